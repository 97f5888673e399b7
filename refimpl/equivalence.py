"""Randomised parallel-vs-iterative equivalence checks (the ``refimpl equivalence`` command).

Each *check* draws random cases from a seed, runs every form of one op and returns a row:
forms compared, number of cases, worst error and, for spiking forms, spike mismatches and
iteration counts. The CLI adds the progress bar and the table; this module never prints.
"""
import numpy as np

from .activations import ACTIVATIONS
from .conv import direct_conv, fftconv
from .model import NEURON_IMPLS, NORMS, ModelConfig, init_model
from .neurons import RESETS, SPIKE_CONDITIONS, NeuronConfig, neuron_fwd
from .pmbc import pmbc_fwd
from .recurrence import ssm_recurrence, ssm_scan
from .ssm import INITS, DISCRETIZATIONS, discretize_params, s4d_init, s4d_kernel
from .stream import ModelStream, compare_forms


def _ssm_case(rng):
    """One random S4D case: shapes, init, disc, dt range, direction."""
    H = int(rng.integers(1, 5))
    N = 2 * int(rng.integers(1, 9))
    L = int(rng.integers(1, 300))
    init = str(rng.choice(list(INITS)))
    disc = str(rng.choice(list(DISCRETIZATIONS)))
    bi = bool(rng.integers(0, 2))
    dt = float(rng.choice([1e-3, 1e-2, 1e-1]))
    p = s4d_init(H, N, init=init, seed=rng, dt_min=dt, dt_max=dt, bidirectional=bi)
    u = rng.normal(size=(int(rng.integers(1, 3)), H, L))  # (B, H, L)
    return p, u, disc


def check_ssm_forms(n_cases, seed=0, progress=None):
    """Direct convolution vs FFT convolution vs recurrence vs associative scan.

    Returns a dict row: ``forms``, ``cases``, ``worst_error`` (max abs difference to the
    direct form, relative to ``max(1, max|y|)``), ``spike_mismatches`` (None), ``iterations``
    (None).
    """
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(n_cases):
        p, u, disc = _ssm_case(rng)
        L = u.shape[-1]
        K = s4d_kernel(p["log_dt"], p["log_A_real"], p["A_imag"], p["C_re"], p["C_im"], L, disc)
        dA, dB = discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"], disc=disc)
        C = p["C_re"] + 1j * p["C_im"]
        y_direct = direct_conv(u, K, p["D"])  # (B, H, L)
        scale = max(1.0, float(np.abs(y_direct).max()))
        for y in (fftconv(u, K, p["D"]), ssm_recurrence(u, dA, dB, C, p["D"]),
                  ssm_scan(u, dA, dB, C, p["D"])):
            worst = max(worst, float(np.abs(y - y_direct).max()) / scale)
        if progress is not None:
            progress(1)
    return {"forms": "direct conv = FFT conv = recurrence = scan", "cases": n_cases,
            "worst_error": worst, "spike_mismatches": None, "iterations": None}


def _neuron_case(rng):
    """One random neuron case for PMBC: reset (every registered one; ``u_reset`` and ``rho``
    drawn where its :class:`~refimpl.neurons.Reset` takes them), tau, theta, R, input scale and
    sign, length."""
    reset = str(rng.choice(list(RESETS)))
    rule = RESETS[reset]
    cfg = NeuronConfig(
        reset=reset,
        tau=float(rng.choice([0.0, 0.125, 0.5, 0.9])),
        theta=float(rng.uniform(0.25, 2.0)),
        u_reset=float(rng.uniform(-0.5, 0.0)) if rule.u_reset else 0.0,
        refractory_steps=int(rng.integers(0, 3)),
        spike_condition=str(rng.choice(list(SPIKE_CONDITIONS))),
    )
    H, L = int(rng.integers(1, 5)), int(rng.integers(1, 2049))
    x = rng.normal(float(rng.choice([-0.5, 0.0, 0.5])), float(rng.choice([0.3, 1.0, 3.0])),
                   size=(2, H, L))  # (B, H, L)
    rho = rng.uniform(0.0, 1.0, size=H) if rule.param == "rho" else None  # (H,)
    return x, cfg, rho


