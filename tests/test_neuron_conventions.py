"""refimpl's neuron reproduces the conventions of snntorch, spikingjelly and norse.

No torch here: each library's update rule is transcribed below as a small independent loop,
from the library's own source (cited per function), and refimpl must match it under the
mapping in this table (also in the module docstring of :mod:`refimpl.neurons`):

| row | library, model | refimpl ``reset`` | agreement |
|---|---|---|---|
| 1 | snntorch ``Leaky``, ``reset_mechanism="zero"`` | ``hard`` | bit-exact |
| 2 | snntorch ``Leaky``, ``"subtract"``, ``reset_delay=True`` | ``refractory`` | to rounding |
| 3 | snntorch ``Leaky``, ``"subtract"``, ``reset_delay=False`` | ``soft`` | bit-exact (see 3) |
| 4 | snntorch ``Leaky``, ``"none"`` | ``none`` | bit-exact |
| 5 | spikingjelly ``LIFNode(decay_input=False, v_reset=0)`` | ``hard`` | bit-exact |
| 6 | spikingjelly ``LIFNode(decay_input=False, v_reset=None)`` | ``soft`` | bit-exact |
| 7 | spikingjelly ``LIFNode(decay_input=False, v_reset=vr)`` | ``hard`` | to rounding |
| 8 | norse ``lif_feed_forward_step`` | ``hard`` | to rounding (see 8) |

The rest of each row's refimpl config, its outputs, and the agreement in full:

1. ``u_reset=0``, ``tau=beta``, ``theta=thr``, ``gt``; ``spk = s``; ``mem = h``
   (``reset_delay=True``) / ``u`` (``False``); bit-exact.
2. ``rho = thr (1 - beta) / beta``, ``gt``; ``mem = h``; to rounding.
3. ``gt``; ``mem = u``; bit-exact while ``h <= 2 thr`` at every spike (see the test).
4. ``gt``; ``mem = h``; bit-exact.
5. ``u_reset=0``, ``tau = 1 - 1/T``, ``ge``; ``H = h, V = u, S = s``; bit-exact.
6. ``tau = 1 - 1/T``, ``ge``; ``H = h, V = u``; bit-exact.
7. ``u_reset=0``, ``theta = vth - vr``; ``H - vr = h``, ``V - vr = u``; to rounding.
8. ``tau = 1 - dt tau_mem_inv``, ``theta = v_th``, ``u_reset = v_reset``, ``gt``;
   ``x_t = dt tau_mem_inv (v_leak + i_t)``; ``v = u``, ``z = s``; to rounding; norse's
   published sequence to its own 1e-4.

"to rounding": the same real-number recurrence evaluated in another order; membranes agree to
``1e-12`` relative and spikes agree wherever the margin ``|h - theta|`` exceeds ``1e-9``.
"""
import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.neurons import NeuronConfig, neuron_fwd


def row(x):
    """A (L,) sequence as refimpl's (B=1, H=1, L) input."""
    return np.asarray(x, dtype=np.float64).reshape(1, 1, -1)


def run(cfg, x, rho=None):
    s, h, u = neuron_fwd(row(x), cfg, None if rho is None else np.array([rho]))
    return s[0, 0], h[0, 0], u[0, 0]


inputs = st.integers(0, 2**32 - 1).map(
    lambda seed: np.random.default_rng(seed).normal(0.4, 0.8, size=60))

# --------------------------------------------------------------------------------------------
# snntorch (jeshraghian/snntorch, snntorch/_neurons/leaky.py and neurons.py)
# --------------------------------------------------------------------------------------------


def snntorch_heaviside(z):
    """``spike_grad`` forward (ATan, also ``_surrogate_bypass``): ``(z > 0).float()``."""
    return 1.0 if z > 0 else 0.0


