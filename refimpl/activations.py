"""Activation families of the spiking SSM block: one registered entry per family.

DESIGN.md section 8: inside a block, ``s = activation(y)`` turns the S4D output ``y (B, H, L)``
(divided by ``exp(ln_vth)`` where the family has a learnable threshold) into what the feature
mixing reads. Each family is one :class:`Activation` subclass registered in
:data:`ACTIVATIONS` with :func:`register`; it supplies

- its settings: the mixing layer (``"glu"`` or ``"gsu"``), whether it has a learnable
  threshold, its neuron (the :class:`~refimpl.neurons.NeuronConfig` fields it fixes);
- its per-layer parameters and buffers (``rho``, the SDN's fixed weights) and their constraint;
- :meth:`~Activation.forward` / :meth:`~Activation.backward` with a named cache, built on the
  library's own functions (:func:`refimpl.neurons.neuron_fwd`, :func:`refimpl.pmbc.pmbc_fwd`,
  :func:`refimpl.sdn.sdn_neuron_fwd`, :func:`refimpl.layers.gelu_fwd`), never re-implemented;
- the firing rate, the diagnostics a golden trace records (spikes and the membranes that decide
  them) and the constants a finite-difference check must hold fixed.

The families **[choice]** (the papers' settings where they state them):

| family | activation | mixing |
|---|---|---|
| ``gelu`` | exact GELU (non-spiking S4D baseline) | GLU |
| ``binary`` | Heaviside ``Theta(y)`` (Binary S4D) | GLU |
| ``binary_gsu`` | none: GSU ternarises ``y`` itself (Binary S4D + GSU) | GSU |
| ``lif`` | iterative hard-reset LIF (SpikingSSM) | GLU |
| ``sdn`` | SDN neuron (SpikingSSM): SDN prediction constant | GLU |
| ``refractory`` | reset-refractory (SPikE-SSM), PMBC or iterative | GLU |

The neuron of each family (``-``: none):

- ``gelu``: -
- ``binary``: reset none, tau 0, theta 0, surrogate atan
- ``binary_gsu``: - (rate = mean abs Ter(y))
- ``lif``: hard, tau 0.125, theta 1, triangle, ``y/exp(ln_vth)``
- ``sdn``: theta 1, triangle, ``y/exp(ln_vth)``
- ``refractory``: refractory, tau 0.5, theta 1, rho >= 0 trainable (init 0.5), triangle,
  ``y/exp(ln_vth)``

Adding a family: one subclass here with ``@register``, and its tests (``tests/test_model.py``
runs the whole-model gradient checks over every registered family).
"""
from typing import NamedTuple, Optional

import numpy as np

from . import layers as Ly
from .neurons import NeuronConfig, NeuronState, neuron_bwd, neuron_fwd, neuron_step
from .pmbc import pmbc_fwd
from .sdn import FUSED_LAYOUT, sdn_neuron_bwd, sdn_neuron_fwd
from .sdn.neuron import SDNState, sdn_neuron_step
from .sdn.weights import K as SDN_K

#: name -> the registered :class:`Activation` instance.
ACTIVATIONS = {}

#: Initial refractory magnitude of the ``refractory`` family.
RHO_INIT = 0.5


def register(cls):
    """Class decorator: add one instance of ``cls`` to :data:`ACTIVATIONS` under ``cls.name``."""
    if cls.name in ACTIVATIONS:
        raise ValueError(f"activation family {cls.name!r} is registered twice")
    ACTIVATIONS[cls.name] = cls()
    return cls


class NeuronCache(NamedTuple):
    """Forward state of a neuron family for :func:`refimpl.neurons.neuron_bwd`."""
    y: np.ndarray  # (B, H, L) neuron input
    s: np.ndarray  # (B, H, L) spikes (or G(h - theta) in smooth mode)
    h: np.ndarray  # (B, H, L) membrane before reset
    u: np.ndarray  # (B, H, L) membrane after reset
    cfg: NeuronConfig
    rho: Optional[np.ndarray]  # (H,) or None
    smooth: bool


class SDNCache(NamedTuple):
    """Forward state of the SDN neuron: its input and the (constant) SDN prediction."""
    y: np.ndarray  # (B, H, L)
    s: np.ndarray  # (B, H, L) spikes (or G(m + y - theta) in smooth mode)
    m: np.ndarray  # (B, H, L) SDN(y), no gradient
    cfg: NeuronConfig


