"""Child process of tests/test_compile_cache.py: compile the tiny 'sd' test UNet (weights from `seed`) with
`cache_dir`, save its output and its eager output, print a JSON line of cache counters and stages.

    python tests/compile_cache_child.py CACHE_DIR SEED OUT
"""
import dataclasses
import json
import sys

import torch
from torch._dynamo.utils import counters

import compiled_unet
from cases import build, inputs_for

cache_dir, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
model = build("sd", seed=seed)
(sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
compiled = compiled_unet.compile(model, sample, timestep, cache_dir=cache_dir, progress=False, **kwargs)
with torch.no_grad():
    torch.save(compiled(sample, timestep, **kwargs, return_dict=False)[0], out)
    torch.save(model(sample, timestep, **kwargs, return_dict=False)[0], out + ".eager")
print(json.dumps({"seed": seed, "out": out, "stages": compiled.compile_stages,
                  "options": dataclasses.asdict(compiled.options),
                  "inductor": {k: v for k, v in counters["inductor"].items() if "cache" in k},
                  "aot": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
                  "export": dict(counters["compiled_unet"])}, default=str))
