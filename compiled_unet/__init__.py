"""compiled_unet: an export-first UNet2DConditionModel with diffusers' surface and numerics."""
from .config import UNetConfig
from .compile import compile
from .export import export
from .runtime import CompiledUNet, ShapeBuckets, load, save
from .unet import UNet2DConditionModel, UNet2DConditionOutput

__all__ = ["CompiledUNet", "ShapeBuckets", "UNet2DConditionModel", "UNet2DConditionOutput", "UNetConfig", "compile",
           "export", "load", "save"]
