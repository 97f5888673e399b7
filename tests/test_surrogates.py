"""Surrogate registry: formulas, primitives (G' = g), limits, kernels == reference, validation.

Tolerance of kernel vs :mod:`refimpl.reference`: the two sides evaluate each formula with
different but equivalent expressions (the reference writes ``a sig (1 - sig)``, the kernel
``a e / (1 + e)^2``) and with different ``exp``/``atan`` (NumPy's SIMD loops vs Numba's libm
calls, which differ by an ulp on some CPUs). Each side makes fewer than ten roundings on
quantities bounded by the function's peak (``g(0)``; for ``G`` its range, ``total``), so they
agree to ``TOL_EPS * eps * peak`` with ``TOL_EPS = 32`` leaving margin; a wrong constant or
a missing factor is O(peak). Never bit-equality: that would pass on one CPU and fail on another.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import reference as R
from refimpl.surrogates import (SURROGATES, get_surrogate, surrogate_grad,
                                surrogate_primitive)

NAMES = list(SURROGATES)
Z = np.concatenate([np.linspace(-3.0, 3.0, 601), [-1e6, -40.0, -1e-12, 0.0, 1e-12, 40.0, 1e6]])
EPS = np.finfo(np.float64).eps
TOL_EPS = 32


def test_registry_names_codes_and_defaults():
    assert NAMES == ["triangle", "rectangle", "sigmoid", "atan", "fast_sigmoid"]
    defaults = {k: (v.scale_name, v.default_scale) for k, v in SURROGATES.items()}
    assert defaults == {"triangle": ("w", 1.0), "rectangle": ("w", 1.0), "sigmoid": ("a", 4.0),
                        "atan": ("a", 2.0), "fast_sigmoid": ("k", 25.0)}
    assert sorted(v.code for v in SURROGATES.values()) == list(range(5))


def test_unknown_surrogate_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown surrogate 'erf'; valid names are 'triangle', "
                                         r"'rectangle', 'sigmoid', 'atan', 'fast_sigmoid'"):
        get_surrogate("erf")


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf])
def test_scale_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match=r"surrogate_scale \(a of 'atan'\) must be"):
        get_surrogate("atan").resolve_scale(bad)


def test_scale_must_be_a_number():
    with pytest.raises(TypeError, match=r"surrogate_scale \(w of 'triangle'\) must be a real"):
        get_surrogate("triangle").resolve_scale("1")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [None, 0.5, 3.0])
def test_kernels_equal_the_reference_table(name, scale):
    """The Numba kernels (through the public array API) == refimpl.reference's NumPy table."""
    sur = get_surrogate(name)
    c = sur.resolve_scale(scale)
    default, g_ref, G_ref = R.SURROGATES[name]
    assert default == sur.default_scale
    g_peak = float(g_ref(np.array(0.0), c))
    np.testing.assert_allclose(sur.grad(Z, scale), g_ref(Z, c), rtol=0,
                               atol=TOL_EPS * EPS * g_peak)
    np.testing.assert_allclose(sur.primitive(Z, scale), G_ref(Z, c), rtol=0,
                               atol=TOL_EPS * EPS * sur.total(c))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [None, 0.5, 3.0])
