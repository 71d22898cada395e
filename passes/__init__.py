"""FX passes on exported ATen graphs of UNet2DConditionModel (ours or diffusers')."""
