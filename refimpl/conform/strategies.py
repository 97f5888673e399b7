"""Hypothesis strategies of ``refimpl conform``: one drawn example per registered op (issue 24).

:func:`draw_spec` draws one golden-format case specification
(:class:`refimpl.golden.registry.Spec`) of an op, from hypothesis's ``data.draw`` only (no global
random state: the same draws give the same bits). The engine turns it into a golden case with
:func:`refimpl.golden.generate.regenerate` (the reference outputs, gradients and bounds) and
judges a backend on it.

What an example covers
----------------------
- **Shapes up to the limits** (:class:`Limits`, the CLI's ``--max-*`` options): every size is
  ``st.integers(1, limit)``, so hypothesis shrinks a failure to the smallest size that still
  fails (a bug only at ``L > 1000`` to ``L = 1001``, one only for ``H`` not a multiple of 8 to a
  small ``H``). The real state size is ``N = 2 N2`` (``N2`` complex modes).
- **Every configuration field over its valid range** (each op's config class says which):
  every reset of :data:`refimpl.neurons.RESETS`, both spike conditions, every surrogate of
  :data:`refimpl.surrogates.SURROGATES` with its default or a drawn shape constant, every grad
  mode, ``refractory_steps`` 0..3, ``tau`` in ``[0, 1)`` (0 included), ``theta`` and
  ``u_reset`` where the reset takes them; both S4D discretizations and initialisations,
  trainable ``B``, bidirectional kernels; every convolution method; BatchNorm's training and
  eval modes, momentum and ``eps``. A field in ``fixed`` (an adapter of a library that
  implements one configuration) is never drawn.
- **Value regimes** (a draw of its own, shrinking to ``normal``): ``N(0, 1)``-like values;
  values *at* a threshold (dyadic inputs, ``tau``, ``theta`` and state: the membranes hit
  ``theta`` exactly in any float64 arithmetic, ``exact=True``); values *near* it (a few ulps
  off: rounding decides, refimpl marks the case ``acceptable``); large and small magnitudes
  (``2**20`` and ``2**-20``); all-zero inputs where they are a special case.
- **dt** (the S4D ops): ``log_dt`` per channel in the S4 range ``[1e-3, 1e-1]``, at the tiny end
  of :data:`refimpl.ssm.DT_RANGE` (``1e-8 .. 1e-5``, often exactly ``1e-8``), at the huge end
  (``1 .. 100``, often exactly 100), or spanning the whole range; the extremes are flagged
  ``extreme_dt`` (the golden suites' tight ZOH bound).
- **Stateful starts** (ops with a state), with probability 1/2: a random membrane ``u0`` (some
  rows above threshold) and refractory counts ``count0`` in ``0 .. refractory_steps`` with at
  least one at the maximum; random complex modes ``x0`` (the S4D layer, forward only:
  ``no_grads``, as refimpl has no backward from a state); a random input window (the SDN
  neuron).
- **Invalid examples** (with probability 1/:data:`INVALID_ODDS`, unless ``invalid=False``):
  only kinds that refimpl's op rejects with ``ValueError``/``TypeError`` (:data:`INVALID`:
  NaN inputs, shape mismatches, out-of-range configurations, counts above
  ``refractory_steps``, tokens ``>= V``, labels outside ``[0, C)``, a sequence of rank 2 or
  of ``L = 0``, ...); ``result = "invalid"``, the backend must reject them too. The layers
  (gelu, glu, layernorm, batchnorm, ...) have no NaN kinds: refimpl does not check their
  values (NaN passes, by design: :func:`refimpl.layers._check_dtypes`).

Examples stay cheap at the default limits (refimpl runs each about four times, forward and
backward, to build the case): 1 to 4 ms for every op but PMBC, whose parallel kernel costs a
fixed few milliseconds per call (thread launch) whatever the size.
"""
import numbers
from typing import Callable, NamedTuple

import numpy as np
from hypothesis import strategies as st

from ..conv import CONV_METHODS
from ..golden.registry import Spec, dyadic
from ..layers import TERNARY_RATIO, dropout_mask
from ..neurons import GRAD_MODES, RESETS, SPIKE_CONDITIONS, NeuronConfig, NeuronState, neuron_fwd
from ..ops import all_ops, config_fields
from ..sdn import K as SDN_TAPS
from ..sdn import fold, init_train_params, sdn_forward
from ..sdn.fused import random_weights
from ..sdn.weights import C as SDN_CHANNELS
from ..ssm import DISCRETIZATIONS, DT_RANGE, INITS, s4d_init
from ..surrogates import SURROGATES

# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------

from .limits import OPTIONS, Limits  # noqa: E402,F401  (re-exported: the strategies' sizes)

#: The default limits (``Limits()``).
DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------

#: One example in this many is invalid (when invalid examples are drawn at all).
INVALID_ODDS = 10

#: The value regimes of the spiking ops; the first is the one a failure shrinks to.
SPIKING_REGIMES = ("normal", "at_threshold", "near_threshold", "large", "small")
#: The value regimes of the other ops.
PLAIN_REGIMES = ("normal", "large", "small")
#: The magnitude of the ``large`` and ``small`` regimes (a power of two: scaling is exact).
MAGNITUDE = {"normal": 1.0, "large": 2.0**20, "small": 2.0**-20}
#: The longest sequence of an ``at_threshold`` neuron example: with dyadic ``tau`` (a multiple
#: of 1/4) and inputs (multiples of 1/8), every membrane of 20 steps needs fewer than 53 bits,
#: so every float64 evaluation order (PMBC's scan included) computes it exactly.
EXACT_MAX_L = 20
#: ``dt`` regimes of the S4D ops (:func:`_log_dt`).
DT_REGIMES = ("default", "tiny", "huge", "span")
#: Flags of the dt regimes.
DT_FLAGS = {"default": [], "tiny": ["tiny_dt", "extreme_dt"], "huge": ["huge_dt", "extreme_dt"],
            "span": ["tiny_dt", "huge_dt", "extreme_dt"]}
#: Flags of the value regimes.
REGIME_FLAGS = {"normal": [], "at_threshold": ["at_threshold"],
                "near_threshold": ["near_threshold_values"], "large": ["large_values"],
                "small": ["small_values"], "zero": ["all_zero"], "saturation": ["saturation"],
                "offset": ["offset_mean"], "constant": ["zero_variance"],
                "tails": ["saturation"], "confident": ["confident"], "repeats": ["repeats"],
                "zero_token": ["all_zero"]}


def _floats(lo, hi, **kw):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, **kw)


class _Draws:
    """The draws of one example: hypothesis's ``draw``, the limits, the fixed fields, whether
    stateful starts are drawn."""

    def __init__(self, draw, limits, fixed, state=True):
        self.draw, self.limits, self.fixed, self.state = draw, limits, fixed, state

    def size(self, limit):
        """A size in ``1 .. limit`` (shrinks to 1)."""
        return self.draw(st.integers(1, max(1, int(limit))))

    def pick(self, name, strategy):
        """Configuration field ``name``: its fixed value, else a draw."""
        return self.fixed[name] if name in self.fixed else self.draw(strategy)

    def name(self, field, names):
        """Configuration field ``field``, one of ``names`` (the first is the default): its
        fixed value (a ValueError if not one of them), else a draw."""
        value = self.pick(field, st.sampled_from(tuple(names)))
        if value not in names:
            raise ValueError(f"the fixed configuration {self.fixed} is not valid: unknown "
                             f"{field} {value!r}; valid names are {', '.join(map(repr, names))}")
        return value

    def choice(self, options):
        """One of ``options`` (shrinks to the first)."""
        return self.draw(st.sampled_from(tuple(options)))

    def flag(self):
        return self.draw(st.booleans())

    def start(self):
        """Whether the example starts from a state: probability 1/2 (shrinks to the zero
        state); never (and no draw) when stateful starts are off."""
        return self.state and self.flag()

    def rng(self):
        """The example's NumPy generator, from one drawn seed (few draws: fast shrinking)."""
        return np.random.default_rng(self.draw(st.integers(0, 2**32 - 1)))


