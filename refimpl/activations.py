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
  them) and the constants a finite-difference check must hold fixed;
- what the rest of the package would otherwise ask its name for: the arrays of a layer record
  (:attr:`~Activation.record_names`), what fires in it and the membrane that decides it
  (:meth:`~Activation.membranes` and :meth:`~Activation.margins`, the one derivation of spike
  margins that streams, golden traces and plots read), the model options it reads
  (:attr:`~Activation.options`), whether it needs SDN weights, and the labels of its plots
  (:class:`PlotText`).

Nothing outside this module compares a family's name (``tools/check_style.py`` enforces it):
code asks the family, ``cfg.family`` (:class:`refimpl.model.ModelConfig`) or
``ACTIVATIONS[name]``.

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
from typing import NamedTuple

import numpy as np

from . import layers as Ly
from .neurons import NEURON_OP, NeuronState
from .ops import Op, Result, diagnose
from .pmbc import PMBC_OP
from .sdn import FUSED_LAYOUT
from .sdn.neuron import SDN_NEURON_OP, SDNState
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


#: ``ModelConfig`` options that only some families read (:attr:`Activation.options`).
FAMILY_OPTIONS = ("surrogate", "grad_mode", "neuron_impl")


class PlotText(NamedTuple):
    """How :mod:`refimpl.plot` labels what a family fires and the membrane that decides it
    (each field a complete label; ``{n}``, ``{theta}``, ``{value}`` filled in by the plot)."""
    rate: str = "spikes per neuron per step"  # training curves: the firing-rate axis
    unit: str = "neuron"  # raster title: "rate 0.12 per <unit> per step"
    count: str = "spikes"  # trace legend: "channel 3 (12 <count>)"
    total: str = "spikes: {n}"  # raster title: what fired in the layer
    legend: str = ""  # raster legend of one event value (ternary events only)
    trace: str = ""  # the record entry drawn below the raster
    membrane: str = ""  # its axis label
    threshold: str = ""  # the threshold's label


class ActCache(NamedTuple):
    """A family's forward: the op (:mod:`refimpl.ops`) that ran, its arguments and result.
    The family's backward is that op's VJP; the op's own cache is read by the op only."""
    op: Op
    inputs: dict  # {"x": the activation's input (B, H, L), ...}
    params: dict
    cfg: object  # the op's configuration (the model's NeuronConfig for the neurons)
    result: Result

    @property
    def y(self):
        """The activation's input ``(B, H, L)``."""
        return self.inputs[self.op.inputs[0]]

    @property
    def s(self):
        """The activation's output ``(B, H, L)`` (spikes, or GELU's values)."""
        return self.result.outputs[self.op.outputs[0]]