def snntorch_leaky(xs, beta, threshold, reset_mechanism, reset_delay=True):
    """``Leaky.forward`` step by step from ``mem = 0``; returns ``(spk, mem)`` sequences.

    ``reset = mem_reset(mem)`` is ``Heaviside(mem - threshold)`` of the *stored* membrane
    (detached); ``_base_sub``: ``beta mem + input - reset threshold``; ``_base_zero``:
    ``mem = (1 - reset) mem`` then ``beta mem + input``; ``_base_int``: ``beta mem + input``.
    ``spk = fire(mem) = Heaviside(mem - threshold)``. With ``reset_delay=False`` the reset is
    applied in the same step: ``do_reset = spk - reset``, then ``mem -= do_reset threshold``
    (subtract) or ``mem -= do_reset mem`` (zero).
    """
    mem = 0.0
    spks, mems = [], []
    for inp in xs:
        reset = snntorch_heaviside(mem - threshold)
        if reset_mechanism == "subtract":
            mem = beta * mem + inp - reset * threshold
        elif reset_mechanism == "zero":
            mem = (1 - reset) * mem
            mem = beta * mem + inp
        else:
            mem = beta * mem + inp
        spk = snntorch_heaviside(mem - threshold)
        if not reset_delay:
            do_reset = spk - reset
            if reset_mechanism == "subtract":
                mem = mem - do_reset * threshold
            elif reset_mechanism == "zero":
                mem = mem - do_reset * mem
        spks.append(spk)
        mems.append(mem)
    return np.array(spks), np.array(mems)


@given(xs=inputs, beta=st.sampled_from([0.0, 0.25, 0.5, 0.9, 0.95]),
       thr=st.sampled_from([0.5, 1.0, 1.3]), reset_delay=st.booleans())
def test_snntorch_zero_is_hard_reset(xs, beta, thr, reset_delay):
    spk, mem = snntorch_leaky(xs, beta, thr, "zero", reset_delay)
    s, h, u = run(NeuronConfig(reset="hard", u_reset=0.0, tau=beta, theta=thr,
                               spike_condition="gt"), xs)
    np.testing.assert_array_equal(spk, s)
    np.testing.assert_array_equal(mem, h if reset_delay else u)


@given(xs=inputs, beta=st.sampled_from([0.0, 0.5, 0.9]), thr=st.sampled_from([0.5, 1.0]))
def test_snntorch_none_is_no_reset(xs, beta, thr):
    spk, mem = snntorch_leaky(xs, beta, thr, "none")
    s, h, _ = run(NeuronConfig(reset="none", tau=beta, theta=thr, spike_condition="gt"), xs)
    np.testing.assert_array_equal(spk, s)
    np.testing.assert_array_equal(mem, h)


@given(xs=inputs, beta=st.sampled_from([0.1, 0.25, 0.5, 0.9]), thr=st.sampled_from([0.5, 1.0, 1.3]))
def test_snntorch_subtract_is_refractory_reset(xs, beta, thr):
    """Default ``reset_delay=True``: ``mem_t = beta mem_{t-1} + x_t - thr spk_{t-1}``.

    refimpl subtracts before the decay, so the same recurrence needs ``tau (theta + rho) = thr``:
    ``rho = thr (1 - beta) / beta``. Same real numbers, different rounding.
    """
    spk, mem = snntorch_leaky(xs, beta, thr, "subtract")
    rho = thr * (1.0 - beta) / beta
    s, h, _ = run(NeuronConfig(reset="refractory", tau=beta, theta=thr, spike_condition="gt"),
                  xs, rho)
    assume(np.min(np.abs(mem - thr)) > 1e-9)
    np.testing.assert_array_equal(spk, s)
    np.testing.assert_allclose(mem, h, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), beta=st.sampled_from([0.0, 0.5, 0.9]),
       thr=st.sampled_from([0.5, 1.0]))
def test_snntorch_subtract_without_delay_is_soft_reset(seed, beta, thr):
    """``reset_delay=False``: bit-exact soft reset while ``h <= 2 thr`` (inputs kept below thr)."""
    xs = np.random.default_rng(seed).uniform(-0.5, 0.9, size=60) * thr
    spk, mem = snntorch_leaky(xs, beta, thr, "subtract", reset_delay=False)
    s, h, u = run(NeuronConfig(reset="soft", tau=beta, theta=thr, spike_condition="gt"), xs)
    assert np.max(h) <= 2 * thr
    np.testing.assert_array_equal(spk, s)
    np.testing.assert_array_equal(mem, u)


