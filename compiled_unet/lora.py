"""LoRA adapters for the UNet: load (diffusers/PEFT and kohya files), combine, fuse, unload, export.

A LoRA-adapted layer computes `base(x) + sum_a B_a(A_a(x)) * scaling_a` over the active adapters `a`, as
PEFT does (diffusers' LoRA backend). Here, unlike PEFT:

- The adapted layer IS the layer: `LoRALinear` / `LoRAConv2d` subclass `nn.Linear` / `nn.Conv2d` and
  hold the base layer's own `weight` / `bias` Parameters, so the base keys of `state_dict()` do not change
  (`...to_q.weight`, not PEFT's `...to_q.base_layer.weight`); adapter keys are added beside them
  (`...to_q.lora_A.<adapter>.weight`, `...to_q.lora_B.<adapter>.weight`, `...to_q.lora_scaling.<adapter>`).
  Unloading puts the original module object back, so its weights are the very same tensors (bit-exact).
- Every number of an adapter is a tensor of the module: A and B are parameters and the scaling
  (`adapter weight x alpha / rank x set_lora_scale(...)`) is a 0-d buffer. An exported program takes them
  as inputs (its `state_dict` holds the module's own tensors), so updating them in place -- `set_adapters`
  weights, `set_lora_scale`, `load_lora_adapter(..., hotswap=True)` -- changes what the exported program
  computes without a new export. What changes the graph's structure (which adapters are active, enabling or
  disabling, fusing) needs a new export.
- `cross_attention_kwargs={"scale": s}` multiplies the active adapters' scaling for that call, exactly as
  diffusers' `apply_lora_scale`; it is a Python number, so an export bakes it in as a constant (use
  `set_lora_scale(s)` to keep it changeable). Unlike diffusers, the call leaves no state behind (diffusers
  divides the scale back out, and after `scale=0` resets the scaling, forgetting `set_adapters` weights).

Key formats read (with or without a `unet.` prefix; `text_encoder*` / `lora_te*` keys are other pipeline
components and are reported as such):
  PEFT / diffusers  `<path>.lora_A.weight`, `<path>.lora_B.weight`
  old diffusers     `<path>.lora.down.weight` / `.lora.up.weight`, `<attn>.processor.to_q_lora.down.weight`
                    (to_k, to_v, to_out), `<path>.lora_linear_layer.down.weight` / `.up.weight`
  kohya             `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
Alphas come from `.alpha` keys, `network_alphas` or a safetensors file's `lora_adapter_metadata`
(diffusers' LoraConfig: `lora_alpha`, `alpha_pattern`, `r`, `rank_pattern`, `use_rslora`); without one,
alpha = rank (scale 1), as in diffusers. Targets: every `nn.Linear` and `nn.Conv2d` of the model.

Deliberately not copied from diffusers / PEFT:
- Keys that match no layer raise (strict=True) or are listed in the returned report; diffusers warns.
- Kohya names are matched against the model's own module paths, not rewritten by string replaces:
  diffusers' conversion mangles `add_embedding`, `class_embedding`, `add_k_proj`/`add_v_proj`, and names the
  alphas of attention layers so that PEFT never applies them (per-layer kohya alphas are lost there).
- `fuse_lora(lora_scale)` leaves the adapters' scaling as it was (diffusers multiplies it in for good, so
  after `unfuse_lora` the adapter runs at `lora_scale`); `unfuse_lora` puts back a saved copy of the weights
  (bit-exact; one copy of each fused weight is kept while fused) instead of subtracting the delta.
- A layer with some adapters fused still runs its other active adapters (PEFT runs none once merged), and
  `disable_lora` does not unfuse (PEFT unmerges on disable).
Not supported (clear errors): DoRA, LoRA bias, LoKr, per-block dict weights in `set_adapters`, SDXL kohya
files with sgm names (`lora_unet_input_blocks_...`: reported as unmatched), pickled files, hub downloads.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

OTHER_COMPONENT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
METADATA_KEY = "lora_adapter_metadata"

# (suffix regex -> role) for diffusers/PEFT-style keys; the module path is what precedes the suffix.
_SUFFIXES = [
    (re.compile(r"\.lora_A\.weight$"), "A"), (re.compile(r"\.lora_B\.weight$"), "B"),
    (re.compile(r"\.lora\.down\.weight$"), "A"), (re.compile(r"\.lora\.up\.weight$"), "B"),
    (re.compile(r"\.lora_linear_layer\.down\.weight$"), "A"), (re.compile(r"\.lora_linear_layer\.up\.weight$"), "B"),
    (re.compile(r"\.lora_down\.weight$"), "A"), (re.compile(r"\.lora_up\.weight$"), "B"),
]
# Old attention-processor names: attn1.processor.to_q_lora.down.weight -> attn1.to_q
_PROC_LORA = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)(\.weight)?")
_UNSUPPORTED = {"lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "lora_B.bias": "LoRA bias (lora_bias=True)"}


# -- layers ----------------------------------------------------------------------------------------
class _Scalars(nn.Module):
    """0-d float32 buffers, one per adapter (a ModuleDict cannot hold buffers)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]