def run_op(op, inputs, params=None, cfg=None, smooth=False, state=None):
    """Run a family's op (its smooth forward if ``smooth``): ``(activation output,
    ActCache)``; from ``state`` with the end state in ``result.state``, else without one."""
    params = {} if params is None else params
    fwd = op.smooth if smooth else op.fwd
    if state is None:
        res = fwd(inputs, params, cfg, end_state=False) if op.state else fwd(inputs, params, cfg)
    else:
        res = fwd(inputs, params, cfg, state)
    c = ActCache(op, inputs, params, cfg, res)
    return c.s, c


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
    pmbc : bool
        Whether ``neuron_impl="pmbc"`` runs the family's forward by PMBC (exact either way).
    record : tuple of str
        The family's own arrays in a layer record, in record order (:attr:`record_names`).
    events : str or None
        The record entry of what fires: ``"s"`` (spikes, 0/1) or ``"Tx"`` (the GSU's
        ``Ter(v)``, -1/0/1); None for a family without events.
    ternary : bool
        Whether the events take -1/0/1 (drawn in two colours) rather than 0/1.
    membrane : str or None
        The record entry the neuron's spike test compares with :attr:`theta` (``"h"``,
        ``"m+x"``); None without one (:meth:`membranes` of the GSU derives its own).
    membrane_label : str
        What plots call that membrane.
    needs_sdn_weights : bool
        :meth:`init_buffers` needs ``sdn_weights`` (callers draw or load them only then).
    """
    name = ""
    mixing = "glu"
    threshold = False
    neuron = None
    kind = "neuron"
    pmbc = False
    record = ()
    events = None
    ternary = False
    membrane = None
    membrane_label = ""
    needs_sdn_weights = False

    @property
    def record_names(self):
        """What one layer's record holds (:func:`refimpl.model.layer_record`), ``(B, H, L)``
        each: the block's ``y`` (S4D output) and ``v`` (the activation's input), the family's
        :attr:`record`, the block's ``out``."""
        return ("y", "v", *self.record, "out")

    @property
    def options(self):
        """The :data:`FAMILY_OPTIONS` of ``ModelConfig`` this family reads: ``surrogate`` and
        ``grad_mode`` (its neuron's), ``neuron_impl`` (PMBC); the CLI refuses the others."""
        neuron = self.neuron is not None
        used = {"surrogate": neuron, "grad_mode": neuron, "neuron_impl": self.pmbc}
        return frozenset(k for k in FAMILY_OPTIONS if used[k])

    @property
    def theta(self):
        """The threshold the recorded :attr:`membrane` is compared with, in the units of ``v``
        (1 = the learned threshold with threshold scaling); None without a membrane."""
        return None if self.membrane is None else float(self.neuron["theta"])

    def membranes(self, rec):
        """What decided the :attr:`events` of a layer record ``rec`` (``(..., H, L)`` arrays,
        :attr:`record_names`): ``{name: (value, threshold)}``, empty without events. The one
        derivation of spike margins (:meth:`margins`, golden ``model_stream`` membranes, the
        raster's threshold)."""
        if self.membrane is None:
            return {}
        return {self.membrane: (rec[self.membrane], self.theta)}

    def margins(self, rec):
        """``{events: |value - threshold|}`` of :meth:`membranes`: how far each decision in the
        layer record ``rec`` was from flipping (empty without events)."""
        mem = self.membranes(rec)
        if not mem:
            return {}
        ((value, thr),) = mem.values()  # one membrane decides the events
        return {self.events: np.abs(value - thr)}

    @property
    def plot(self):
        """The family's :class:`PlotText`."""
        units = "threshold units" if self.threshold else "S4D output units"
        learned = " (learned exp(ln_vth))" if self.threshold else ""
        return PlotText(trace=self.membrane or "", membrane=f"{self.membrane_label}\n({units})",
                        threshold="threshold {theta:g}" + learned)

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
        """Returns ``(dy, grads)``: ``grads`` maps parameter suffixes (``"rho"``) to gradients.
        A family run by an op (:func:`run_op`) gets its op's VJP."""
        g = dict(cache.op.vjp(cache.result.cache, {cache.op.outputs[0]: ds}))
        dy = g.pop(cache.op.inputs[0])
        return dy, {k: v for k, v in g.items() if k in cache.params and k not in cache.op.nondiff}

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
        return run_op(Ly.GELU_OP, {"x": y})

    def rate(self, s, cache, mix_cache):
        return None