def test_primitive_derivative_is_the_surrogate(name, scale):
    """Central differences of G equal g away from the kinks (G' = g: the smooth-mode contract)."""
    sur = get_surrogate(name)
    c = sur.resolve_scale(scale)
    z = np.linspace(-2.5, 2.5, 997) * max(c, 1.0 / c)  # (n,)
    kinks = np.array(sur.kinks(c) or [np.inf])
    z = z[np.min(np.abs(z[:, None] - kinks[None, :]), axis=1) > 1e-3]
    eps = 1e-6
    fd = (sur.primitive(z + eps, scale) - sur.primitive(z - eps, scale)) / (2 * eps)
    np.testing.assert_allclose(fd, sur.grad(z, scale), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_primitive_is_a_step_with_the_stated_limits(name):
    sur = get_surrogate(name)
    c = sur.default_scale
    lo = float(sur.primitive(-1e9))
    hi = float(sur.primitive(1e9))
    assert lo == pytest.approx(0.0, abs=1e-8)
    assert hi == pytest.approx(sur.total(c), rel=1e-7)
    G = sur.primitive(Z)
    assert np.all(np.diff(G[:601]) >= 0)  # monotone on the grid
    assert np.all(sur.grad(Z) >= 0)


def test_fast_sigmoid_is_not_normalised():
    """snntorch's fast sigmoid integrates to 2/k (0.08 at k = 25), not 1."""
    sur = get_surrogate("fast_sigmoid")
    assert sur.total(25.0) == pytest.approx(0.08)
    assert float(sur.primitive(0.0)) == pytest.approx(1 / 25)


@pytest.mark.parametrize("name, g0", [("triangle", 1.0), ("rectangle", 1.0), ("sigmoid", 1.0),
                                      ("atan", 1.0), ("fast_sigmoid", 1.0)])
def test_peak_values_at_default_scale(name, g0):
    """g(0): 1/w, 1/w, a/4, a/2, 1 -- all 1 at the defaults (DESIGN.md table)."""
    assert float(get_surrogate(name).grad(0.0)) == pytest.approx(g0)


def test_formulas_at_sample_points():
    """Spot values, written out by hand from DESIGN.md's table."""
    z = 0.3
    assert float(get_surrogate("triangle").grad(z, 2.0)) == pytest.approx((1 - 0.15) / 2)
    assert float(get_surrogate("rectangle").grad(z, 0.5)) == 0.0
    assert float(get_surrogate("rectangle").grad(0.2, 0.5)) == 2.0
    sig = 1 / (1 + math.exp(-4 * z))
    assert float(get_surrogate("sigmoid").grad(z)) == pytest.approx(4 * sig * (1 - sig))
    assert float(get_surrogate("atan").grad(z)) == pytest.approx(1 / (1 + (math.pi * z) ** 2))
    assert float(get_surrogate("fast_sigmoid").grad(z)) == pytest.approx(1 / (1 + 25 * z) ** 2)
    # SpikingSSM's piecewise_quadratic backward is (1 - |x|) on |x| <= 1: the triangle with w = 1
    assert float(get_surrogate("triangle").grad(-0.4)) == pytest.approx(0.6)


def test_sigmoid_grad_has_no_cancellation_far_out():
    """a sig (1 - sig) would round to 0 at a z = 40; the e/(1+e)^2 form keeps the tail."""
    g = float(get_surrogate("sigmoid").grad(10.0))
    assert g == pytest.approx(4 * math.exp(-40.0), rel=1e-12)


@given(z=st.floats(-50, 50, allow_nan=False), name=st.sampled_from(NAMES))
def test_scalar_dispatch_matches_registry(z, name):
    """The array API runs the scalar kernels: the same numbers (to an ulp, in case a vector
    math library vectorises the array loop on some machine)."""
    sur = get_surrogate(name)
    assert surrogate_grad(sur.code, z, sur.default_scale) == pytest.approx(
        float(sur.grad(z)), rel=4 * EPS, abs=1e-300)
    assert surrogate_primitive(sur.code, z, sur.default_scale) == pytest.approx(
        float(sur.primitive(z)), rel=4 * EPS, abs=1e-300)


@pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 3, 5)])
def test_array_api_keeps_shape_and_dtype(shape):
    """float64 of z's shape; a 0-d z gives a NumPy scalar, as a ufunc does."""
    z = np.random.default_rng(0).normal(size=shape)
    for f in (get_surrogate("sigmoid").grad, get_surrogate("sigmoid").primitive):
        out = f(z)
        assert out.dtype == np.float64 and out.shape == shape
        assert isinstance(out, np.ndarray if shape else np.float64)


def test_array_api_reads_strided_views_and_scalars():
    z = np.linspace(-2, 2, 24).reshape(4, 6)  # (4, 6)
    sur = get_surrogate("atan")
    np.testing.assert_array_equal(sur.grad(z.T), sur.grad(z).T)
    np.testing.assert_array_equal(sur.primitive(z[:, ::2]), sur.primitive(z)[:, ::2])
    for zz in (0.3, 1, np.float64(0.3)):
        out = sur.grad(zz)
        assert isinstance(out, np.float64)
        assert out == surrogate_grad(sur.code, float(zz), sur.default_scale)


def test_array_api_refuses_other_dtypes():
    with pytest.raises(TypeError, match=r"z must have dtype float64, got float32; .*"
                                        r"z.astype\(np.float64\)"):
        get_surrogate("triangle").grad(np.zeros(3, dtype=np.float32))
    with pytest.raises(TypeError, match=r"z must be a float64 array or a real number, got list"):
        get_surrogate("triangle").primitive([0.0, 1.0])


def test_unknown_code_gives_nan():
    assert math.isnan(surrogate_grad(99, 0.0, 1.0))
    assert math.isnan(surrogate_primitive(99, 0.0, 1.0))
