"""`CompiledUNet`: a compiled UNet graph (any backend's runner) behind the UNet's forward, a drop-in `pipe.unet`.

What pipelines read from `pipe.unet` comes from a weightless skeleton: the UNet built from the compiled
config on the `meta` device (no weights in memory twice), to which module attributes are delegated
(`add_embedding.linear_1.in_features`, `encoder_hid_proj`, `down_blocks`, `attn_processors`, ...).
Methods that would change the compiled graph either work on it (`enable_freeu` / `disable_freeu` when the
UNet was compiled with FreeU: the scales are graph inputs; `fuse_qkv_projections` when the passes fused
them already) or raise one error saying what to do.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..config import UNetConfig
from ..unet import UNet2DConditionModel, UNet2DConditionOutput
from .signature import Signature, dtype_name

# Module attributes pipelines read from `pipe.unet`, answered by the meta skeleton (diffusers 0.42's
# pipelines read these; weights are never re-exposed: the skeleton's tensors are on `meta`).
SKELETON_ATTRIBUTES = frozenset({
    "add_embedding", "add_time_proj", "attn_processors", "class_embedding", "conv_in", "conv_norm_out", "conv_out",
    "down_blocks", "encoder_hid_proj", "mid_block", "num_upsamplers", "position_net", "sample_size",
    "time_embedding", "time_proj", "up_blocks",
})
FREEU_INPUT = "freeu_scales"


class ConfigView:
    """Read-only attribute and item view of a config dict that is not a UNetConfig (e.g. from another version)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)

    def get(self, key, default=None):
        return self.__dict__.get(key, default)

    def __getitem__(self, key):
        return self.__dict__[key]

    def __contains__(self, key):
        return key in self.__dict__

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def config_from_dict(d: dict | None):
    if d is None:
        return None
    try:
        return UNetConfig.from_dict(d)
    except (TypeError, ValueError):
        return ConfigView(d)


def config_to_dict(config) -> dict | None:
    if config is None:
        return None
    if isinstance(config, UNetConfig):
        return config.to_dict()
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _same_tensor(a: torch.Tensor, b) -> bool:
    """Equal shape, dtype and values (oneDNN-packed tensors, layout torch._mkldnn, compared unpacked)."""
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or a.is_mkldnn != b.is_mkldnn:
        return False
    return torch.equal(a.to_dense(), b.to_dense()) if a.is_mkldnn else torch.equal(a, b)


