"""What a long compile is doing, on one terminal line: the stage (export, passes, lowering, C++ kernels
done/total, packaging) and the elapsed time.

    compiled_unet.compile(unet, sample, t, text)                   # a line on stderr when it is a terminal
    compiled_unet.compile(..., progress=False)                     # quiet; COMPILED_UNET_PROGRESS=0 too

The line is drawn by tqdm (the `progress` extra); without tqdm, or when stderr is not a terminal, nothing is
drawn, but the stage timings are still recorded (`CompiledUNet.compile_stages`), so a log or a benchmark can
say where the time went.

C++ kernels: Inductor's generated module submits every kernel to its compile pool, then waits for all of
them. `count_cpp_kernels` wraps the two submission points of `AsyncCompile` (once per process; the wrapper
does nothing unless a compile in the *same thread* is counting), so the line can say "C++ kernels 41/70".
Kernels found in Inductor's on-disk cache count as done at once; kernels built together in one translation
unit (backends/cpp_units.py, the jit default) count as done together. AOTInductor builds its kernels into one
shared library with a single compiler call, which shows as the "lowering" stage only.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from ._once import installed_once

_local = threading.local()       # the CompileProgress counting kernels in this thread, if any


class CompileProgress:
    """Stage timings of one compile, and (when enabled) a tqdm status line showing them live."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = os.environ.get("COMPILED_UNET_PROGRESS", "1") != "0" and _is_terminal(self.stream)
        self.stages: dict[str, float] = {}          # stage name -> seconds, in order
        self.kernels_total = self.kernels_done = 0
        self._t0 = time.perf_counter()
        self._stage = ""
        self._bar = _make_bar(self.stream) if enabled else None

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage (and show it while it runs)."""
        self._stage, t0 = name, time.perf_counter()
        self._refresh()
        try:
            yield self
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    def kernel_submitted(self) -> None:
        self.kernels_total += 1
        self._refresh()

    def kernel_done(self) -> None:
        self.kernels_done += 1
        self._refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._refresh(final=True)
            self._bar.close()
            self._bar = None

    def summary(self) -> str:
        """'export 1.2 s, passes 0.3 s, lowering 40.1 s (70 C++ kernels)'."""
        parts = [f"{name} {seconds:.1f} s" for name, seconds in self.stages.items()]
        if self.kernels_total:
            parts[-1:] = [f"{parts[-1]} ({self.kernels_total} C++ kernels)"] if parts else []
        return ", ".join(parts)

    def _refresh(self, final: bool = False) -> None:
        if self._bar is None:
            return
        text = self.summary() if final else self._stage
        if not final and self.kernels_total:
            text += f": C++ kernels {self.kernels_done}/{self.kernels_total}"
        self._bar.set_description_str(f"compiled_unet {text}", refresh=False)
        self._bar.refresh()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _make_bar(stream):
    try:
        from tqdm import tqdm
    except ImportError:                 # the `progress` extra is not installed: record, draw nothing
        return None
    # A bar with no total: tqdm shows the description and the elapsed time, redrawn every second.
    return tqdm(total=None, file=stream, bar_format="{desc} [{elapsed}]", mininterval=1.0, leave=True)


@contextlib.contextmanager
def count_cpp_kernels(progress: CompileProgress | None):
    """Count the C++ kernels Inductor submits and finishes in this thread while the block runs."""
    if progress is None or not _install_counting_wrappers():
        yield
        return
    previous, _local.progress = getattr(_local, "progress", None), progress
    try:
        yield
    finally:
        _local.progress = previous


@installed_once
def _install_counting_wrappers() -> bool:
    """Wrap AsyncCompile.cpp / cpp_pybinding; False where this torch's Inductor lacks them."""
    try:
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.codecache import CodeCacheFuture
    except ImportError:
        return False
    if not all(hasattr(AsyncCompile, name) for name in ("cpp", "cpp_pybinding")):
        return False
    from .backends import cpp_units

    cpp_units.install()      # beneath the counter, so that kernels built in shared units are counted too

    class _CountedFuture(CodeCacheFuture):
        def __init__(self, inner, progress):
            self.inner, self.progress = inner, progress

        def result(self, timeout=None):
            # torch < 2.13's LambdaFuture.result() takes no timeout
            kernel = self.inner.result() if timeout is None else self.inner.result(timeout)
            self.progress.kernel_done()
            return kernel

    def counting(submit):
        def wrapper(self, *args, **kwargs):
            progress = getattr(_local, "progress", None)
            result = submit(self, *args, **kwargs)
            if progress is None:
                return result
            progress.kernel_submitted()
            if isinstance(result, CodeCacheFuture):      # compiled in the pool: done when waited for
                return _CountedFuture(result, progress)
            progress.kernel_done()                       # compiled (or loaded) synchronously
            return result
        wrapper.__wrapped__ = submit
        return wrapper

    AsyncCompile.cpp = counting(AsyncCompile.cpp)
    AsyncCompile.cpp_pybinding = counting(AsyncCompile.cpp_pybinding)
    return True