class Neuron(Activation):
    """Families run by the iterative neuron (or PMBC, for ``neuron_impl="pmbc"``)."""
    record = ("s", "h", "u")
    events = "s"
    membrane = "h"
    membrane_label = "membrane h"

    def _op(self, cfg, smooth=False, step=False):
        """PMBC for ``neuron_impl="pmbc"`` (float64 only: the float32 variant and the smooth
        forward run the iterative neuron, the form PMBC equals exactly in float64; so does a
        single step), else the iterative neuron."""
        if (cfg.neuron_impl == "pmbc" and self.pmbc and not smooth and not step
                and cfg.dtype == "float64"):
            return PMBC_OP
        return NEURON_OP

    def forward(self, y, cfg, p, buf, pre, smooth=False, frozen=None):
        params = {"rho": p[pre + "rho"]} if pre + "rho" in p else {}
        return run_op(self._op(cfg, smooth), {"x": y}, params, cfg.neuron_config(), smooth)

    def diagnostics(self, cache, mix_cache):
        c = cache
        d = diagnose(c.op, c.inputs, c.params, c.cfg, c.result)
        return {**d, "internals": {"u": c.result.outputs["u"]}}

    def state_spec(self, B, H):
        """The neuron's membrane after reset ``u_{T-1}`` and its refractory counter
        (:class:`refimpl.neurons.NeuronState`)."""
        return {"neuron.u": ((B, H), np.float64), "neuron.count": ((B, H), np.int64)}

    def stream(self, v, cfg, p, buf, pre, state, step=False):
        params = {"rho": p[pre + "rho"]} if pre + "rho" in p else {}
        st = NeuronState(state["neuron.u"], state["neuron.count"])
        s, c = run_op(self._op(cfg, step=step), {"x": v}, params, cfg.neuron_config(), state=st)
        new = c.result.state
        return s, {"neuron.u": new.u, "neuron.count": new.count}, self.diagnostics(c, None)



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
    record = ("s", "m+x", "m")
    events = "s"
    membrane = "m+x"
    membrane_label = "membrane m + x (SDN)"
    needs_sdn_weights = True

    def init_buffers(self, sdn_weights):
        if sdn_weights is None:
            raise ValueError("activation='sdn' needs sdn_weights (w0..w5); train them with "
                             "'refimpl sdn train' or load the published .npz")
        return {"sdn." + k: np.asarray(sdn_weights[k], dtype=np.float64) for k in FUSED_LAYOUT}

    def forward(self, y, cfg, p, buf, pre, smooth=False, frozen=None):
        weights = {k: buf["sdn." + k] for k in FUSED_LAYOUT}
        m = (frozen or {}).get(pre + "m")
        inputs = {"x": y} if m is None else {"x": y, "m": m}
        return run_op(SDN_NEURON_OP, inputs, weights, cfg.neuron_config(), smooth)

    def frozen(self, cache, mix_cache):
        return {"m": cache.result.outputs["m"]}

    def state_spec(self, B, H):
        """The SDN's window: the last ``K`` inputs (:class:`refimpl.sdn.SDNState`)."""
        return {"sdn.window": ((B, H, SDN_K), np.float64)}

    def stream(self, v, cfg, p, buf, pre, state, step=False):
        weights = {k: buf["sdn." + k] for k in FUSED_LAYOUT}
        st = SDNState(state["sdn.window"])
        s, c = run_op(SDN_NEURON_OP, {"x": v}, weights, cfg.neuron_config(), state=st)
        return s, {"sdn.window": c.result.state.window}, self.diagnostics(c, None)

    def diagnostics(self, cache, mix_cache):
        c = cache
        d = diagnose(c.op, c.inputs, c.params, c.cfg, c.result)
        return {**d, "internals": {"m": c.result.outputs["m"]}}


@register
class BinaryGSU(Activation):
    name = "binary_gsu"
    mixing = "gsu"
    kind = "none"
    record = ("Tx",)
    events = "Tx"
    ternary = True

    def membranes(self, rec):
        """``Ter(v)`` keeps ``|v| >= TERNARY_RATIO max|v|`` over the channels of each token:
        ``{"|v|": (|v|, TERNARY_RATIO max_h |v|)}``, the threshold ``(..., 1, L)``."""
        a = np.abs(rec["v"])  # (..., H, L)
        return {"|v|": (a, Ly.TERNARY_RATIO * a.max(axis=-2, keepdims=True))}  # (..., 1, L)

    @property
    def plot(self):
        return PlotText(rate="nonzero Ter(v) per channel per step", unit="channel",
                        count="nonzero", total="GSU activations Ter(v): {n} nonzero",
                        legend="Ter(v) = {value:+d}", trace="v",
                        membrane="GSU input v = y (S4D output)",
                        threshold=f"threshold +-{Ly.TERNARY_RATIO} max|v| (over channels)")

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
