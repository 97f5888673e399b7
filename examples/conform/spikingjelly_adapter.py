"""spikingjelly's ``LIFNode`` (multi-step) as a ``refimpl conform`` adapter (issue 24): one
adapter object per library configuration, each at float32 and float64 (``<name>_f64``).

Run (in ``.venv-conform``, see ``make conform-matrix``)::

    refimpl conform examples/conform/spikingjelly_adapter.py:hard_sigmoid --op neuron \\
        --precision float32

What spikingjelly computes (``spikingjelly/activation_based/neuron/lif.py`` and
``spikingjelly/_ops/lif/``, read in the installed release): ``LIFNode(tau=T, decay_input,
v_threshold, v_reset, surrogate_function, detach_reset, step_mode="m", store_v_seq=True)``
called on ``x_seq (T_steps, N)``::

    H[t] = V[t-1] - (V[t-1] - V_reset) / T + X[t]                  decay_input=False
    H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / T                 decay_input=True
    S[t] = surrogate(H[t] - V_th)                                   forward: H[t] >= V_th
    V[t] = H[t] - S[t] V_th  (v_reset=None)   or   S[t] V_reset + (1 - S[t]) H[t]
    detach_reset=True: the S[t] inside V[t] is detached

On the CPU both dtypes run the library's Torch formula above under autograd (the graph of
``spikingjelly._ops.lif.reference``; seen as ``StackBackward0`` on the spikes), whether
``lif_multi_step`` dispatches to its registered ``sj_lif`` operator (float32) or calls the
reference directly (float64).

Mapping onto refimpl's neuron: ``tau = 1 - 1/T`` (so the adapter passes ``T = 1 / (1 - tau)``),
``theta = V_th``, ``spike_condition = "ge"``, ``x = X`` (``decay_input=False``: refimpl's input
is not scaled; the ``decay_input=True`` object passes ``X = T x`` instead: the same real
numbers, not the same floats, so a membrane exactly at the threshold may land an ulp away),
time moved from refimpl's last axis to spikingjelly's first. Outputs: ``s = S``, ``u = V``
(the stored ``v_seq``), ``h = H``, which ``LIFNode`` does not return: computed from
``v_seq`` with the library's own charge function
(``spikingjelly._ops.lif.reference.charge``), so it carries the library's gradients. A refimpl
state ``u_{-1}`` is the node's ``v`` before the call. ``detach_reset=False`` is refimpl
``grad_mode="bptt"``, ``True`` is ``"detach_reset"``.

Each object (spikingjelly options -> the refimpl fields it fixes; what to expect):

- ``hard_sigmoid``: ``v_reset=0.0``, ``Sigmoid(alpha)`` -> ``hard``, ``u_reset=0``, ``ge``,
  ``sigmoid`` (``a = alpha``), ``bptt``; the same neuron (to rounding).
- ``hard_sigmoid_detach``: the same with ``detach_reset=True`` -> ``detach_reset``.
- ``soft_atan``: ``v_reset=None``, ``ATan(alpha)`` -> ``soft``, ``atan``, ``bptt``.
- ``soft_atan_detach``: the same with ``detach_reset=True`` -> ``detach_reset``.
- ``hard_pq``: ``v_reset=0.0``, ``PiecewiseQuadratic(alpha = 1/w)`` -> ``hard``, ``triangle``
  (``w``): ``max(0, alpha - alpha^2 |x|)`` is refimpl's triangle of half-width ``1/alpha``.
- ``soft_decay_input``: ``v_reset=None``, ``decay_input=True``, input ``T x``, ``Sigmoid`` ->
  ``soft``, ``sigmoid``, ``bptt``; the same real numbers.
- ``hard_vreset``: ``v_reset = u_reset`` (drawn) -> ``hard``, ``sigmoid``, ``bptt``;
  spikingjelly leaks towards ``v_reset``, refimpl towards 0 (the same only for ``u_reset=0``).

``LIFNode``'s constructor asserts ``tau > 1.0`` (refimpl ``tau > 0``); the CPU formula takes
``T = 1`` (refimpl ``tau = 0``: ``H = X`` exactly), so the adapter builds the node with
``T = 2`` and sets ``node.tau`` afterwards, the attribute the node reads at every call.
"""
import logging

import spikingjelly
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

from _torch_common import register_adapters, surrogate_scale

try:
    from spikingjelly._ops.lif.reference import charge as _sj_charge
except ImportError:  # an older layout: the same formula as LIFNode.neuronal_charge
    def _sj_charge(x, v, tau, decay_input, reset):
        r = 0.0 if reset is None else reset
        return v + (x - (v - r)) / tau if decay_input else v - (v - r) / tau + x

logging.getLogger("torch._library").setLevel(logging.ERROR)  # "Triton not available" on CPU

LIBRARY = "spikingjelly"
try:
    from importlib.metadata import version as _version
    VERSION = _version("spikingjelly")
