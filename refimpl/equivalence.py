"""Randomised parallel-vs-iterative equivalence checks (the ``refimpl equivalence`` command).

Each *check* draws random cases from a seed, runs every form of one op and returns a row:
forms compared, number of cases, worst error and, for spiking forms, spike mismatches and
iteration counts. The CLI adds the progress bar and the table; this module never prints.

A check is three functions (:data:`PARTS`): ``draw(rng)`` draws one case, ``run(case)``
compares the forms on it and returns what the row needs of it, ``row(per_case, n_cases)``
folds those in case order. Cases are drawn in this process, one after the other from one
generator per check (``default_rng(seed)``, as they always were), and each case is a task of
:func:`refimpl.campaign.run_tasks`: the rows are the same bits in this process, on a pool of
local processes or on a Dask cluster.
"""
import functools

import numpy as np

from .activations import ACTIVATIONS
from .campaign import run_tasks
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


def _ssm_run(case):
    """The forms' errors on one S4D case: ``[FFT, recurrence, scan]`` relative to the direct
    form (each ``max |y - y_direct| / max(1, max |y_direct|)``)."""
    p, u, disc = case
    L = u.shape[-1]
    K = s4d_kernel(p["log_dt"], p["log_A_real"], p["A_imag"], p["C_re"], p["C_im"], L, disc)
    dA, dB = discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"], disc=disc)
    C = p["C_re"] + 1j * p["C_im"]
    y_direct = direct_conv(u, K, p["D"])  # (B, H, L)
    scale = max(1.0, float(np.abs(y_direct).max()))
    return [float(np.abs(y - y_direct).max()) / scale
            for y in (fftconv(u, K, p["D"]), ssm_recurrence(u, dA, dB, C, p["D"]),
                      ssm_scan(u, dA, dB, C, p["D"]))]


def _ssm_row(per_case, n_cases):
    worst = 0.0
    for errors in per_case:
        for e in errors:
            worst = max(worst, e)
    return {"forms": "direct conv = FFT conv = recurrence = scan", "cases": n_cases,
            "worst_error": worst, "spike_mismatches": None, "iterations": None}


def check_ssm_forms(n_cases, seed=0, progress=None, workers=1, scheduler=None):
    """Direct convolution vs FFT convolution vs recurrence vs associative scan.

    Returns a dict row: ``forms``, ``cases``, ``worst_error`` (max abs difference to the
    direct form, relative to ``max(1, max|y|)``), ``spike_mismatches`` (None), ``iterations``
    (None). ``workers``/``scheduler``: where the cases run (:func:`run_checks`).
    """
    return run_checks(["ssm"], n_cases, seed, progress, workers, scheduler)[0]


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


def _pmbc_run(case):
    """PMBC vs the iterative neuron on one case: ``(differing spikes, max membrane
    difference, PMBC's evaluations of F per row)``."""
    x, cfg, rho = case
    s0, h0, _ = neuron_fwd(x, cfg, rho=rho)
    s, h, _, it = pmbc_fwd(x, cfg, rho=rho)
    return int((s != s0).sum()), float(np.abs(h - h0).max()), it.ravel().tolist()


def _pmbc_row(per_case, n_cases):
    worst, mismatches, iters = 0.0, 0, []
    for bad, err, it in per_case:
        mismatches += bad
        if bad == 0:
            worst = max(worst, err)
        iters.extend(it)
    return {"forms": "PMBC = iterative neuron", "cases": n_cases, "worst_error": worst,
            "spike_mismatches": mismatches,
            "iterations": (int(np.min(iters)), float(np.median(iters)), int(np.max(iters)))}


def check_pmbc(n_cases, seed=0, progress=None, workers=1, scheduler=None):
    """PMBC vs the iterative neuron on random cases of every reset.

    ``worst_error``: max membrane difference over cases whose spike trains agree;
    ``spike_mismatches``: spikes that differ in total (expected 0; only possible where the
    iterative margin is below :func:`refimpl.pmbc.rounding_bound`); ``iterations``:
    (min, median, max) evaluations of ``F`` per row.
    """
    return run_checks(["pmbc"], n_cases, seed, progress, workers, scheduler)[0]


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


def _model_run(case):
    """Parallel vs step by step vs chunked on one model case: ``(worst error, mismatches,
    flips)`` of :func:`refimpl.stream.compare_forms`."""
    st, x, chunks = case
    r = compare_forms(st, x, chunks)
    return r["worst_error"], r["mismatches"], r["flips"]


def _model_row(activation, per_case, n_cases):
    worst, mismatches, flips = 0.0, 0, 0
    for err, bad, flipped in per_case:
        worst = max(worst, err)
        mismatches += bad
        flips += flipped
    return {"forms": f"model ({activation}): parallel = step by step = chunked",
            "cases": n_cases, "worst_error": worst, "spike_mismatches": mismatches,
            "flips": flips, "iterations": None}


def _model_check(activation):
    def check(n_cases, seed=0, progress=None, workers=1, scheduler=None):
        """A random causal model of the family: parallel form vs step by step vs chunked
        (:func:`refimpl.stream.compare_forms`). ``worst_error``: logits, relative to
        ``max(1, max|logits|)``; ``spike_mismatches``: differing spikes beyond the derived
        bound (expected 0); ``flips``: differing spikes within it (rounding decides them)."""
        return run_checks([f"model-{activation}"], n_cases, seed, progress, workers,
                          scheduler)[0]
    check.__name__ = f"check_model_{activation}"
    return check


#: name -> ``(draw(rng) -> case, run(case) -> per-case result, row(per_case, n_cases) ->
#: row)``; ``run`` is a module-level function (it runs in a worker process or on a cluster).
PARTS = {"ssm": (_ssm_case, _ssm_run, _ssm_row),
         "pmbc": (_neuron_case, _pmbc_run, _pmbc_row),
         **{f"model-{name}": (functools.partial(_model_case, activation=name), _model_run,
                              functools.partial(_model_row, name))
            for name in ACTIVATIONS}}

#: name -> check function ``(n_cases, seed=0, progress=None, workers=1, scheduler=None) ->
#: row``; the CLI runs them in this order.
CHECKS = {"ssm": check_ssm_forms, "pmbc": check_pmbc,
          **{f"model-{name}": _model_check(name) for name in ACTIVATIONS}}


def _tasks(names, n_cases, seed):
    """``(run, case)`` per case, check after check; each check draws its cases from its own
    ``default_rng(seed)``, in order."""
    for name in names:
        draw, run, _ = PARTS[name]
        rng = np.random.default_rng(seed)
        for _ in range(n_cases):
            yield run, draw(rng)


def _run_task(task):
    run, case = task
    return run(case)


def run_checks(names, n_cases, seed=0, progress=None, workers=1, scheduler=None):
    """The rows of the checks ``names`` (keys of :data:`CHECKS`), ``n_cases`` cases each,
    in one campaign: every case is a task of :func:`refimpl.campaign.run_tasks`, computed in
    this process (``workers=1``, the default), on a pool of local processes (``workers=None``
    or ``N``) or on the Dask cluster at ``scheduler``; the rows are the same bits whichever.
    ``progress(1)`` after every case."""
    for name in names:
        if name not in PARTS:
            raise ValueError(f"unknown check {name!r}; valid checks are {', '.join(PARTS)}")
    per_case = run_tasks(_run_task, _tasks(names, n_cases, seed), workers=workers,
                         scheduler=scheduler, progress=progress, label="equivalence")
    return [PARTS[name][2](per_case[k * n_cases:(k + 1) * n_cases], n_cases)
            for k, name in enumerate(names)]
