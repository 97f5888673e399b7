"""snntorch's ``Leaky`` as a ``refimpl conform`` adapter (issue 24): one adapter object per
library configuration, each at float32 (torch's default) and float64 (``<name>_f64``).

Run (in the environment of ``make conform-matrix``, ``.venv-conform``)::

    refimpl conform examples/conform/snntorch_adapter.py:zero_atan --op neuron --precision float32
    refimpl conform examples/conform/snntorch_adapter.py:zero_atan_f64 --op neuron

What snntorch computes (``snntorch/_neurons/leaky.py`` and ``neurons.py``, read in the installed
release), per call ``spk, mem = Leaky(input_, mem)``::

    reset = Heaviside(mem - threshold), detached          (the previous call's membrane)
    subtract: mem = beta mem + input_ - reset threshold
    zero:     mem = beta (1 - reset) mem + input_
    none:     mem = beta mem + input_
    spk = spike_grad(mem - threshold)                      forward: (mem - threshold > 0)
    reset_delay=False: mem = mem - (spk - reset) threshold (subtract) or - (spk - reset) mem (zero)

Mapping onto refimpl's neuron (``h_t = tau u_{t-1} + x_t``, ``s_t = Theta(h_t - theta)``,
``u_t = reset(h_t, s_t)``): ``tau = beta``, ``theta = threshold``, ``x = input_`` (time is the
last axis of refimpl's ``(B, H, L)``; snntorch is called once per step on ``(B, H)``), the
spike condition is ``gt`` (every snntorch spike function fires on ``> 0``). The outputs:

- ``s = spk``;
- ``h`` = the membrane the spike is computed from: the library's ``state_function`` output,
  captured by wrapping that method (with ``reset_delay=True``, the default, it is the
  returned ``mem``);
- ``u`` = the membrane after the library's reset: with ``reset_delay=False`` the returned
  ``mem``; with the default delayed reset, the reset snntorch applies at its next call,
  computed with its own ``mem_reset``: ``(1 - reset) mem`` (zero), ``mem - reset threshold``
  (subtract), ``mem`` (none).

A refimpl state ``u_{-1}`` is passed as snntorch's ``mem``: exact while ``u_{-1} <= threshold``.
snntorch's state is the membrane *before* its delayed reset, so a stored membrane above
threshold is reset once more at the next call; refimpl's state is the membrane after the
reset, which may lie above threshold. conform's stateful starts find that; each object's
``<name>_nostate`` view (no ``state`` argument) is checked from the zero state only.

Findings the matrix shows (snntorch 1.0.0): the spike functions return ``(x > 0).float()``,
so a float64 run rounds the spikes' cotangent to float32 (``grads/x`` off in the 9th digit);
``sigmoid(slope)``'s backward computes ``exp(-slope x) / (exp(-slope x) + 1)^2``, which is
``inf / inf = nan`` in float32 once ``slope |x|`` exceeds about 88.

The configurations (``CONFIGS``; the refimpl fields each fixes, the engine draws the rest:
``tau``, ``theta``, the surrogate's scale, the shapes, the values, the starting state):

Each object (snntorch options -> the refimpl fields it fixes; what to expect):

- ``zero_atan``: ``reset_mechanism="zero"``, ``spike_grad=atan(alpha)`` -> ``hard``,
  ``u_reset=0``, ``gt``, ``atan``, ``detach_reset``; the same neuron.
- ``zero_fast_sigmoid``: ``"zero"``, ``fast_sigmoid(slope)`` -> ``hard``, ``fast_sigmoid``
  (``k = slope``); the same neuron.
- ``zero_sigmoid``: ``"zero"``, ``sigmoid(slope)`` -> ``hard``, ``sigmoid`` (``a = slope``).
- ``zero_triangular``: ``"zero"``, ``triangular(threshold=1/w)`` -> ``hard``, ``triangle``
  (``w``); snntorch's "triangular" backward is ``+-threshold``, not a triangle.
- ``zero_nodelay``: ``"zero"``, ``reset_delay=False``, ``atan`` -> ``hard``, ``bptt`` (its
  immediate reset is not detached).
- ``subtract_atan``: ``"subtract"`` (the default), ``atan`` -> ``soft``, ``gt``,
  ``detach_reset``; snntorch subtracts the threshold after the decay, refimpl before it.
- ``subtract_nodelay``: ``"subtract"``, ``reset_delay=False``, ``atan`` -> ``soft``, ``bptt``;
  after a spike with ``h > 2 theta`` snntorch's delayed re-reset differs.
- ``none_atan``: ``"none"``, ``atan`` -> ``none``, ``bptt``; the same neuron.

Why these grad modes: snntorch's delayed reset is ``mem_reset(...).detach()``, so no gradient
crosses the reset's spike (refimpl ``detach_reset``: ``du/dh = 1 - a s`` kept, ``du/ds``
dropped); with ``reset_delay=False`` the immediate reset uses ``spk`` itself, not detached
(``bptt``). ``none`` has no reset path, so its grad modes coincide.

Precision: ``float32`` objects give snntorch Python floats for ``beta`` and ``threshold`` (its
own buffers: float32) and float32 inputs; ``_f64`` objects pass float64 tensors for both and
float64 inputs. snntorch's spike functions return ``(x > 0).float()``: float32 spikes even in
a float64 run, so the spikes' cotangent is rounded to float32 on its way back.
"""
import snntorch
import torch
from snntorch import surrogate as sg

