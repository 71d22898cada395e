"""compiled_unet: an export-first UNet2DConditionModel with diffusers' surface and numerics."""
from .config import UNetConfig
from .compile import compile
from .export import export
from .runtime import CompiledUNet, ShapeBuckets, load, save
from .unet import UNet2DConditionModel, UNet2DConditionOutput
from . import export_cache

export_cache.remember_namespaces()  # the library's functions as imported: the export cache refuses replaced ones

__all__ = ["CompiledUNet", "ShapeBuckets", "UNet2DConditionModel", "UNet2DConditionOutput", "UNetConfig", "compile",
           "export", "load", "save"]