except Exception:  # pragma: no cover
    VERSION = getattr(spikingjelly, "__version__", "?")


def _surrogate(name, scale):
    if name == "sigmoid":
        return sj_surrogate.Sigmoid(alpha=scale)
    if name == "atan":
        return sj_surrogate.ATan(alpha=scale)
    if name == "triangle":  # PiecewiseQuadratic: max(0, alpha - alpha^2 |x|) = triangle(w=1/a)
        return sj_surrogate.PiecewiseQuadratic(alpha=1.0 / scale)
    raise ValueError(f"spikingjelly: no surrogate matching refimpl's {name!r} in this adapter")


def _runner(soft, detach_reset, decay_input=False, v_reset_from_config=False):
    def run(X, U0, cfg):
        tau = float(cfg["tau"])
        T = 1.0 / (1.0 - tau)
        if soft:
            v_reset = None
        elif v_reset_from_config:
            v_reset = float(cfg["u_reset"])
        else:
            v_reset = 0.0
        scale = surrogate_scale(cfg["surrogate"], cfg.get("surrogate_scale"))
        node = sj_neuron.LIFNode(tau=2.0, decay_input=decay_input,
                                 v_threshold=float(cfg["theta"]), v_reset=v_reset,
                                 surrogate_function=_surrogate(cfg["surrogate"], scale),
                                 detach_reset=detach_reset, step_mode="m", store_v_seq=True)
        node.tau = T  # see the module docstring (the constructor asserts T > 1)
        xs = X.permute(2, 0, 1)  # (L, B, H): time first
        if decay_input:
            xs = xs * T  # the input the same real-number neuron needs (module docstring)
        v0 = torch.zeros_like(xs[0]) if U0 is None else U0
        node.v = v0
        if xs.shape[0] == 0:
            empty = X[:, :, :0]
            return empty, empty, empty
        spikes = node(xs)
        vs = node.v_seq  # (L, B, H): V[t], after the reset
        prev = torch.cat([v0.unsqueeze(0), vs[:-1]], 0)
        hs = _sj_charge(xs, prev, T, decay_input, v_reset)
        return (spikes.permute(1, 2, 0).to(X.dtype), hs.permute(1, 2, 0),
                vs.permute(1, 2, 0))
    return run


def _row(reset, surrogate, grad_mode, fix_u_reset=True):
    row = {"reset": reset, "spike_condition": "ge", "surrogate": surrogate,
           "grad_mode": grad_mode, "refractory_steps": 0}
    if reset == "hard" and fix_u_reset:
        row["u_reset"] = 0.0
    return row


#: object name -> (runner options, refimpl fields fixed, the library configuration)
SPECS = {
    "hard_sigmoid": (dict(soft=False, detach_reset=False), _row("hard", "sigmoid", "bptt"),
                     "LIFNode(decay_input=False, v_reset=0.0, surrogate_function=Sigmoid(alpha))"),
    "hard_sigmoid_detach": (dict(soft=False, detach_reset=True),
                            _row("hard", "sigmoid", "detach_reset"),
                            "LIFNode(decay_input=False, v_reset=0.0, Sigmoid(alpha), "
                            "detach_reset=True)"),
    "soft_atan": (dict(soft=True, detach_reset=False), _row("soft", "atan", "bptt"),
                  "LIFNode(decay_input=False, v_reset=None, surrogate_function=ATan(alpha))"),
    "soft_atan_detach": (dict(soft=True, detach_reset=True), _row("soft", "atan", "detach_reset"),
                         "LIFNode(decay_input=False, v_reset=None, ATan(alpha), "
                         "detach_reset=True)"),
    "hard_pq": (dict(soft=False, detach_reset=False), _row("hard", "triangle", "bptt"),
                "LIFNode(decay_input=False, v_reset=0.0, "
                "surrogate_function=PiecewiseQuadratic(alpha=1/w))"),
    # tau = 0.5 (T = 2): the input T x is exact only where T is a power of two; elsewhere an
    # example whose membrane hits the threshold exactly would flip on that rounding alone
    "soft_decay_input": (dict(soft=True, detach_reset=False, decay_input=True),
                         {**_row("soft", "sigmoid", "bptt"), "tau": 0.5},
                         "LIFNode(decay_input=True, v_reset=None, Sigmoid(alpha)), input T x"),
    "hard_vreset": (dict(soft=False, detach_reset=False, v_reset_from_config=True),
                    _row("hard", "sigmoid", "bptt", fix_u_reset=False),
                    "LIFNode(decay_input=False, v_reset=u_reset, Sigmoid(alpha))"),
}

#: The objects ``make conform-matrix`` runs, in the matrix's order (each also as
#: ``<name>_nostate``: the same neuron without a state argument, checked from the zero state),
#: and the refimpl configuration fields each fixes ({name: {"neuron": fields}}).
ADAPTERS, CONFIGS = register_adapters(globals(), SPECS, LIBRARY, VERSION,
                                      lambda opts: _runner(**opts))