class _LoRAMixin:
    """Adapter bookkeeping shared by `LoRALinear` and `LoRAConv2d` (the base layer's forward is `_base`)."""

    def _adopt(self, base: nn.Module):
        """Take over `base`'s own weight and bias Parameters (state_dict keys unchanged) and its mode."""
        self.weight, self.bias = base.weight, base.bias
        self._init_lora(base)
        self.train(base.training)
        return self

    def _init_lora(self, base: nn.Module) -> None:
        self.lora_A, self.lora_B, self.lora_scaling = nn.ModuleDict(), nn.ModuleDict(), _Scalars()
        self.lora_alpha: dict[str, float] = {}
        self.lora_rank: dict[str, int] = {}
        self.lora_rslora: dict[str, bool] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.lora_enabled = True
        self.runtime_scale = 1.0  # cross_attention_kwargs["scale"] of the call in progress (a Python number)
        self.fused_adapters: tuple[str, ...] = ()
        self._original = (base,)  # a tuple: not registered as a submodule
        self._unfused_weight: Optional[torch.Tensor] = None

    def base_scaling(self, name: str) -> float:
        r = self.lora_rank[name]
        return self.lora_alpha[name] / (math.sqrt(r) if self.lora_rslora[name] else r)

    def add_lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + B(A(x)) * scaling for each active, unfused adapter, in order (PEFT's order of sums)."""
        if not self.lora_enabled:
            return out
        for name in self.active_adapters:  # a Python tuple: unrolled at export
            if name not in self.lora_A or name in self.fused_adapters:
                continue
            scaling = self.lora_scaling[name]
            if self.runtime_scale != 1.0:
                scaling = scaling * self.runtime_scale
            out = out + self.lora_B[name](self.lora_A[name](x)) * scaling
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling x (B @ A) in the base weight's layout (conv: [out, in, kh, kw])."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        delta = torch.einsum("or,r...->o...", b.flatten(1).float(), a.float())
        return delta * self.lora_scaling[name].float()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.lora_A)}, active={list(self.active_adapters)}"