def test_snntorch_subtract_without_delay_differs_after_a_spike_above_two_thresholds():
    """The stated limit of the previous row. After a spike at ``h > 2 thr`` the stored membrane
    still exceeds ``thr``, so snntorch's next step subtracts a delayed reset *before* its
    threshold test (and adds it back after): it fires only if ``h > 2 thr`` there."""
    xs = np.array([2.5, 0.6, 0.0])
    spk, mem = snntorch_leaky(xs, 0.5, 1.0, "subtract", reset_delay=False)
    s, h, u = run(NeuronConfig(reset="soft", tau=0.5, theta=1.0, spike_condition="gt"), xs)
    np.testing.assert_array_equal(s, [1, 1, 0])  # h = 2.5, 1.35, 0.175
    np.testing.assert_allclose(u, [1.5, 0.35, 0.175], rtol=1e-15)
    np.testing.assert_array_equal(spk, [1, 0, 0])  # 1.35 - 1 (delayed reset) is not > 1
    np.testing.assert_allclose(mem, [1.5, 1.35, 0.675], rtol=1e-15)


# --------------------------------------------------------------------------------------------
# spikingjelly (fangwei123456/spikingjelly, spikingjelly/activation_based/neuron.py)
# --------------------------------------------------------------------------------------------


def spikingjelly_lif(xs, tau, v_threshold, v_reset):
    """``LIFNode(decay_input=False)`` single steps; ``v_reset=None`` is the soft reset.

    ``v`` starts at ``v_reset`` (0 when None). ``neuronal_charge``: ``v * (1 - 1/tau) + x``
    (``v_reset`` None or 0) or ``v - (v - v_reset) / tau + x``; ``neuronal_fire``:
    ``heaviside(v - v_threshold)`` with ``heaviside(x) = (x >= 0)``; ``neuronal_reset``:
    ``jit_soft_reset`` ``v - spike v_threshold`` or ``jit_hard_reset``
    ``(1 - spike) v + spike v_reset``. Returns ``(S, H, V)``.
    """
    v = 0.0 if v_reset is None else v_reset
    S, H, V = [], [], []
    for x in xs:
        if v_reset is None or v_reset == 0.0:
            v = v * (1.0 - 1.0 / tau) + x
        else:
            v = v - (v - v_reset) / tau + x
        H.append(v)
        spike = 1.0 if v - v_threshold >= 0 else 0.0
        if v_reset is None:
            v = v - spike * v_threshold
        else:
            v = (1.0 - spike) * v + spike * v_reset
        S.append(spike)
        V.append(v)
    return np.array(S), np.array(H), np.array(V)


@given(xs=inputs, T=st.sampled_from([1.25, 2.0, 4.0, 10.0]), vth=st.sampled_from([0.5, 1.0]),
       soft=st.booleans())
def test_spikingjelly_lif_no_decay_input(xs, T, vth, soft):
    S, H, V = spikingjelly_lif(xs, T, vth, None if soft else 0.0)
    cfg = NeuronConfig(reset="soft" if soft else "hard", tau=1.0 - 1.0 / T, theta=vth,
                       spike_condition="ge")
    s, h, u = run(cfg, xs)
    np.testing.assert_array_equal(S, s)
    np.testing.assert_array_equal(H, h)
    np.testing.assert_array_equal(V, u)


