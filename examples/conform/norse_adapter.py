"""norse's LIF neurons as a ``refimpl conform`` adapter (issue 24): one adapter object per
library configuration, each at float32 and float64 (``<name>_f64``).

Run (in ``.venv-conform``, see ``make conform-matrix``)::

    refimpl conform examples/conform/norse_adapter.py:box_hard_triangle --op neuron \\
        --precision float32

What norse computes (``norse/torch/functional/lif_box.py``, ``lif.py``, ``threshold.py``,
``reset.py``, read in the installed release). ``LIFBoxCell(p, dt)`` (a LIF without synaptic
current), one call per step on ``(B, H)``::

    v_decayed = v + dt tau_mem_inv (input + v_leak - v)
    z = threshold(v_decayed - v_th, method, alpha)                 forward: (v_decayed - v_th) > 0
    v = p.reset_method(z, v_decayed, v_reset, v_th)
        reset_value:    (1 - z) v_decayed + z v_reset
        reset_subtract: (1 - z) v_decayed + z (v_decayed - v_th)

``LIFCell(p, dt)`` (current-based, ``lif_feed_forward_step``): ``i_new = i + input``, then
``v_decayed = v + dt tau_mem_inv ((v_leak - v) + i_new)``, ``i = i_new - dt tau_syn_inv i_new``,
the same threshold and ``reset_value``.

Mapping onto refimpl's neuron: the continuous-time leak is a decay ``tau = 1 - dt tau_mem_inv``
per step; the adapter takes ``dt = 1``, ``tau_mem_inv = 1 - tau``, ``v_leak = 0``. norse's input
is a current, which the step scales by ``dt tau_mem_inv``; refimpl's ``x`` is what reaches the
membrane, so the adapter passes ``input = x / (dt tau_mem_inv)`` (a change of units: the same
real numbers, another rounding). ``theta = v_th``, ``u_reset = v_reset``, ``spike_condition =
"gt"`` (norse's ``heaviside`` is ``x > 0``). The spike ``z`` enters the reset without a detach,
so the gradient is refimpl ``grad_mode="bptt"``. Outputs: ``s = z``, ``u = v`` (the state after
the reset), ``h = v_decayed``: for ``LIFBoxCell`` captured by passing the library's own reset
function wrapped (``p.reset_method`` receives ``v_decayed``); ``LIFCell`` has no such hook, so
``h`` is its ``v_decayed`` formula above evaluated from its state. For ``LIFCell`` the adapter
takes ``tau_syn_inv = 1 / dt``: the current decays fully in one step (``i = 0`` after it), so the
input of a step reaches the membrane in that step and nowhere else. A refimpl state ``u_{-1}``
is norse's ``v`` (``i = 0``). The change of units is not exact in floating point (``x / a``
with ``a = 3/4`` is not a dyadic number): where refimpl's membrane lands exactly on the
threshold (conform's ``at_threshold`` examples), norse's may land an ulp away and the spike
differ.

Surrogates (``method``): ``"super"`` is SuperSpike, documented as ``1 / (alpha |x| + 1)^2``
(refimpl ``fast_sigmoid`` with ``k = alpha``; the adapter passes ``alpha = k``); ``"triangle"`` is
``alpha relu(1 - |x|)``: a triangle of half-width 1 and height ``alpha``, refimpl ``triangle``
with ``w = 1`` when ``alpha = 1`` (the objects fix ``surrogate_scale = 1``).

Each object (norse options -> the refimpl fields it fixes; what to expect):

- ``box_hard_triangle``: ``LIFBoxCell``, ``reset_value``, ``method="triangle"``, ``alpha=1``
  -> ``hard`` (``u_reset`` drawn), ``gt``, ``triangle`` with ``w = 1``, ``bptt``; the same
  neuron (to rounding).
- ``box_soft_triangle``: ``LIFBoxCell``, ``reset_subtract``, ``"triangle"`` -> ``soft``.
- ``box_hard_super``: ``LIFBoxCell``, ``reset_value``, ``method="super"``, ``alpha = k`` ->
  ``hard``, ``fast_sigmoid`` (``k``, drawn). norse 1.1.0's ``SuperSpike.backward`` divides by
  ``(|x| + 1)^2``: ``alpha`` is not used, so its gradients are refimpl's for ``k = 1`` only.
- ``cell_hard_triangle``: ``LIFCell``, ``tau_syn_inv = 1/dt``, ``"triangle"`` -> ``hard``,
  ``triangle`` with ``w = 1``; the same neuron.
"""
from importlib.metadata import version as _version