class CompiledUNet(torch.nn.Module):
    """A compiled UNet graph behind the UNet's forward signature and output type; see the module docstring.

    Holds no parameters of its own. `.to()` / `.eval()` with the compiled device and dtype are no-ops; any
    other device or dtype is an error (a compiled graph runs where it was compiled).
    `check_finite=True` makes every call raise, naming the input, when a floating input holds NaN or inf
    (off by default: like eager, NaN/inf inputs then propagate into the output).
    """

    def __init__(self, runner, signature: Signature, config: dict | None = None, *, exported=None, optimized=None,
                 passes: Any = None, report=None, freeu: Mapping[str, float] | None = None,
                 fused_qkv: bool | None = None, check_finite: bool = False):
        super().__init__()
        self._runner = runner
        self.signature = signature
        self._config_dict = config
        self.config = config_from_dict(config)
        self.report = report                   # passes.PassReport (None: passes=None, or loaded jit/XLA saves)
        self.check_finite = check_finite
        self._exported, self._optimized, self._passes = exported, optimized, passes
        self.fused_qkv = fused_qkv             # True when the graph's attention projections are fused
        self.compile_stages: dict[str, float] = {}   # stage -> seconds, set by compile() (empty when loaded)
        n_inputs = sum(x.name.startswith(FREEU_INPUT) for x in signature.leaves)
        if len(freeu or {}) != n_inputs:
            raise ValueError(f"FreeU scales {sorted(freeu or {})} do not match the graph's {n_inputs} scale inputs")
        # FreeU buffer name ("up_blocks.0.freeu.b") -> float32 tensor on the compiled device, in graph input order
        self._freeu = ({k: torch.tensor(float(v), device=self.device) for k, v in freeu.items()}
                       if n_inputs else None)
        self._skeleton_cache = None

    # ----- what pipelines read
    @property
    def options(self):
        return self._runner.options

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.signature.leaves[0].dtype)

    @property
    def device(self) -> torch.device:
        return torch.device(self.signature.device)

    @property
    def in_channels(self) -> int:
        return self.signature.leaves[0].shape[1]

    @property
    def compile_seconds(self) -> float | None:
        return self._runner.compile_seconds

    @property
    def _skeleton(self) -> UNet2DConditionModel:
        if self._skeleton_cache is None:
            if not isinstance(self.config, UNetConfig):
                raise AttributeError("this compiled UNet carries no UNet config, so it cannot answer module "
                                     "attributes (compile with config=unet.config)")
            with torch.device("meta"):
                self.__dict__["_skeleton_cache"] = UNet2DConditionModel.from_config(self.config).to(self.dtype)
        return self._skeleton_cache

    def __getattr__(self, name: str):
        if name in SKELETON_ATTRIBUTES:
            return getattr(self._skeleton, name)
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{self._runner.kind}, {self.signature.describe()}"

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if (device is not None and torch.device(device).type != self.device.type) or (
                dtype is not None and dtype != self.dtype):
            raise ValueError(f"this UNet was compiled for {self.device} {dtype_name(self.dtype)}; it cannot move to "
                             f"{device or self.device} {dtype_name(dtype or self.dtype)}. Compile it again there")
        return self

    # ----- calling
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                class_labels=None, timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        args, kwargs = self.bind(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
            timestep_cond=timestep_cond, attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
            encoder_attention_mask=encoder_attention_mask)
        out = self._runner(*self._runner.prepare(args, kwargs))
        return UNet2DConditionOutput(sample=out[0]) if return_dict else tuple(out)

    def bind(self, *args, **kwargs) -> tuple[tuple, dict]:
        """A call checked against the compiled signature, in the graph's structure (FreeU scales added)."""
        kwargs.pop("return_dict", None)
        if self._freeu is not None:
            kwargs[FREEU_INPUT] = tuple(self._freeu.values())
        return self.signature.bind(*args, check_finite=self.check_finite, **kwargs)

    def accepts(self, *args, **kwargs) -> bool:
        try:
            self.bind(*args, **kwargs)
        except (ValueError, TypeError):
            return False
        return True

    # ----- methods pipelines call on pipe.unet
    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """New FreeU scales for the compiled graph (no recompile): needs a UNet compiled with FreeU enabled."""
        if self._freeu is None:
            raise RuntimeError("this compiled UNet has no FreeU in its graph: call unet.enable_freeu(...) on the "
                               "compiled_unet.UNet2DConditionModel before compiling (any scales), then the compiled "
                               "UNet's enable_freeu/disable_freeu change them without a recompile")
        stages = {0: {"b": b1, "s": s1}, 1: {"b": b2, "s": s2}}
        for name in self._freeu:
            block, kind = _freeu_stage(name)
            self._freeu[name].fill_(float(stages.get(block, {"b": 1.0, "s": 1.0})[kind]))

    def disable_freeu(self) -> None:
        """FreeU off: every scale 1, which makes both FreeU operations the identity."""
        if self._freeu is None:
            return  # nothing in the graph: already off
        for t in self._freeu.values():
            t.fill_(1.0)

    @property
    def freeu_scales(self) -> dict[str, float] | None:
        return None if self._freeu is None else {k: float(v) for k, v in self._freeu.items()}

    def fuse_qkv_projections(self) -> None:
        """Fused already when the fuse_qkv pass ran (it does by default); otherwise compile again with it."""
        if not self.fused_qkv:
            raise RuntimeError("this compiled UNet was compiled without the fuse_qkv pass: fuse before compiling "
                               "(unet.fuse_qkv_projections()) or compile with the default passes")

    def unfuse_qkv_projections(self) -> None:
        """Fused and unfused projections compute the same outputs (within float rounding): nothing to change."""

    def set_attn_processor(self, processor) -> None:
        raise RuntimeError("the attention of a compiled UNet is part of its graph: set the processor on the "
                           "UNet (unet.set_attn_processor(...)) and compile again")

    def set_default_attn_processor(self) -> None:
        raise RuntimeError("the attention of a compiled UNet is part of its graph: set the processor on the "
                           "UNet (unet.set_default_attn_processor()) and compile again")

    def set_attention_slice(self, slice_size) -> None:
        raise RuntimeError("attention slicing changes the compiled graph: call unet.set_attention_slice(...) "
                           "before compiling")

    # ----- weights
    def weight_names(self) -> list[str]:
        """The names of the compiled graph's weights (what `swap_weights` takes)."""
        return sorted(self._runner.constant_specs())

    def _check_swappable(self) -> None:
        refusal = self._runner.swap_refusal()
        if refusal:
            raise RuntimeError(refusal)

    def derive_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the original UNet's state_dict to the compiled graph's weights (running the passes' weight
        rewrites, e.g. fused QKV, without compiling). Needs the exported program: in the compiling process."""
        self._check_swappable()
        if self._exported is None:
            raise RuntimeError("derive_weights needs the exported program, which a loaded artifact does not hold; "
                               "derive the weights where the UNet was compiled and pass them to swap_weights")
        from .. import passes as graph_passes

        raw = self._exported
        missing = sorted(set(raw.state_dict) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(raw.state_dict))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the compiled UNet: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        for k, v in raw.state_dict.items():
            got = state_dict[k]
            if not torch.is_tensor(got) or tuple(got.shape) != tuple(v.shape):
                raise ValueError(f"state_dict[{k!r}] is {_describe(got)}, expected a tensor of shape {list(v.shape)}")
        ep = graph_passes.with_weights(raw, {k: state_dict[k].detach().to(v.dtype) for k, v in raw.state_dict.items()})
        optimized = ep if self._passes is None else graph_passes.optimize(ep, list(self._passes))[0]
        if optimized.graph_module.code != self._optimized.graph_module.code:
            raise RuntimeError("the passes rewrote the graph differently for these weights; compile again")
        names = set(self._runner.constant_specs())
        # A constant the passes computed from weights (a folded weight-only subgraph) must follow the new
        # weights; one the compiled graph holds under another name (AOTInductor renames lifted constants)
        # cannot be reached, and leaving it stale would be a silently wrong answer.
        stale = sorted(k for k, v in optimized.constants.items() if k not in names and isinstance(v, torch.Tensor)
                       and not _same_tensor(v, self._optimized.constants.get(k)))
        if stale:
            raise RuntimeError(f"the passes folded these weights into constants the compiled graph holds under "
                               f"internal names: {stale[:5]} ({len(stale)} in all); swapping would leave them "
                               f"stale. Compile again, or without the pass that made them")
        weights = {**optimized.state_dict, **optimized.constants}
        return {k: v.detach() for k, v in weights.items() if k in names}

    def swap_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load new weights into the compiled graph without recompiling.

        `state_dict`: the original UNet's (derived here through the passes; in the compiling process) or the
        compiled graph's own names (`derive_weights` output; works on loaded artifacts too). Every tensor's
        name, shape and dtype is checked before anything is loaded: after a refusal the old weights stay."""
        self._check_swappable()
        if not set(state_dict) <= set(self._runner.constant_specs()) and self._exported is not None:
            state_dict = self.derive_weights(state_dict)
        self.check_weights(state_dict, strict=strict)
        self._runner.load_constants({k: v.detach().to(self.device) for k, v in state_dict.items()})

    def check_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Raise unless `state_dict` (the compiled graph's names) fits: known names, shapes, dtypes, none missing
        when strict."""
        self._check_swappable()
        specs = self._runner.constant_specs()
        unknown = sorted(set(state_dict) - set(specs))
        if unknown:
            raise ValueError(f"not weights of this compiled graph: {unknown[:10]} ({len(unknown)} in all). A loaded "
                             f"artifact takes the compiled graph's names (see weight_names() and derive_weights)")
        missing = sorted(n for n in set(specs) - set(state_dict) if not n.startswith("_"))
        if strict and missing:
            raise ValueError(f"swap_weights(strict=True): missing {missing[:10]} ({len(missing)} in all)")
        packed = getattr(self._runner, "packed_weight_names", set)()
        for name, value in state_dict.items():
            shape, dtype = specs[name]
            if not torch.is_tensor(value) or list(value.shape) != list(shape) or dtype_name(value.dtype) != dtype:
                raise ValueError(f"swap_weights: {name!r} is {_describe(value)}; the compiled graph holds "
                                 f"{shape} {dtype}")
            if name in packed and not value.is_mkldnn:
                raise ValueError(f"swap_weights: {name!r} is a oneDNN-packed weight of the compiled graph; pass the "
                                 f"UNet's own state_dict (or derive_weights' output), which packs it")
            if name not in packed and (value.is_mkldnn or value.layout != torch.strided):
                raise ValueError(f"swap_weights: {name!r} must be a dense (strided) tensor")

    # ----- artifacts
    def artifact_doc(self) -> dict:
        """What an artifact of this UNet records besides the compiled code (format-independent part)."""
        # No pass report here: a jit graph saves as a package of another program (its packing undone), which
        # that report does not describe; an AOT package keeps the one its compile recorded (AotRunner.save).
        return artifact_doc(self.signature, self._config_dict, self.freeu_scales, self.fused_qkv)


def artifact_doc(signature: Signature, config: dict | None, freeu: Mapping[str, float] | None,
                 fused_qkv: bool | None, report=None) -> dict:
    """The artifact document: what `load` needs to rebuild a CompiledUNet without the model source (runners
    add their options and weight specs), and, for a package compiled from the passes' program, what the passes
    did (`report`, a passes.PassReport: `load` and a package-cache hit give it back)."""
    doc = {"signature": signature.to_json(), "config": config, "freeu": None if freeu is None else dict(freeu),
           "fused_qkv": fused_qkv, "torch": torch.__version__}
    if report is not None:
        doc["passes"] = report.to_json()
    return doc


def report_from_doc(doc: Mapping) -> Any:
    """The passes.PassReport an artifact document records, or None (passes=None, a saved jit graph or XLA
    artifact, or an older package)."""
    if not doc.get("passes"):
        return None
    from .. import passes as graph_passes

    return graph_passes.PassReport.from_json(doc["passes"])


def _freeu_stage(name: str) -> tuple[int, str]:
    """'up_blocks.1.freeu.s' -> (1, 's'): the up block (FreeU stage) and which scale."""
    parts = name.split(".")
    return int(parts[1]), parts[-1]


def _describe(v) -> str:
    return f"a tensor {list(v.shape)} {dtype_name(v.dtype)}" if torch.is_tensor(v) else type(v).__name__
