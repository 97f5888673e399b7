"""Naive oracles: the DESIGN.md formulas as plain Python loops, one scalar at a time.

Written to be obviously right, not fast (STYLE.md "layered oracles"; stumpy's ``tests/naive.py``).
Each concept has its own clearly separated section; the fast kernels are tested against these.
"""
import numpy as np

# ============================================================================================
# Spiking neurons (DESIGN.md section 4) -- refimpl/neurons.py is tested against this section
# ============================================================================================


def reset_naive(reset, h, s, theta, u_reset, rho_c):
    """``u = reset(h, s)`` literally as DESIGN.md's table states it."""
    if reset == "hard":
        return h * (1.0 - s) + s * u_reset
    if reset == "soft":
        return h - theta * s
    if reset == "refractory":
        return h - (theta + rho_c) * s
    if reset == "none":
        return h
    raise ValueError(reset)


def reset_partials_naive(reset, h, s, theta, u_reset, rho_c):
    """``(du/dh, du/ds, du/drho)`` of :func:`reset_naive`."""
    if reset == "hard":
        return 1.0 - s, u_reset - h, 0.0
    if reset == "soft":
        return 1.0, -theta, 0.0
    if reset == "refractory":
        return 1.0, -(theta + rho_c), -s
    return 1.0, 0.0, 0.0


def fires_naive(h, theta, spike_condition):
    """``Theta(h - theta)`` for ``ge`` (``h >= theta``) or ``gt`` (``h > theta``)."""
    return h >= theta if spike_condition == "ge" else h > theta


def neuron_fwd_naive(x, reset, tau, theta, u_reset=0.0, rho=None, refractory_steps=0,
                     spike_condition="ge", G=None, mask=None, reset_spikes=None, m_fixed=None):
    """The iterative neuron, row by row and step by step.

    Parameters
    ----------
    x : (B, H, L)
    G : callable or None
        ``None``: hard spikes ``Theta(h - theta)``; a callable: smooth spikes
        ``allowed * G(h - theta)`` (the refractory mask still follows the hard spikes).
    mask : (B, H, L) or None
        Use these 0/1 values as ``allowed_t`` instead of computing the refractory mask.
    reset_spikes : (B, H, L) or None
        Spikes to use *inside* ``reset()`` instead of ``s_t``: with the base run's spikes this is
        the forward whose plain derivative is ``grad_mode="detach_reset"``.
    m_fixed : (B, H, L) or None
        Decayed potentials to use instead of ``tau u_{t-1}``: with the base run's ``m`` this is
        the forward whose plain derivative is ``grad_mode="sltt"``.

    Returns
    -------
    s, h, u, m, allowed : (B, H, L) arrays
    """
    Bsz, H, L = x.shape
    out = {k: np.zeros((Bsz, H, L)) for k in ("s", "h", "u", "m", "allowed")}
    for b in range(Bsz):
        for c in range(H):
            rho_c = 0.0 if rho is None else float(rho[c])
            u_prev = 0.0
            blocked_for = 0  # steps left in the absolute refractory period
            for t in range(L):
                m = tau * u_prev if m_fixed is None else float(m_fixed[b, c, t])
                h = m + float(x[b, c, t])
                allowed = blocked_for == 0 if mask is None else bool(mask[b, c, t])
                hard = allowed and fires_naive(h, theta, spike_condition)
                if G is None:
                    s = 1.0 if hard else 0.0
                else:
                    s = float(G(h - theta)) if allowed else 0.0
                if hard:
                    blocked_for = refractory_steps
                elif blocked_for > 0:
                    blocked_for -= 1
                s_reset = s if reset_spikes is None else float(reset_spikes[b, c, t])
                u = reset_naive(reset, h, s_reset, theta, u_reset, rho_c)
                for k, v in (("s", s), ("h", h), ("u", u), ("m", m), ("allowed", float(allowed))):
                    out[k][b, c, t] = v
                u_prev = u
    return out["s"], out["h"], out["u"], out["m"], out["allowed"]


def neuron_jvp_naive(x, vx, reset, tau, theta, u_reset=0.0, rho=None, vrho=None,
                     refractory_steps=0, spike_condition="ge", g=None, G=None, grad_mode="bptt"):
    """Forward-mode tangents ``(ds, dh, du)`` of the neuron for a tangent ``(vx, vrho)``.

    ``g`` is the surrogate derivative (``ds/dh = allowed g(h - theta)``), ``G`` as in
    :func:`neuron_fwd_naive` (``None`` for hard spikes). The modes, as explicit loops::

        dm_t = tau du_{t-1}                     (sltt: 0)
        dh_t = dm_t + vx_t
        ds_t = allowed_t g(h_t - theta) dh_t
        du_t = du/dh dh_t + du/ds ds_t + du/drho vrho     (detach_reset: no du/ds term)
    """
    s, h, u, _, allowed = neuron_fwd_naive(x, reset, tau, theta, u_reset, rho, refractory_steps,
                                           spike_condition, G)
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
