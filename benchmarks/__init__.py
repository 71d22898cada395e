"""Side-by-side benchmarks: diffusers eager, diffusers + the best torch.compile recipe, ours eager, ours compiled.

Entry points: `python -m benchmarks.bench ...` (or `compiled-unet bench ...` from a source checkout) and
`bash benchmarks/gpu.sh` on a GPU machine. Method and notes: benchmarks/NOTES.md.
"""
from ._bare_checkout import install as _map_checkout_passes

_map_checkout_passes()