@given(xs=inputs, T=st.sampled_from([2.0, 4.0]), vr=st.sampled_from([-0.5, 0.3]))
def test_spikingjelly_nonzero_v_reset_by_shift(xs, T, vr):
    """Leak towards ``v_reset``: refimpl's membrane is spikingjelly's minus ``v_reset``."""
    vth = 1.0
    S, H, V = spikingjelly_lif(xs, T, vth, vr)
    s, h, u = run(NeuronConfig(reset="hard", tau=1.0 - 1.0 / T, theta=vth - vr), xs)
    assume(np.min(np.abs(H - vth)) > 1e-9)
    np.testing.assert_array_equal(S, s)
    np.testing.assert_allclose(H - vr, h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(V - vr, u, rtol=1e-12, atol=1e-12)


def test_spikingjelly_fires_at_equality():
    S, _, _ = spikingjelly_lif([1.0], 2.0, 1.0, 0.0)
    s, _, _ = run(NeuronConfig(tau=0.5, spike_condition="ge"), [1.0])
    assert S[0] == s[0] == 1.0


# --------------------------------------------------------------------------------------------
# norse (norse/norse, norse/torch/functional/lif.py and test/test_lif.py)
# --------------------------------------------------------------------------------------------


def norse_lif_feed_forward(inputs, tau_syn_inv=1 / 5e-3, tau_mem_inv=1 / 1e-2, v_leak=0.0,
                           v_th=1.0, v_reset=0.0, dt=0.001):
    """``lif_feed_forward_step`` from ``v = i = 0`` (the defaults of ``LIFParameters``).

    ``v_decayed = v + dt tau_mem_inv ((v_leak - v) + i)``; ``i_decayed = i - dt tau_syn_inv i``;
    ``z = heaviside(v_decayed - v_th)`` (``where(x <= 0, 0, 1)``);
    ``v = (1 - z) v_decayed + z v_reset``; ``i = i_decayed + input``. Returns ``(z, v_decayed, v)``.
    """
    v = i = 0.0
    Z, VD, V = [], [], []
    for inp in inputs:
        dv = dt * tau_mem_inv * ((v_leak - v) + i)
        v_decayed = v + dv
        di = -dt * tau_syn_inv * i
        i_decayed = i + di
        z = 0.0 if v_decayed - v_th <= 0 else 1.0
        v = (1 - z) * v_decayed + z * v_reset
        i = i_decayed + inp
        Z.append(z)
        VD.append(v_decayed)
        V.append(v)
    return np.array(Z), np.array(VD), np.array(V)


def norse_mapping(inputs, tau_syn_inv=1 / 5e-3, tau_mem_inv=1 / 1e-2, v_leak=0.0, v_th=1.0,
                  v_reset=0.0, dt=0.001):
    """refimpl config and input for norse's LIF: the synaptic current is a linear filter of the
    input (independent of the spikes), so it is computed first; it reaches ``v`` one step late."""
    a = dt * tau_mem_inv
    i = 0.0
    x = []
    for inp in inputs:
        x.append(a * (v_leak + i))  # the current entering this step
        i = (1.0 - dt * tau_syn_inv) * i + inp
    cfg = NeuronConfig(reset="hard", tau=1.0 - a, theta=v_th, u_reset=v_reset,
                       spike_condition="gt")
    return cfg, np.array(x)


def test_norse_published_sequence():
    """norse/torch/functional/test/test_lif.py, ``test_lif_feed_forward_step``: ``s.v`` for an
    input of ones with the default parameters, checked there with ``atol=1e-4``."""
    published = [0.0, 0.1, 0.27, 0.487, 0.7335, 0.9963, 0.0, 0.3951, 0.7717, 0.0]
    cfg, x = norse_mapping(np.ones(10))
    s, _, u = run(cfg, x)
    np.testing.assert_allclose(u, published, atol=1e-4)
    np.testing.assert_array_equal(s, [0, 0, 0, 0, 0, 0, 1, 0, 0, 1])
    z, _, v = norse_lif_feed_forward(np.ones(10))  # the transcription agrees with its own test
    np.testing.assert_allclose(v, published, atol=1e-4)
    np.testing.assert_array_equal(z, s)


@given(seed=st.integers(0, 2**32 - 1), v_leak=st.sampled_from([0.0, 0.2]),
       v_reset=st.sampled_from([0.0, -0.1]), tau_mem_inv=st.sampled_from([50.0, 100.0, 300.0]))
def test_norse_lif_feed_forward(seed, v_leak, v_reset, tau_mem_inv):
    inputs = np.random.default_rng(seed).normal(0.3, 1.0, size=60)
    Z, VD, V = norse_lif_feed_forward(inputs, tau_mem_inv=tau_mem_inv, v_leak=v_leak,
                                      v_reset=v_reset)
    cfg, x = norse_mapping(inputs, tau_mem_inv=tau_mem_inv, v_leak=v_leak, v_reset=v_reset)
    s, h, u = run(cfg, x)
    assume(np.min(np.abs(VD - 1.0)) > 1e-9)
    np.testing.assert_array_equal(Z, s)
    np.testing.assert_allclose(VD, h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(V, u, rtol=1e-12, atol=1e-12)
