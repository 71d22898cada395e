"""compiled_unet: an export-first UNet2DConditionModel with diffusers' surface and numerics."""
