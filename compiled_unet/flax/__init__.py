"""JAX/Flax half of the API: `FlaxUNet2DConditionModel` and `FlaxUNet2DConditionOutput`.

Needs the `flax` extra (jax, jaxlib, flax); `import compiled_unet` never imports this package.
Weights convert to and from our PyTorch model bit-exactly (`compiled_unet.flax.convert`).
"""
from .model import FlaxUNet2DConditionModel, FlaxUNet2DConditionOutput

__all__ = ["FlaxUNet2DConditionModel", "FlaxUNet2DConditionOutput"]