from _torch_common import register_adapters, surrogate_scale

LIBRARY = "snntorch"
VERSION = snntorch.__version__


def _spike_grad(name, scale):
    if name == "atan":
        return sg.atan(alpha=scale)
    if name == "fast_sigmoid":
        return sg.fast_sigmoid(slope=scale)
    if name == "sigmoid":
        return sg.sigmoid(slope=scale)
    if name == "triangle":
        # snntorch.surrogate.triangular: forward (x > 0), backward threshold * grad, negated
        # for x >= 0; the honest reading of refimpl's triangle of half-width w (peak 1/w)
        return sg.triangular(threshold=1.0 / scale)
    raise ValueError(f"snntorch has no surrogate matching refimpl's {name!r}")


def _runner(reset_mechanism, reset_delay):
    def run(X, U0, cfg):
        dtype = X.dtype
        scale = surrogate_scale(cfg["surrogate"], cfg.get("surrogate_scale"))
        if dtype == torch.float64:  # float64 buffers (a Python float would be stored float32)
            beta = torch.tensor(float(cfg["tau"]), dtype=dtype)
            thr = torch.tensor(float(cfg["theta"]), dtype=dtype)
        else:
            beta, thr = float(cfg["tau"]), float(cfg["theta"])
        lif = snntorch.Leaky(beta=beta, threshold=thr,
                             spike_grad=_spike_grad(cfg["surrogate"], scale),
                             reset_mechanism=reset_mechanism, reset_delay=reset_delay)
        try:
            captured = []
            base = lif.state_function

            def state_function(input_):  # the membrane before the library's reset
                m = base(input_)
                captured.append(m)
                return m
            lif.state_function = state_function
            mem = torch.zeros_like(X[:, :, 0]) if U0 is None else U0
            S, Hs, Us = [], [], []
            for t in range(X.shape[2]):
                spk, mem = lif(X[:, :, t], mem)
                h = captured[-1]
                if reset_delay:  # the reset snntorch applies at its next call
                    r = lif.mem_reset(h)
                    u = {"zero": (1 - r) * h, "subtract": h - r * lif.threshold,
                         "none": h}[reset_mechanism]
                else:
                    u = mem
                S.append(spk.to(dtype))
                Hs.append(h)
                Us.append(u)
        finally:
            if lif in snntorch.SpikingNeuron.instances:
                snntorch.SpikingNeuron.instances.remove(lif)
        if not S:
            empty = X[:, :, :0]
            return empty, empty, empty
        return torch.stack(S, 2), torch.stack(Hs, 2), torch.stack(Us, 2)
    return run


def _row(reset, surrogate, grad_mode, **extra):
    row = {"reset": reset, "spike_condition": "gt", "surrogate": surrogate,
           "grad_mode": grad_mode, "refractory_steps": 0}
    if reset == "hard":
        row["u_reset"] = 0.0
    row.update(extra)
    return row


#: object name -> (snntorch options, refimpl fields fixed, what the library configuration is)
SPECS = {
    "zero_atan": (("zero", True), _row("hard", "atan", "detach_reset"),
                  'Leaky(reset_mechanism="zero", spike_grad=atan(alpha))'),
    "zero_fast_sigmoid": (("zero", True), _row("hard", "fast_sigmoid", "detach_reset"),
                          'Leaky(reset_mechanism="zero", spike_grad=fast_sigmoid(slope))'),
    "zero_sigmoid": (("zero", True), _row("hard", "sigmoid", "detach_reset"),
                     'Leaky(reset_mechanism="zero", spike_grad=sigmoid(slope))'),
    "zero_triangular": (("zero", True), _row("hard", "triangle", "detach_reset"),
                        'Leaky(reset_mechanism="zero", spike_grad=triangular(threshold=1/w))'),
    "zero_nodelay": (("zero", False), _row("hard", "atan", "bptt"),
                     'Leaky(reset_mechanism="zero", reset_delay=False, spike_grad=atan(alpha))'),
    "subtract_atan": (("subtract", True), _row("soft", "atan", "detach_reset"),
                      'Leaky(reset_mechanism="subtract", spike_grad=atan(alpha))'),
    "subtract_nodelay": (("subtract", False), _row("soft", "atan", "bptt"),
                         'Leaky(reset_mechanism="subtract", reset_delay=False, '
                         'spike_grad=atan(alpha))'),
    "none_atan": (("none", True), _row("none", "atan", "bptt"),
                  'Leaky(reset_mechanism="none", spike_grad=atan(alpha))'),
}

#: The objects ``make conform-matrix`` runs, in the matrix's order (each also as
#: ``<name>_nostate``: the same neuron without a state argument, checked from the zero state),
#: and the refimpl configuration fields each fixes ({name: {"neuron": fields}}).
ADAPTERS, CONFIGS = register_adapters(globals(), SPECS, LIBRARY, VERSION,
                                      lambda opts: _runner(*opts))
