"""`save` / `load`: compiled UNets as artifacts, one module for every format, dispatched by what is on disk.

    compiled_unet.save(compiled, "unet.pt2")     # AOTInductor package (inductor) / StableHLO folder (xla)
    compiled_unet.save(bundle, "buckets/")       # a bucket bundle: manifest.json + one artifact per bucket
    compiled_unet.load(path)                     # -> CompiledUNet or ShapeBuckets; no model source needed

Every write is atomic (a temporary next to the target, renamed into place; parent folders created). Reading
checks before it loads: a truncated, corrupt, random or foreign file or folder is a `DamagedArtifact`
(a ValueError) naming the path and saying what is wrong, never a raw error from inside torch.
"""
from __future__ import annotations

import json
import os

from .._atomic import atomic_dir, atomic_file, write_atomic
from ..backends import inductor
from ..errors import DamagedArtifact
from .buckets import ShapeBuckets
from .compiled import CompiledUNet, report_from_doc
from .signature import Signature

BUNDLE_MANIFEST = "manifest.json"
BUNDLE_FORMAT = "compiled_unet.buckets/1"
XLA_MANIFEST = "compiled_unet_xla.json"   # backends/xla.py's MANIFEST (kept here so reading needs no torch_xla)


def save(compiled, path) -> str:
    """Write `compiled` (CompiledUNet or ShapeBuckets) to `path` atomically; returns the path."""
    path = os.fspath(path)
    if isinstance(compiled, ShapeBuckets):
        return _save_bundle(compiled, path)
    if not isinstance(compiled, CompiledUNet):
        raise TypeError(f"save expects a CompiledUNet or ShapeBuckets, got {type(compiled).__name__}")
    runner = compiled._runner
    if runner.artifact_is_dir:
        with atomic_dir(path) as tmp:
            runner.save(tmp, compiled.artifact_doc())
    else:
        # Ends in .pt2: aoti_compile_and_package refuses any other package path.
        with atomic_file(path, suffix=".pt2") as tmp:
            runner.save(tmp, {**compiled.artifact_doc(), "format": inductor.FORMAT})
    return path


def _save_bundle(bundle: ShapeBuckets, path: str) -> str:
    with atomic_dir(path) as tmp:
        names = []
        for i, b in enumerate(bundle.buckets):
            names.append(f"bucket_{i}" + ("" if b._runner.artifact_is_dir else ".pt2"))
            save(b, os.path.join(tmp, names[-1]))
        write_atomic(os.path.join(tmp, BUNDLE_MANIFEST),
                     json.dumps({"format": BUNDLE_FORMAT, "buckets": names, "shapes": bundle.available()}, indent=1))
    return path


def load(path, *, check_finite: bool = False):
    """Load what `save` wrote: a `.pt2` or StableHLO folder -> CompiledUNet; a bucket folder -> ShapeBuckets."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, BUNDLE_MANIFEST)):
            return _load_bundle(path, check_finite)
        if os.path.isfile(os.path.join(path, XLA_MANIFEST)):
            from ..backends import xla

            return _compiled(xla.StableHLORunner.load(path), path, check_finite)
        raise DamagedArtifact(f"{path}: a folder, but not a compiled UNet artifact (no {BUNDLE_MANIFEST} of a "
                              f"bucket bundle, no {XLA_MANIFEST} of a StableHLO artifact)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no compiled UNet at {path}")
    return _compiled(inductor.AotRunner.load(path), path, check_finite)


def _compiled(runner, path: str, check_finite: bool) -> CompiledUNet:
    doc = runner.doc
    try:
        signature = Signature.from_json(doc["signature"])
    except (KeyError, TypeError, ValueError):
        raise DamagedArtifact(f"{path}: damaged artifact (its input signature is unreadable)") from None
    try:
        report = report_from_doc(doc)
    except ValueError as e:
        raise DamagedArtifact(f"{path}: damaged artifact ({e})") from None
    return CompiledUNet(runner, signature, doc.get("config"), report=report, freeu=doc.get("freeu"),
                        fused_qkv=doc.get("fused_qkv"), check_finite=check_finite)


def _load_bundle(path: str, check_finite: bool) -> ShapeBuckets:
    manifest = os.path.join(path, BUNDLE_MANIFEST)
    try:
        with open(manifest) as f:
            doc = json.load(f)
        names = list(doc["buckets"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedArtifact(f"{manifest}: damaged bucket bundle manifest") from None
    if doc.get("format") != BUNDLE_FORMAT:
        raise DamagedArtifact(f"{manifest}: unsupported format {doc.get('format')!r}; expected {BUNDLE_FORMAT!r}")
    missing = [n for n in names if not os.path.exists(os.path.join(path, n))]
    if missing or not names:
        raise DamagedArtifact(f"{path}: damaged bucket bundle (missing {missing or 'every bucket'})")
    return ShapeBuckets([load(os.path.join(path, n), check_finite=check_finite) for n in names])
