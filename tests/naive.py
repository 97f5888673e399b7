"""Test-only oracles that are not part of the spec: forward-mode tangents of the neuron.

The forward formulas themselves live in :mod:`refimpl.reference` (the neuron loop is
:func:`refimpl.reference.neuron_trace`); this module adds what only the tests need, written to be
obviously right, not fast (STYLE.md "layered oracles"): the neuron's forward-mode JVP, the
independent check of the hand-written reverse mode in ``tests/test_neurons.py``.
"""
import numpy as np

from refimpl.reference import neuron_trace, reset_affine

# ============================================================================================
# Spiking neurons (DESIGN.md section 4): forward-mode tangents
# ============================================================================================


def reset_partials_naive(reset, h, s, theta, u_reset, rho_c):
    """``(du/dh, du/ds, du/drho)`` of :func:`refimpl.reference.reset_membrane` (every reset is
    affine in ``h`` and ``s``, :func:`refimpl.reference.reset_affine` reads its coefficients off
    the literal formula): ``1 - a s``, ``b - a h``, ``drho s``."""
    a, b, drho = reset_affine(reset, theta, u_reset, rho_c)
    return 1.0 - a * s, b - a * h, drho * s


def neuron_jvp_naive(x, vx, reset, tau, theta, u_reset=0.0, rho=None, vrho=None,
                     refractory_steps=0, spike_condition="ge", g=None, G=None, grad_mode="bptt"):
    """Forward-mode tangents ``(ds, dh, du)`` of the neuron for a tangent ``(vx, vrho)``.

    ``g`` and ``G`` are scalar functions: the surrogate derivative (``ds/dh = allowed
    g(h - theta)``) and, for smooth spikes, its primitive (``None`` for hard spikes; see
    :func:`refimpl.reference.neuron_trace`). The modes, as explicit loops::

        dm_t = tau du_{t-1}                     (sltt: 0)
        dh_t = dm_t + vx_t
        ds_t = allowed_t g(h_t - theta) dh_t
        du_t = du/dh dh_t + du/ds ds_t + du/drho vrho     (detach_reset: no du/ds term)
    """
    G_rows = None if G is None else np.vectorize(G, otypes=[np.float64])  # scalar G on (B, H)
    s, h, _, _, allowed = neuron_trace(x, reset=reset, tau=tau, theta=theta, u_reset=u_reset,
                                       rho=rho, refractory_steps=refractory_steps,
                                       spike_condition=spike_condition, G=G_rows)
    Bsz, H, L = x.shape
    ts, th, tu = (np.zeros((Bsz, H, L)) for _ in range(3))
    for b in range(Bsz):
        for c in range(H):
            rho_c = 0.0 if rho is None else float(rho[c])
            vrho_c = 0.0 if vrho is None else float(vrho[c])
            du_prev = 0.0
            for t in range(L):
                dm = 0.0 if grad_mode == "sltt" else tau * du_prev
                dh = dm + float(vx[b, c, t])
                ds = allowed[b, c, t] * g(h[b, c, t] - theta) * dh
                ph, ps, pr = reset_partials_naive(reset, h[b, c, t], s[b, c, t], theta, u_reset,
                                                  rho_c)
                du = ph * dh + pr * vrho_c
                if grad_mode != "detach_reset":
                    du += ps * ds
                ts[b, c, t], th[b, c, t], tu[b, c, t] = ds, dh, du
                du_prev = du
    return ts, th, tu