class Activation:
    """One activation family. Subclasses set the class attributes and override what differs.

    Attributes
    ----------
    name : str
        The registry key (``ModelConfig.activation``).
    mixing : {"glu", "gsu"}
        The feature-mixing layer after the activation.
    threshold : bool
        Learnable threshold by input scaling, ``y / exp(ln_vth)`` (parameter ``ln_vth (H,)``).
    neuron : dict or None
        The :class:`~refimpl.neurons.NeuronConfig` fields the family fixes (``grad_mode`` and
        optionally ``surrogate`` come from the model config); None for non-neuron families.
    kind : str
        How golden traces name the family's activation (the case attribute
        ``activation_kind``): ``gelu``, ``neuron``, ``sdn`` or ``none``.
    """
    name = ""
    mixing = "glu"
    threshold = False
    neuron = None
    kind = "neuron"

    def init_params(self, H):
        """Extra per-layer parameters ``{suffix: array}`` (``ln_vth`` added by the block)."""
        return {}

    def init_buffers(self, sdn_weights):
        """Extra model buffers (not trained); ``sdn_weights`` as given to ``init_model``."""
        return {}

    def project(self, layer_params):
        """Put constrained parameters of one layer back into their domain (in place)."""

    def forward(self, y, cfg, p, buf, pre, smooth=False, frozen=None):
        """``s = activation(y)``; returns ``(s, cache)``.

        ``cfg`` is the :class:`~refimpl.model.ModelConfig`, ``p``/``buf`` the model's flat
        parameter and buffer dicts, ``pre`` this layer's prefix (``"layers.i."``), ``smooth``
        asks spiking families for the surrogate primitive instead of the Heaviside, and
        ``frozen`` may hold constants recorded by :meth:`frozen` to reuse.
        """
        raise NotImplementedError

    def backward(self, cache, ds):
        """Returns ``(dy, grads)``: ``grads`` maps parameter suffixes (``"rho"``) to gradients."""
        raise NotImplementedError

    def rate(self, s, cache, mix_cache):
        """The firing rate of one block (None for non-spiking families)."""
        return float(s.mean())

    def frozen(self, cache, mix_cache):
        """Quantities the backward treats as constants, ``{suffix: array}``, recorded so that a
        finite-difference check can hold them fixed."""
        return {}

    def diagnostics(self, cache, mix_cache):
        """``{"spikes": {name: 0/1 array}, "membranes": {name: (value, threshold)}}``: what
        decided each spike, so that golden traces can record margins and flag near-ties; an
        optional ``"internals": {name: array}`` adds what else the family computed over time
        (the neuron's membrane after reset ``u``, the SDN's predicted membrane ``m``), for
        records (:func:`refimpl.model.layer_record`)."""
        return {"spikes": {}, "membranes": {}}

    # Streaming (DESIGN.md section 10): the family's state between chunks, eval mode only.

    def state_spec(self, B, H):
        """The family's streaming state of one layer: ``{suffix: (shape, dtype)}``, zero at the
        start of a sequence (empty for stateless families)."""
        return {}

    def stream(self, v, cfg, p, buf, pre, state, step=False):
        """Eval-mode ``s = activation(v)`` for a chunk ``v (B, H, T)`` started from ``state``
        (``{suffix: array}`` as :meth:`state_spec`); returns ``(s, new_state, diagnostics)``.
        ``step`` asks for the one-step form (``T = 1``). Stateless families run
        :meth:`forward`."""
        s, cache = self.forward(v, cfg, p, buf, pre)
        return s, {}, self.diagnostics(cache, None)


@register
class Gelu(Activation):
    name = "gelu"
    kind = "gelu"

    def forward(self, y, cfg, p, buf, pre, smooth=False, frozen=None):
        return Ly.gelu_fwd(y)

    def backward(self, cache, ds):
        (dy,) = Ly.gelu_bwd(cache, ds)
        return dy, {}

    def rate(self, s, cache, mix_cache):
        return None


class Neuron(Activation):
    """Families run by the iterative neuron (or PMBC, for ``neuron_impl="pmbc"``)."""

    def forward(self, y, cfg, p, buf, pre, smooth=False, frozen=None):
        ncfg = cfg.neuron_config()
        rho = p.get(pre + "rho")
        # PMBC is float64 only; the float32 variant runs the iterative neuron (the form PMBC
        # equals exactly in float64)
        if cfg.neuron_impl == "pmbc" and self.pmbc and not smooth and cfg.dtype == "float64":
            s, h, u, _ = pmbc_fwd(y, ncfg, rho=rho)
        else:
            s, h, u = neuron_fwd(y, ncfg, rho=rho, smooth=smooth)
        return s, NeuronCache(y, s, h, u, ncfg, rho, smooth)

    def backward(self, cache, ds):
        dy, drho = neuron_bwd(cache.y, cache.s, cache.h, cache.cfg, ds, rho=cache.rho,
                              smooth=cache.smooth)
        return dy, ({} if drho is None else {"rho": drho})

    def diagnostics(self, cache, mix_cache):
        return {"spikes": {"s": cache.s}, "membranes": {"h": (cache.h, cache.cfg.theta)},
                "internals": {"u": cache.u}}

    def state_spec(self, B, H):
        """The neuron's membrane after reset ``u_{T-1}`` and its refractory counter
        (:class:`refimpl.neurons.NeuronState`)."""
        return {"neuron.u": ((B, H), np.float64), "neuron.count": ((B, H), np.int64)}

    def stream(self, v, cfg, p, buf, pre, state, step=False):
        ncfg = cfg.neuron_config()
        rho = p.get(pre + "rho")
        st = NeuronState(state["neuron.u"], state["neuron.count"])
        if step:
            s_t, h_t, u_t, new = neuron_step(v[:, :, 0], ncfg, st, rho=rho)
            s, h, u = s_t[:, :, None], h_t[:, :, None], u_t[:, :, None]  # (B, H, 1)
        elif cfg.neuron_impl == "pmbc" and self.pmbc:
            s, h, u, _, new = pmbc_fwd(v, ncfg, rho=rho, state=st, return_state=True)
        else:
            s, h, u, new = neuron_fwd(v, ncfg, rho=rho, state=st, return_state=True)
        diag = self.diagnostics(NeuronCache(v, s, h, u, ncfg, rho, False), None)
        return s, {"neuron.u": new.u, "neuron.count": new.count}, diag

    #: Whether ``neuron_impl="pmbc"`` runs this family's forward by PMBC (exact either way).
    pmbc = False


