"""Compile with Inductor, ship an AOTInductor .pt2, load it where the model source is absent, swap weights.

    python examples/compile_and_serve.py              # tiny preset; the AOT compile takes ~30-60 s on 2 cores
"""
import os
import tempfile

import torch

import compiled_unet
from compiled_unet.backends import InductorOptions
from compiled_unet.presets import build_random, example_inputs

unet = build_random("tiny")
sample, timestep, kwargs = example_inputs("tiny")

# freezing=False keeps the weights swappable (below); the CPU default freezes them into prepacked oneDNN
# kernels, which is several times faster per step but fixes the weights.
compiled = compiled_unet.compile(unet, sample, timestep, options=InductorOptions(aot=True, freezing=False), **kwargs)
path = os.path.join(tempfile.mkdtemp(), "unet.pt2")
compiled_unet.save(compiled, path)                          # atomic write

served = compiled_unet.load(path)                           # no UNet2DConditionModel is built here
out = served(sample, timestep, **kwargs).sample             # same call signature and output type
print("served output", tuple(out.shape))

# New weights (a fine-tune, a fused LoRA) without recompiling: map them through the passes once, then load.
finetuned = build_random("tiny", seed=1)
served.swap_weights(compiled.derive_weights(finetuned.state_dict()))
with torch.no_grad():
    expected = finetuned(sample, timestep, **kwargs).sample
print("after swap, max-abs vs the fine-tune's eager output:",
      (served(sample, timestep, **kwargs).sample - expected).abs().max().item())
