"""`export()`: capture a UNet (ours or diffusers') as one static `torch.export.ExportedProgram`.

torch.export fixes how the program is called: `ep.module()` takes exactly the (args, kwargs) structure that
was traced, here `((sample, timestep), {"encoder_hidden_states": ..., <other inputs>, "return_dict": False})`.
`export()` keeps that structure (backends read it from `ep.call_spec.in_spec`) and returns a `UNetProgram`:
an ExportedProgram whose `module()` first binds a call the way the UNet's forward does, so
`ep.module()(sample, t, text)`, `ep.module()(sample, t, encoder_hidden_states=text)` and the full
`ep.module()(sample, t, encoder_hidden_states=text, return_dict=False)` all work.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import ConstantArgument, InputKind

class UNetProgram(torch.export.ExportedProgram):
    """An ExportedProgram of a UNet whose `module()` is called like the UNet's forward.

    Positional inputs map onto the forward's parameter order; inputs the program was exported with as
    `None` and `return_dict` (always False: the program returns `(sample,)`) may be left out. Anything
    else the program was not exported with is a ValueError naming it. Programs derived from this one
    (passes, `run_decompositions`, `torch.export.load`) are plain ExportedPrograms with torch's strict
    calling convention; `UNetProgram.wrap(ep, forward_params)` gives them this one back.
    """

    _forward_params: tuple = ()
    _omittable: dict = {}

    @classmethod
    def wrap(cls, ep: torch.export.ExportedProgram, forward_params=None) -> "UNetProgram":
        """A shallow copy of `ep` (graph, weights shared) with UNet-style calls; `forward_params`: the
        forward's parameter names in order (default: UNet2DConditionModel's)."""
        if forward_params is None:
            from .unet import UNet2DConditionModel
            forward_params = tuple(inspect.signature(UNet2DConditionModel.forward).parameters)[1:]
        # The user inputs, one per leaf of (args, kwargs); constants (None, False, ...) carry their value.
        user = [spec.arg for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
        _, kwargs = pytree.tree_unflatten(user, ep.call_spec.in_spec)
        program = object.__new__(cls)
        program.__dict__.update(ep.__dict__)
        program._forward_params = tuple(forward_params)
        # Keyword inputs exported as None, and return_dict, may be left out of a call.
        program._omittable = {k: arg.value for k, arg in kwargs.items() if isinstance(arg, ConstantArgument)
                              and (arg.value is None or k == "return_dict")}
        return program

    def module(self, *args, **kwargs) -> torch.fx.GraphModule:
        m = super().module(*args, **kwargs)
        in_spec = self.call_spec.in_spec
        n_args = in_spec.child(0).num_children
        names = tuple(self._forward_params[:n_args]) + tuple(in_spec.child(1).context)
        bind = functools.partial(_bind_call, self._forward_params, names, n_args, dict(self._omittable))
        m.register_forward_pre_hook(bind, prepend=True, with_kwargs=True)
        return m


def _bind_call(forward_params: tuple, names: tuple, n_args: int, omittable: dict, _module, args, kwargs):
    """(args, kwargs) as the UNet's forward takes them -> the exported (args, kwargs) structure."""
    if len(args) > len(forward_params):
        raise TypeError(f"the UNet takes at most {len(forward_params)} positional inputs, got {len(args)}")
    call = dict(zip(forward_params, args))
    for k, v in kwargs.items():
        if k in call:
            raise TypeError(f"`{k}` given both positionally and as a keyword")
        call[k] = v
    missing = [k for k in names if k not in call and k not in omittable]
    if missing:
        raise TypeError(f"missing inputs {missing}: the program was exported with {list(names)}")
    for k, exported in omittable.items():
        given = call.setdefault(k, exported)
        if k == "return_dict" and given != exported:
            raise ValueError(f"`return_dict={given!r}`: the program was exported with return_dict={exported!r} "
                             f"and returns a (sample,) tuple")
        if exported is None and given is not None:
            raise ValueError(f"`{k}`: the program was exported without it (None); export again with it")
    extra = sorted(k for k, v in call.items() if k not in names and v is not None)
    if extra:
        raise ValueError(f"inputs {extra} were not part of the export; the program takes {list(names)}")
    return tuple(call[k] for k in names[:n_args]), {k: call[k] for k in names[n_args:]}


def export(unet: torch.nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states=None,
           strict: bool = False, **forward_kwargs) -> UNetProgram:
    """Export `unet` with static shapes taken from the example inputs.

    Works for `compiled_unet.UNet2DConditionModel` and diffusers' own `UNet2DConditionModel`.
    Python-number timesteps become constants of the graph; pass a tensor to keep the timestep an input.
    `return_dict` is forced to False so the program returns a plain `(sample,)` tuple. The program's
    state_dict keys and nn_module_stack are the UNet's own (the UNet itself is traced, no wrapper).
    """
    forward_kwargs = dict(forward_kwargs)
    forward_kwargs["return_dict"] = False
    kwargs = {"encoder_hidden_states": encoder_hidden_states, **forward_kwargs}
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(unet, (sample, timestep), kwargs, strict=strict)
    finally:
        unet.train(was_training)
    return UNetProgram.wrap(ep, _positional_params(unet.forward))


def _positional_params(forward):
    """Names positional inputs bind to; None (UNet2DConditionModel's order) for a forward taking *args."""
    params = inspect.signature(forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