@register
class Binary(Neuron):
    name = "binary"
    neuron = dict(reset="none", tau=0.0, theta=0.0, surrogate="atan")


@register
class LIF(Neuron):
    name = "lif"
    threshold = True
    neuron = dict(reset="hard", tau=0.125, theta=1.0, surrogate="triangle")


@register
class Refractory(Neuron):
    name = "refractory"
    threshold = True
    neuron = dict(reset="refractory", tau=0.5, theta=1.0, surrogate="triangle")
    pmbc = True

    def init_params(self, H):
        return {"rho": np.full(H, RHO_INIT)}  # (H,)

    def project(self, layer_params):
        """``rho >= 0`` (projection after each optimizer step)."""
        np.maximum(layer_params["rho"], 0.0, out=layer_params["rho"])


@register
class SDN(Activation):
    name = "sdn"
    threshold = True
    neuron = dict(reset="hard", tau=0.125, theta=1.0, surrogate="triangle")
    kind = "sdn"

    def init_buffers(self, sdn_weights):
        if sdn_weights is None:
            raise ValueError("activation='sdn' needs sdn_weights (w0..w5); train them with "
                             "'refimpl sdn train' or load the published .npz")
        return {"sdn." + k: np.asarray(sdn_weights[k], dtype=np.float64) for k in FUSED_LAYOUT}

    def forward(self, y, cfg, p, buf, pre, smooth=False, frozen=None):
        ncfg = cfg.neuron_config()
        weights = {k: buf["sdn." + k] for k in FUSED_LAYOUT}
        m = (frozen or {}).get(pre + "m")
        s, m = sdn_neuron_fwd(y, weights, ncfg, m=m, smooth=smooth)
        return s, SDNCache(y, s, m, ncfg)

    def backward(self, cache, ds):
        return sdn_neuron_bwd(cache.y, cache.m, cache.cfg, ds), {}

    def frozen(self, cache, mix_cache):
        return {"m": cache.m}

    def state_spec(self, B, H):
        """The SDN's window: the last ``K`` inputs (:class:`refimpl.sdn.SDNState`)."""
        return {"sdn.window": ((B, H, SDN_K), np.float64)}

    def stream(self, v, cfg, p, buf, pre, state, step=False):
        ncfg = cfg.neuron_config()
        weights = {k: buf["sdn." + k] for k in FUSED_LAYOUT}
        st = SDNState(state["sdn.window"])
        if step:
            s_t, m_t, new = sdn_neuron_step(v[:, :, 0], weights, ncfg, st)
            s, m = s_t[:, :, None], m_t[:, :, None]  # (B, H, 1)
        else:
            s, m, new = sdn_neuron_fwd(v, weights, ncfg, state=st, return_state=True)
        return s, {"sdn.window": new.window}, self.diagnostics(SDNCache(v, s, m, ncfg), None)

    def diagnostics(self, cache, mix_cache):
        v = cache.m + cache.y  # (B, H, L) what the spike test compares with theta
        return {"spikes": {"s": cache.s}, "membranes": {"m+x": (v, cache.cfg.theta)},
                "internals": {"m": cache.m}}


@register
class BinaryGSU(Activation):
    name = "binary_gsu"
    mixing = "gsu"
    kind = "none"

    def forward(self, y, cfg, p, buf, pre, smooth=False, frozen=None):
        return None, None  # the GSU ternarises y itself

    def backward(self, cache, ds):
        raise RuntimeError("binary_gsu has no activation to differentiate (the GSU reads y)")

    def stream(self, v, cfg, p, buf, pre, state, step=False):
        return None, {}, {"spikes": {}, "membranes": {}}  # Ter(y) is per token: stateless

    def rate(self, s, cache, mix_cache):
        return float(np.abs(mix_cache.Tx).mean())  # GSU's ternary activations Ter(y)

    def frozen(self, cache, mix_cache):
        return {"Tx": mix_cache.Tx, "TW": mix_cache.TW}

    def diagnostics(self, cache, mix_cache):
        return {"spikes": {"Tx": mix_cache.Tx, "TW": mix_cache.TW}, "membranes": {}}
