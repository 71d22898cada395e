"""compiled_unet: an export-first UNet2DConditionModel with diffusers' surface and numerics."""
from .config import UNetConfig
from .compile import compile, load, save
from .export import export
from .unet import UNet2DConditionModel, UNet2DConditionOutput

__all__ = ["UNet2DConditionModel", "UNet2DConditionOutput", "UNetConfig", "compile", "export", "load", "save"]
