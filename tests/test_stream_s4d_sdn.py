"""State in and out for the S4D layer and the SDN neuron (issue 12; DESIGN.md section 10).

Tolerances (eps = float64 machine epsilon), derived from the depth of the computation:

- One complex product rounds by at most ``sqrt(5) eps < 3 eps`` relative, so the running power
  ``dA^l`` of the Vandermonde kernel (``l`` products) is off by ``<= 3 l eps`` relative.
- The end state's powers ``exp(k log dA)``: ``log dA`` is accurate to ``<= 8 eps`` absolute
  (``log|dA|`` by ``log1p`` of ``(re - 1)(re + 1) + im^2``, terms of size ``<= 2``, a few
  roundings each; the phase ``atan2`` to ``pi eps``), so ``dA^k`` is off by ``<= (8 k + 2) eps``
  relative. The sum over ``s`` (a matrix product, ``T`` terms) adds ``<= T eps`` of the sum of
  the terms' magnitudes, the factor ``dB`` another ``3 eps``.
- FFT convolution: ``<= 5 log2(n) eps sum_l |K[l]| max|u|`` per run (radix stages, each a
  butterfly with a rounded twiddle), two runs compared.
- Everything is scaled by ``S_h = max|u| (|D_h| + 2 sum_n |C dB| G_n)`` with
  ``G_n = sum_{l<L} |dA_n|^l``, which bounds ``sum_l |K[l]| max|u|``, the state term and every
  partial sum.

Hence chunked vs whole S4D output: ``eps (3 L + 3 L + 8 L + L + 10 log2 n + 16) S_h`` (the
whole run's kernel powers; the chunked run's state-term powers, end-state powers and sums over
every earlier chunk, at most ``L`` steps in all; both FFTs; the last products).
End state vs the recurrence: the recurrence rounds ``<= 7 eps X_n`` per step (two complex
products and a sum) and damps older errors by ``|dA| < 1``: ``7 L eps X_n``; the closed form
``(8 L + L + 5) eps X_n``, with ``X_n = |dB_n| max|u| G_n`` bounding ``|x_t[n]|``.

Exact comparisons: :func:`refimpl.s4d.s4d_layer_step` and :func:`refimpl.recurrence.
ssm_recurrence` run the same Numba operations in the same order (and the same NumPy ``D u``
term), and the SDN's chunked ``m`` adds the same products in the same order as the whole run
(module docstring of :mod:`refimpl.sdn.neuron`), so both are compared bit for bit.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import sdn
from refimpl.conv import fft_length
from refimpl.neurons import NeuronConfig
from refimpl.recurrence import ssm_recurrence, ssm_step, ssm_zero_state
from refimpl.s4d import (check_state, s4d_layer_bwd, s4d_layer_fwd, s4d_layer_step,
                         s4d_step_coeffs, s4d_zero_state)
from refimpl.ssm import DISCRETIZATIONS, INITS, discretize_params, s4d_init

EPS = np.finfo(np.float64).eps
BIDIRECTIONAL = "a bidirectional S4D layer has no streaming state"


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@st.composite
def chunkings(draw, L):
    """Cut points ``0 < c_1 < .. < L`` giving 1 .. 5 chunks (fewer when L is short)."""
    k = draw(st.integers(0, min(4, L - 1)))
    cuts = draw(st.lists(st.integers(1, L - 1), min_size=k, max_size=k, unique=True)) if k else []
    return [0] + sorted(cuts) + [L]


@st.composite
def s4d_stream_cases(draw):
    """(params, u, disc, cuts): S4D params from s4d_init, u (B, H, L) ~ N(0, 1)."""
    H = draw(st.integers(1, 4))
    N = 2 * draw(st.integers(1, 8))
    L = draw(st.integers(1, 200))
    Bsz = draw(st.integers(1, 3))
    tb = draw(st.booleans())
    dt = draw(st.one_of(st.sampled_from([1e-3, 1e-1]),
                        st.floats(np.log(1e-3), np.log(1e-1)).map(np.exp)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = s4d_init(H, N, init=draw(st.sampled_from(sorted(INITS))), seed=rng, dt_min=dt,
                 dt_max=dt, trainable_B=tb)
    if tb:
        p["B_re"] = p["B_re"] + 0.3 * rng.normal(size=p["B_re"].shape)
        p["B_im"] = 0.3 * rng.normal(size=p["B_im"].shape)
    u = rng.normal(size=(Bsz, H, L))  # (B, H, L)
    return p, u, draw(st.sampled_from(sorted(DISCRETIZATIONS))), draw(chunkings(L))


def coeffs_of(p, disc):
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    dA, dB = discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"], disc=disc, **B)
    return dA, dB, p["C_re"] + 1j * p["C_im"]


def scales(p, u, disc):
    """``S_h (H,)`` and ``X_n (H, N2)`` of the module docstring."""
    dA, dB, C = coeffs_of(p, disc)
    L = u.shape[-1]
    a = np.abs(dA)  # (H, N2)
    G = (1.0 - a**L) / (1.0 - a)  # (H, N2) sum_{l<L} |dA|^l
    umax = np.abs(u).max()
    S = umax * (np.abs(p["D"]) + 2.0 * (np.abs(C * dB) * G).sum(1))  # (H,)
    X = np.abs(dB) * umax * G  # (H, N2)
    return S, X


def run_chunked(u, p, disc, cuts):
    """The S4D layer over the chunks ``u[..., cuts[i]:cuts[i+1]]``, state handed over."""
    ys, x = [], None
    for a, b in zip(cuts[:-1], cuts[1:]):
        y, _, x = s4d_layer_fwd(u[..., a:b], p, disc, state=x, return_state=True)
        ys.append(y)
    return np.concatenate(ys, axis=-1), x


# --------------------------------------------------------------------------------------------
# S4D layer
# --------------------------------------------------------------------------------------------


@given(s4d_stream_cases())
def test_s4d_chunked_equals_whole_and_end_state_equals_recurrence(case):
    p, u, disc, cuts = case
    Bsz, H, L = u.shape
    y_whole, _, x_whole = s4d_layer_fwd(u, p, disc, return_state=True)
    y_chunk, x_chunk = run_chunked(u, p, disc, cuts)
    S, X = scales(p, u, disc)
    n = fft_length(L)
    atol_y = EPS * (15 * L + 10 * np.log2(n) + 16) * S[None, :, None]  # (1, H, 1), see top
    assert np.all(np.abs(y_chunk - y_whole) <= atol_y), np.abs(y_chunk - y_whole).max()

    dA, dB, C = coeffs_of(p, disc)
    x = ssm_zero_state(Bsz, H, dA.shape[1])
    for t in range(L):
        _, x = ssm_step(x, u[..., t], dA, dB, C)
    atol_x = EPS * (16 * L + 8) * X[None]  # (1, H, N2): recurrence 7 L + closed form 9 L + 5
    assert np.all(np.abs(x_whole - x) <= atol_x), np.abs(x_whole - x).max()
    assert np.all(np.abs(x_chunk - x) <= atol_x + atol_x), np.abs(x_chunk - x).max()


@given(s4d_stream_cases())
@settings(max_examples=15)
def test_s4d_step_loop_equals_recurrence_exactly(case):
    """Same Numba operations in the same order (refimpl.s4d._step vs the recurrence kernel)."""
    p, u, disc, cuts = case
    Bsz, H, L = u.shape
    co = s4d_step_coeffs(p, disc)
    x = s4d_zero_state(Bsz, H, co.dA.shape[1])
    ys = []
    for t in range(L):
        x_in = x.copy()
        y_t, x_next = s4d_layer_step(u[..., t], co, x)
        assert np.array_equal(x, x_in)  # the input state is not modified
        x = x_next
        ys.append(y_t)
    y_rec = ssm_recurrence(u, co.dA, co.dB, co.C, co.D)
    assert np.array_equal(np.stack(ys, axis=-1), y_rec)
    dA, dB, C = coeffs_of(p, disc)
    assert np.array_equal(co.dA, dA) and np.array_equal(co.dB, dB) and np.array_equal(co.C, C)


def longdouble_end_state(u, dA, dB):
    """The recurrence in extended precision (the reference for the float64 end state)."""
    x = np.zeros(u.shape[:2] + dA.shape[1:], dtype=np.clongdouble)  # (B, H, N2)
    a, b = dA.astype(np.clongdouble), dB.astype(np.clongdouble)
    ul = u.astype(np.longdouble)
    for t in range(u.shape[-1]):
        x = a * x + b * ul[..., t, None]
    return x


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18,
                    reason="needs an extended-precision long double as the reference")
@pytest.mark.parametrize("inputs", ["noise", "constant"])
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_s4d_end_state_long_sequence_slow_modes(disc, inputs):
    """L = 3000, dt = 1e-3: modes decay by exp(-0.5 * 3) over the run (long memory).

    Inputs: N(0, 1) noise, and the constant 1 (a step response: no cancellation in the sum,
    so the recurrence's accumulated rounding shows: measured 1.7-4 eps for the closed form,
    155-168 eps for the recurrence, relative to X).

    Against the extended-precision recurrence of the same float64 ``dA, dB`` (its own error
    ``~ L 2^-64`` relative, negligible), the closed form's error relative to
    ``X = sum_s |dA^(T-1-s) dB u_s|`` is bounded by ``(8 L max|log dA| + L + 5) eps``: here
    ``log dA`` is small, so the power term is ``8 k |log dA| eps`` at most (relative error of the
    accurately computed log), and the sum over ``s`` adds ``L eps``. The float64 recurrence is
    held to its own bound ``7 L eps``.
    """
    rng = np.random.default_rng(3)
    L = 3000
    p = s4d_init(2, 16, "lin", seed=rng, dt_min=1e-3, dt_max=1e-3)
    u = rng.normal(size=(2, 2, L)) if inputs == "noise" else np.ones((2, 2, L))  # (B, H, L)
    _, _, x_end = s4d_layer_fwd(u, p, disc, return_state=True)
    dA, dB, C = coeffs_of(p, disc)
    truth = longdouble_end_state(u, dA, dB)
    k = np.arange(L - 1, -1, -1)  # (L,) exponents T-1-s
    mag = np.abs(dB)[None] * np.einsum("bhs,hns->bhn", np.abs(u),
                                       np.abs(dA)[:, :, None] ** k)  # (B, H, N2) X
    rel = (np.abs(x_end - truth) / mag).astype(np.float64)  # (B, H, N2)
    bound = (8 * L * np.abs(np.log(dA)).max() + L + 5) * EPS
    assert rel.max() <= bound, (rel.max(), bound)
    x = ssm_zero_state(2, 2, dA.shape[1])
    for t in range(L):
        _, x = ssm_step(x, u[..., t], dA, dB, C)
    rel_rec = (np.abs(x - truth) / mag).astype(np.float64)
    assert rel_rec.max() <= 7 * L * EPS, rel_rec.max()


@given(s4d_stream_cases())
@settings(max_examples=10)
def test_s4d_zero_state_is_no_state_bit_exact(case):
    p, u, disc, _ = case
    Bsz, H, L = u.shape
    N2 = p["log_A_real"].shape[1]
    y0, c0 = s4d_layer_fwd(u, p, disc)
    y1, c1 = s4d_layer_fwd(u, p, disc, state=s4d_zero_state(Bsz, H, N2))
    y2, c2, x2 = s4d_layer_fwd(u, p, disc, state=s4d_zero_state(Bsz, H, N2), return_state=True)
    y3, _, x3 = s4d_layer_fwd(u, p, disc, return_state=True)
    for y in (y1, y2, y3):
        assert np.array_equal(y, y0)
    assert np.array_equal(x2, x3)
    dy = np.random.default_rng(0).normal(size=u.shape)  # (B, H, L)
    du0, g0 = s4d_layer_bwd(c0, dy)
    for c in (c1, c2):
        du, g = s4d_layer_bwd(c, dy)
        assert np.array_equal(du, du0)
        assert g.keys() == g0.keys() and all(np.array_equal(g[k], g0[k]) for k in g0)


def test_s4d_state_term_alone():
    """u = 0 from a state: y_t = 2 Re sum_n C dA^(t+1) x0 (direct powers), x_end = dA^T x0."""
    rng = np.random.default_rng(5)
    p = s4d_init(3, 8, "inv", seed=rng)
    x0 = rng.normal(size=(2, 3, 4)) + 1j * rng.normal(size=(2, 3, 4))  # (B, H, N2)
    L = 50
    y, _, x_end = s4d_layer_fwd(np.zeros((2, 3, L)), p, state=x0, return_state=True)
    dA, _, C = coeffs_of(p, "zoh")
    powers = dA[:, :, None] ** np.arange(1, L + 1)  # (H, N2, L)
    want = 2.0 * np.einsum("hn,hnl,bhn->bhl", C, powers, x0).real  # (B, H, L)
    # both sides: <= 3 L eps relative per power (running product / np.power), N2-term sums
    scale = 2.0 * (np.abs(C)[None] * np.abs(x0)).sum(-1)[..., None]  # (B, H, 1)
    assert np.all(np.abs(y - want) <= EPS * (6 * L + 16) * scale)
    xt = dA[None] ** L * x0  # (B, H, N2)
    # closed form (8 L + 2) eps and np.power (3 L eps) per power, the product with x0 3 eps
    assert np.all(np.abs(x_end - xt) <= EPS * (11 * L + 8) * np.abs(x0))


def test_s4d_bidirectional_refused():
    p = s4d_init(2, 4, seed=0, bidirectional=True)
    u = np.random.default_rng(0).normal(size=(1, 2, 10))
    y, cache = s4d_layer_fwd(u, p)  # stateless: as before
    assert y.shape == (1, 2, 10) and cache.state is None
    with pytest.raises(ValueError, match=BIDIRECTIONAL):
        s4d_layer_fwd(u, p, state=s4d_zero_state(1, 2, 2))
    with pytest.raises(ValueError, match=BIDIRECTIONAL):
        s4d_layer_fwd(u, p, return_state=True)
    with pytest.raises(ValueError, match=BIDIRECTIONAL):
        s4d_step_coeffs(p)


def test_s4d_bwd_after_nonzero_state_raises():
    p = s4d_init(2, 4, seed=0)
    u = np.random.default_rng(0).normal(size=(1, 2, 10))
    x0 = s4d_zero_state(1, 2, 2)
    x0[0, 1, 0] = 0.5j
    _, cache = s4d_layer_fwd(u, p, state=x0)
    with pytest.raises(NotImplementedError, match="nonzero state"):
        s4d_layer_bwd(cache, np.ones_like(u))
    du, g = s4d_layer_bwd(s4d_layer_fwd(u, p)[1], np.ones_like(u))  # state None: as before
    assert du.shape == u.shape and set(g) == {"log_dt", "log_A_real", "A_imag", "C_re",
                                              "C_im", "D"}


def test_s4d_end_state_blocked_over_time(monkeypatch):
    """The time blocks of the power table (memory bound) change nothing but rounding."""
    import refimpl.s4d as s4d
    rng = np.random.default_rng(1)
    p = s4d_init(2, 6, seed=rng)
    u = rng.normal(size=(2, 2, 300))  # (B, H, L)
    _, _, x_one = s4d_layer_fwd(u, p, return_state=True)
    monkeypatch.setattr(s4d, "STATE_BLOCK_BYTES", 7 * (32 * 2 * 3 + 8 * 2 * 2))  # 7 steps
    _, _, x_blocks = s4d_layer_fwd(u, p, return_state=True)
    S, X = scales(p, u, "zoh")
    # the same terms summed in other groupings: <= L eps of the sum of magnitudes (X)
    assert np.all(np.abs(x_one - x_blocks) <= 300 * EPS * X[None])


# --------------------------------------------------------------------------------------------
# S4D: bad states
# --------------------------------------------------------------------------------------------


def test_s4d_state_wrong_dtype():
    with pytest.raises(TypeError, match=r"state must be complex128 of shape \(B, H, N2\) = "
                                        r"\(1, 2, 2\).*got dtype float64"):
        check_state(np.zeros((1, 2, 2)), 1, 2, 2)
    p = s4d_init(2, 4, seed=0)
    with pytest.raises(TypeError, match="state must be complex128"):
        s4d_layer_fwd(np.zeros((1, 2, 5)), p, state=np.zeros((1, 2, 2)))
    with pytest.raises(TypeError, match="state must be complex128"):
        s4d_layer_step(np.zeros((1, 2)), s4d_step_coeffs(p), np.zeros((1, 2, 2)))


def test_s4d_state_wrong_shape():
    p = s4d_init(2, 4, seed=0)
    with pytest.raises(ValueError, match=r"state must have shape \(B, H, N2\) = \(1, 2, 2\), "
                                         r"got \(1, 2, 3\)"):
        s4d_layer_fwd(np.zeros((1, 2, 5)), p, state=s4d_zero_state(1, 2, 3))
    with pytest.raises(ValueError, match=r"state must have shape \(B, H, N2\) = \(3, 2, 2\)"):
        s4d_layer_step(np.zeros((3, 2)), s4d_step_coeffs(p), s4d_zero_state(1, 2, 2))


def test_s4d_state_non_finite():
    x = s4d_zero_state(1, 2, 2)
    x[0, 1, 1] = complex(0.0, np.nan)
    with pytest.raises(ValueError, match=r"state contains non-finite values \(first at index "
                                         r"\(0, 1, 1\)"):
        s4d_layer_fwd(np.zeros((1, 2, 5)), s4d_init(2, 4, seed=0), state=x)


def test_s4d_state_wrong_type():
    p = s4d_init(2, 4, seed=0)
    with pytest.raises(TypeError, match="state must be a numpy.ndarray, complex128.*got list"):
        s4d_layer_fwd(np.zeros((1, 2, 5)), p, state=[[[0j, 0j]] * 2])
    with pytest.raises(TypeError, match="state must be a numpy.ndarray.*got SDNState"):
        s4d_layer_fwd(np.zeros((1, 2, 5)), p, state=sdn.sdn_zero_state(1, 2))
    with pytest.raises(TypeError, match="coeffs must be the"):
        s4d_layer_step(np.zeros((1, 2)), {"dA": 1}, s4d_zero_state(1, 2, 2))


# --------------------------------------------------------------------------------------------
# SDN neuron
# --------------------------------------------------------------------------------------------

SDN_CFG = NeuronConfig(reset="hard", tau=0.125, theta=1.0)
KW = sdn.K


def random_weights(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.4, size=shape) for k, (_, shape) in sdn.FUSED_LAYOUT.items()}


@st.composite
def sdn_stream_cases(draw):
    Bsz, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    L = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 0.6, size=(Bsz, H, L))  # (B, H, L): spikes and silence
    if draw(st.booleans()):  # exact zeros in the input (the padding's value) too
        x[rng.random(x.shape) < 0.3] = 0.0
    return x, random_weights(seed % 1000), draw(chunkings(L))


@given(sdn_stream_cases())
def test_sdn_chunked_and_stepped_equal_whole_exactly(case):
    x, w, cuts = case
    Bsz, H, L = x.shape
    s_whole, m_whole = sdn.sdn_neuron_fwd(x, w, SDN_CFG)
    state, ss, ms = None, [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        s, m, state = sdn.sdn_neuron_fwd(x[..., a:b], w, SDN_CFG, state=state, return_state=True)
        ss.append(s)
        ms.append(m)
        seen = np.concatenate([np.zeros((Bsz, H, KW)), x[..., :b]], axis=-1)  # zero padding
        assert np.array_equal(state.window, seen[..., -KW:])
    assert np.array_equal(np.concatenate(ms, axis=-1), m_whole)
    assert np.array_equal(np.concatenate(ss, axis=-1), s_whole)

    state = sdn.sdn_zero_state(Bsz, H)
    for t in range(L):
        window_before = state.window.copy()
        s_t, m_t, new = sdn.sdn_neuron_step(x[..., t], w, SDN_CFG, state)
        assert np.array_equal(state.window, window_before)  # not modified in place
        assert np.array_equal(m_t, m_whole[..., t]) and np.array_equal(s_t, s_whole[..., t])
        assert np.array_equal(new.window, np.concatenate([window_before[..., 1:],
                                                          x[..., t, None]], axis=-1))
        state = new


def test_sdn_zero_state_is_no_state_and_smooth_and_m_given():
    rng = np.random.default_rng(2)
    x = rng.normal(0.5, 0.6, size=(2, 3, 20))
    w = random_weights(2)
    s0, m0 = sdn.sdn_neuron_fwd(x, w, SDN_CFG)
    s1, m1, st1 = sdn.sdn_neuron_fwd(x, w, SDN_CFG, state=sdn.sdn_zero_state(2, 3),
                                     return_state=True)
    assert np.array_equal(s0, s1) and np.array_equal(m0, m1)
    assert np.array_equal(st1.window, x[..., -KW:])
    # smooth: the same m, the primitive in place of the Heaviside
    g0, _ = sdn.sdn_neuron_fwd(x, w, SDN_CFG, smooth=True)
    g1, _ = sdn.sdn_neuron_fwd(x, w, SDN_CFG, smooth=True, state=sdn.sdn_zero_state(2, 3))
    assert np.array_equal(g0, g1)
    # a given m is used as is; the state still advances
    s2, m2, st2 = sdn.sdn_neuron_fwd(x, None, SDN_CFG, m=m0, state=st1, return_state=True)
    assert m2 is m0 or np.array_equal(m2, m0)
    assert np.array_equal(s2, s0) and np.array_equal(st2.window, x[..., -KW:])


def test_sdn_state_from_a_short_history_holds_zeros():
    x = np.arange(1.0, 4.0).reshape(1, 1, 3)
    _, _, state = sdn.sdn_neuron_fwd(x, random_weights(0), SDN_CFG, return_state=True)
    assert np.array_equal(state.window[0, 0], [0, 0, 0, 0, 0, 1.0, 2.0, 3.0])


def test_sdn_state_wrong_type():
    x = np.zeros((1, 2, 4))
    with pytest.raises(TypeError, match=r"state must be a refimpl.sdn.SDNState .*got ndarray"):
        sdn.sdn_neuron_fwd(x, random_weights(0), SDN_CFG, state=np.zeros((1, 2, KW)))
    with pytest.raises(TypeError, match=r"state must be a refimpl.sdn.SDNState"):
        sdn.sdn_neuron_step(x[..., 0], random_weights(0), SDN_CFG, s4d_zero_state(1, 2, 8))


def test_sdn_state_wrong_dtype():
    bad = sdn.SDNState(np.zeros((1, 2, KW), dtype=np.int64))
    with pytest.raises(TypeError, match="state.window must have dtype float64, got int64"):
        sdn.sdn_neuron_fwd(np.zeros((1, 2, 4)), random_weights(0), SDN_CFG, state=bad)


def test_sdn_state_wrong_shape():
    with pytest.raises(ValueError, match=r"state.window must have shape \(1, 2, 8\), "
                                         r"got \(1, 3, 8\)"):
        sdn.sdn_neuron_fwd(np.zeros((1, 2, 4)), random_weights(0), SDN_CFG,
                           state=sdn.sdn_zero_state(1, 3))
    with pytest.raises(ValueError, match=r"state.window must have shape \(1, 2, 8\)"):
        sdn.check_sdn_state(sdn.SDNState(np.zeros((1, 2, 7))), 1, 2)


def test_sdn_state_non_finite():
    bad = sdn.sdn_zero_state(1, 2)
    bad.window[0, 1, 3] = np.inf
    with pytest.raises(ValueError, match=r"state.window contains non-finite values \(first at "
                                         r"index \(0, 1, 3\)"):
        sdn.sdn_neuron_step(np.zeros((1, 2)), random_weights(0), SDN_CFG, bad)
