"""Compiler backends for exported UNet graphs. Each backend module owns its options type and runners."""
from .inductor import AotRunner, InductorOptions, JitRunner

# "xla" needs torch_xla (the .venv-xla environment); without it compile(backend="xla") says how to get it.
BACKENDS = ("inductor", "xla")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    return name


__all__ = ["AotRunner", "BACKENDS", "InductorOptions", "JitRunner", "check_backend"]
