"""One test per input rule of the SSM core: the error type and its message (STYLE.md)."""
import numpy as np
import pytest

from refimpl.conv import direct_conv, fftconv, fftconv_bwd
from refimpl.recurrence import ssm_recurrence, ssm_scan, ssm_step, ssm_zero_state
from refimpl.s4d import s4d_layer_fwd
from refimpl.ssm import discretize, discretize_params, s4d_init, s4d_kernel, s4d_kernel_bwd


@pytest.fixture
def p():
    return s4d_init(3, 4, seed=0)


def kargs(p):
    return p["log_dt"], p["log_A_real"], p["A_imag"], p["C_re"], p["C_im"]


def coeffs(p):
    dA, dB = discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"])
    return dA, dB, p["C_re"] + 1j * p["C_im"]


U = np.zeros((2, 3, 10))


# --- wrong dtype: TypeError naming the argument and the fix -----------------------------------

def test_float32_input_is_rejected_not_cast(p):
    K = s4d_kernel(*kargs(p), 10)
    with pytest.raises(TypeError,
                       match=r"u must have dtype float64, got float32.*u\.astype\(np\.float64\)"):
        fftconv(U.astype(np.float32), K, p["D"])


def test_integer_parameter_is_rejected(p):
    with pytest.raises(TypeError, match=r"log_dt must have dtype float64, got int64"):
        s4d_kernel(np.zeros(3, dtype=np.int64), *kargs(p)[1:], 10)


def test_list_instead_of_array_is_rejected(p):
    with pytest.raises(TypeError, match=r"D must be a numpy.ndarray of float64, got list"):
        fftconv(U, s4d_kernel(*kargs(p), 10), [0.0, 0.0, 0.0])


def test_real_coefficients_for_complex_recurrence_are_rejected(p):
    dA, dB, C = coeffs(p)
    with pytest.raises(TypeError, match=r"dA must have dtype complex128, got float64"):
        ssm_recurrence(U, dA.real.copy(), dB, C)


# --- rank and shape -------------------------------------------------------------------------

def test_wrong_rank_input(p):
    with pytest.raises(ValueError, match=r"u must have rank 3, got shape \(3, 10\)"):
        fftconv(U[0], s4d_kernel(*kargs(p), 10))


def test_kernel_shape_mismatch(p):
    with pytest.raises(ValueError, match=r"K must have shape \(3, 10\), got \(3, 9\)"):
        fftconv(U, s4d_kernel(*kargs(p), 9))


def test_channel_mismatch_in_parameters(p):
    with pytest.raises(ValueError, match=r"A_imag must have shape \(3, 2\), got \(2, 2\)"):
        s4d_kernel(p["log_dt"], p["log_A_real"], p["A_imag"][:2], p["C_re"], p["C_im"], 10)


def test_cotangent_shape_mismatch(p):
    K = s4d_kernel(*kargs(p), 10)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 10\), got \(2, 3, 9\)"):
        fftconv_bwd(U, K, p["D"], np.zeros((2, 3, 9)))


def test_kernel_cotangent_shape_mismatch(p):
    with pytest.raises(ValueError, match=r"dK must have rank 2"):
        s4d_kernel_bwd(*kargs(p), np.zeros((2, 3, 10)))


def test_only_one_of_B_re_B_im(p):
    with pytest.raises(ValueError, match=r"pass both B_re and B_im"):
        s4d_kernel(*kargs(p), 10, B_re=np.ones((3, 2)))


def test_step_state_shape(p):
    dA, dB, C = coeffs(p)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3, 2\), got \(2, 3, 3\)"):
        ssm_step(np.zeros((2, 3, 3), complex), U[:, :, 0], dA, dB, C)


def test_step_rejects_bidirectional(p):
    dA, dB, C = coeffs(p)
    with pytest.raises(ValueError, match=r"ssm_step is causal"):
        ssm_step(ssm_zero_state(2, 3, 2), U[:, :, 0], dA, dB, np.stack([C, C]))


def test_missing_layer_parameter(p):
    del p["D"]
    with pytest.raises(ValueError, match=r"params is missing \['D'\]"):
        s4d_layer_fwd(U, p)


# --- L < 1 ----------------------------------------------------------------------------------

def test_kernel_length_zero(p):
    with pytest.raises(ValueError, match=r"L must be >= 1, got 0"):
        s4d_kernel(*kargs(p), 0)


def test_kernel_length_not_integer(p):
    with pytest.raises(TypeError, match=r"L must be an integer, got 10.0"):
        s4d_kernel(*kargs(p), 10.0)


def test_empty_sequence(p):
    with pytest.raises(ValueError, match=r"u must have at least one time step \(L >= 1\)"):
        fftconv(np.zeros((2, 3, 0)), np.zeros((3, 0)))


def test_empty_sequence_recurrence(p):
    with pytest.raises(ValueError, match=r"u must have at least one time step"):
        ssm_scan(np.zeros((2, 3, 0)), *coeffs(p))


# --- non-finite values ----------------------------------------------------------------------

def test_nan_input(p):
    u = U.copy()
    u[1, 2, 5] = np.nan
    with pytest.raises(ValueError,
                       match=r"u contains non-finite values \(first at index \(1, 2, 5\): nan\)"):
        direct_conv(u, s4d_kernel(*kargs(p), 10))


def test_inf_parameter(p):
    p["C_im"][0, 1] = np.inf
    with pytest.raises(ValueError, match=r"C_im contains non-finite values"):
        s4d_kernel(*kargs(p), 10)


# --- dt <= 0 ----------------------------------------------------------------------------------

