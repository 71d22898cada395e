"""Export a UNet (ours or diffusers') into one graph, run the passes, and see what they changed.

    python examples/export_and_optimize.py            # tiny preset, seconds on a CPU
"""
import torch

import compiled_unet
from compiled_unet import passes
from compiled_unet.presets import build_random, example_inputs

unet = build_random("tiny")
unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)          # FreeU's FFT is folded away by the passes
sample, timestep, kwargs = example_inputs("tiny", batch=2)

program = compiled_unet.export(unet, sample, timestep, **kwargs)   # torch.export.ExportedProgram
optimized, report = passes.optimize(program)
print(report)                                               # rewrites per pass, op counts after each

with torch.no_grad():
    eager = unet(sample, timestep, **kwargs).sample
    graph = optimized.module()(sample, timestep, **kwargs, return_dict=False)[0]
print("max-abs difference vs eager:", (graph - eager).abs().max().item())
assert not any("fft" in str(n.target) for n in optimized.graph.nodes)