class LoRALinear(_LoRAMixin, nn.Linear):
    """`nn.Linear` with LoRA adapters; `weight` / `bias` are the base layer's own Parameters."""

    @classmethod
    def wrap(cls, base: nn.Linear) -> "LoRALinear":
        layer = cls(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        return layer._adopt(base)

    def new_adapter(self, rank: int) -> tuple[nn.Module, nn.Module]:
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        return nn.Linear(self.in_features, rank, bias=False, **kw), nn.Linear(rank, self.out_features, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora(x, F.linear(x, self.weight, self.bias))


class LoRAConv2d(_LoRAMixin, nn.Conv2d):
    """`nn.Conv2d` with LoRA adapters: A has the base kernel/stride/padding, B is 1x1 (as PEFT and kohya)."""

    @classmethod
    def wrap(cls, base: nn.Conv2d) -> "LoRAConv2d":
        layer = cls(base.in_channels, base.out_channels, base.kernel_size, stride=base.stride, padding=base.padding,
                    dilation=base.dilation, groups=base.groups, bias=base.bias is not None,
                    padding_mode=base.padding_mode, device="meta")
        return layer._adopt(base)

    def new_adapter(self, rank: int) -> tuple[nn.Module, nn.Module]:
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        a = nn.Conv2d(self.in_channels, rank, self.kernel_size, stride=self.stride, padding=self.padding,
                      dilation=self.dilation, bias=False, padding_mode=self.padding_mode, **kw)
        return a, nn.Conv2d(rank, self.out_channels, 1, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora(x, self._conv_forward(x, self.weight, self.bias))


LoRALayer = Union[LoRALinear, LoRAConv2d]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _LoRAMixin)}


def target_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / Conv2d of the model by path, adapter-internal layers excluded."""
    inner = re.compile(r"\.lora_[AB]\.[^.]+$")
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not inner.search(name)}


# -- parsing ---------------------------------------------------------------------------------------
@dataclass
class LoRALoadReport:
    """What `load_lora_adapter` did with each key of the file.

    `loaded`: module paths that received the adapter. `other_components`: keys of other pipeline parts
    (text encoders), skipped. `unmatched`: keys that name no Linear/Conv2d of this UNet or have an unknown
    suffix; with strict=True (the default) loading raises instead of returning them.
    """

    adapter_name: str
    loaded: list[str] = field(default_factory=list)
    other_components: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


@dataclass
class _ModuleLoRA:
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    keys: list = field(default_factory=list)


def read_source(source) -> tuple[dict, Optional[dict]]:
    """(state dict, diffusers LoraConfig metadata or None) from a dict or a .safetensors path."""
    if isinstance(source, dict):
        return dict(source), None
    path = os.fspath(source)
    if not path.endswith(".safetensors"):
        raise ValueError(f"LoRA files must be .safetensors (pickle files are not loaded): {path}")
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return load_file(path), json.loads(raw) if raw else None


def _strip_unet(key: str) -> str:
    return key[len("unet."):] if key.startswith("unet.") else key


def _module_path(key: str, kohya: dict[str, str]) -> tuple[Optional[str], Optional[str]]:
    """(module path, role in {"A", "B", "alpha"}) of one key, or (None, None) if it is not a LoRA key."""
    if key.startswith("lora_unet_"):
        stem, _, rest = key.partition(".")
        role = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}.get(rest)
        return kohya.get(stem[len("lora_unet_"):]), role
    key = _strip_unet(key).replace(".processor.", ".")
    key = _PROC_LORA.sub(lambda m: f".{m.group(1)}{'.0' if m.group(1) == 'to_out' else ''}.lora.{m.group(2)}"
                         + (m.group(3) or ""), key)
    if key.endswith(".alpha"):
        stem = key[: -len(".alpha")]
        for pattern, _ in _SUFFIXES:  # "<path>.lora.down.weight.alpha" style
            stem = pattern.sub("", stem)
        stem = re.sub(r"\.lora(_linear_layer)?\.down$", "", stem)
        return stem, "alpha"
    for pattern, role in _SUFFIXES:
        if pattern.search(key):
            return pattern.sub("", key), role
    return None, None


def _metadata_alpha(metadata: dict, path: str, rank: int) -> tuple[Optional[float], bool]:
    """Alpha (and use_rslora) for `path` from diffusers' LoraConfig metadata (PEFT's pattern rules)."""
    if any(k.startswith("unet.") for k in metadata):
        metadata = {k[len("unet."):]: v for k, v in metadata.items() if k.startswith("unet.")}
    for pattern, alpha in (metadata.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha), bool(metadata.get("use_rslora", False))
    alpha = metadata.get("lora_alpha")
    return (None if alpha is None else float(alpha)), bool(metadata.get("use_rslora", False))


def parse(state_dict: dict, targets: dict[str, nn.Module], network_alphas: Optional[dict] = None,
          metadata: Optional[dict] = None) -> tuple[dict[str, _ModuleLoRA], list[str], list[str], dict[str, bool]]:
    """Group keys by target module; (per-module LoRA, other-component keys, unmatched keys, rslora flags).

    Raises ValueError for unsupported adapter kinds (DoRA, LoRA bias), a module with A but no B (or B but
    no A), and shapes that do not fit the layer (naming the key and both shapes).
    """
    unsupported = sorted(k for k in state_dict if any(t in k for t in _UNSUPPORTED))
    if unsupported:
        kinds = sorted({v for t, v in _UNSUPPORTED.items() for k in unsupported if t in k})
        raise ValueError(f"unsupported LoRA variant ({', '.join(kinds)}): keys {unsupported[:8]}"
                         + (f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else ""))
    kohya = {path.replace(".", "_"): path for path in targets}
    modules: dict[str, _ModuleLoRA] = {}
    other, unmatched = [], []
    for key, value in state_dict.items():
        if key.startswith(OTHER_COMPONENT_PREFIXES):
            other.append(key)
            continue
        path, role = _module_path(key, kohya)
        if path is None or role is None or path not in targets:
            unmatched.append(key)
            continue
        entry = modules.setdefault(path, _ModuleLoRA())
        entry.keys.append(key)
        if role == "alpha":
            entry.alpha = float(value.item() if torch.is_tensor(value) else value)
        else:
            setattr(entry, role, value)
    for key, value in (network_alphas or {}).items():
        if key.startswith(OTHER_COMPONENT_PREFIXES):
            continue
        path, _ = _module_path(key if key.endswith(".alpha") else key + ".alpha", kohya)
        if path in modules:
            modules[path].alpha = float(value)
        else:
            unmatched.append(f"network_alphas[{key!r}]")
    alpha_only = sorted(k for p, e in modules.items() if e.A is None and e.B is None for k in e.keys)
    unmatched += alpha_only
    modules = {p: e for p, e in modules.items() if e.A is not None or e.B is not None}
    rslora = {}
    for path, e in modules.items():
        if e.A is None or e.B is None:
            have = "lora_A/down" if e.A is not None else "lora_B/up"
            raise ValueError(f"LoRA for {path!r} has only {have} weights (keys {e.keys}); both A and B are needed")
        rank = e.A.shape[0]
        exp_a, exp_b = _expected_shapes(targets[path], rank)
        for name, tensor, expected in (("A (down)", e.A, exp_a), ("B (up)", e.B, exp_b)):
            if tuple(tensor.shape) != tuple(expected):
                key = next((k for k in e.keys if _role_of(k, kohya) == name[0]), path)
                raise ValueError(f"LoRA weight {key!r} ({name} of {path}, {type(targets[path]).__name__}) has shape "
                                 f"{tuple(tensor.shape)}, but the layer needs {tuple(expected)} for rank {rank}")
        rslora[path] = False
        if e.alpha is None and metadata:
            e.alpha, rslora[path] = _metadata_alpha(metadata, path, rank)
        if e.alpha is None:
            e.alpha = float(rank)
    return modules, other, unmatched, rslora


def _role_of(key: str, kohya: dict) -> Optional[str]:
    return _module_path(key, kohya)[1]


def _expected_shapes(layer: nn.Module, rank: int) -> tuple[tuple, tuple]:
    if isinstance(layer, nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    return (rank, layer.in_channels // layer.groups, *layer.kernel_size), (layer.out_channels, rank, 1, 1)


# -- model-level operations (called by UNet2DConditionModel's LoRA methods) -----------------------
@dataclass
class LoRAState:
    """Per-model bookkeeping: adapter weights (set_adapters), the global scale and the runtime-scale hooks."""

    weights: dict[str, float] = field(default_factory=dict)
    global_scale: float = 1.0
    hooks: list = field(default_factory=list)


def _state(model: nn.Module) -> LoRAState:
    state = model.__dict__.get("_lora_state")
    if state is None:
        state = LoRAState()
        model.__dict__["_lora_state"] = state
    return state


def adapter_names(model: nn.Module) -> list[str]:
    return list(_state(model).weights)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def refresh_scaling(model: nn.Module) -> None:
    """Write every scaling buffer in place: global scale x adapter weight x alpha / rank."""
    state = _state(model)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.lora_A:
                layer.lora_scaling[name].fill_(state.global_scale * state.weights[name] * layer.base_scaling(name))


def _apply_prefix(d: Optional[dict], prefix: Optional[str]) -> tuple[Optional[dict], list]:
    """Keys under `prefix.` with the prefix removed, and the keys outside it (other components)."""
    if not d or not prefix:
        return d, []
    p = prefix + "."
    return {k[len(p):]: v for k, v in d.items() if k.startswith(p)}, [k for k in d if not k.startswith(p)]


def load(model: nn.Module, source, adapter_name: Optional[str] = None, *, prefix: Optional[str] = None,
         network_alphas: Optional[dict] = None, strict: bool = True, hotswap: bool = False) -> LoRALoadReport:
    state_dict, metadata = read_source(source)
    state_dict, outside = _apply_prefix(state_dict, prefix)
    network_alphas, _ = _apply_prefix(network_alphas, prefix)
    state = _state(model)
    if adapter_name is None:
        adapter_name = f"default_{len(state.weights)}"
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter names must be non-empty strings without '.'; got {adapter_name!r}")
    if adapter_name in state.weights and not hotswap:
        raise ValueError(f"Adapter name {adapter_name} already in use in the model - please select a new adapter name.")
    if hotswap and adapter_name not in state.weights:
        raise ValueError(f"hotswap=True needs an existing adapter named {adapter_name!r}; loaded: {list(state.weights)}")
    targets = target_layers(model)
    modules, other, unmatched, rslora = parse(state_dict, targets, network_alphas, metadata)
    report = LoRALoadReport(adapter_name, sorted(modules), sorted(other + outside), sorted(unmatched))
    if unmatched and strict:
        raise ValueError(f"{len(unmatched)} LoRA key(s) match no Linear/Conv2d layer of this UNet (pass strict=False "
                         f"to load the rest and get them in the report): {report.unmatched[:20]}"
                         + (" ..." if len(unmatched) > 20 else ""))
    if unmatched:
        warnings.warn(f"LoRA keys that match no layer were not loaded: {report.unmatched}", stacklevel=3)
    if not modules:
        raise ValueError(f"no UNet LoRA weights found ({len(other)} keys of other components, "
                         f"{len(unmatched)} unmatched)")
    if hotswap:
        _hotswap(model, adapter_name, modules, rslora, targets)
    else:
        for path, e in modules.items():
            layer = targets[path]
            if not isinstance(layer, _LoRAMixin):
                if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                    raise ValueError(f"LoRA on grouped convolutions is not supported ({path}, groups={layer.groups})")
                layer = (LoRALinear if isinstance(layer, nn.Linear) else LoRAConv2d).wrap(layer)
                _replace(model, path, layer)
            rank = e.A.shape[0]
            a, b = layer.new_adapter(rank)
            with torch.no_grad():
                a.weight.copy_(e.A.reshape(a.weight.shape))
                b.weight.copy_(e.B.reshape(b.weight.shape))
            layer.lora_A[adapter_name], layer.lora_B[adapter_name] = a, b
            layer.lora_scaling.register_buffer(adapter_name, torch.zeros((), device=layer.weight.device))
            layer.lora_alpha[adapter_name], layer.lora_rank[adapter_name] = e.alpha, rank
            layer.lora_rslora[adapter_name] = rslora[path]
        state.weights[adapter_name] = 1.0
        _install_scale_hooks(model)
        set_active(model, [adapter_name])  # diffusers: the adapter loaded last is the active one
    refresh_scaling(model)
    return report


def _hotswap(model, adapter_name, modules, rslora, targets) -> None:
    """Copy new A/B/alpha into an existing adapter's tensors: same layers and ranks, no new tensors."""
    have = {p for p, layer in lora_layers(model).items() if adapter_name in layer.lora_A}
    if set(modules) != have:
        raise ValueError(f"hotswap into {adapter_name!r} needs the same target layers; missing "
                         f"{sorted(have - set(modules))[:10]}, new {sorted(set(modules) - have)[:10]}")
    for path, e in modules.items():
        layer = targets[path]
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if e.A.shape[0] != a.shape[0]:
            raise ValueError(f"hotswap into {adapter_name!r}: {path} has rank {a.shape[0]}, the new weights rank "
                             f"{e.A.shape[0]}; load it as a new adapter instead")
    for path, e in modules.items():
        layer = targets[path]
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(e.A.reshape(layer.lora_A[adapter_name].weight.shape))
            layer.lora_B[adapter_name].weight.copy_(e.B.reshape(layer.lora_B[adapter_name].weight.shape))
        layer.lora_alpha[adapter_name], layer.lora_rslora[adapter_name] = e.alpha, rslora[path]


