"""`export()`: capture a UNet (ours or diffusers') as one static `torch.export.ExportedProgram`."""
from __future__ import annotations

import torch


def export(unet: torch.nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states=None,
           strict: bool = False, **forward_kwargs) -> torch.export.ExportedProgram:
    """Export `unet` with static shapes taken from the example inputs.

    Works for `compiled_unet.UNet2DConditionModel` and diffusers' own `UNet2DConditionModel`.
    Python-number timesteps become constants of the graph; pass a tensor to keep the timestep an input.
    `return_dict` is forced to False so the program returns a plain `(sample,)` tuple.
    """
    forward_kwargs = dict(forward_kwargs)
    forward_kwargs["return_dict"] = False
    kwargs = {"encoder_hidden_states": encoder_hidden_states, **forward_kwargs}
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            return torch.export.export(unet, (sample, timestep), kwargs, strict=strict)
    finally:
        unet.train(was_training)