def test_dt_zero_in_discretize(p):
    A = -0.5 + 1j * np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"dt must be > 0 everywhere, got min\(dt\) = 0.0"):
        discretize(np.array([0.1, 0.0, 0.1]), A)


def test_log_dt_underflow(p):
    p["log_dt"][1] = -800.0
    with pytest.raises(ValueError,
                       match=r"dt = exp\(log_dt\) must be > 0, but log_dt\[1\] = -800.0"):
        s4d_kernel(*kargs(p), 10)


def test_dt_min_not_positive():
    with pytest.raises(ValueError, match=r"dt_min must be in \(0.0, inf\], got 0"):
        s4d_init(3, 4, dt_min=0)


# --- unstable modes ---------------------------------------------------------------------------

def test_unstable_A_in_discretize():
    A = np.full((1, 2), -0.5 + 0j)
    A[0, 1] = 0.0 + 1j
    with pytest.raises(ValueError, match=r"unstable mode: Re A must be < 0, got A\[0, 1\] = 1j"):
        discretize(np.array([0.1]), A)


def test_log_A_real_underflow_is_unstable(p):
    p["log_A_real"][2, 0] = -1000.0
    with pytest.raises(ValueError, match=r"unstable mode: Re A = -exp\(log_A_real\) must be < 0"):
        s4d_kernel(*kargs(p), 10)


@pytest.mark.parametrize("fn", ["kernel", "kernel_bwd", "discretize_params", "layer"])
def test_log_A_real_overflow_is_unstable(p, fn):
    """exp(800) = inf: a ValueError (README), not an all-NaN kernel with a RuntimeWarning."""
    p["log_A_real"][1, 0] = 800.0
    with pytest.raises(ValueError, match=r"unstable mode: Re A = -exp\(log_A_real\) must be "
                                         r"finite, but log_A_real\[1, 0\] = 800.0 overflows"):
        with np.errstate(all="raise"):  # and no floating-point warning on the way
            if fn == "kernel":
                s4d_kernel(*kargs(p), 10)
            elif fn == "kernel_bwd":
                s4d_kernel_bwd(*kargs(p), np.ones((3, 10)))
            elif fn == "discretize_params":
                discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"])
            else:
                s4d_layer_fwd(np.ones((1, 3, 10)), p)


def test_log_dt_overflow(p):
    p["log_dt"][2] = 710.0
    with pytest.raises(ValueError, match=r"dt = exp\(log_dt\) must be finite, but "
                                         r"log_dt\[2\] = 710.0 overflows"):
        s4d_kernel(*kargs(p), 10)


def test_discretization_overflow_is_named(p):
    """Finite dt, A, B whose ZOH dB = B (exp(dt A) - 1) / A ~ B dt exceeds float64: refused,
    naming the discretization and the coefficient."""
    p["log_dt"][0], p["log_A_real"][0, 0] = 5.0, -700.0
    B_re, B_im = np.full((3, 2), 1e308), np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"the zoh discretization overflows: dB\[0, 0\]"):
        s4d_kernel(*kargs(p), 10, B_re=B_re, B_im=B_im)


def test_kernel_overflow_from_huge_C(p):
    p["C_re"][...] = 1e308
    B_re, B_im = np.full((3, 2), 1e300), np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"S4D kernel overflows"):
        s4d_kernel(*kargs(p), 10, B_re=B_re, B_im=B_im)


@pytest.mark.parametrize("conv", [fftconv, direct_conv])
def test_convolution_overflow_is_refused(p, conv):
    """1e308 inputs: the result does not fit in float64; a ValueError naming the overflow
    rather than inf / NaN returned (the result is checked, so nothing that fits is refused)."""
    u = np.full((1, 3, 10), 1e308)
    K = np.ones((3, 10))
    with pytest.raises(ValueError, match=r"conv overflows the float64 range: y\[0, 0, [01]\]"):
        conv(u, K)
    y = conv(np.full((1, 3, 10), 1e307), np.full((3, 10), 1e-9))  # large but fits: accepted
    assert np.all(np.isfinite(y))


def test_convolution_bwd_overflow_is_refused(p):
    u = np.full((1, 3, 10), 1e308)
    with pytest.raises(ValueError, match=r"fftconv_bwd overflows the float64 range"):
        fftconv_bwd(u, np.ones((3, 10)), None, np.ones((1, 3, 10)))


def test_unstable_recurrence(p):
    dA, dB, C = coeffs(p)
    dA[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"unstable mode: \|dA\| must be < 1"):
        ssm_recurrence(U, dA, dB, C)


# --- unknown names ----------------------------------------------------------------------------

def test_unknown_init():
    with pytest.raises(ValueError,
                       match=r"unknown init 'legs'; valid names are 'lin', 'inv', 'real'"):
        s4d_init(3, 4, init="legs")


def test_unknown_disc(p):
    with pytest.raises(ValueError,
                       match=r"unknown disc 'euler'; valid names are 'zoh', 'bilinear'"):
        s4d_kernel(*kargs(p), 10, disc="euler")


def test_odd_state_size():
    with pytest.raises(ValueError, match=r"N \(d_state\) must be even"):
        s4d_init(3, 5)


def test_inputs_not_modified(p):
    """Validation never writes: a non-contiguous input is copied, never changed in place."""
    u = np.asfortranarray(np.random.default_rng(0).normal(size=(2, 3, 10)))
    before = u.copy()
    fftconv(u, s4d_kernel(*kargs(p), 10), p["D"])
    np.testing.assert_array_equal(u, before)
