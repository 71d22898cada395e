"""`compile`: a UNet (ours, diffusers' or an ExportedProgram) -> export -> passes -> a backend's runner,
behind `CompiledUNet` (compiled_unet/runtime). Saving and loading: compiled_unet/runtime/artifacts.py.

    compiled = compiled_unet.compile(unet, sample, t, text)           # CompiledUNet, forward like the UNet's
    pipe.unet = compiled                                              # answers what pipelines read
    compiled_unet.save(compiled, "unet.pt2")                          # AOTInductor package, atomic
    loaded = compiled_unet.load("unet.pt2")                           # no model source needed
    loaded.swap_weights(compiled.derive_weights(new_unet.state_dict()))   # new weights, no recompile

A compiled UNet serves exactly the shapes it was compiled for: any other shape, dtype or set of optional
inputs is a ValueError naming what it expects (never a silent recompile). The timestep is compiled as a
float32 tensor of shape [batch] whatever the example's type, so fractional timesteps are exact.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Sequence

import torch
from torch.export import ExportedProgram

from . import passes as graph_passes
from .backends import AotRunner, InductorOptions, JitRunner, check_backend, package_cache
from .backends.vec_isa import start_probe as start_simd_probe
from .progress import CompileProgress, count_cpp_kernels
from .runtime.compiled import FREEU_INPUT, CompiledUNet, artifact_doc, config_to_dict, report_from_doc
from .runtime.signature import Signature
# Kept importable from here (older code and tests): saving and loading live in runtime/artifacts.py.
from .runtime.artifacts import load, save  # noqa: F401

log = logging.getLogger("compiled_unet")


def run_passes(ep: ExportedProgram, passes_list: Sequence | None, donate_weights: bool = False):
    """(optimized program, PassReport | None)."""
    if passes_list is None:
        return ep, None
    return graph_passes.optimize(ep, list(passes_list), graph_passes.OptimizeConfig(donate_weights=donate_weights))


def _float_timestep(timestep, sample: torch.Tensor) -> torch.Tensor:
    """The example timestep as the graph takes it: float32 [batch] (integers convert exactly)."""
    t = torch.as_tensor(timestep, device=sample.device)
    if t.numel() == 1:
        t = t.reshape(()).expand(sample.shape[0])
    return t.to(torch.float32).clone(memory_format=torch.contiguous_format)


def compile(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None, *,
            backend: str = "inductor", passes: str | Sequence | None = "default",
            options: InductorOptions | None = None, config=None, check_finite: bool = False,
            progress: bool | CompileProgress | None = None, cache_dir: str | os.PathLike | None = None,
            donate_weights: bool = False, export_cache: bool = True, **forward_kwargs) -> CompiledUNet:
    """Export `unet` on these example inputs, run the graph passes, compile with `backend`.

    unet: `compiled_unet.UNet2DConditionModel`, diffusers' `UNet2DConditionModel`, or an ExportedProgram of
        either (exported with these inputs; pass `config=` to give it a `.config`).
    passes: "default" (`passes.default_passes(device)`: DEFAULT_PASSES, plus CPU_PASSES for Inductor on CPU),
        None (no passes) or a list of pass functions.
    options: InductorOptions (None: per-device defaults). With `prepack_weights` (the float32 CPU jit default)
        `passes.prepack_onednn` is appended to the pass list.
    check_finite: every call raises, naming the input, if a floating input holds NaN or inf.
    progress: a status line on stderr (stage, C++ kernels done/total, elapsed): None = when stderr is a
        terminal (and COMPILED_UNET_PROGRESS is not 0), True/False, or a CompileProgress. The stage timings
        are kept as `compiled.compile_stages` either way.
    cache_dir: Inductor's cache folder while compiling (FX graphs, AOTAutograd entries, C++ kernels), instead of
        TORCHINDUCTOR_CACHE_DIR. A second compile of the same UNet structure, shapes and options with the same
        folder is warm (SD1.5 32x32 on CPU: 21 s instead of 120 s; weights are inputs, so other weights hit
        too). Copied to another machine with the same torch version and CPU ISA, the folder makes the compile
        there warm as well; anything that differs (torch, ISA, compiler flags) is part of Inductor's keys and
        simply misses (a cold compile, never a wrong kernel). AOT packages are kept there too
        (backends/package_cache.py), keyed before the passes by the exported program and its weights' bytes,
        the passes, the options and the library's source: the same UNet, weights and options again skips the
        passes and the lowering and loads the kept package (SD1.5 32x32: ~1 s to key, then the load).
    donate_weights: the caller gives up `unet`: each parameter's memory is freed as soon as the passes stop
        reading it (the float32 CPU jit default packs every convolution and linear weight, so the compile then
        holds ~1x the weights instead of the model's copy plus the packed one: SD1.5 32x32, benchmarks/NOTES.md).
        `unet` cannot run afterwards (calling it raises, naming this argument); `derive_weights` and
        `swap_weights` still work (they need only the weights' shapes). A frozen package (the same program as
        without donating) frees its convolution weights as the passes pack them, every other weight the library
        does not keep before AOTInductor serialises its constants, and the rest once the package is written; its
        peak is AOTInductor's one buffer of all constants beside the packed weights (SD1.5: 2.05x the weights).
    export_cache: our UNet's exported graph is kept beside Inductor's cache (compiled_unet/export_cache.py) and a
        later compile of the same UNet (classes, attributes, processors, shapes, library and torch versions) on
        the same inputs reads it instead of exporting again (SD1.5: 0.26 s instead of 1.8 s). A UNet the key
        cannot describe (hooks, classes or methods from elsewhere, unknown attribute types; diffusers' UNet) is
        always exported. False (or COMPILED_UNET_EXPORT_CACHE=0): always export, e.g. in a process that replaces
        torch's own functions.
    With FreeU enabled on our UNet, its scales become graph inputs: the compiled UNet's `enable_freeu` /
    `disable_freeu` then change them without a recompile.
    """
    check_backend(backend)
    if backend == "xla" and options is not None:
        raise ValueError("options are InductorOptions; the xla backend takes none (leave options=None)")
    options = InductorOptions() if options is None else options
    if not isinstance(options, InductorOptions):
        raise TypeError(f"options must be InductorOptions, got {type(options).__name__}")
    if not (passes is None or passes == "default" or isinstance(passes, (list, tuple))):
        raise ValueError(f"passes must be 'default', None or a list of passes, got {passes!r}")
    if not isinstance(donate_weights, bool):
        raise TypeError(f"donate_weights must be True or False, got {donate_weights!r}")
    if not isinstance(export_cache, bool):
        raise TypeError(f"export_cache must be True or False, got {export_cache!r}")
    if not torch.is_tensor(sample) or sample.ndim != 4:
        raise ValueError(f"sample: expected a 4-D tensor [batch, channels, height, width] as the example input, "
                         f"got {type(sample).__name__ if not torch.is_tensor(sample) else tuple(sample.shape)}")
    forward_kwargs.pop("return_dict", None)
    if backend == "inductor":
        options = options.resolve(sample.device, sample.dtype)
    if passes == "default":
        # CPU Inductor adds CPU_PASSES (linear layers as oneDNN 1x1 convolutions); XLA and CUDA do not.
        passes = graph_passes.DEFAULT_PASSES if backend == "xla" else graph_passes.default_passes(sample.device)
        if backend == "inductor" and options.linear_kernel == "mkl":
            # Linears stay linears: MKL's packed GEMM, packed by a pass in the jit graph, by freezing in a package.
            passes = [p for p in passes if p is not graph_passes.linear_to_conv1x1]
            passes += [graph_passes.prepack_mkl_linear] if options.prepack_weights else []
    passes = None if passes is None else list(passes)
    if backend == "inductor" and options.prepack_weights and graph_passes.prepack_onednn not in (passes or []):
        passes = (passes or []) + [graph_passes.prepack_onednn]  # last: nothing may run on packed weights
    elif (backend == "inductor" and options.aot and options.freezing and passes is not None
          and sample.device.type == "cpu" and sample.dtype == torch.float32 and torch.backends.mkldnn.is_available()):
        # A package freezes its weights; the passes pack the convolutions (freezing keeps the packed ones, as in the
        # program `save` packages for a jit graph), so that donated weights are freed one by one as they are packed
        # (freezing's own packing, with its channels-last copies, peaked at 2.65x the weights donated, 2.05x this
        # way), and a donated compile is the same program as a plain one (one package-cache entry for both).
        # Linears left to MKL are packed by freezing.
        passes = passes + [graph_passes.prepack_onednn]

    if not isinstance(progress, CompileProgress):
        progress = CompileProgress(enabled=progress)
    try:
        with _inductor_cache_dir(cache_dir):
            if backend == "inductor" and sample.device.type == "cpu":
                start_simd_probe()   # a first process's probe of the CPU's SIMD ISAs overlaps export and passes
            compiled = _compile_stages(unet, sample, timestep, encoder_hidden_states, forward_kwargs,
                                       backend=backend, passes=passes, options=options, config=config,
                                       check_finite=check_finite, progress=progress, donate_weights=donate_weights,
                                       use_export_cache=export_cache)
    finally:
        progress.close()
        if donate_weights and isinstance(unet, torch.nn.Module):
            _mark_donated(unet)  # also when the compile failed: the passes may have freed weights already
    compiled.compile_stages = dict(progress.stages)
    return compiled


def _mark_donated(unet: torch.nn.Module) -> None:
    """A UNet whose weights `compile(..., donate_weights=True)` freed refuses to run (instead of reading freed
    memory)."""
    def refuse(module, args, kwargs):
        raise RuntimeError(f"this {type(module).__name__} gave its weights to compiled_unet.compile(..., "
                           f"donate_weights=True) and cannot run; call the compiled UNet instead")

    unet.register_forward_pre_hook(refuse, prepend=True, with_kwargs=True)


def _compile_stages(unet, sample, timestep, encoder_hidden_states, forward_kwargs, *, backend, passes, options,
                    config, check_finite, progress: CompileProgress, donate_weights: bool,
                    use_export_cache: bool = True) -> CompiledUNet:
    """export -> passes -> lowering, each a timed stage of `progress`."""
    freeu = None
    if isinstance(unet, ExportedProgram):
        exported = unet
    else:
        timestep = _float_timestep(timestep, sample)
        with progress.stage("export"):
            exported, freeu = _export_with_freeu_inputs(
                unet, sample, timestep, {"encoder_hidden_states": encoder_hidden_states, **forward_kwargs},
                use_cache=use_export_cache)
        config = unet.config if config is None else config
    config_dict = config_to_dict(config)
    key = cached = None
    if backend == "inductor" and options.aot:
        # The package cache is keyed before the passes: a hit skips them (on CPU they pack every weight) too.
        with progress.stage("package cache"):
            key, cached = AotRunner.cached_package(exported, passes, options, artifact_doc_of_caller(config_dict, freeu))
        if cached is not None and options.freezing:  # nothing to keep for swapping weights: the package is all
            compiled = _from_cached_package(key, cached, exported, passes, config_dict, freeu, check_finite,
                                            progress, donate_weights)
            if compiled is not None:
                return compiled
            cached = None
    with progress.stage("passes"):
        optimized, report = run_passes(exported, passes, donate_weights)
    signature = Signature.from_program(optimized)
    args, kwargs = signature.bind(*optimized.example_inputs[0], **optimized.example_inputs[1])
    fused = None if report is None else report.rewrites.get("fuse_qkv", 0) > 0
    with progress.stage("lowering"), count_cpp_kernels(progress):
        if backend == "xla":
            from .backends.xla import OpenXlaRunner

            runner = OpenXlaRunner(optimized, args, kwargs)
        elif options.aot:
            params = [optimized.state_dict[n] for n in optimized.graph_signature.parameters]
            # the caller's weights still alive (a pass-made parameter, e.g. a fused QKV weight, is nobody's model)
            given = _storage_bytes(exported.state_dict[n] for n in exported.graph_signature.parameters)
            held = {ptr: n for ptr, n in _storage_bytes(params).items() if ptr in given}
            doc = artifact_doc(signature, config_dict, freeu, fused, report)
            package = cached or AotRunner.write_package(optimized, options, doc, donate_weights, cache_key=key)
            if options.freezing:
                # A frozen package's weights cannot be swapped, so nothing needs the programs past this point;
                # dropped before the load, which copies the packed weights out of the library: with donated
                # weights the optimized program holds packed ones (SD1.5: 2.6 GB, kept twice otherwise).
                if donate_weights:  # the package holds them all now: the rest of the donated parameters go too
                    for p in params:
                        graph_passes.free_storage(p)
                    if report is not None:  # what this compile freed past the passes (freezing's, then these)
                        left = _storage_bytes(params)
                        report.donated_bytes += sum(n - left.get(ptr, 0) for ptr, n in held.items())
                exported = optimized = None
            del params
            runner = AotRunner.load_package(package)
        else:
            runner = JitRunner(optimized, options, args, kwargs)
    return CompiledUNet(runner, signature, config_dict, exported=_weights_as_meta(exported), optimized=optimized,
                        passes=passes, report=report, freeu=freeu, fused_qkv=fused, check_finite=check_finite)


def artifact_doc_of_caller(config_dict: dict | None, freeu) -> dict:
    """The part of a package's artifact document that comes from the caller, not from the passes' program."""
    return {"config": config_dict, "freeu": None if freeu is None else dict(freeu)}


def _from_cached_package(key: str, cached, exported: ExportedProgram, passes, config_dict, freeu,
                         check_finite: bool, progress: CompileProgress, donate_weights: bool) -> CompiledUNet | None:
    """A CompiledUNet of the frozen package an earlier compile of the same program, passes and options made;
    the passes did not run, so its report is the one that compile recorded in the package. None (the entry
    removed) when the package's document is unreadable: the caller compiles."""
    doc = cached[1]
    try:
        signature, report = Signature.from_json(doc["signature"]), report_from_doc(doc)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("compiled_unet: cached package %s has an unreadable document (%s); compiling again", key, e)
        cached[2].cleanup()
        package_cache.discard(key)
        return None
    if donate_weights:  # given up, and the package holds every weight: freed as a compile would free them
        params = [exported.state_dict[n] for n in exported.graph_signature.parameters]
        before = _storage_bytes(params)
        for p in params:
            graph_passes.free_storage(p)
        if report is not None:
            left = _storage_bytes(params)
            report.donated_bytes = sum(n - left.get(ptr, 0) for ptr, n in before.items())
    with progress.stage("loading"):
        runner = AotRunner.load_package(cached)
    return CompiledUNet(runner, signature, config_dict, exported=_weights_as_meta(exported), passes=passes,
                        report=report, freeu=freeu, fused_qkv=doc.get("fused_qkv"), check_finite=check_finite)


def _weights_as_meta(ep: ExportedProgram | None) -> ExportedProgram | None:
    """`ep` with every state_dict tensor replaced by a meta tensor of its shape and dtype: what `derive_weights`
    reads of the exported program (names, shapes, dtypes, the graph; the new weights come with the call).
    Why: the exported program's state_dict holds the caller's parameters, and the compiled graph runs on packed
    copies of most of them; keeping the originals here made `pipe.unet = compile(pipe.unet)` hold the weights twice
    after the old UNet was dropped (SD1.5 CPU jit: 7.25 GB instead of 4.0, benchmarks/NOTES.md). A caller who keeps
    the model keeps its weights; the compiled UNet no longer does."""
    if ep is None:
        return None
    return graph_passes.with_weights(ep, {k: torch.empty_like(v, device="meta") for k, v in ep.state_dict.items()
                                          if isinstance(v, torch.Tensor)})


def _storage_bytes(tensors) -> dict[int, int]:
    """{storage address: bytes} of the plain tensors among `tensors`, each storage once."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if not t.is_mkldnn and t.layout == torch.strided and t.untyped_storage().nbytes()}


def _inductor_cache_dir(folder):
    """Inductor's cache in `folder` while compiling (torch's own context manager, which also drops the
    in-memory caches that remember the previous folder's entries); nothing when `folder` is None."""
    if folder is None:
        return contextlib.nullcontext()
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    return temporary_cache_dir(folder)


FREEU_BUFFER = re.compile(r"up_blocks\.(\d+)\.freeu\.([bs])")


def _export_with_freeu_inputs(unet, sample, timestep, kwargs, use_cache: bool = True
                              ) -> tuple[ExportedProgram, dict[str, float] | None]:
    """Export; FreeU's scale buffers (`up_blocks.<i>.freeu.b|s`, our UNet with FreeU enabled) become a graph
    input `freeu_scales` (a tuple), so that no pass and no freezing folds them into constants and a compiled
    UNet changes them per call. Returns (program, {buffer name: current value} in input order); the map is
    None when the UNet has no FreeU tensors (diffusers' UNet keeps its FreeU scales as Python floats).
    With `use_cache`, the graph comes from export_cache when this UNet was exported the same way before."""
    from .export import export

    buffers = dict(unet.named_buffers())
    names = sorted((n for n in buffers if FREEU_BUFFER.fullmatch(n)), key=lambda n: (int(n.split(".")[1]), n))
    if not names:
        return _cached(unet, sample, timestep, kwargs, use_cache, lambda: export(unet, sample, timestep, **kwargs)), None
    owners = [(unet.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
    plain_forward = unet.forward

    def forward(sample, timestep, *args, freeu_scales, **kw):  # freeu_scales: FREEU_INPUT
        # While tracing, the scale inputs stand in for the buffers: the graph reads the inputs instead.
        saved = [owner._buffers[attr] for owner, attr in owners]
        for (owner, attr), t in zip(owners, freeu_scales):
            owner._buffers[attr] = t
        try:
            return plain_forward(sample, timestep, *args, **kw)
        finally:
            for (owner, attr), t in zip(owners, saved):
                owner._buffers[attr] = t

    def export_with_scale_inputs():
        unet.forward = forward
        try:
            return export(unet, sample, timestep, **kwargs, **{FREEU_INPUT: scales})
        finally:
            del unet.forward

    scales = tuple(buffers[n].detach().clone() for n in names)
    program = _cached(unet, sample, timestep, {**kwargs, FREEU_INPUT: scales}, use_cache, export_with_scale_inputs)
    return program, {n: float(buffers[n]) for n in names}


def _cached(unet, sample, timestep, kwargs, use_cache: bool, export_now) -> ExportedProgram:
    """`export_now()`, or the same graph from export_cache (keyed before `export_now` patches anything)."""
    from . import export_cache
    from .export import UNetProgram, export_inputs

    args, kw = export_inputs(sample, timestep, **kwargs)
    key = export_cache.key(unet, args, kw) if use_cache else None
    program = export_cache.load(key, unet, args, kw)
    if program is not None:
        return UNetProgram.wrap(program)
    program = export_now()
    export_cache.store(key, program)
    return program
