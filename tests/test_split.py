"""Split: disjoint, deterministic, nested across training sizes; reference = not train/val."""

from __future__ import annotations

import numpy as np
import pytest

from crmse.data import make_split, stride_to


def test_split_is_disjoint_and_reference_is_the_rest():
    s = make_split(1000, 100, 50, 200, seed=3)
    assert [len(s[k]) for k in ("train", "val", "test")] == [100, 50, 200]
    assert not set(s["train"]) & set(s["val"])
    assert not set(s["train"]) & set(s["test"])
    assert not set(s["val"]) & set(s["test"])
    assert set(s["reference"]) == set(range(1000)) - set(s["train"]) - set(s["val"])
    assert set(s["test"]) <= set(s["reference"])
    assert np.all(np.diff(s["reference"]) > 0)


def test_split_is_deterministic_per_seed():
    a, b, c = make_split(500, 50, 20, 40, 0), make_split(500, 50, 20, 40, 0), make_split(500, 50, 20, 40, 1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["train"], c["train"])


def test_sizes_share_val_and_test_and_nest():
    small, large = make_split(800, 50, 30, 100, 7), make_split(800, 200, 30, 100, 7)
    np.testing.assert_array_equal(small["val"], large["val"])
    np.testing.assert_array_equal(small["test"], large["test"])
    assert set(small["train"]) <= set(large["train"])


def test_too_large_split_is_an_error():
    with pytest.raises(ValueError, match="exceeds the 100 frames"):
        make_split(100, 90, 10, 10, 0)


def test_stride_keeps_order_and_bounds():
    idx = np.arange(10, 1010)
    out = stride_to(idx, 100)
    assert len(out) == 100 and out[0] == 10 and out[-1] == 1009 and np.all(np.diff(out) > 0)
    np.testing.assert_array_equal(stride_to(idx, 5000), idx)
