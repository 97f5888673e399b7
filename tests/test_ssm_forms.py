"""The four forms of an S4D layer agree: direct convolution, FFT convolution, recurrence, scan.

Tolerances. All four forms compute ``y[t] = sum_s K[t-s] u[s] + D u[t]`` (or the recurrence
that generates it) and differ only in summation order and, for the FFT, in the O(eps log n)
error of the transform. A rounding bound for such sums is ``c * eps * S`` with
``S = max_t sum_s |K[t-s]| |u[s]| + |D| |u|`` (the sum of magnitudes, not the result) and a
modest ``c``: we use ``atol = 1e3 * eps * S`` (about 2e-13 S), far below any real discrepancy
(a wrong index or a missing term is O(S)). The kernel is compared with the reference's
``exp(l log dA)``; both are exact to ``O(l |log dA| eps)`` relative per term, so
``atol = 1e3 * eps * (1 + L max|log dA|) * 2 sum_n |C dB|``.
"""
import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from refimpl import reference as R
from refimpl.conv import direct_conv, fft_length, fftconv
from refimpl.recurrence import ssm_recurrence, ssm_scan, ssm_step, ssm_zero_state
from refimpl.ssm import discretize_params, s4d_init, s4d_kernel

from strategies import ssm_cases

EPS = np.finfo(np.float64).eps


def kernel_of(p, L, disc):
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    return s4d_kernel(p["log_dt"], p["log_A_real"], p["A_imag"], p["C_re"], p["C_im"], L, disc, **B)


def coeffs_of(p, disc):
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    dA, dB = discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"], disc=disc, **B)
    return dA, dB, p["C_re"] + 1j * p["C_im"]


def magnitude(u, K, D):
    """``S = max_t sum_s |K||u| + |D||u|``: the scale of the rounding bound."""
    return float(np.abs(direct_conv(np.abs(u), np.abs(K))).max()
                 + np.abs(D[:, None] * u).max()) + 1e-300


# single time step, bidirectional: K1 is never used, the anti-causal sum is empty
L1_BIDIRECTIONAL = (s4d_init(2, 4, "lin", seed=0, bidirectional=True),
                    np.random.default_rng(0).normal(size=(1, 2, 1)), "zoh")


@given(ssm_cases())
@example(L1_BIDIRECTIONAL)
def test_four_forms_agree(case):
    p, u, disc = case
    L = u.shape[-1]
    K = kernel_of(p, L, disc)  # (H, L) or (2, H, L)
    dA, dB, C = coeffs_of(p, disc)
    y_direct = direct_conv(u, K, p["D"])
    atol = 1e3 * EPS * magnitude(u, K, p["D"])
    np.testing.assert_allclose(fftconv(u, K, p["D"]), y_direct, rtol=0, atol=atol)
    np.testing.assert_allclose(ssm_recurrence(u, dA, dB, C, p["D"]), y_direct, rtol=0, atol=atol)
    np.testing.assert_allclose(ssm_scan(u, dA, dB, C, p["D"]), y_direct, rtol=0, atol=atol)
    # and the standalone NumPy statement of the math
    np.testing.assert_allclose(R.causal_conv(u, K, p["D"]), y_direct, rtol=0, atol=atol)
    np.testing.assert_allclose(R.ssm_recurrence(u, dA, dB, C, p["D"]), y_direct, rtol=0, atol=atol)


@given(ssm_cases())
def test_kernel_matches_reference(case):
    p, u, disc = case
    L = u.shape[-1]
    K = kernel_of(p, L, disc)
    B = p["B_re"] + 1j * p["B_im"] if "B_re" in p else None
    C = p["C_re"] + 1j * p["C_im"]
    K_ref = R.s4d_kernel(p["log_dt"], p["log_A_real"], p["A_imag"], C, L, B=B, disc=disc)
    dA, dB, _ = coeffs_of(p, disc)
    W = np.abs(C * dB).sum(-1)[..., None]  # (H, 1) or (2, H, 1)
    atol = 1e3 * EPS * (1 + L * np.abs(np.log(dA)).max()) * 2 * W
    assert np.all(np.abs(K - K_ref) <= atol)


@given(ssm_cases(bidirectional=False))
def test_step_api_streams_the_recurrence(case):
    """Looping the streaming step (state in, state out) equals the whole-sequence kernel."""
    p, u, disc = case
    dA, dB, C = coeffs_of(p, disc)
    x = ssm_zero_state(u.shape[0], *dA.shape)
    ys = []
    for t in range(u.shape[-1]):
        x_before = x.copy()
        y_t, x_new = ssm_step(x, u[:, :, t], dA, dB, C, p["D"])
        np.testing.assert_array_equal(x, x_before)  # the input state is not modified
        x = x_new
        ys.append(y_t)
    y = np.stack(ys, axis=-1)
    atol = 1e3 * EPS * magnitude(u, kernel_of(p, u.shape[-1], disc), p["D"])
    np.testing.assert_allclose(y, ssm_recurrence(u, dA, dB, C, p["D"]), rtol=0, atol=atol)


@given(st.integers(1, 5000))
def test_fft_length_is_fast_and_long_enough(L):
    n = fft_length(L)
    assert n >= 2 * L
    m = n
    for f in (2, 3, 5):
        while m % f == 0:
            m //= f
    assert m == 1, f"fft length {n} is not 5-smooth"


def test_dt_extremes_change_the_kernel_as_expected():
    """dt = 1e-3 keeps a long memory (slow decay), dt = 1e-1 a short one: a sanity check that
    dt enters the kernel at all, independent of the oracle."""
    L = 2000
    slow = s4d_init(1, 2, "real", seed=0, dt_min=1e-3, dt_max=1e-3)
    fast = s4d_init(1, 2, "real", seed=0, dt_min=1e-1, dt_max=1e-1)
    for p, dt in ((slow, 1e-3), (fast, 1e-1)):
        p["C_re"][:] = 1.0
        p["C_im"][:] = 0.0
        K = kernel_of(p, L, "zoh")[0]
        # A = -1 real, C = 1, B = 1: K[l] = 2 (1 - e^-dt) e^(-dt l), in closed form
        expected = 2 * (-np.expm1(-dt)) * np.exp(-dt * np.arange(L))
        np.testing.assert_allclose(K, expected, rtol=1e-12)


def test_fft_result_does_not_depend_on_thread_count(monkeypatch):
    from refimpl import threads
    rng = np.random.default_rng(0)
    u, K = rng.normal(size=(4, 8, 300)), rng.normal(size=(2, 8, 300))
    with threads.using(1):
        one = fftconv(u, K)
    with threads.using(2):
        np.testing.assert_array_equal(fftconv(u, K), one)
