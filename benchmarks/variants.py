"""The benchmark's case (one set of weights and inputs) and its variants.

Roles, so that ratios mean the same whatever is installed:
  a  baseline eager          diffusers' UNet2DConditionModel, eager (our own eager model when diffusers
                             is not installed, e.g. on the GPU machine; the label says so)
  b  baseline + recipe       the best public torch.compile recipe for the device applied to the baseline
  c  ours eager              compiled_unet.UNet2DConditionModel, eager
  d  ours compiled           compiled_unet.compile(...) for each backend / runtime
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable

import torch

from .measure import Forward, sync

# The public recipes, recorded verbatim in every JSON record.
# CPU: what issue 6 measured as the best torch.compile setting on this machine (1.66x over eager).
# CUDA: the "diffusion fast" recipe (pytorch.org blog "Accelerating Generative AI Part III: Diffusion, Fast";
# huggingface/diffusion-fast): bf16, SDPA, channels_last, fused QKV, max-autotune (CUDA graphs included),
# and these Inductor flags.
RECIPES = {
    "cpu": dict(mode=None, fullgraph=True, channels_last=True, fuse_qkv=False, inductor_config={"freezing": True}),
    "cuda": dict(mode="max-autotune", fullgraph=True, channels_last=True, fuse_qkv=True,
                 inductor_config={"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                                  "epilogue_fusion": False, "coordinate_descent_check_all_directions": True}),
}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclasses.dataclass
class Case:
    """One UNet structure with seeded random weights, on one device and dtype, and its inputs."""
    preset: str
    size: int
    batch: int
    device: torch.device
    dtype: torch.dtype
    ours: torch.nn.Module            # compiled_unet.UNet2DConditionModel
    base: torch.nn.Module            # diffusers' UNet2DConditionModel, or `ours` without diffusers
    baseline: str                    # what role a/b run on, in words
    has_diffusers: bool
    sample: torch.Tensor
    timestep: torch.Tensor
    kwargs: dict
    ref: torch.Tensor | None         # fp32 output of the baseline model (the error reference)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.preset} {self.size}x{self.size} batch {self.batch} {dtype} {self.device.type}"


def _to(tree, device, dtype):
    """Move tensors to `device`; floating-point ones also to `dtype` (unless None)."""
    if torch.is_tensor(tree):
        return tree.to(device, dtype) if dtype is not None and tree.is_floating_point() else tree.to(device)
    if isinstance(tree, dict):
        return {k: _to(v, device, dtype) for k, v in tree.items()}
    return tree


def diffusers_twin(ours: torch.nn.Module, config: dict) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with the same config, sharing our weights' storage."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its `.to(dtype)` advice is about from_pretrained
    with torch.device("meta"):
        twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(ours.state_dict(), assign=True, strict=True)
    left = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers twin has tensors outside the state_dict: {left[:5]}")
    return twin.eval()


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are new Parameter objects on the same storage: layout changes
    (`.to(memory_format=...)`), QKV fusion or compilation of the copy never touch the original."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def diffusers_available(wanted: bool = True) -> bool:
    """Whether `build_case(use_diffusers=wanted)` will have diffusers' model as the baseline."""
    if not wanted:
        return False
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def build_case(preset: str, size: int | None, batch: int, device: torch.device, dtype: torch.dtype,
               use_diffusers: bool = True, reference: bool = True, log: Callable[[str], None] = print) -> Case:
    from compiled_unet.presets import build_random, example_inputs
    from compiled_unet.presets import preset as get_preset

    p = get_preset(preset)
    size = size or p.latent_size
    t0 = time.perf_counter()
    ours = build_random(preset)                                   # fp32, CPU, seeded
    sample, timestep, kwargs = example_inputs(preset, batch=batch, latent_size=size)
    has_diffusers = diffusers_available(use_diffusers)
    why = "not requested" if not use_diffusers else "diffusers not installed"
    if use_diffusers and not has_diffusers:
        log("diffusers is not installed: the baseline is our own eager model (roles a and b)")
    if has_diffusers:
        import diffusers

        base, baseline = diffusers_twin(ours, p.config), f"diffusers {diffusers.__version__}"
    else:
        base, baseline = ours, f"ours eager ({why})"
    log(f"built {preset}: {sum(t.numel() for t in ours.parameters()) / 1e6:.1f} M parameters "
        f"({time.perf_counter() - t0:.1f} s)")
    ref = None
    if reference:
        # The error reference: the baseline model in float32 on the device, TF32 off.
        base.to(device)
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                ref = base(sample.to(device), timestep.to(device), **_to(kwargs, device, None),
                           return_dict=False)[0].float().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    ours.to(device, dtype)
    if base is not ours:
        base.to(device, dtype)
    return Case(preset, size, batch, device, dtype, ours, base, baseline, has_diffusers,
                sample.to(device, dtype), timestep.to(device), _to(kwargs, device, dtype), ref)


