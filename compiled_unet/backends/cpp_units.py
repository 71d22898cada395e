"""Inductor's CPU kernels built in a few C++ translation units instead of one per kernel.

Inductor's jit wrapper submits each C++ kernel (`AsyncCompile.cpp_pybinding`) as its own translation unit: one
compiler process that loads the ~150 MB precompiled header, compiles ~0.1-0.2 s of kernel and links a shared
library. For SD1.5 that is ~70 kernels at ~0.85 s each, of which ~0.7 s is the fixed header + link cost
(benchmarks/NOTES.md, "C++ kernel compile: the flags are not what costs"). Inside `batched_cpp_kernels()`, the
kernels of a compile are built in units of 12 consecutive kernels instead: each kernel in a namespace of its own,
with torch's own Python binding for it, from the same compiler command, cache and precompiled header as
Inductor's (`CppPythonBindingsCodeCache.load_async`). A unit is submitted to Inductor's compile workers as soon as
it is full, while Inductor is still generating code (a hook on its wrapper's `define_kernel`); the last at the
generated module's `wait`. The kernels are the same source, so the same machine code; one shared library holds one
Python module per kernel. SD1.5 32x32 on 2 cores: ~70 libraries, ~30 s of a cold compile, become 6 units whose
builds mostly overlap the code generation (benchmarks/NOTES.md, "Round 2, eleventh session").

A kernel whose source does not have the shape this relies on (includes, then one `extern "C"` function named
`kernel`) is built by torch as before; a unit that fails to build falls back to torch's per-kernel path with a
warning. Nothing changes outside the context, with a single compile thread (Inductor then builds synchronously),
or with `COMPILED_UNET_CPP_UNITS=0` (torch's one library per kernel, e.g. to compare).
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import sys
import threading
import warnings

from .._once import installed_once

_local = threading.local()       # the _Batch collecting kernels in this thread, if any
_BatchedKernel = None            # the future class, made at install (it subclasses Inductor's CodeCacheFuture)

_KERNEL_DEF = re.compile(r'^extern "C"\s+void\s+kernel\(', re.MULTILINE)
# Kernels per unit. Each unit pays the header load + link once (~0.7 s) and ~0.1 s per kernel; units of 12 let the
# first ones build on the compile workers while Inductor generates the rest (SD1.5: ~70 kernels, 6 units).
_UNIT_KERNELS = 12
_MAX_UNIT_CHARS = 1_000_000      # ...or fewer when their source is this long


@contextlib.contextmanager
def batched_cpp_kernels(enabled: bool = True):
    """Build the C++ kernels Inductor submits in this thread while the block runs in a few translation units."""
    if not enabled or os.environ.get("COMPILED_UNET_CPP_UNITS", "1") == "0" or not install():
        yield
        return
    previous, _local.batch = getattr(_local, "batch", None), _Batch()
    try:
        yield
    finally:
        _local.batch = previous


@installed_once
def install() -> bool:
    """Wrap AsyncCompile.cpp_pybinding / wait (and the wrapper's define_kernel); False where this torch differs."""
    try:
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.codecache import CodeCacheFuture, CppPythonBindingsCodeCache
    except ImportError:
        return False
    if not all(hasattr(AsyncCompile, n) for n in ("cpp_pybinding", "wait", "submit")) or not all(
            hasattr(CppPythonBindingsCodeCache, n) for n in ("suffix_template", "load_async", "load_pybinding")):
        return False
    global _BatchedKernel

    class _BatchedKernel(CodeCacheFuture):       # what Inductor's wait resolves: a CodeCacheFuture
        def __init__(self, kernel: _Kernel):
            self.kernel = kernel

        def result(self, timeout=None):
            return self.kernel.result()

    cpp_pybinding, wait = AsyncCompile.cpp_pybinding, AsyncCompile.wait

    def batching_cpp_pybinding(self, argtypes, source_code):
        batch = getattr(_local, "batch", None)
        if batch is None or not _compile_threads_above_one() or not _batchable(source_code):
            return cpp_pybinding(self, argtypes, source_code)
        return _BatchedKernel(batch.kernel(list(argtypes), source_code))

    def flushing_wait(self, scope):
        batch = getattr(_local, "batch", None)
        if batch is not None:
            batch.flush()
        return wait(self, scope)

    batching_cpp_pybinding.__wrapped__ = cpp_pybinding
    flushing_wait.__wrapped__ = wait
    AsyncCompile.cpp_pybinding = batching_cpp_pybinding
    AsyncCompile.wait = flushing_wait
    _hook_code_generation()
    return True


def _hook_code_generation() -> None:
    """Start building units while Inductor is still generating code: its Python wrapper's `define_kernel` sees
    each C++ kernel's `async_compile.cpp_pybinding(argtypes, source)` call as text, in the order the generated
    module will make the calls. Without the hook (another torch), units form when the module runs."""
    try:
        from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    except ImportError:
        return
    define_kernel = getattr(PythonWrapperCodegen, "define_kernel", None)
    if define_kernel is None:
        return

    def defining_kernel(self, kernel_name, kernel_body, *args, **kwargs):
        batch = getattr(_local, "batch", None)
        if batch is not None and isinstance(kernel_body, str) and _compile_threads_above_one():
            call = _cpp_pybinding_call(kernel_body)
            if call is not None and _batchable(call[1]):
                batch.kernel(*call)
        return define_kernel(self, kernel_name, kernel_body, *args, **kwargs)

    defining_kernel.__wrapped__ = define_kernel
    PythonWrapperCodegen.define_kernel = defining_kernel


def _cpp_pybinding_call(body: str) -> tuple[list[str], str] | None:
    """(argtypes, source) of a kernel body that is exactly `async_compile.cpp_pybinding([...], r'''...''')`."""
    if "cpp_pybinding" not in body:
        return None
    try:
        call = ast.parse(body.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr == "cpp_pybinding" and len(call.args) == 2 and not call.keywords):
            return None
        argtypes, source = ast.literal_eval(call.args[0]), ast.literal_eval(call.args[1])
    except (SyntaxError, ValueError):
        return None
    if not isinstance(source, str) or not isinstance(argtypes, list):
        return None
    return [str(t) for t in argtypes], source


def _compile_threads_above_one() -> bool:
    from torch._inductor.async_compile import get_compile_threads

    return get_compile_threads() > 1


def _batchable(source: str) -> bool:
    """Includes, then one `extern "C" void kernel(` definition, and no preprocessor definitions (they would leak
    into the kernels after it in a shared unit)."""
    defs = list(_KERNEL_DEF.finditer(source))
    if len(defs) != 1 or "#define" in source or "#undef" in source:
        return False
    head = source[:defs[0].start()]
    return all(not line.strip() or line.startswith("#include") for line in head.splitlines())


class _Batch:
    """The kernels of one compile, built in units of `_UNIT_KERNELS` consecutive kernels in the order they are
    defined: a unit is submitted as soon as it is full, so while Inductor still generates code (the
    `define_kernel` hook), and the last one at the module's `wait`. The same order gives the same units, and so
    hits in Inductor's C++ cache, when a warm compile loads the module from the FX graph cache (no code
    generation: the kernels arrive from the module itself)."""

    def __init__(self):
        self.by_source: dict[str, _Kernel] = {}
        self.open: list[_Kernel] = []       # the unit being filled

    def kernel(self, argtypes: list[str], source: str) -> "_Kernel":
        kernel = self.by_source.get(source)
        if kernel is None or kernel.argtypes != argtypes:
            kernel = self.by_source[source] = _Kernel(self, argtypes, source)
            self.open.append(kernel)
            if len(self.open) >= _UNIT_KERNELS or sum(len(k.source) for k in self.open) >= _MAX_UNIT_CHARS:
                self.flush()
        return kernel

    def flush(self) -> None:
        members, self.open = self.open, []
        if members:
            _Unit(members).submit()


class _Kernel:
    def __init__(self, batch: _Batch, argtypes: list[str], source: str):
        self.batch, self.argtypes, self.source = batch, argtypes, source
        self.unit: _Unit | None = None
        self.index = -1
        self.loaded = None

    def result(self):
        if self.loaded is None:
            if self.unit is None:                  # asked for before its unit was full or its module's wait
                self.batch.flush()
            self.loaded = self.unit.kernel(self)
        return self.loaded


class _Unit:
    """One translation unit: kernel i lives in namespace cu_k<i>, its Python module is `kernel` (i = 0, which
    torch's loader imports) or `kernel_<i>`."""

    def __init__(self, kernels: list[_Kernel]):
        self.kernels = kernels
        for i, k in enumerate(kernels):
            k.unit, k.index = self, i
        self.get_module = None
        self.modules: dict[int, object] = {}
        self.failed: Exception | None = None

    def source(self) -> str:
        from torch._inductor.codecache import CppPythonBindingsCodeCache as Bindings

        includes: list[str] = []
        bodies: list[str] = []
        for i, k in enumerate(self.kernels):
            start = _KERNEL_DEF.search(k.source).start()
            for line in k.source[:start].splitlines():
                if line.strip() and line not in includes:
                    includes.append(line)
            body = _KERNEL_DEF.sub("void kernel(", k.source[start:], count=1)
            entry = "kernel" if i == 0 else f"kernel_{i}"
            parseargs = ", ".join(f"parse_arg<{t.replace('const ', '')}>(args, {n})" for n, t in enumerate(k.argtypes))
            suffix = Bindings.suffix_template.format(
                arg_len=len(k.argtypes), call_entry_func=Bindings.call_entry_function.format(parseargs),
                entry_func=entry, extra_parse_arg=Bindings.extra_parse_arg.format(array_len=-1))
            head = [line for line in suffix.splitlines() if line.startswith(("#include", "#define"))]
            for line in head:
                if line not in includes:
                    includes.append(line)
            rest = "\n".join(line for line in suffix.splitlines() if line not in head)
            bodies.append(f"namespace cu_k{i} {{\n{body}\n{rest}\n}}  // namespace cu_k{i}\n")
        return "\n".join(includes) + "\n\n" + "\n".join(bodies)

    def submit(self) -> None:
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.codecache import CppPythonBindingsCodeCache as Bindings

        try:
            self.get_module = Bindings.load_async(self.source(), "cpu", submit_fn=AsyncCompile.submit)
        except Exception as e:   # noqa: BLE001 - any failure: torch's own per-kernel path
            self._fall_back(e)

    def kernel(self, k: _Kernel):
        if self.failed is None and 0 not in self.modules:
            try:
                self.modules[0] = self.get_module()
            except Exception as e:   # noqa: BLE001
                self._fall_back(e)
        if self.failed is not None:
            from torch._inductor.codecache import CppPythonBindingsCodeCache as Bindings

            return Bindings.load_pybinding(k.argtypes, k.source)
        if k.index not in self.modules:
            self.modules[k.index] = _import_sibling(self.modules[0], f"kernel_{k.index}")
        name = "kernel" if k.index == 0 else f"kernel_{k.index}"
        return getattr(self.modules[k.index], name)

    def _fall_back(self, error: Exception) -> None:
        self.failed = error
        warnings.warn(f"compiled_unet: building {len(self.kernels)} C++ kernels as one unit failed ({error!s:.300}); "
                      "building them one by one", RuntimeWarning, stacklevel=2)


def _import_sibling(first, name: str):
    """Import the module `name` whose init function is in the same shared library as the module `first`."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache as Bindings

    module_name = f"{first.__name__.rpartition('.')[0]}.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, first.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    names = getattr(Bindings, "_loaded_module_names", None)   # what torch's cache_clear unloads (torch >= 2.10)
    if names is not None:
        names.add(module_name)
    spec.loader.exec_module(module)
    return module
