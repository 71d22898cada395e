"""Helpers for the pass tests: export tiny modules, run passes, inspect graphs (exposed as fixtures)."""
import pytest
import torch

from compiled_unet import passes
from tests.closeness import assert_close


class Graphs:
    """Small utilities shared by the pass tests."""

    @staticmethod
    def export(module, *args, **kwargs):
        return torch.export.export(module.eval(), args, kwargs, strict=False)

    @staticmethod
    def ops(ep):
        return passes.op_counts(ep.graph)

    @staticmethod
    def count(ep, *names):
        ops = passes.op_counts(ep.graph)
        return sum(v for k, v in ops.items() if any(n in k for n in names))

    @staticmethod
    def complex_or_fft(ep):
        """Names of nodes that are FFTs or carry a complex value."""
        bad = []
        for n in ep.graph.nodes:
            v = n.meta.get("val")
            if "fft" in str(n.target) or (isinstance(v, torch.Tensor) and v.is_complex()):
                bad.append(n.name)
        return bad

    @staticmethod
    def run(ep, *args, **kwargs):
        with torch.no_grad():
            out = ep.module()(*args, **kwargs)
        return out

    @staticmethod
    def check_close(got, ref, rel=1e-5):
        """assert_close(got, ref, scale_tol=rel) (tests/closeness.py); kept for test_passes_freeu.py."""
        assert_close(got, ref, scale_tol=rel)

    @staticmethod
    def optimize(ep, *pass_list, config=None):
        return passes.optimize(ep, list(pass_list) if pass_list else None, config)


@pytest.fixture
def g():
    return Graphs
