"""`export()`: capture a UNet (ours or diffusers') as one static `torch.export.ExportedProgram`.

torch.export fixes how the program is called: `ep.module()` takes exactly the (args, kwargs) structure that
was traced, here `((sample, timestep), {"encoder_hidden_states": ..., <other inputs>, "return_dict": False})`.
`export()` keeps that structure (backends read it from `ep.call_spec.in_spec`) and returns a `UNetProgram`:
an ExportedProgram whose `module()` first binds a call the way the UNet's forward does, so
`ep.module()(sample, t, text)`, `ep.module()(sample, t, encoder_hidden_states=text)` and the full
`ep.module()(sample, t, encoder_hidden_states=text, return_dict=False)` all work.
"""
from __future__ import annotations

import torch

from .runtime.signature import Signature

class UNetProgram(torch.export.ExportedProgram):
    """An ExportedProgram of a UNet whose `module()` is called like the UNet's forward.

    Calls are bound by the runtime's one `Signature` (the binder every backend uses): positional inputs map
    onto the forward's parameter order; inputs the program was exported with as `None`, and `return_dict`
    (always False: the program returns `(sample,)`), may be left out; anything else the program was not
    exported with is a ValueError naming it. Programs derived from this one (passes, `run_decompositions`,
    `torch.export.load`) are plain ExportedPrograms with torch's strict calling convention;
    `UNetProgram.wrap(ep)` gives them this one back.
    """

    @classmethod
    def wrap(cls, ep: torch.export.ExportedProgram) -> "UNetProgram":
        """A shallow copy of `ep` (graph, weights shared) with UNet-style calls."""
        program = object.__new__(cls)
        program.__dict__.update(ep.__dict__)
        return program

    def module(self, *args, **kwargs) -> torch.fx.GraphModule:
        m = super().module(*args, **kwargs)
        signature = Signature.from_program(self)

        def bind(_module, call_args, call_kwargs):
            return signature.bind(*call_args, **call_kwargs)

        m.register_forward_pre_hook(bind, prepend=True, with_kwargs=True)
        return m


def export_inputs(sample: torch.Tensor, timestep, encoder_hidden_states=None, **forward_kwargs) -> tuple[tuple, dict]:
    """(args, kwargs) exactly as `export` hands them to torch.export (and as the program's call spec holds them)."""
    forward_kwargs = dict(forward_kwargs)
    forward_kwargs["return_dict"] = False
    return (sample, timestep), {"encoder_hidden_states": encoder_hidden_states, **forward_kwargs}


def export(unet: torch.nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states=None,
           strict: bool = False, **forward_kwargs) -> UNetProgram:
    """Export `unet` with static shapes taken from the example inputs.

    Works for `compiled_unet.UNet2DConditionModel` and diffusers' own `UNet2DConditionModel`.
    Python-number timesteps become constants of the graph; pass a tensor to keep the timestep an input.
    `return_dict` is forced to False so the program returns a plain `(sample,)` tuple. The program's
    state_dict keys and nn_module_stack are the UNet's own (the UNet itself is traced, no wrapper).
    """
    args, kwargs = export_inputs(sample, timestep, encoder_hidden_states, **forward_kwargs)
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(unet, args, kwargs, strict=strict)
    finally:
        unet.train(was_training)
    return UNetProgram.wrap(ep)