def _check_names(model: nn.Module, names: list[str]) -> None:
    unknown = [n for n in names if n not in _state(model).weights]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; loaded adapters: {adapter_names(model)}")


def set_active(model: nn.Module, names: list[str]) -> None:
    for layer in lora_layers(model).values():
        layer.active_adapters = tuple(names)


def set_adapters(model: nn.Module, names, weights=None) -> None:
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of their weights {len(weights)}.")
    for w in weights:
        if isinstance(w, dict) or w is None:
            raise ValueError(f"adapter weights must be numbers (per-block dict weights are not supported); got {w!r}")
    state = _state(model)
    for name, w in zip(names, weights):
        state.weights[name] = float(w)
    set_active(model, names)
    refresh_scaling(model)


def set_global_scale(model: nn.Module, scale: float) -> None:
    if not lora_layers(model):
        raise ValueError("set_lora_scale: no LoRA adapter is loaded")
    _state(model).global_scale = float(scale)
    refresh_scaling(model)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(model).values():
        layer.lora_enabled = enabled


def fuse(model: nn.Module, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None) -> None:
    names = None if adapter_names is None else ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    if names is not None:
        _check_names(model, names)
    for path, layer in lora_layers(model).items():
        todo = [n for n in (names if names is not None else layer.active_adapters)
                if n in layer.lora_A and n not in layer.fused_adapters]
        if not todo:
            continue
        with torch.no_grad():
            delta = sum(layer.delta_weight(n) for n in todo) * lora_scale
            fused = layer.weight.float() + delta
            if safe_fusing and not torch.isfinite(fused).all():
                raise ValueError(f"NaN/inf in the fused weights of {path}; LoRA not fused")
            if layer._unfused_weight is None:
                layer._unfused_weight = layer.weight.detach().clone()
            layer.weight.copy_(fused.to(layer.weight.dtype))
        layer.fused_adapters = layer.fused_adapters + tuple(todo)