@dataclasses.dataclass
class Built:
    name: str
    role: str                       # a, b, c, d (see the module docstring)
    label: str
    fn: Forward | None = None
    first_call_s: float | None = None   # in this process: compile (export, passes) + first forward
    load_s: float | None = None         # AOT: loading the package
    options: dict = dataclasses.field(default_factory=dict)
    artifact: str | None = None         # AOT: the package path (kept for load probes)
    keep: Any = None                    # objects that must outlive the run (temporary directories)


def _backend_available(name: str) -> bool:
    """A backend module may define `available()` (e.g. XLA, which needs its own environment)."""
    import importlib

    try:
        module = importlib.import_module(f"compiled_unet.backends.{name}")
    except ImportError:
        return False
    return bool(getattr(module, "available", lambda: True)())


def _ours_compiled(only_available: bool = False) -> list[str]:
    """One variant per compiled_unet backend (`ours-<backend>`), plus the AOTInductor runtime."""
    from compiled_unet.backends import BACKENDS

    names = [b for b in BACKENDS if not only_available or _backend_available(b)]
    return [f"ours-{b}" for b in names] + (["ours-aot"] if "inductor" in names else [])


def aliases() -> dict[str, str]:
    """Every accepted variant name -> its role."""
    out = {"eager": "a", "diffusers-eager": "a", "torch-eager": "a", "recipe": "b", "diffusers-compile": "b",
           "torch-compile": "b", "ours-eager": "c"}
    return {**out, **{n: "d" for n in _ours_compiled()}}


def variant_names(case_has_diffusers: bool, device: torch.device, everything: bool = False) -> list[str]:
    """The variants for this device, in table order. By default: only backends available here, and no AOT
    package on CUDA (compile budget); `everything`: every name that may be requested."""
    a, b = ("diffusers-eager", "diffusers-compile") if case_has_diffusers else ("torch-eager", "torch-compile")
    ours = [n for n in _ours_compiled(only_available=not everything)
            if everything or device.type == "cpu" or n != "ours-aot"]
    return [a, b] + (["ours-eager"] if case_has_diffusers else []) + ours


def resolve_names(requested: list[str] | None, case_has_diffusers: bool, device: torch.device) -> list[str]:
    """Map requested names (either spelling of the baselines, or 'eager'/'recipe') to this case's names."""
    if not requested:
        return variant_names(case_has_diffusers, device)
    available = variant_names(case_has_diffusers, device, everything=True)
    roles = aliases()
    by_role = {"a": available[0], "b": available[1]}
    out = []
    for name in requested:
        if name not in roles:
            raise ValueError(f"unknown variant {name!r}; expected some of {sorted(roles)}")
        real = by_role.get(roles[name], name)
        if real == "ours-eager" and not case_has_diffusers:
            continue  # the same model as torch-eager
        if real not in out:
            out.append(real)
    return sorted(out, key=available.index)


def ours_options(device: torch.device, overrides: dict | None = None):
    """compiled_unet's InductorOptions for the benchmark: the library's per-device defaults, plus
    autotuning and CUDA graphs on GPU (the named GPU options of InductorOptions), plus overrides."""
    from compiled_unet.backends import InductorOptions

    fields = dict(max_autotune=True, cudagraphs=True) if device.type == "cuda" else {}
    fields.update(overrides or {})
    return InductorOptions(**fields)


def _no_recompile():
    import contextlib

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("fail_on_recompile") if stance else contextlib.nullcontext()