def check_pmbc(n_cases, seed=0, progress=None):
    """PMBC vs the iterative neuron on random cases of every reset.

    ``worst_error``: max membrane difference over cases whose spike trains agree;
    ``spike_mismatches``: spikes that differ in total (expected 0; only possible where the
    iterative margin is below :func:`refimpl.pmbc.rounding_bound`); ``iterations``:
    (min, median, max) evaluations of ``F`` per row.
    """
    rng = np.random.default_rng(seed)
    worst, mismatches, iters = 0.0, 0, []
    for _ in range(n_cases):
        x, cfg, rho = _neuron_case(rng)
        s0, h0, _ = neuron_fwd(x, cfg, rho=rho)
        s, h, _, it = pmbc_fwd(x, cfg, rho=rho)
        bad = int((s != s0).sum())
        mismatches += bad
        if bad == 0:
            worst = max(worst, float(np.abs(h - h0).max()))
        iters.extend(it.ravel().tolist())
        if progress is not None:
            progress(1)
    return {"forms": "PMBC = iterative neuron", "cases": n_cases, "worst_error": worst,
            "spike_mismatches": mismatches,
            "iterations": (int(np.min(iters)), float(np.median(iters)), int(np.max(iters)))}


def _model_case(rng, activation):
    """One random causal model of a family, an input batch and a random chunking."""
    from .sdn.fused import random_weights as sdn_weights  # of the published shapes

    cfg = ModelConfig(
        n_classes=int(rng.integers(2, 5)), d_input=int(rng.integers(1, 3)),
        d_model=int(rng.integers(2, 9)), d_state=2 * int(rng.integers(1, 5)),
        n_layers=int(rng.integers(1, 3)), activation=activation,
        norm=str(rng.choice(list(NORMS))), prenorm=bool(rng.integers(0, 2)),
        disc=str(rng.choice(list(DISCRETIZATIONS))),
        neuron_impl=str(rng.choice(list(NEURON_IMPLS))))
    w = sdn_weights(rng) if cfg.family.needs_sdn_weights else None
    p, buf = init_model(cfg, seed=rng, sdn_weights=w)
    for k in buf:  # BatchNorm statistics away from their initial values
        if k.endswith("running_mean"):
            buf[k] = rng.normal(0.0, 0.3, size=buf[k].shape)
        elif k.endswith("running_var"):
            buf[k] = rng.uniform(0.5, 2.0, size=buf[k].shape)
    L = int(rng.integers(1, 65))
    x = rng.normal(0.0, float(rng.choice([1.0, 3.0])), size=(2, L, cfg.d_input))  # (B, L, d)
    cuts = np.sort(rng.choice(np.arange(1, L), size=min(int(rng.integers(0, 4)), L - 1),
                              replace=False)) if L > 1 else np.array([], dtype=int)
    chunks = np.diff(np.concatenate([[0], cuts, [L]])).tolist()
    return ModelStream(cfg, p, buf), x, chunks


def _model_check(activation):
    def check(n_cases, seed=0, progress=None):
        """A random causal model of the family: parallel form vs step by step vs chunked
        (:func:`refimpl.stream.compare_forms`). ``worst_error``: logits, relative to
        ``max(1, max|logits|)``; ``spike_mismatches``: differing spikes beyond the derived
        bound (expected 0); ``flips``: differing spikes within it (rounding decides them)."""
        rng = np.random.default_rng(seed)
        worst, mismatches, flips = 0.0, 0, 0
        for _ in range(n_cases):
            st, x, chunks = _model_case(rng, activation)
            r = compare_forms(st, x, chunks)
            worst = max(worst, r["worst_error"])
            mismatches += r["mismatches"]
            flips += r["flips"]
            if progress is not None:
                progress(1)
        return {"forms": f"model ({activation}): parallel = step by step = chunked",
                "cases": n_cases, "worst_error": worst, "spike_mismatches": mismatches,
                "flips": flips, "iterations": None}
    check.__name__ = f"check_model_{activation}"
    return check


#: name -> check function; the CLI runs them in this order.
CHECKS = {"ssm": check_ssm_forms, "pmbc": check_pmbc,
          **{f"model-{name}": _model_check(name) for name in ACTIVATIONS}}
