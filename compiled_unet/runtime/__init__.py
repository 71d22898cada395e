"""The runtime of compiled UNets: one call signature, one CompiledUNet over any backend's runner, shape
buckets, and artifacts (save/load) for every format. Built by `compiled_unet.compile` / `compile_buckets`."""
from .artifacts import load, save
from .buckets import ShapeBuckets
from .compiled import CompiledUNet
from .signature import FORWARD_ARGS, Signature

__all__ = ["CompiledUNet", "FORWARD_ARGS", "ShapeBuckets", "Signature", "load", "save"]