def _timed_first(fn: Forward, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    sync(device)
    return time.perf_counter() - t0


def recipe_for(device: torch.device, mode: str | None = None, config: dict | None = None) -> dict:
    """The device's recipe; `mode` replaces its torch.compile mode ("default" = None), `config` entries are
    merged over its Inductor config."""
    recipe = dict(RECIPES["cuda" if device.type == "cuda" else "cpu"])
    if mode is not None:
        recipe["mode"] = None if mode == "default" else mode
    if config:
        recipe["inductor_config"] = {**recipe["inductor_config"], **config}
    return recipe


AOT_LABEL = "ours compiled (Inductor, AOT package)"


def build(name: str, case: Case, overrides: dict | None = None, recipe_mode: str | None = None,
          package: str | None = None, recipe_config: dict | None = None) -> Built:
    """Build one variant; compiled ones are compiled (and run once) here. `package`: for ours-aot, load this
    saved `.pt2` instead of compiling (what a server does; first_call_s is then load + first forward)."""
    x, t, kw = case.sample, case.timestep, case.kwargs
    dev = case.device
    if name == "ours-aot" and package is not None:
        import compiled_unet

        t0 = time.perf_counter()
        loaded = compiled_unet.load(package)
        load_s = time.perf_counter() - t0

        def fn():
            return loaded(x, t, **kw, return_dict=False)[0]

        built = Built(name, "d", AOT_LABEL, fn, load_s,
                      load_s=load_s, options=dataclasses.asdict(loaded.options), artifact=package, keep=loaded)
        built.first_call_s += _timed_first(fn, dev)
        return built
    cudagraph_step = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    if name in ("diffusers-eager", "torch-eager"):
        model = case.base
        return Built(name, "a", "diffusers eager" if case.has_diffusers else "ours eager (no diffusers)",
                     lambda: model(x, t, **kw, return_dict=False)[0])
    if name == "ours-eager":
        model = case.ours
        return Built(name, "c", "ours eager", lambda: model(x, t, **kw, return_dict=False)[0])
    if name in ("diffusers-compile", "torch-compile"):
        recipe = recipe_for(dev, recipe_mode, recipe_config)
        model = shared_copy(case.base)
        if recipe["fuse_qkv"]:
            model.fuse_qkv_projections()
        xin = x
        if recipe["channels_last"]:
            model.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        compiled = torch.compile(model, mode=recipe["mode"], fullgraph=recipe["fullgraph"])
        graphs = recipe["mode"] in ("max-autotune", "reduce-overhead")

        def fn():
            if graphs:
                cudagraph_step()
            with _no_recompile():
                return compiled(xin, t, **kw, return_dict=False)[0]

        def first():
            if graphs:
                cudagraph_step()
            return compiled(xin, t, **kw, return_dict=False)[0]

        with torch._inductor.config.patch(recipe["inductor_config"]):
            first_s = _timed_first(first, dev)
        what = "diffusers" if case.has_diffusers else "ours eager (no diffusers)"
        return Built(name, "b", f"{what} + torch.compile recipe", fn, first_s, options=dict(recipe))
    if name in _ours_compiled():
        import compiled_unet

        backend = "inductor" if name == "ours-aot" else name.removeprefix("ours-")
        opts = ours_options(dev, overrides) if backend == "inductor" else None
        if name == "ours-aot":
            opts = dataclasses.replace(opts, aot=True, channels_last=None, cudagraphs=False)
        model = shared_copy(case.ours)
        sync(dev)
        t0 = time.perf_counter()
        compiled = compiled_unet.compile(model, x, t, backend=backend, options=opts, **kw)
        sync(dev)
        first_s = time.perf_counter() - t0
        graphs = bool(getattr(compiled.options, "cudagraphs", False))

        def fn():
            if graphs:
                cudagraph_step()
            return compiled(x, t, **kw, return_dict=False)[0]

        resolved = dataclasses.asdict(compiled.options) if dataclasses.is_dataclass(compiled.options) else {}
        label = AOT_LABEL if name == "ours-aot" else f"ours compiled ({backend})"
        built = Built(name, "d", label, fn, first_s, options=resolved, keep=compiled)
        # compiled_unet.compile returns before any forward (jit and AOT alike), while torch.compile compiles
        # inside its first call: time to the first output is compile + first forward for every variant.
        built.first_call_s += _timed_first(fn, dev)
        if name == "ours-aot":
            built.load_s = getattr(compiled._runner, "load_seconds", None)
        return built
    raise ValueError(f"unknown variant {name!r}")
