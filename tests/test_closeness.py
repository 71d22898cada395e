"""tests/closeness.py: the one closeness check the tests share."""
import math

import pytest
import torch

from tests.closeness import assert_close, closeness


def test_scale_is_max_of_one_and_the_reference():
    ref = torch.tensor([0.5, -4.0], dtype=torch.float64)
    c = assert_close(ref + torch.tensor([0.0, 3e-4]), ref)          # 3e-4 <= 1e-4 x 4
    assert c.scale == 4.0 and c.max_abs == pytest.approx(3e-4)
    assert closeness(torch.tensor([0.1]), torch.tensor([0.1])).scale == 1.0
    with pytest.raises(AssertionError, match=r"max-abs 5\.000e-04 \(scale 4\)"):
        assert_close(ref + torch.tensor([0.0, 5e-4]), ref)


def test_rel_l2_when_asked_and_what_names_the_comparison():
    ref = torch.ones(100, dtype=torch.float64)
    out = ref + 1e-5                                                # max-abs fine, rel-L2 1e-5
    assert_close(out, ref, rel_l2=2e-5)
    with pytest.raises(AssertionError, match=r"^unet 16x16: .*rel-L2 1\.000e-05.*rel-L2 tol 1e-06"):
        assert_close(out, ref, rel_l2=1e-6, what="unet 16x16")


def test_non_finite_and_shape_mismatch_fail():
    ref = torch.zeros(3)
    c = closeness(torch.tensor([0.0, float("nan"), 0.0]), ref)
    assert math.isinf(c.max_abs) and math.isinf(c.rel_l2)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([0.0, float("inf"), 0.0]), ref, scale_tol=1.0)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close(torch.zeros(1, 3), ref)
