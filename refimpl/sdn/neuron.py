"""The SDN neuron (SpikingSSM): the SDN's prediction in place of the LIF's memory.

DESIGN.md section 6. In a model the iterative hard-reset LIF is replaced by::

    m     = SDN(x)                   the fused network (refimpl.sdn.fused), a constant
    s     = Theta(m + x - theta)     ge: m + x >= theta;  gt: m + x > theta
    ds/dx = g(m + x - theta)         no gradient flows through the network

with ``g`` a surrogate of :mod:`refimpl.surrogates`. This is the ``sltt`` backward of the
iterative neuron (:mod:`refimpl.neurons`) with the SDN's ``m`` in place of ``tau u_{t-1}``. At
inference the iterative LIF can replace it. These two functions are the only place the SDN
neuron is written; the model's ``sdn`` activation family calls them.
"""
import numpy as np

from .._checks import check_array
from ..neurons import NeuronConfig
from ..surrogates import get_surrogate
from .fused import sdn_forward


def _check_cfg(cfg):
    """The SDN predicts a hard-reset LIF with ``u_reset = 0`` and no refractory period."""
    if not isinstance(cfg, NeuronConfig):
        raise TypeError(f"cfg must be a refimpl.neurons.NeuronConfig, got {type(cfg).__name__}")
    if cfg.reset != "hard":
        raise ValueError(f"reset must be 'hard' for the SDN neuron (the SDN predicts a "
                         f"hard-reset LIF), got reset={cfg.reset!r}")
    if cfg.u_reset != 0.0:
        raise ValueError(f"u_reset must be 0 for the SDN neuron (the SDN predicts a LIF that "
                         f"resets to 0), got u_reset={cfg.u_reset}")
    if cfg.refractory_steps != 0:
        raise ValueError(f"refractory_steps must be 0 for the SDN neuron, got "
                         f"refractory_steps={cfg.refractory_steps}")
    return cfg


def sdn_neuron_fwd(x, weights, cfg, m=None, smooth=False):
    """SDN neuron forward: ``s = Theta(m + x - theta)`` with ``m = SDN(x)`` a constant.

    Parameters
    ----------
    x : float64 (B, H, L)
    weights : dict or str or os.PathLike
        Fused weights ``w0 .. w5`` or a weights file; not used when ``m`` is given.
    cfg : refimpl.neurons.NeuronConfig
        ``theta``, ``spike_condition``, ``surrogate`` and ``surrogate_scale`` are used;
        ``reset`` must be ``"hard"`` (with ``u_reset = 0``, ``refractory_steps = 0``). ``tau``
        is fixed by the weights (the published network: 0.125) and ``grad_mode`` by the SDN
        (``m`` is a constant), so both are ignored.
    m : float64 (B, H, L) or None, default None
        A precomputed (frozen) SDN prediction; None runs :func:`~refimpl.sdn.sdn_forward`.
    smooth : bool, default False
        Emit the surrogate's primitive ``G(m + x - theta)`` instead of the Heaviside (``m``
        still a constant), so that finite differences check :func:`sdn_neuron_bwd`.

    Returns
    -------
    s : float64 (B, H, L)
        Spikes in {0, 1} (or ``G(m + x - theta)`` when ``smooth``).
    m : float64 (B, H, L)
        The SDN prediction; pass it to :func:`sdn_neuron_bwd`.
    """
    cfg = _check_cfg(cfg)
    x = check_array("x", x, 3)
    if m is None:
        m, _ = sdn_forward(x, weights, theta=cfg.theta)  # (B, H, L)
    else:
        m = check_array("m", m, 3)
        if m.shape != x.shape:
            raise ValueError(f"x and m must have the same shape, got x {x.shape}, m {m.shape}")
    v = m + x  # (B, H, L) what the spike test compares with theta
    if smooth:
        s = get_surrogate(cfg.surrogate).primitive(v - cfg.theta, cfg.surrogate_scale)
    else:
        s = (v >= cfg.theta_fire).astype(np.float64)  # (B, H, L), the neuron's one spike test
    return s, m


def sdn_neuron_bwd(x, m, cfg, ds):
    """SDN neuron backward: ``dx = ds * g(m + x - theta)`` (no gradient through the SDN).

    Parameters
    ----------
    x, m : float64 (B, H, L)
        Input and the SDN prediction returned by :func:`sdn_neuron_fwd`.
    cfg : refimpl.neurons.NeuronConfig
        As in the forward (``theta``, ``surrogate``, ``surrogate_scale``).
    ds : float64 (B, H, L)
        Cotangent of the spikes.

    Returns
    -------
    dx : float64 (B, H, L), newly allocated.
    """
    cfg = _check_cfg(cfg)
    x = check_array("x", x, 3)
    m = check_array("m", m, 3)
    ds = check_array("ds", ds, 3)
    if m.shape != x.shape or ds.shape != x.shape:
        raise ValueError(f"x, m and ds must have the same shape, got x {x.shape}, m {m.shape}, "
                         f"ds {ds.shape}")
    return ds * get_surrogate(cfg.surrogate).grad(m + x - cfg.theta, cfg.surrogate_scale)
