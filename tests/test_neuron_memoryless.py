"""The memoryless neuron path (tau = 0, no refractory period: the binary family) equals the
recurrent kernels it bypasses, for every reset and gradient mode."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import neurons as N
from refimpl.neurons import NeuronConfig


def _recurrent(x, cfg, rho, ds, dh, du):
    """The general kernels (``_neuron_fwd`` / ``_neuron_bwd``) called directly with tau = 0."""
    Bsz, H, L = x.shape
    M = Bsz * H
    a, b = N.reset_coefficients(cfg, rho, H)
    b_rows = np.ascontiguousarray(np.broadcast_to(b, (Bsz, H)).reshape(-1))
    s, h, u = (np.empty(x.shape) for _ in range(3))
    N._neuron_fwd(x.reshape(M, L), np.zeros(M), np.zeros(M, np.int64), cfg.tau, cfg.theta_fire,
                  a, b_rows, None, s.reshape(M, L), h.reshape(M, L), u.reshape(M, L))
    empty = np.empty((0, 0))
    dx, g_rho = np.empty(x.shape), np.empty(M)
    N._neuron_bwd(s.reshape(M, L), h.reshape(M, L), ds.reshape(M, L),
                  empty if dh is None else dh.reshape(M, L),
                  empty if du is None else du.reshape(M, L), dh is not None, du is not None,
                  np.zeros(M, np.int64), cfg.tau, cfg.theta, cfg.theta_fire, a, b_rows, 0, False,
                  N.get_surrogate(cfg.surrogate).code, cfg.scale, N.GRAD_MODES[cfg.grad_mode],
                  dx.reshape(M, L), g_rho)
    return (s, h, u), dx, g_rho.reshape(Bsz, H).sum(0)


@settings(max_examples=40)
@given(reset=st.sampled_from(sorted(N.RESETS)), mode=st.sampled_from(sorted(N.GRAD_MODES)),
       surrogate=st.sampled_from(["atan", "triangle", "sigmoid"]),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 30)),
       cotangents=st.booleans(), seed=st.integers(0, 2**16))
def test_memoryless_equals_recurrent(reset, mode, surrogate, shape, cotangents, seed):
    rng = np.random.default_rng(seed)
    cfg = NeuronConfig(reset=reset, tau=0.0, theta=0.3, grad_mode=mode, surrogate=surrogate)
    x = rng.standard_normal(shape)  # (B, H, L)
    x.reshape(-1)[::7] = 0.3  # on the threshold: the spike condition decides
    rho = np.abs(rng.standard_normal(shape[1])) if N.RESETS[reset].param else None
    ds = rng.standard_normal(shape)
    dh, du = (rng.standard_normal(shape), rng.standard_normal(shape)) if cotangents else (None,
                                                                                         None)
    fwd = N.neuron_fwd(x, cfg, rho=rho)
    dx, drho = N.neuron_bwd(x, fwd[0], fwd[1], cfg, ds, dh=dh, du=du, rho=rho)
    ref_fwd, ref_dx, ref_drho = _recurrent(x, cfg, rho, ds, dh, du)
    # The same floating-point operations per element: equal (np.array_equal: a zero's sign,
    # the only possible difference, compares equal).
    for got, want in zip(fwd, ref_fwd):
        assert np.array_equal(got, want)
    assert np.array_equal(dx, ref_dx)
    if reset == "refractory":
        assert np.array_equal(drho, ref_drho)


def test_memoryless_path_is_taken_for_binary():
    """A planted difference: with tau != 0 the paths must differ (the test above compares two
    different code paths, not one with itself)."""
    x = np.linspace(-1, 1, 24).reshape(1, 2, 12)
    mem = N.neuron_fwd(x, NeuronConfig(reset="none", tau=0.0, theta=0.0))[1]
    rec = N.neuron_fwd(x, NeuronConfig(reset="none", tau=0.5, theta=0.0))[1]
    assert np.array_equal(mem, x) and not np.array_equal(rec, x)
