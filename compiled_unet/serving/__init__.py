"""Serving a saved artifact on Ray Serve: replicas, request batching into compiled buckets, a tensor wire format.

    compiled-unet serve unet_buckets/ --replicas 2 --port 8000      # command line (blocks; Ctrl-C stops)

    from compiled_unet.serving import run_local, infer_with_retry
    handle = run_local("unet_buckets/", replicas=2)                 # Python: a Ray Serve DeploymentHandle

- `batching.py` (no Ray): which requests may share a graph call, packing into the largest compiled batch,
  padding to the nearest bucket, splitting per request, clear rejections.
- `wire.py` (no Ray): safetensors bytes over HTTP; dicts of tensors through Ray handles.
- `deployment.py`: the Ray Serve deployment (imports Ray: the optional extra `compiled_unet[serve]`).

Importing this package does not import Ray; the Ray-side names below load `deployment.py` on first use.
"""
from __future__ import annotations

from .batching import Batcher, Request, Result  # noqa: F401

_RAY_NAMES = ("UNetServer", "app", "run_local", "infer_with_retry", "shutdown", "start_ray", "RETRYABLE")


def __getattr__(name: str):
    if name in _RAY_NAMES or name == "deployment":
        import importlib

        try:
            deployment = importlib.import_module(f"{__name__}.deployment")  # not `from . import`: that asks __getattr__
        except ImportError as e:
            raise ImportError(f"compiled_unet.serving.{name} needs Ray Serve: pip install 'compiled_unet[serve]' "
                              f"({e})") from None
        return deployment if name == "deployment" else getattr(deployment, name)
    raise AttributeError(f"module 'compiled_unet.serving' has no attribute {name!r}")