def _plain(v):
    """A plain Python scalar (golden case attributes hold str, int, float, bool)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _is_dyadic(v, bits=10):
    """Whether ``v`` is a multiple of ``2**-bits`` below ``2**20`` (exact in every sum here)."""
    w = float(v) * 2.0**bits
    return abs(v) < 2.0**20 and w == np.floor(w)


def _sizes_text(**sizes):
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def _regime_text(regime):
    return {"normal": "", "at_threshold": "values at the threshold (dyadic, exact)",
            "near_threshold": "values within a few ulps of the threshold",
            "large": "large values (x 2^20)", "small": "small values (x 2^-20)",
            "zero": "all-zero input"}.get(regime, regime.replace("_", " "))


def _spec(op_name, sizes, notes, flags, config, inputs, params, exact=False, result="valid"):
    """The :class:`Spec`, its comment one line: the sizes, then the notable choices."""
    comment = f"{op_name} {_sizes_text(**sizes)}"
    notes = [n for n in notes if n]
    if notes:
        comment += ": " + ", ".join(notes)
    return Spec(comment, list(dict.fromkeys(flags)), {k: _plain(v) for k, v in config.items()},
                inputs, params, result=result, exact=bool(exact))


# --------------------------------------------------------------------------------------------
# S4D kernel, convolution, S4D layer
# --------------------------------------------------------------------------------------------

def _log_dt(rng, H, regime):
    """``log_dt (H,)`` of a dt regime: ``default`` U[ln 1e-3, ln 1e-1]; ``tiny`` half the
    channels at ``ln DT_RANGE[0]``, the others in ``[ln 1e-8, ln 1e-5]``; ``huge`` half at
    ``ln DT_RANGE[1]``, the others in ``[0, ln 100]``; ``span`` uniform over the whole range,
    channel 0 at the bottom and (``H > 1``) the last at the top."""
    lo, hi = np.log(DT_RANGE[0]), np.log(DT_RANGE[1])
    if regime == "default":
        return rng.uniform(np.log(1e-3), np.log(1e-1), size=H)  # (H,)
    if regime == "tiny":
        return np.where(rng.random(H) < 0.5, lo, rng.uniform(lo, np.log(1e-5), size=H))
    if regime == "huge":
        return np.where(rng.random(H) < 0.5, hi, rng.uniform(0.0, hi, size=H))
    log_dt = rng.uniform(lo, hi, size=H)  # (H,)
    log_dt[0] = lo
    if H > 1:
        log_dt[-1] = hi
    return log_dt


def _ssm_draws(ex, stateful=False):
    """The S4D draws shared by the kernel and the layer (config first, then sizes, then the
    seed); a layer started from a state is causal (a bidirectional one has no state)."""
    d = {"disc": ex.name("disc", DISCRETIZATIONS),
         "init": ex.choice(INITS), "bidirectional": not stateful and ex.flag(),
         "trainable_B": ex.flag(),
         "dt": ex.choice(DT_REGIMES), "regime": ex.choice(PLAIN_REGIMES)}
    d["H"] = ex.size(ex.limits.channels)
    d["N"] = 2 * ex.size(ex.limits.state // 2)
    return d


def _ssm_params(rng, d, with_D):
    """S4D parameters (:func:`refimpl.ssm.s4d_init`, ``log_dt`` of the dt regime, ``B`` moved
    off 1 when trainable)."""
    H, N = d["H"], d["N"]
    p = s4d_init(H, N, init=d["init"], seed=rng, trainable_B=d["trainable_B"],
                 bidirectional=d["bidirectional"])
    p["log_dt"] = _log_dt(rng, H, d["dt"])  # (H,)
    if d["trainable_B"]:
        p["B_re"] = p["B_re"] + 0.3 * rng.normal(size=p["B_re"].shape)  # (H, N2)
        p["B_im"] = 0.3 * rng.normal(size=p["B_im"].shape)  # (H, N2)
    if not with_D:
        del p["D"]
    return p


def _ssm_config(d, L):
    """The op's fields and the golden S4D suites' descriptive attributes (their tolerance
    models read ``L`` and ``disc``)."""
    return dict(disc=d["disc"], L=int(L), init=d["init"], trainable_B=d["trainable_B"],
                bidirectional=d["bidirectional"], H=d["H"], N=d["N"])


def _ssm_notes(d):
    dt = {"default": "", "tiny": "tiny dt (1e-8 .. 1e-5)", "huge": "huge dt (1 .. 100)",
          "span": "dt spanning 1e-8 .. 100"}[d["dt"]]
    return [f"disc {d['disc']}, init {d['init']}", "bidirectional" if d["bidirectional"] else "",
            "trainable B" if d["trainable_B"] else "", dt]


def gen_s4d_kernel(draw, limits, fixed):
    """The S4D kernel: both discretizations and initialisations, trainable ``B``,
    bidirectional ``C``, the dt regimes; ``C`` scaled by the magnitude regime."""
    ex = _Draws(draw, limits, fixed)
    d = _ssm_draws(ex)
    L = ex.pick("L", st.integers(1, limits.length))
    rng = ex.rng()
    p = _ssm_params(rng, d, with_D=False)
    for k in ("C_re", "C_im"):
        p[k] = p[k] * MAGNITUDE[d["regime"]]
    return _spec("s4d_kernel", dict(H=d["H"], N=d["N"], L=L),
                 _ssm_notes(d) + [_regime_text(d["regime"])],
                 DT_FLAGS[d["dt"]] + REGIME_FLAGS[d["regime"]], _ssm_config(d, L), {}, p)


def gen_s4d_layer(draw, limits, fixed, state=True):
    """The S4D layer: the kernel's draws plus ``u``, ``D`` and, for a causal layer with
    probability 1/2, a stateful start ``x0`` (complex ``(B, H, N2)``; forward only)."""
    ex = _Draws(draw, limits, fixed, state)
    stateful = ex.start()
    d = _ssm_draws(ex, stateful)
    B, L = ex.size(limits.batch), ex.size(limits.length)
    zero = ex.flag() and ex.flag()  # an all-zero input, 1 in 4
    rng = ex.rng()
    p = _ssm_params(rng, d, with_D=True)
    u = rng.normal(size=(B, d["H"], L)) * MAGNITUDE[d["regime"]]  # (B, H, L)
    if zero:
        u[:] = 0.0
    inputs = {"u": u}
    flags = DT_FLAGS[d["dt"]] + REGIME_FLAGS[d["regime"]] + (["all_zero"] if zero else [])
    notes = _ssm_notes(d) + [_regime_text(d["regime"]), "all-zero input" if zero else ""]
    if stateful:
        N2 = d["N"] // 2
        inputs["x0_re"] = rng.normal(size=(B, d["H"], N2))  # (B, H, N2)
        inputs["x0_im"] = rng.normal(size=(B, d["H"], N2))  # (B, H, N2)
        flags += ["stateful", "no_grads"]
        notes.append("stateful: random complex x0 (forward only)")
    return _spec("s4d_layer", dict(B=B, H=d["H"], N=d["N"], L=L), notes, flags,
                 _ssm_config(d, L), inputs, p)


def gen_fftconv(draw, limits, fixed):
    """The convolution: every method, causal and bidirectional kernels (decaying or white
    noise), the magnitude regimes and an all-zero input; ``D`` always (the golden ``fftconv``
    suite's tolerance model reads it)."""
    ex = _Draws(draw, limits, fixed)
    method = ex.name("method", ("fft",) + tuple(m for m in CONV_METHODS if m != "fft"))
    bi, white = ex.flag(), ex.flag()
    regime = ex.choice(PLAIN_REGIMES + ("zero",))
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    shape = (2, H, L) if bi else (H, L)
    K = rng.normal(size=shape)  # (H, L) or (2, H, L)
    if not white:
        K = K * np.exp(-rng.uniform(0.02, 0.3, size=shape[:-1] + (1,)) * np.arange(L))
    u = rng.normal(size=(B, H, L)) * MAGNITUDE.get(regime, 0.0)  # (B, H, L)
    return _spec("fftconv", dict(B=B, H=H, L=L),
                 [f"method {method}", "bidirectional" if bi else "",
                  "white-noise kernel" if white else "decaying kernel", _regime_text(regime)],
                 REGIME_FLAGS[regime], {"method": method}, {"u": u},
                 {"K": K, "D": rng.normal(size=H)})


# --------------------------------------------------------------------------------------------
# Neurons and PMBC
# --------------------------------------------------------------------------------------------

def _neuron_config(ex, regime):
    """Every :class:`~refimpl.neurons.NeuronConfig` field over its valid range (dyadic values
    in the ``at_threshold`` regime), the surrogate scale resolved to a float."""
    exact = regime == "at_threshold"
    reset = ex.name("reset", tuple(RESETS))
    rule = RESETS[reset]
    if exact:
        tau = ex.pick("tau", st.sampled_from((0.5, 0.0, 0.25, 0.75)))
        thetas = (1.0, 0.5, 1.5, 2.0) + (() if rule.theta_positive else (0.0, -0.5))
        theta = ex.pick("theta", st.sampled_from(thetas))
        resets = st.sampled_from((0.0, -0.25, 0.5))
    else:
        tau = ex.pick("tau", st.one_of(st.sampled_from((0.5, 0.0, 0.9)),
                                       _floats(0.0, 1.0, exclude_max=True)))
        theta = ex.pick("theta", st.one_of(st.just(1.0), _floats(0.1, 3.0) if rule.theta_positive
                                           else _floats(-1.0, 2.0)))
        resets = st.one_of(st.just(0.0), _floats(-1.0, 0.5))
    u_reset = ex.pick("u_reset", resets if rule.u_reset else st.just(0.0))
    surrogate = ex.pick("surrogate", st.sampled_from(tuple(SURROGATES)))
    scale = ex.pick("surrogate_scale", st.one_of(st.none(), _floats(0.25, 8.0)))
    if scale is None and surrogate in SURROGATES:
        scale = SURROGATES[surrogate].default_scale
    return _checked(ex, dict(
        reset=reset, tau=tau, theta=theta, u_reset=u_reset,
        refractory_steps=ex.pick("refractory_steps", st.integers(0, 3)),
        spike_condition=ex.pick("spike_condition", st.sampled_from(tuple(SPIKE_CONDITIONS))),
        surrogate=surrogate, surrogate_scale=scale,
        grad_mode=ex.pick("grad_mode", st.sampled_from(tuple(GRAD_MODES)))))


def _checked(ex, cfg):
    """``cfg`` if it is a valid :class:`~refimpl.neurons.NeuronConfig`; a ValueError naming
    the fixed fields otherwise (a drawn configuration is always valid)."""
    try:
        NeuronConfig(**cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the fixed configuration {ex.fixed} is not valid: {e}") from None
    return cfg


def _neuron_hits(rng, x, cfg, rho, state, ulps):
    """Set ``x`` at up to three steps so that the membrane ``h_t = tau u_{t-1} + x_t`` equals
    ``theta`` in every row (``ulps = 0``; exact for dyadic values) or lies within ``ulps`` ulps
    of it. ``u_{t-1}`` comes from refimpl's neuron run on the steps before."""
    B, H, L = x.shape
    ncfg = NeuronConfig(**cfg)
    start = None if state is None else NeuronState(*state)
    for t in np.sort(rng.choice(L, size=min(L, 3), replace=False)):
        if t == 0:
            u_prev = np.zeros((B, H)) if state is None else state[0]  # (B, H)
        else:
            u_prev = neuron_fwd(x[..., :t], ncfg, rho=rho, state=start)[2][..., -1]  # (B, H)
        target = cfg["theta"] - cfg["tau"] * u_prev  # (B, H)
        if ulps:
            ulp = np.spacing(np.maximum(abs(cfg["theta"]), np.abs(target)))  # (B, H)
            target = target + rng.integers(-ulps, ulps + 1, size=(B, H)) * ulp
        x[..., t] = target


def _neuron_generator(op_name):
    """The generator of the neuron and of PMBC (the same neuron, another algorithm)."""

    def generate(draw, limits, fixed, state=True):
        ex = _Draws(draw, limits, fixed, state)
        regime = ex.choice(SPIKING_REGIMES)
        cfg = _neuron_config(ex, regime)
        rule = RESETS[cfg["reset"]]
        mag = MAGNITUDE.get(regime, 1.0)
        for k in ("theta", "u_reset"):
            if k not in fixed:
                cfg[k] = cfg[k] * mag
        unit = (abs(cfg["theta"]) or 1.0) * (mag if "theta" in fixed else 1.0)
        B, H = ex.size(limits.batch), ex.size(limits.channels)
        L = ex.size(min(limits.length, EXACT_MAX_L) if regime == "at_threshold"
                    else limits.length)
        stateful = ex.start()
        rng = ex.rng()
        R = cfg["refractory_steps"]
        if regime == "at_threshold":
            x = dyadic(rng, (B, H, L)) * unit  # (B, H, L)
            rho = dyadic(rng, (H,), 0.0, 1.5) * unit  # (H,)
            u0 = dyadic(rng, (B, H), -1.0, 2.0) * unit  # (B, H)
        else:
            x = rng.normal(0.6 * unit, unit, size=(B, H, L))  # (B, H, L)
            rho = rng.uniform(0.0, 1.5, size=H) * unit  # (H,)
            u0 = rng.uniform(-0.75, 1.5, size=(B, H)) * unit  # (B, H)
        rho = rho if rule.param else None
        count0 = rng.integers(0, R + 1, size=(B, H)).astype(np.int64)  # (B, H)
        if R:
            count0.flat[0] = R  # a blocked row in every stateful example with a period
        state = (u0, count0) if stateful else None
        if regime in ("at_threshold", "near_threshold"):
            _neuron_hits(rng, x, cfg, rho, state, 0 if regime == "at_threshold" else 2)
        exact = regime == "at_threshold" and all(
            _is_dyadic(cfg[k]) for k in ("tau", "theta", "u_reset"))
        inputs = {"x": x}
        flags = list(REGIME_FLAGS["near_threshold" if regime == "at_threshold" and not exact
                                  else regime])
        notes = [f"reset {cfg['reset']}, tau {cfg['tau']:.6g}, theta {cfg['theta']:.6g}"
                 + (f", u_reset {cfg['u_reset']:.6g}" if rule.u_reset else ""),
                 f"R = {R}" if R else "", cfg["spike_condition"],
                 f"{cfg['surrogate']} ({cfg['surrogate_scale']:.6g})", cfg["grad_mode"],
                 "rho drawn" if rho is not None else "", _regime_text(regime)]
        if stateful:
            inputs.update(u0=u0, count0=count0)
            flags.append("stateful")
            notes.append("stateful: random u0" + (f", count0 in 0 .. {R} (some = {R})"
                                                  if R else ""))
        return _spec(op_name, dict(B=B, H=H, L=L), notes, flags, cfg, inputs,
                     {} if rho is None else {"rho": rho}, exact=exact)

    generate.__name__ = f"gen_{op_name}"
    generate.__doc__ = (f"The ``{op_name}`` op: every reset, spike condition, surrogate, grad "
                        "mode and refractory period; the spiking regimes; stateful starts "
                        "(u0, count0) with probability 1/2.")
    return generate


gen_neuron = _neuron_generator("neuron")
gen_pmbc = _neuron_generator("pmbc")


# --------------------------------------------------------------------------------------------
# SDN
# --------------------------------------------------------------------------------------------

def _sdn_weights(ex, rng):
    """Fused weights: random (:func:`refimpl.sdn.fused.random_weights`) or folded from a
    training network with non-trivial BatchNorm statistics (as the golden ``sdn`` suite)."""
    kind = ex.choice(("random", "folded"))
    if kind == "random":
        return random_weights(rng), "random weights"
    params, buffers = init_train_params(seed=rng, init="lif")
    for k in ("bn1", "bn2"):
        buffers[f"{k}.running_mean"] = rng.normal(0.0, 0.5, size=SDN_CHANNELS)
        buffers[f"{k}.running_var"] = rng.uniform(0.2, 3.0, size=SDN_CHANNELS)
        params[f"{k}.weight"] = params[f"{k}.weight"] * rng.uniform(0.5, 1.5, size=SDN_CHANNELS)
        params[f"{k}.bias"] = params[f"{k}.bias"] + rng.normal(0.0, 0.2, size=SDN_CHANNELS)
    return fold(params, buffers), "weights folded from a training network"


def _sdn_config(ex, exact):
    """A :class:`~refimpl.neurons.NeuronConfig` of the SDN: a hard reset to 0 without a
    refractory period (the neuron the SDN predicts), ``tau = 0.125`` (the weights') and
    ``grad_mode = "bptt"`` (ignored: ``m`` is a constant) unless fixed; ``theta``, the spike
    condition and the surrogate drawn."""
    theta = ex.pick("theta", st.sampled_from((1.0, 0.5, 1.5)) if exact
                    else st.one_of(st.just(1.0), _floats(0.25, 2.0)))
    surrogate = ex.pick("surrogate", st.sampled_from(tuple(SURROGATES)))
    scale = ex.pick("surrogate_scale", st.one_of(st.none(), _floats(0.25, 8.0)))
    if scale is None and surrogate in SURROGATES:
        scale = SURROGATES[surrogate].default_scale
    return _checked(ex, dict(
        reset=ex.pick("reset", st.just("hard")), tau=ex.pick("tau", st.just(0.125)),
        theta=theta, u_reset=ex.pick("u_reset", st.just(0.0)),
        refractory_steps=ex.pick("refractory_steps", st.just(0)),
        spike_condition=ex.pick("spike_condition", st.sampled_from(tuple(SPIKE_CONDITIONS))),
        surrogate=surrogate, surrogate_scale=scale,
        grad_mode=ex.pick("grad_mode", st.just("bptt"))))


def _sdn_hits(rng, x, theta, m_of, ulps):
    """Set ``x`` at up to three steps so that ``m_t + x_t`` equals ``theta`` (or lies within
    ``ulps`` ulps of it); ``m_of(x)`` is the prediction, which at ``t`` depends on earlier
    inputs only (so the steps are set in order)."""
    B, H, L = x.shape
    for t in np.sort(rng.choice(L, size=min(L, 3), replace=False)):
        target = theta - m_of(x)[..., t]  # (B, H)
        if ulps:
            ulp = np.spacing(np.maximum(abs(theta), np.abs(target)))  # (B, H)
            target = target + rng.integers(-ulps, ulps + 1, size=(B, H)) * ulp
        x[..., t] = target


def gen_sdn_fused(draw, limits, fixed):
    """The fused SDN network: random or folded weights, rows shorter and longer than its
    eight taps, the magnitude regimes and an all-zero input."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(PLAIN_REGIMES + ("zero",))
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    w, wnote = _sdn_weights(ex, rng)
    x = rng.normal(size=(B, H, L)) * MAGNITUDE.get(regime, 0.0)  # (B, H, L)
    return _spec("sdn_fused", dict(B=B, H=H, L=L), [wnote, _regime_text(regime)],
                 REGIME_FLAGS[regime], {}, {"x": x}, w)


def gen_sdn_neuron(draw, limits, fixed, state=True):
    """The SDN neuron: with a frozen prediction ``m`` or the network's, ``theta``, both spike
    conditions, every surrogate; the spiking regimes (at the threshold: ``m`` given, dyadic,
    exact); a stateful start (the window of the last eight inputs) with probability 1/2."""
    ex = _Draws(draw, limits, fixed, state)
    regime = ex.choice(SPIKING_REGIMES)
    cfg = _sdn_config(ex, regime == "at_threshold")
    with_m = ex.flag() or regime == "at_threshold"
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    stateful = ex.start()
    rng = ex.rng()
    w, wnote = _sdn_weights(ex, rng)
    mag = MAGNITUDE.get(regime, 1.0)
    if regime == "at_threshold":
        x = dyadic(rng, (B, H, L))  # (B, H, L)
        m = dyadic(rng, (B, H, L), -1.0, 1.0)  # (B, H, L)
        window = dyadic(rng, (B, H, SDN_TAPS))  # (B, H, K)
    else:
        x = rng.normal(0.5, 1.0, size=(B, H, L)) * mag  # (B, H, L)
        m = rng.normal(0.3, 0.5, size=(B, H, L)) * mag  # (B, H, L)
        window = rng.normal(0.5, 1.0, size=(B, H, SDN_TAPS)) * mag  # (B, H, K)
    if regime in ("at_threshold", "near_threshold"):
        if with_m:
            def m_of(x):
                return m
        else:
            def m_of(x):
                xc = np.concatenate([window, x], axis=-1) if stateful else x  # (B, H, K + L)
                return sdn_forward(xc, w, theta=cfg["theta"])[0][..., xc.shape[-1] - L:]
        _sdn_hits(rng, x, cfg["theta"], m_of, 0 if regime == "at_threshold" else 2)
    exact = regime == "at_threshold" and _is_dyadic(cfg["theta"])
    inputs = {"x": x}
    flags = list(REGIME_FLAGS["near_threshold" if regime == "at_threshold" and not exact
                              else regime])
    notes = [f"theta {cfg['theta']:.6g}", cfg["spike_condition"],
             f"{cfg['surrogate']} ({cfg['surrogate_scale']:.6g})",
             "frozen m given" if with_m else wnote, _regime_text(regime)]
    if with_m:
        inputs["m"] = m
    if stateful:
        inputs["window0"] = window
        flags.append("stateful")
        notes.append("stateful: random input window")
    return _spec("sdn_neuron", dict(B=B, H=H, L=L), notes, flags, cfg, inputs, w, exact=exact)


def gen_sdn(draw, limits, fixed):
    """The SDN op (network and spike): random or folded weights, ``theta``, both spike
    conditions, every surrogate; the spiking regimes (``m + x`` within rounding of ``theta``
    through the network's ``m``: never exact)."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(SPIKING_REGIMES)
    cfg = _sdn_config(ex, False)
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    w, wnote = _sdn_weights(ex, rng)
    x = rng.normal(0.5, 1.0, size=(B, H, L)) * MAGNITUDE.get(regime, 1.0)  # (B, H, L)
    if regime in ("at_threshold", "near_threshold"):
        _sdn_hits(rng, x, cfg["theta"], lambda x: sdn_forward(x, w, theta=cfg["theta"])[0],
                  0 if regime == "at_threshold" else 2)
    flags = ["near_threshold_values" if regime == "at_threshold" else f
             for f in REGIME_FLAGS[regime]]
    return _spec("sdn", dict(B=B, H=H, L=L),
                 [f"theta {cfg['theta']:.6g}", cfg["spike_condition"],
                  f"{cfg['surrogate']} ({cfg['surrogate_scale']:.6g})", wnote,
                  "m + x = theta up to the rounding of m" if regime == "at_threshold"
                  else _regime_text(regime)], flags, cfg, {"x": x}, w)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

def gen_linear(draw, limits, fixed):
    """``linear``: widths ``Hin``, ``Hout`` up to ``features``, with and without a bias, the
    magnitude regimes."""
    ex = _Draws(draw, limits, fixed)
    regime, with_b = ex.choice(PLAIN_REGIMES), ex.flag()
    B, L = ex.size(limits.batch), ex.size(limits.length)
    Hin, Hout = ex.size(limits.features), ex.size(limits.features)
    rng = ex.rng()
    x = rng.normal(size=(B, Hin, L)) * MAGNITUDE[regime]  # (B, Hin, L)
    params = {"W": rng.normal(size=(Hout, Hin)) / np.sqrt(Hin)}  # (Hout, Hin)
    if with_b:
        params["b"] = rng.normal(size=Hout)  # (Hout,)
    return _spec("linear", dict(B=B, Hin=Hin, Hout=Hout, L=L),
                 ["bias" if with_b else "no bias", _regime_text(regime)],
                 REGIME_FLAGS[regime], {}, {"x": x}, params)


def gen_embedding(draw, limits, fixed):
    """``embedding``: tokens uniform over ``V`` or repeating a few (``dE`` accumulates)."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(PLAIN_REGIMES + ("repeats",))
    B, L = ex.size(limits.batch), ex.size(limits.length)
    V, H = ex.size(limits.vocab), ex.size(limits.channels)
    rng = ex.rng()
    high = min(V, 2) if regime == "repeats" else V
    tokens = rng.integers(0, high, size=(B, L)).astype(np.int64)  # (B, L)
    E = rng.normal(size=(V, H)) * MAGNITUDE.get(regime, 1.0)  # (V, H)
    return _spec("embedding", dict(B=B, H=H, L=L, V=V),
                 ["tokens 0 and 1 only (repeats)" if regime == "repeats" else "",
                  _regime_text(regime) if regime != "repeats" else ""],
                 REGIME_FLAGS[regime], {}, {"tokens": tokens}, {"E": E})


def gen_gelu(draw, limits, fixed):
    """``gelu``: both signs, the tails (``|x|`` up to 40: ``Phi`` saturates), the magnitude
    regimes."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(PLAIN_REGIMES + ("tails",))
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    if regime == "tails":
        x = rng.uniform(-40.0, 40.0, size=(B, H, L))  # (B, H, L)
    else:
        x = 2.0 * rng.normal(size=(B, H, L)) * MAGNITUDE[regime]  # (B, H, L)
    return _spec("gelu", dict(B=B, H=H, L=L),
                 ["tails |x| <= 40" if regime == "tails" else _regime_text(regime)],
                 REGIME_FLAGS[regime], {}, {"x": x}, {})


def gen_glu(draw, limits, fixed):
    """``glu``: spike or real input, the channel-major and batch-major paths (``L`` on both
    sides of 64), saturated gates (``W``, ``b`` x 300) and small inputs."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(("normal", "saturation", "small"))
    spikes = ex.flag()
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    if spikes:
        s = (rng.random((B, H, L)) < 0.3).astype(np.float64)  # (B, H, L)
    else:
        s = rng.normal(size=(B, H, L)) * MAGNITUDE.get(regime, 1.0)  # (B, H, L)
    bound = (300.0 if regime == "saturation" else 1.0) / np.sqrt(H)
    params = {"W": rng.uniform(-bound, bound, size=(2 * H, H)),  # (2H, H)
              "b": rng.uniform(-bound, bound, size=2 * H)}  # (2H,)
    return _spec("glu", dict(B=B, H=H, L=L),
                 ["spike input" if spikes else "real input",
                  "saturated gates (W, b x 300)" if regime == "saturation"
                  else _regime_text(regime)],
                 REGIME_FLAGS[regime], {}, {"s": s}, params)


def gen_gsu(draw, limits, fixed):
    """``gsu``: ``b, c`` drawn or zero; values exactly at the ternarisation cut ``0.15
    max|v|`` (dyadic: ``acceptable``, as the golden suite's case), within a few ulps of it, an
    all-zero token (the ``max|v| = 0`` guard), the magnitude regimes."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(("normal", "at_threshold", "near_threshold", "zero_token", "large",
                        "small"))
    with_bc = ex.flag()
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    x = rng.normal(size=(B, H, L)) * MAGNITUDE.get(regime, 1.0)  # (B, H, L)
    W = rng.uniform(-1.0, 1.0, size=(H, H)) / np.sqrt(H)  # (H, H)
    b = 0.1 * rng.normal(size=H) if with_bc else np.zeros(H)  # (H,)
    c = 0.1 * rng.normal(size=H) if with_bc else np.zeros(H)  # (H,)
    result, exact = "valid", False
    if regime == "at_threshold":
        x = dyadic(rng, (B, H, L), -1.0, 1.0, 0.25)  # (B, H, L)
        x[:, 0, :] = 2.0  # max |x| of every token
        if H > 1:
            x[:, 1, :] = TERNARY_RATIO * 2.0  # exactly at the cut (0.3 in float64): Ter = 1
        if H > 2:
            x[:, 2, :] = -TERNARY_RATIO * 2.0
        W[0, 0] = 1.0
        if H > 1:
            W[1, 1] = TERNARY_RATIO * np.abs(W).max()  # exactly at the weights' cut
        result, exact = "acceptable", True
    elif regime == "near_threshold":
        x[:, 0, :] = 1.5 * np.abs(x).max(axis=1) + 1.0  # the max of every token
        if H > 1:
            cut = TERNARY_RATIO * x[:, 0, :]  # (B, L)
            x[:, 1, :] = cut + rng.integers(-2, 3, size=cut.shape) * np.spacing(cut)
    elif regime == "zero_token":
        x[..., rng.integers(L)] = 0.0
    flags = list(REGIME_FLAGS[regime]) + (["ternary_threshold"] if regime == "at_threshold"
                                          else [])
    notes = ["b, c drawn" if with_bc else "b = c = 0",
             {"at_threshold": "values exactly at the ternarisation cut 0.15 max|v|",
              "near_threshold": "values within a few ulps of the ternarisation cut",
              "zero_token": "an all-zero token"}.get(regime, _regime_text(regime))]
    return _spec("gsu", dict(B=B, H=H, L=L), notes, flags, {}, {"x": x},
                 {"W": W, "b": b, "c": c}, exact=exact, result=result)


def _eps(ex):
    return ex.pick("eps", st.one_of(st.sampled_from((1e-5, 1e-3, 0.5)), _floats(1e-8, 1.0)))


def _norm_input(rng, regime, shape, constant_axis):
    """A normalisation's input: ``N(0.5, 1)``, offset by ``2**10`` (cancellation in the
    centring), small (``eps`` matters), large, or one row constant (zero variance)."""
    x = rng.normal(0.5, 1.0, size=shape) * MAGNITUDE.get(regime, 1.0)  # (B, H, L)
    if regime == "offset":
        x += 2.0**10
    elif regime == "constant":
        index = [slice(None)] * 3
        for axis in constant_axis:
            index[axis] = rng.integers(shape[axis])
        x[tuple(index)] = rng.normal()
    return x


_NORM_NOTES = {"offset": "mean offset 2^10 (cancellation)", "constant": "a zero-variance row"}


def gen_layernorm(draw, limits, fixed):
    """``layernorm``: ``eps`` drawn, the magnitude regimes, an offset mean, a constant token."""
    ex = _Draws(draw, limits, fixed)
    eps = _eps(ex)
    regime = ex.choice(PLAIN_REGIMES + ("offset", "constant"))
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    x = _norm_input(rng, regime, (B, H, L), (0, 2))  # a constant token
    return _spec("layernorm", dict(B=B, H=H, L=L),
                 [f"eps {eps:.3g}", _NORM_NOTES.get(regime, _regime_text(regime))],
                 REGIME_FLAGS[regime], {"eps": eps}, {"x": x},
                 {"gamma": rng.normal(1.0, 0.3, size=H), "beta": rng.normal(size=H)})


def gen_batchnorm(draw, limits, fixed):
    """``batchnorm``: training and eval, momentum in ``[0, 1]``, ``eps``; the magnitude
    regimes, an offset mean, a constant channel; ``B L = 1`` included (the unbiased variance's
    guard)."""
    ex = _Draws(draw, limits, fixed)
    training = ex.pick("training", st.booleans())
    momentum = ex.pick("momentum", st.one_of(st.sampled_from((0.1, 0.0, 1.0)),
                                             _floats(0.0, 1.0)))
    eps = _eps(ex)
    regime = ex.choice(PLAIN_REGIMES + ("offset", "constant"))
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    x = _norm_input(rng, regime, (B, H, L), (1,))  # a constant channel
    inputs = {"x": x, "running_mean": rng.normal(0.2, 0.1, size=H),  # (H,)
              "running_var": rng.uniform(0.5, 1.5, size=H)}  # (H,)
    return _spec("batchnorm", dict(B=B, H=H, L=L),
                 ["training" if training else "eval", f"momentum {momentum:.3g}",
                  f"eps {eps:.3g}", _NORM_NOTES.get(regime, _regime_text(regime))],
                 REGIME_FLAGS[regime], {"training": training, "momentum": momentum, "eps": eps},
                 inputs, {"gamma": rng.normal(1.0, 0.3, size=H), "beta": rng.normal(size=H)})


def gen_meanpool(draw, limits, fixed):
    """``meanpool``: the magnitude regimes."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(PLAIN_REGIMES)
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    x = ex.rng().normal(size=(B, H, L)) * MAGNITUDE[regime]  # (B, H, L)
    return _spec("meanpool", dict(B=B, H=H, L=L), [_regime_text(regime)],
                 REGIME_FLAGS[regime], {}, {"x": x}, {})


def gen_cross_entropy(draw, limits, fixed):
    """``cross_entropy``: ``C`` classes up to ``vocab``; logits at scale 3, confidently right
    (+12 at the label: the loss cancels), large (scale 3 x 2^20: every softmax saturates) or
    small."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(PLAIN_REGIMES + ("confident",))
    B, C = ex.size(limits.batch), ex.size(limits.vocab)
    rng = ex.rng()
    logits = rng.normal(0.0, 3.0, size=(B, C)) * MAGNITUDE.get(regime, 1.0)  # (B, C)
    labels = rng.integers(0, C, size=B).astype(np.int64)  # (B,)
    if regime == "confident":
        logits[np.arange(B), labels] += 12.0
    return _spec("cross_entropy", dict(B=B, V=C),
                 ["confidently right" if regime == "confident" else _regime_text(regime)],
                 REGIME_FLAGS[regime], {}, {"logits": logits, "labels": labels}, {})


def gen_dropout(draw, limits, fixed):
    """``dropout``: with a mask (``p`` drawn; :func:`refimpl.layers.dropout_mask`) or without
    (the identity), the magnitude regimes."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(PLAIN_REGIMES)
    p = ex.choice((0.5, None, 0.1, 0.9))
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    rng = ex.rng()
    inputs = {"x": rng.normal(size=(B, H, L)) * MAGNITUDE[regime]}  # (B, H, L)
    if p is not None:
        inputs["mask"] = dropout_mask(rng, (B, H, L), p)  # (B, H, 1)
    return _spec("dropout", dict(B=B, H=H, L=L),
                 [f"mask of p = {p}" if p is not None else "no mask", _regime_text(regime)],
                 REGIME_FLAGS[regime], {}, inputs, {})


def gen_lm_decoder(draw, limits, fixed):
    """``lm_decoder``: ``V`` up to ``vocab``, the magnitude regimes (``L`` past 256 takes the
    one-GEMM path when the limits allow it)."""
    ex = _Draws(draw, limits, fixed)
    regime = ex.choice(PLAIN_REGIMES)
    B, H, L = ex.size(limits.batch), ex.size(limits.channels), ex.size(limits.length)
    V = ex.size(limits.vocab)
    rng = ex.rng()
    h = rng.normal(size=(B, H, L)) * MAGNITUDE[regime]  # (B, H, L)
    params = {"W": rng.normal(size=(V, H)) / np.sqrt(H), "b": rng.normal(size=V)}
    return _spec("lm_decoder", dict(B=B, H=H, L=L, V=V), [_regime_text(regime)],
                 REGIME_FLAGS[regime], {}, {"h": h}, params)


#: op name -> its generator ``(draw, limits, fixed) -> Spec`` (valid examples only; the
#: generators of ops with a state also take ``state=False``: no stateful start).
GENERATORS = {
    "s4d_kernel": gen_s4d_kernel, "fftconv": gen_fftconv, "s4d_layer": gen_s4d_layer,
    "neuron": gen_neuron, "pmbc": gen_pmbc, "sdn_fused": gen_sdn_fused,
    "sdn_neuron": gen_sdn_neuron, "sdn": gen_sdn, "linear": gen_linear,
    "embedding": gen_embedding, "gelu": gen_gelu, "glu": gen_glu, "gsu": gen_gsu,
    "layernorm": gen_layernorm, "batchnorm": gen_batchnorm, "meanpool": gen_meanpool,
    "cross_entropy": gen_cross_entropy, "dropout": gen_dropout, "lm_decoder": gen_lm_decoder,
}


# --------------------------------------------------------------------------------------------
# Invalid examples
# --------------------------------------------------------------------------------------------

class Invalid(NamedTuple):
    """One kind of invalid example: ``applies(spec, fixed)``, then ``apply(spec, rng)``
    changes the spec in place and returns a note for the comment. ``flag``: the golden flag
    (``nan_input``, ``bad_shape``, ``invalid_config``); ``adds_state``: the kind gives the
    example a state (not drawn with ``state=False``)."""
    name: str
    flag: str
    applies: Callable
    apply: Callable
    adds_state: bool = False


def _has(group, name):
    return lambda spec, fixed: name in getattr(spec, group)


def _nan(group, name):
    """A NaN at a random position of ``<group>/<name>``."""
    def apply(spec, rng):
        a = np.array(getattr(spec, group)[name], dtype=np.float64)
        a.flat[rng.integers(a.size)] = np.nan
        getattr(spec, group)[name] = a
        return f"NaN in {name}"
    return Invalid(f"nan_{name}", "nan_input", _has(group, name), apply)


def _grow(group, name, axis, broadcast=False):
    """``<group>/<name>`` one longer along ``axis`` (a shape mismatch). ``broadcast``: refimpl
    catches the mismatch only as NumPy's broadcasting error, which a length-1 axis of the
    other operand would not raise (the kind then applies only where the axis is >= 2)."""
    def applies(spec, fixed):
        a = getattr(spec, group).get(name)
        return a is not None and (not broadcast or np.shape(a)[axis] >= 2)

    def apply(spec, rng):
        a = getattr(spec, group)[name]
        extra = np.take(a, [0], axis=axis)
        getattr(spec, group)[name] = np.concatenate([a, extra], axis=axis)
        return f"{name} of shape {getattr(spec, group)[name].shape}"
    return Invalid(f"shape_{name}", "bad_shape", applies, apply)


def _shrink(group, name, axis):
    """``<group>/<name>`` one shorter along ``axis`` (a shape mismatch; a parameter read by
    index in a kernel, such as LayerNorm's ``beta``, would be read past its end)."""
    def apply(spec, rng):
        a = getattr(spec, group)[name]
        getattr(spec, group)[name] = np.delete(a, -1, axis=axis)
        return f"{name} of shape {getattr(spec, group)[name].shape}"
    return Invalid(f"short_{name}", "bad_shape", _has(group, name), apply)


def _rank2(group, name):
    """``<group>/<name>`` without its last (time) axis: ``(B, H)`` for ``(B, H, L)``."""
    def apply(spec, rng):
        getattr(spec, group)[name] = np.ascontiguousarray(getattr(spec, group)[name][..., 0])
        return f"{name} of rank 2, shape {getattr(spec, group)[name].shape}"
    return Invalid(f"rank_{name}", "bad_shape", _has(group, name), apply)


def _config(field, value, when=None):
    """Configuration ``field`` set to ``value(spec)`` (out of range), unless fixed."""
    def applies(spec, fixed):
        return field not in fixed and (when is None or when(spec))

    def apply(spec, rng):
        spec.config[field] = value(spec)
        return f"{field} = {spec.config[field]!r}"
    return Invalid(f"config_{field}", "invalid_config", applies, apply)


def _edit(name, flag, applies, edit):
    """Any other edit: ``edit(spec, rng) -> note``."""
    return Invalid(name, flag, applies, edit)


def _stateful(spec, fixed):
    return "stateful" in spec.flags


def _count_above(spec, rng):
    c = np.array(spec.inputs["count0"])
    c.flat[rng.integers(c.size)] = spec.config["refractory_steps"] + 1
    spec.inputs["count0"] = c
    return f"count0 = refractory_steps + 1 = {spec.config['refractory_steps'] + 1}"


def _count_negative(spec, rng):
    c = np.array(spec.inputs["count0"])
    c.flat[rng.integers(c.size)] = -1
    spec.inputs["count0"] = c
    return "count0 = -1"


def _negative_rho(spec, rng):
    rho = np.array(spec.params["rho"])
    rho[rng.integers(rho.size)] = -0.25
    spec.params["rho"] = rho
    return "rho < 0"


def _drop_rho(spec, rng):
    del spec.params["rho"]
    return f"reset {spec.config['reset']} without rho"


def _stray_rho(spec, rng):
    spec.params["rho"] = np.full(spec.inputs["x"].shape[1], 0.5)
    return f"rho given with reset {spec.config['reset']}"


def _takes_rho(spec):
    return RESETS[spec.config["reset"]].param is not None


def _neuron_invalid():
    return [
        _nan("inputs", "x"),
        _nan("inputs", "u0"),
        _config("tau", lambda spec: 1.0),
        _config("tau", lambda spec: -0.25),
        _config("theta", lambda spec: 0.0,
                when=lambda spec: RESETS[spec.config["reset"]].theta_positive),
        _config("u_reset", lambda spec: 0.5,
                when=lambda spec: not RESETS[spec.config["reset"]].u_reset),
        _config("refractory_steps", lambda spec: -1),
        _config("surrogate_scale", lambda spec: 0.0),
        _config("surrogate", lambda spec: "heaviside"),
        _edit("count0_above_R", "invalid_config", _stateful, _count_above),
        _edit("count0_negative", "invalid_config", _stateful, _count_negative),
        _edit("rho_negative", "invalid_config", _has("params", "rho"), _negative_rho),
        _edit("rho_missing", "invalid_config",
              lambda spec, fixed: _takes_rho(spec) and "rho" in spec.params, _drop_rho),
        _edit("rho_stray", "invalid_config", lambda spec, fixed: not _takes_rho(spec),
              _stray_rho),
        _grow("params", "rho", 0),
    ]


def _log_dt_overflow(spec, rng):
    log_dt = np.array(spec.params["log_dt"])
    log_dt[rng.integers(log_dt.size)] = 710.0 if rng.random() < 0.5 else -746.0
    spec.params["log_dt"] = log_dt
    return "log_dt outside the float64 range of dt (exp overflows or underflows)"


def _drop_B_im(spec, rng):
    del spec.params["B_im"]
    return "B_re without B_im"


def _ssm_invalid(layer):
    kinds = [
        _nan("params", "log_dt"), _nan("params", "C_re"), _nan("params", "A_imag"),
        _grow("params", "A_imag", -1), _grow("params", "C_im", -1),
        _config("disc", lambda spec: "euler"),
        _edit("log_dt_overflow", "invalid_config", _has("params", "log_dt"), _log_dt_overflow),
        _edit("B_re_alone", "invalid_config", _has("params", "B_im"), _drop_B_im),
    ]
    if not layer:
        return kinds + [_config("L", lambda spec: 0)]

    def bidirectional_state(spec, rng):
        for k in ("C_re", "C_im"):
            spec.params[k] = np.stack([spec.params[k], spec.params[k][::-1]])  # (2, H, N2)
        B, H = spec.inputs["u"].shape[:2]
        N2 = spec.params["log_A_real"].shape[1]
        spec.inputs.setdefault("x0_re", rng.normal(size=(B, H, N2)))
        spec.inputs.setdefault("x0_im", rng.normal(size=(B, H, N2)))
        spec.config["bidirectional"] = True
        for f in ("stateful", "no_grads"):
            if f not in spec.flags:
                spec.flags.append(f)
        return "a bidirectional layer from a state (it has no streaming state)"

    return kinds + [
        _nan("inputs", "u"), _nan("inputs", "x0_im"), _grow("params", "D", 0),
        _grow("inputs", "x0_re", -1),
        Invalid("bidirectional_state", "invalid_config",
                lambda spec, fixed: spec.params["C_re"].ndim == 2, bidirectional_state,
                adds_state=True),
    ]


def _token(value):
    def apply(spec, rng):
        t = np.array(spec.inputs["tokens"])
        V = spec.params["E"].shape[0]
        t.flat[rng.integers(t.size)] = value(V)
        spec.inputs["tokens"] = t
        return f"a token {value(V)} outside [0, {V})"
    return apply


def _empty_time(spec, rng):
    spec.inputs["x"] = np.ascontiguousarray(spec.inputs["x"][..., :0])
    return f"x of shape {spec.inputs['x'].shape} (L = 0)"


def _negative_running_var(spec, rng):
    rv = np.array(spec.inputs["running_var"])
    rv[rng.integers(rv.size)] = -0.5
    spec.inputs["running_var"] = rv
    return "a running_var < 0"


def _label(value):
    def apply(spec, rng):
        t = np.array(spec.inputs["labels"])
        C = spec.inputs["logits"].shape[1]
        t[rng.integers(t.size)] = value(C)
        spec.inputs["labels"] = t
        return f"a label {value(C)} outside [0, {C})"
    return apply


def _per_step_mask(spec, rng):
    x, mask = spec.inputs["x"], spec.inputs["mask"]
    spec.inputs["mask"] = np.ascontiguousarray(np.broadcast_to(mask, x.shape))
    return f"a mask per step, shape {x.shape} (not shared over time)"


def _sdn_weight_invalid(neuron=False):
    """Bad fused weights (a neuron given a frozen ``m`` does not read them: not there)."""
    kinds = [_grow("params", "w0", -1), _nan("params", "w3")]
    if not neuron:
        return kinds
    return [k._replace(applies=lambda spec, fixed, k=k: "m" not in spec.inputs
                       and k.applies(spec, fixed)) for k in kinds]


#: op name -> the kinds of invalid examples refimpl's op rejects (``ValueError``/``TypeError``;
#: tests/test_conform_strategies.py checks each). An op without an entry has none.
INVALID = {
    "s4d_kernel": _ssm_invalid(layer=False),
    "s4d_layer": _ssm_invalid(layer=True),
    "fftconv": [_nan("inputs", "u"), _nan("params", "K"), _grow("params", "K", -1),
                _grow("params", "D", 0), _config("method", lambda spec: "direct")],
    "neuron": _neuron_invalid(),
    "pmbc": _neuron_invalid(),
    "sdn_fused": [_nan("inputs", "x")] + _sdn_weight_invalid(),
    "sdn_neuron": [
        _nan("inputs", "x"), _nan("inputs", "window0"), _nan("inputs", "m"),
        _grow("inputs", "m", -1), _grow("inputs", "window0", -1),
        _config("reset", lambda spec: "soft"), _config("u_reset", lambda spec: 0.5),
        _config("refractory_steps", lambda spec: 1), _config("theta", lambda spec: 0.0),
        _config("tau", lambda spec: 1.0)] + _sdn_weight_invalid(neuron=True),
    "sdn": [_nan("inputs", "x"), _config("theta", lambda spec: -1.0),
            _config("surrogate", lambda spec: "heaviside")] + _sdn_weight_invalid(),
    "linear": [_grow("params", "W", 1), _grow("params", "b", 0), _shrink("params", "b", 0),
               _rank2("inputs", "x")],
    "embedding": [
        _edit("token_V", "invalid_config", _has("inputs", "tokens"), _token(lambda V: V)),
        _edit("token_negative", "invalid_config", _has("inputs", "tokens"),
              _token(lambda V: -1))],
    "gelu": [_rank2("inputs", "x")],
    "glu": [_grow("params", "W", 1), _grow("params", "b", 0), _shrink("params", "b", 0),
            _rank2("inputs", "s")],
    "gsu": [_grow("params", "W", 1), _grow("params", "b", 0), _grow("params", "c", 0),
            _rank2("inputs", "x")],
    "layernorm": [_grow("params", "gamma", 0), _shrink("params", "beta", 0),
                  _rank2("inputs", "x"), _config("eps", lambda spec: -spec.config["eps"]),
                  _config("eps", lambda spec: 0.0)._replace(name="eps_zero")],
    "batchnorm": [_grow("params", "gamma", 0), _shrink("params", "beta", 0),
                  _grow("inputs", "running_mean", 0), _shrink("inputs", "running_var", 0),
                  _rank2("inputs", "x"), _config("momentum", lambda spec: 1.5),
                  _config("eps", lambda spec: -spec.config["eps"]),
                  _edit("running_var_negative", "invalid_config", _has("inputs", "running_var"),
                        _negative_running_var)],
    "meanpool": [_rank2("inputs", "x"),
                 _edit("empty_L", "bad_shape", _has("inputs", "x"), _empty_time)],
    "cross_entropy": [
        _edit("label_C", "invalid_config", _has("inputs", "labels"), _label(lambda C: C)),
        _edit("label_negative", "invalid_config", _has("inputs", "labels"),
              _label(lambda C: -1)),
        _grow("inputs", "labels", 0), _shrink("inputs", "labels", 0)],
    "dropout": [_grow("inputs", "mask", 1), _rank2("inputs", "x"),
                _edit("mask_per_step", "bad_shape",
                      lambda spec, fixed: "mask" in spec.inputs and spec.inputs["x"].shape[2] > 1,
                      _per_step_mask)],
    "lm_decoder": [_grow("params", "W", 1), _grow("params", "b", 0), _shrink("params", "b", 0),
                   _rank2("inputs", "h")],
}


def _make_invalid(spec, kind, rng):
    """Apply ``kind`` to ``spec``: ``result = "invalid"``, its flags, the comment."""
    note = kind.apply(spec, rng)
    spec.result, spec.exact = "invalid", False
    spec.flags = [f for f in spec.flags if f != "at_threshold"] + [kind.flag,
                                                                   "invalid:" + kind.name]
    spec.comment += f"; {note}: must be rejected"
    return spec


# --------------------------------------------------------------------------------------------
# The engine's entry points
# --------------------------------------------------------------------------------------------

def check_fixed(op_name, fixed):
    """``fixed`` as a dict of plain values if every key is a configuration field of op
    ``op_name``; ``ValueError`` naming the strays and the fields otherwise."""
    op = all_ops()[op_name]
    fixed = dict(fixed or {})
    names = config_fields(op.config) if op.config is not None else ()
    stray = [k for k in fixed if k not in names]
    if stray:
        raise ValueError(f"op {op_name!r} has no configuration field(s) {stray}; "
                         + (f"its fields are {list(names)}" if names
                            else "it has no configuration"))
    return {k: (v if v is None else _plain(v)) for k, v in fixed.items()}


def draw_spec(op_name, draw, limits=DEFAULT_LIMITS, fixed=None, invalid=True, state=True):
    """Draw one example of op ``op_name`` as a golden case specification.

    Parameters
    ----------
    op_name : str
        A registered op (:data:`GENERATORS` has one generator per op).
    draw : callable
        Hypothesis's ``data.draw`` (``st.data()``): every choice comes from it.
    limits : Limits, default Limits()
        The largest sizes.
    fixed : dict or None
        ``{configuration field: value}`` every example uses (never drawn; a
        ``surrogate_scale`` of None is the surrogate's default scale).
    invalid : bool, default True
        Draw an invalid example (``result = "invalid"``) with probability 1/:data:`INVALID_ODDS`
        (of a kind in :data:`INVALID` that applies; none for an op without kinds). False:
        never.
    state : bool, default True
        Draw stateful starts (ops with a state, probability 1/2). False: every example
        starts from the zero state (a backend whose forward takes no ``state``).

    Returns
    -------
    refimpl.golden.registry.Spec

    Raises
    ------
    ValueError
        An unknown op (listing the ops), a ``fixed`` field the op's configuration does not
        have (naming it), ``fixed`` values refimpl rejects, limits out of range.
    """
    if op_name not in GENERATORS:
        raise ValueError(f"unknown op {op_name!r}; the strategies cover {', '.join(GENERATORS)}")
    fixed = check_fixed(op_name, fixed)
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a refimpl.conform.strategies.Limits, got "
                        f"{type(limits).__name__}")
    limits.check()
    kinds = INVALID.get(op_name, ()) if invalid else ()
    bad = bool(kinds) and draw(st.integers(0, INVALID_ODDS - 1)) == INVALID_ODDS - 1
    extra = {"state": bool(state)} if all_ops()[op_name].state is not None else {}
    spec = GENERATORS[op_name](draw, limits, fixed, **extra)
    if bad:
        usable = [k for k in kinds if k.applies(spec, fixed) and (state or not k.adds_state)]
        if usable:
            kind = draw(st.sampled_from(usable))
            _make_invalid(spec, kind, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    return spec


#: op name -> ``[(group, name, axis names)]`` of :func:`sizes` (an axis named None is
#: skipped; ``N2`` is reported as ``N = 2 N2``).
_SIZE_AXES = {
    "s4d_kernel": [("params", "log_dt", ("H",)), ("params", "log_A_real", (None, "N2"))],
    "s4d_layer": [("inputs", "u", ("B", "H", "L")), ("params", "log_A_real", (None, "N2"))],
    "fftconv": [("inputs", "u", ("B", "H", "L"))],
    "glu": [("inputs", "s", ("B", "H", "L"))],
    "linear": [("inputs", "x", ("B", "Hin", "L")), ("params", "W", ("Hout", None))],
    "embedding": [("inputs", "tokens", ("B", "L")), ("params", "E", ("V", "H"))],
    "cross_entropy": [("inputs", "logits", ("B", "V"))],
    "lm_decoder": [("inputs", "h", ("B", "H", "L")), ("params", "W", ("V", None))],
}
_SIZE_DEFAULT = [("inputs", "x", ("B", "H", "L"))]


def sizes(op_name, spec):
    """The sizes of an example, for reports: ``{"B", "H", "L", "N", "V"}`` (those the op has;
    ``linear``: ``Hin`` and ``Hout``), read from its arrays (and ``L`` of the kernel from its
    configuration)."""
    out = {}
    for group, name, axes in _SIZE_AXES.get(op_name, _SIZE_DEFAULT):
        a = getattr(spec, group).get(name)
        if a is None:
            continue
        for axis, n in zip(axes, np.shape(a)):
            if axis is not None:
                out.setdefault(axis, int(n))
    if "N2" in out:
        out["N"] = 2 * out.pop("N2")
    if op_name == "s4d_kernel" and "L" in spec.config:
        out["L"] = int(spec.config["L"])
    return out
