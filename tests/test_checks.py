"""refimpl._checks.check_array: the finite-value check (one summing pass, then the scan)."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import precision
from refimpl._checks import check_array


@settings(max_examples=60)
@given(n=st.integers(1, 200), bad=st.sampled_from([np.nan, np.inf, -np.inf, "both"]),
       seed=st.integers(0, 2**16), dtype=st.sampled_from(["float64", "float32", "complex128"]))
def test_every_non_finite_entry_is_found(n, bad, seed, dtype):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(dtype)
    i = int(rng.integers(n))
    if bad == "both":  # inf + -inf: the sum is NaN, not inf
        a[i], a[(i + 1) % n] = np.inf, -np.inf
    else:
        a[i] = bad
    want = np.argwhere(~np.isfinite(a))[0]
    with precision.using(dtype if dtype != "complex128" else "float64"):
        with pytest.raises(ValueError, match=rf"first at index \({int(want[0])},\)"):
            check_array("a", a, dtype=None if dtype != "complex128" else np.complex128)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_finite_entries_whose_sum_overflows_are_accepted(dtype):
    """The sum of finite values can overflow: the scan decides then, silently (no warning)."""
    big = np.finfo(dtype).max / 2
    a = np.full(10, big, dtype)
    with precision.using(dtype), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_array("a", a) is not None


def test_empty_and_finite_arrays_pass():
    assert check_array("a", np.zeros((0, 3))).shape == (0, 3)
    a = np.arange(6.0).reshape(2, 3)
    assert np.array_equal(check_array("a", a), a)
