"""Surrogate registry: formulas, primitives (G' = g), limits, Numba == NumPy, validation."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.surrogates import (SURROGATES, get_surrogate, surrogate_grad,
                                surrogate_primitive)

NAMES = list(SURROGATES)
Z = np.concatenate([np.linspace(-3.0, 3.0, 601), [-1e6, -40.0, -1e-12, 0.0, 1e-12, 40.0, 1e6]])


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
def test_numba_equals_numpy(name, scale):
    """Two independent transcriptions of every formula agree (to libm rounding)."""
    sur = get_surrogate(name)
    c = sur.resolve_scale(scale)
    g_nb = np.array([surrogate_grad(sur.code, z, c) for z in Z])
    G_nb = np.array([surrogate_primitive(sur.code, z, c) for z in Z])
    np.testing.assert_allclose(g_nb, sur.grad(Z, scale), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(G_nb, sur.primitive(Z, scale), rtol=1e-14, atol=1e-300)


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
    sur = get_surrogate(name)
    assert surrogate_grad(sur.code, z, sur.default_scale) == pytest.approx(
        float(sur.grad(z)), rel=1e-14, abs=1e-300)
    assert surrogate_primitive(sur.code, z, sur.default_scale) == pytest.approx(
        float(sur.primitive(z)), rel=1e-14, abs=1e-300)


def test_unknown_code_gives_nan():
    assert math.isnan(surrogate_grad(99, 0.0, 1.0))
    assert math.isnan(surrogate_primitive(99, 0.0, 1.0))
