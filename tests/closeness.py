"""One closeness check for every test that compares tensors (computed in float64, on the CPU):

    max_abs = max |out - ref|                   <= scale_tol * scale,   scale = max(1, max |ref|)
    rel_l2  = ||out - ref||_2 / ||ref||_2        <= rel_l2               (when given)

Max-abs against the output's scale catches a wrong element; relative L2 catches a small error spread
everywhere (pytorch/ao compares numerics the same way). A non-finite output fails both.
Tolerances the tests use: 1e-6 for the same math in the same order, 1e-5 for a rewritten graph (fp32
reassociation), 1e-4 for another kernel (Inductor, oneDNN, XLA). diffusers parity: tests/oracle.py.
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class Closeness:
    max_abs: float
    scale: float      # max(1, max |ref|)
    rel_l2: float

    def __str__(self) -> str:
        return f"max-abs {self.max_abs:.3e} (scale {self.scale:.3g}), rel-L2 {self.rel_l2:.3e}"


def closeness(out: torch.Tensor, ref: torch.Tensor) -> Closeness:
    """max-abs error, output scale and relative L2 error of `out` against `ref`."""
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"shape mismatch: got {tuple(out.shape)}, expected {tuple(ref.shape)}")
    a, b = out.detach().cpu().double(), ref.detach().cpu().double()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    if not bool(torch.isfinite(a).all()):
        return Closeness(math.inf, scale, math.inf)
    if not b.numel():
        return Closeness(0.0, scale, 0.0)
    diff = a - b
    return Closeness(diff.abs().max().item(), scale, diff.norm().item() / max(b.norm().item(), 1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, scale_tol: float = 1e-4, rel_l2: float | None = None,
                 what: str = "") -> Closeness:
    """Assert max|out - ref| <= scale_tol * max(1, max|ref|) (and rel-L2 <= rel_l2 when given); returns the
    numbers. `what` names the comparison in the failure message."""
    c = closeness(out, ref)
    ok = c.max_abs <= scale_tol * c.scale and (rel_l2 is None or c.rel_l2 <= rel_l2)
    if not ok:
        tol = f"max-abs tol {scale_tol:.0e} x scale" + (f", rel-L2 tol {rel_l2:.0e}" if rel_l2 is not None else "")
        raise AssertionError(f"{what + ': ' if what else ''}{c} ({tol})")
    return c