def unfuse(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        if layer._unfused_weight is not None:
            with torch.no_grad():
                layer.weight.copy_(layer._unfused_weight)
            layer._unfused_weight = None
        layer.fused_adapters = ()


def delete(model: nn.Module, names) -> None:
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for path, layer in lora_layers(model).items():
        if any(n in layer.fused_adapters for n in names):
            raise ValueError(f"adapter(s) {names} are fused into {path}; call unfuse_lora() first")
        for n in names:
            if n in layer.lora_A:
                del layer.lora_A[n], layer.lora_B[n]
                del layer.lora_scaling._buffers[n]
                for d in (layer.lora_alpha, layer.lora_rank, layer.lora_rslora):
                    d.pop(n)
        layer.active_adapters = tuple(a for a in layer.active_adapters if a not in names)
        if not len(layer.lora_A):
            _restore(model, path, layer)
    state = _state(model)
    for n in names:
        state.weights.pop(n)
    if not state.weights:
        unload(model)


def _restore(model: nn.Module, path: str, layer: LoRALayer) -> None:
    original = layer._original[0]
    original.weight, original.bias = layer.weight, layer.bias  # the same Parameters (fused values kept)
    original.train(layer.training)
    _replace(model, path, original)


def unload(model: nn.Module) -> None:
    """Remove every adapter; fused weights stay fused (diffusers' fuse-then-unload bakes the LoRA in)."""
    for path, layer in lora_layers(model).items():
        _restore(model, path, layer)
    state = _state(model)
    for handle in state.hooks:
        handle.remove()
    model.__dict__.pop("_lora_state", None)


# -- runtime scale: cross_attention_kwargs={"scale": s}, as diffusers' apply_lora_scale -------------
_CROSS_ATTENTION_KWARGS_POSITION = 6  # forward(sample, timestep, ehs, class_labels, timestep_cond, mask, cak, ...)


def _runtime_scale_pre_hook(model, args, kwargs):
    cak = kwargs.get("cross_attention_kwargs")
    if cak is None and len(args) > _CROSS_ATTENTION_KWARGS_POSITION:
        cak = args[_CROSS_ATTENTION_KWARGS_POSITION]
    scale = 1.0 if not cak else cak.get("scale", 1.0)
    if scale != 1.0:
        for layer in lora_layers(model).values():
            layer.runtime_scale = float(scale)


def _runtime_scale_post_hook(model, args, kwargs, output):
    for layer in lora_layers(model).values():
        layer.runtime_scale = 1.0


def _install_scale_hooks(model: nn.Module) -> None:
    state = _state(model)
    if not state.hooks:
        state.hooks = [model.register_forward_pre_hook(_runtime_scale_pre_hook, with_kwargs=True),
                       model.register_forward_hook(_runtime_scale_post_hook, with_kwargs=True, always_call=True)]