import torch
from norse.torch import LIFBoxCell, LIFBoxParameters, LIFCell, LIFParameters
from norse.torch.functional.lif import LIFFeedForwardState
from norse.torch.functional.lif_box import LIFBoxFeedForwardState
from norse.torch.functional.reset import reset_subtract, reset_value

from _torch_common import register_adapters, surrogate_scale

LIBRARY = "norse"
VERSION = _version("norse")

#: refimpl surrogate -> norse ``method``
METHODS = {"fast_sigmoid": "super", "triangle": "triangle"}
DT = 1.0


def _runner(model, soft):
    def run(X, U0, cfg):
        dtype = X.dtype
        tau = float(cfg["tau"])
        a = DT * (1.0 - tau)  # dt tau_mem_inv: the membrane's share of a step's input
        method = METHODS.get(cfg["surrogate"])
        if method is None:
            raise ValueError(f"norse has no threshold method matching refimpl's "
                             f"{cfg['surrogate']!r} in this adapter")
        alpha = surrogate_scale(cfg["surrogate"], cfg.get("surrogate_scale"))

        def T(v):
            return torch.tensor(float(v), dtype=dtype)
        captured = []
        base = reset_subtract if soft else reset_value

        def reset(z, v, v_reset, v_th):  # norse's own reset, recording v_decayed (= h)
            captured.append(v)
            return base(z, v, v_reset, v_th)
        common = dict(tau_mem_inv=T((1.0 - tau) / DT), v_leak=T(0.0), v_th=T(cfg["theta"]),
                      v_reset=T(cfg["u_reset"]), method=method, alpha=T(alpha))
        v = torch.zeros_like(X[:, :, 0]) if U0 is None else U0
        if model == "box":
            cell = LIFBoxCell(LIFBoxParameters(**common, reset_method=reset), dt=DT)
            state = LIFBoxFeedForwardState(v=v)
        else:
            p = LIFParameters(tau_syn_inv=T(1.0 / DT), **common)
            cell = LIFCell(p, dt=DT)
            state = LIFFeedForwardState(v=v, i=torch.zeros_like(v))
        S, Hs, Us = [], [], []
        for t in range(X.shape[2]):
            inp = X[:, :, t] / a
            if model == "box":
                z, state = cell(inp, state)
                h = captured[-1]
            else:
                p = cell.p
                i_new = state.i + inp  # lif_feed_forward_step's v_decayed, from its state
                h = state.v + DT * p.tau_mem_inv * ((p.v_leak - state.v) + i_new)
                z, state = cell(inp, state)
            S.append(z)
            Hs.append(h)
            Us.append(state.v)
        if not S:
            empty = X[:, :, :0]
            return empty, empty, empty
        return torch.stack(S, 2), torch.stack(Hs, 2), torch.stack(Us, 2)
    return run


def _row(reset, surrogate, **extra):
    # tau = 0.5: norse takes the current i = x / (1 - tau), exact only where 1 - tau is a power
    # of two; at other tau the division rounds, and an example whose membrane hits the
    # threshold exactly (a test of gt against ge) would flip on that rounding alone
    row = {"reset": reset, "spike_condition": "gt", "surrogate": surrogate,
           "grad_mode": "bptt", "refractory_steps": 0, "tau": 0.5}
    row.update(extra)
    return row


#: object name -> ((model, soft), refimpl fields fixed, the library configuration)
SPECS = {
    "box_hard_triangle": (("box", False), _row("hard", "triangle", surrogate_scale=1.0),
                          'LIFBoxCell(LIFBoxParameters(reset_method=reset_value, '
                          'method="triangle", alpha=1))'),
    "box_soft_triangle": (("box", True), _row("soft", "triangle", surrogate_scale=1.0),
                          'LIFBoxCell(LIFBoxParameters(reset_method=reset_subtract, '
                          'method="triangle", alpha=1))'),
    "box_hard_super": (("box", False), _row("hard", "fast_sigmoid"),
                       'LIFBoxCell(LIFBoxParameters(reset_method=reset_value, method="super", '
                       'alpha=k))'),
    "cell_hard_triangle": (("cell", False), _row("hard", "triangle", surrogate_scale=1.0),
                           'LIFCell(LIFParameters(tau_syn_inv=1/dt, method="triangle", '
                           'alpha=1))'),
}

#: The objects ``make conform-matrix`` runs, in the matrix's order (each also as
#: ``<name>_nostate``: the same neuron without a state argument, checked from the zero state),
#: and the refimpl configuration fields each fixes ({name: {"neuron": fields}}).
ADAPTERS, CONFIGS = register_adapters(globals(), SPECS, LIBRARY, VERSION,
                                      lambda opts: _runner(*opts))
