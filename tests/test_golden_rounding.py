"""The verifier's rounding to a format (refimpl.golden.profiles.round_to / read_as), against
NumPy's float32 and float16 casts and a bfloat16 rounding of float32 bits written here (issue
21): nearest, ties to even, subnormals, overflow to inf."""
import numpy as np
import pytest

from refimpl.golden.profiles import PROFILES, read_as, representable, round_to

from test_golden import to16


def _values():
    rng = np.random.default_rng(7)
    x = rng.normal(size=20000) * np.exp(rng.uniform(-110, 100, size=20000))
    ties = []
    for e in (-20, -14, -1, 0, 3, 15):  # exact midpoints of float16 and bfloat16 neighbours
        for m in (1.0, 1.5, 1.75):
            ties += [m * 2.0 ** e * (1 + 2.0 ** -11), m * 2.0 ** e * (1 + 2.0 ** -8),
                     m * 2.0 ** e * (1 + 3 * 2.0 ** -11), m * 2.0 ** e * (1 + 3 * 2.0 ** -8)]
    edges = [65504.0, 65519.99, 65520.0, 70000.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
             2.0 ** -14, 1e-30, 0.0, -0.0, np.inf, -np.inf, 3.4e38, 3.39e38]
    return np.concatenate([x, -x[:100], ties, np.negative(ties), edges])


def test_float32_and_float16_match_numpys_casts():
    x = _values()
    with np.errstate(over="ignore"):
        assert np.array_equal(round_to(x, PROFILES["float32"]),
                              x.astype(np.float32).astype(np.float64))
        assert np.array_equal(round_to(x, PROFILES["float16"]),
                              x.astype(np.float16).astype(np.float64))


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_read_via_float32_matches_pytorchs_way(fmt):
    x = _values()
    x = x[np.abs(x) < 3e38]  # float32 overflow: both give inf, but the cast warns
    assert np.array_equal(read_as(x, PROFILES[fmt], PROFILES["float32"]), to16(x, fmt))


def test_direct_and_via_float32_differ_only_at_double_rounding_midpoints():
    # a float64 value just above a bfloat16 midpoint that float32 rounds onto the midpoint
    x = np.array([1.0 + 2.0 ** -8 + 2.0 ** -30])
    direct, via = read_as(x, PROFILES["bfloat16"]), read_as(x, PROFILES["bfloat16"],
                                                            PROFILES["float32"])
    assert direct[0] == 1.0 + 2.0 ** -7 and via[0] == 1.0  # up; down (tie to even)
    assert representable(direct, PROFILES["bfloat16"]) and not representable(
        x, PROFILES["bfloat16"])
