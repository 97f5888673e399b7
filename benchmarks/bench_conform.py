"""Benchmark group ``conform``: examples per second of ``refimpl conform`` (issue 24).

Issue 24 asks for "``conform``'s speed: examples per second for each op at the default sizes".
For every registered op (:func:`refimpl.ops.all_ops`) one row: a campaign
(:func:`refimpl.conform.engine.conform`) of ``N`` examples of that op, seed 0, float64, the
default :class:`~refimpl.conform.strategies.Limits`, the NumPy adapter of the reference
(``tests/conform_adapters.py:reference``), ``workers=1`` (in this process). Its time divided by
``N`` is the **time per example**; examples per second is its inverse.

The baseline, timed interleaved in the same repeats, is the cost of the reference alone on the
**same examples**: refimpl's ``op.fwd`` then ``op.vjp`` once per example (forward only for a
case without gradients; the rejection for an invalid one), on the inputs, parameters,
configuration, initial state and cotangents of the golden cases the campaign built. They are
recorded from an untimed campaign with the same arguments, after a 10-example warm-up campaign
(so every Numba kernel the examples reach is compiled or loaded before anything is timed); the
baseline's outputs and gradients are checked against those cases. ``speedup = baseline /
conform`` is the harness's column; its inverse, **conform / reference** (in the notes), is the
cost of conform in reference evaluations: it draws the example (the strategies; some run the
op to place values at a threshold), builds the golden case as ``refimpl golden generate`` does
(one run, three perturbed runs, the tolerances), runs the backend in each of its forms (whole;
chunked and step by step for an op with a state) and the verifier.

The recording run also times those parts (:func:`recording`: ``engine.draw_spec``,
``engine.build``, ``engine.judge`` per form, wrapped for that run only); the rest is
hypothesis's engine, the end-state probe of an op with a state (one forward), the chunk
boundaries and conform's bookkeeping. That breakdown, one run and not a median, is in the notes.

Two more rows: one float32 campaign (``reference32`` judged at the float32 profile) over a few
ops beside the same campaign at float64, and the process pool: a mixed campaign of every op on
``workers=2`` beside ``workers=1``, pool start-up included.

``--quick`` (smoke test): small limits, 10 examples per op, small float32 and pool campaigns.
"""
import contextlib
import dataclasses
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script: the harness lives next to this file
    sys.path.insert(0, str(HERE))

from harness import check_same, format_time, register, time_calls, warm_up  # noqa: E402
from refimpl.conform import engine  # noqa: E402
from refimpl.conform.strategies import Limits  # noqa: E402
from refimpl.golden.registry import read_state  # noqa: E402
from refimpl.golden.schema import NO_GRADS  # noqa: E402
from refimpl.ops import all_ops, config_fields, get_op  # noqa: E402

ADAPTERS = HERE.parent / "tests" / "conform_adapters.py"
REFERENCE = f"{ADAPTERS}:reference"
REFERENCE32 = f"{ADAPTERS}:reference32"
SEED = 0

#: Examples per campaign: about 2 s each on the machine of BENCHMARKS.md (fixed, so that a later
#: run times the same examples; shards of 10 examples are seeded by (seed, op, shard) only, so
#: the N examples of a smaller N are the first of a larger one).
EXAMPLES = {"fftconv": 500, "s4d_kernel": 500, "s4d_layer": 100, "neuron": 200, "pmbc": 50,
            "sdn_fused": 500, "linear": 1000, "embedding": 1000, "gelu": 1000, "glu": 1000,
            "gsu": 500, "layernorm": 700, "batchnorm": 400, "meanpool": 1000,
            "cross_entropy": 1000, "dropout": 1000, "sdn_neuron": 200, "sdn": 400,
            "lm_decoder": 1000}
#: An op registered later (not in EXAMPLES): N for ~TARGET_S from a 10-example calibration,
#: at most MAX_EXAMPLES (add the op to EXAMPLES to fix its N).
TARGET_S = 2.0
MAX_EXAMPLES = 1000
#: The float32 row: these ops, this many examples each.
F32_OPS = ("fftconv", "s4d_layer", "neuron", "layernorm", "linear")
F32_EXAMPLES = 50
#: The pool row: every op but these, this many examples each, on this many workers.
POOL_SKIP = ()
POOL_EXAMPLES = 100
POOL_WORKERS = 2

QUICK_LIMITS = Limits(batch=1, channels=4, length=16, state=4, vocab=8, features=4)
QUICK_EXAMPLES = 10
QUICK_F32_OPS = ("fftconv", "neuron")
QUICK_POOL_OPS = ("linear", "gelu")


# --------------------------------------------------------------------------------------------
# Campaigns and the recorded cases
# --------------------------------------------------------------------------------------------

def campaign(ops, examples, limits, out, adapter=REFERENCE, precision="float64", workers=1):
    """A function running the conform campaign (its report as result)."""
    def run():
        return engine.conform(adapter, ops=list(ops), precision=precision, examples=examples,
                              seed=SEED, limits=limits, out=out, workers=workers)
    return run


@contextlib.contextmanager
def recording():
    """Record the golden cases a campaign builds (``engine.build``) and time its parts: drawing
    the example (``engine.draw_spec``, the strategies), building the golden case
    (``engine.build``) and judging the backend (``engine.judge``, per form). ``engine`` is
    restored on exit."""
    rec = {"cases": [], "parts": {}}
    originals = {name: getattr(engine, name) for name in ("draw_spec", "build", "judge")}

    def timed(name, fn):
        sig = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            part = name
            if name == "judge":
                part += ":" + sig.bind(*args, **kwargs).arguments.get("form", "whole")
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            rec["parts"][part] = rec["parts"].get(part, 0.0) + time.perf_counter() - t0
            if name == "build":
                rec["cases"].append(result)
            return result
        return wrapper

    for name, fn in originals.items():
        setattr(engine, name, timed(name, fn))
    try:
        yield rec
    finally:
        for name, fn in originals.items():
            setattr(engine, name, fn)


def record(run):
    """Run the campaign ``run`` once, untimed, recording its cases and timing its parts."""
    with recording() as rec:
        t0 = time.perf_counter()
        report = run()
        rec["total_s"] = time.perf_counter() - t0
    rec["report"] = report
    return rec


# --------------------------------------------------------------------------------------------
# The baseline: refimpl's op forward + VJP once per recorded example
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Call:
    """One example's reference evaluation, its arguments prepared before timing."""
    op: object
    case: object
    inputs: dict
    params: dict
    config: dict
    state: object
    cot: dict  # None: forward only

    def __call__(self):
        op = self.op
        try:
            cfg = op.config(**self.config) if op.config is not None else None
            res = op.fwd(self.inputs, self.params, cfg, self.state)
        except (ValueError, TypeError) as e:  # an invalid example: refimpl's rejection
            return e
        grads = op.vjp(res.cache, self.cot) if self.cot is not None else {}
        return res.outputs, grads


def prepare(gcase):
    """The :class:`Call` of a golden case built by conform."""
    op = get_op(gcase.op)
    fields = config_fields(op.config) if op.config is not None else ()
    grads = NO_GRADS not in gcase.flags and any(p.startswith("cotangents/") for p in gcase.data)
    return Call(op, gcase,
                {n: gcase.data["inputs/" + n] for n in op.inputs if "inputs/" + n in gcase.data},
                {n: gcase.data["params/" + n] for n in op.params if "params/" + n in gcase.data},
                {k: gcase.config[k] for k in fields if k in gcase.config},
                read_state(op, "{}0", gcase.data) if op.state is not None else None,
                ({k: v for k, v in gcase.group("cotangents").items()
                  if k in (op.differentiable or op.outputs)} if grads else None))


def baseline_of(cases):
    calls = [prepare(c) for c in cases]

    def run():
        return [call() for call in calls]
    return run, calls


def check_baseline(calls, results, rtol=1e-12):
    """The baseline computed the cases' outputs and gradients (an invalid case: rejected).
    Returns the largest normwise relative difference."""
    worst = 0.0
    for call, res in zip(calls, results):
        case = call.case
        what = f"{case.op} ({case.comment})"
        if case.result == "invalid":
            if not isinstance(res, Exception):
                raise AssertionError(f"{what}: an invalid case that the baseline accepted")
            continue
        if isinstance(res, Exception):
            raise AssertionError(f"{what}: the baseline rejected a valid case: {res}")
        outputs, grads = res
        pairs = [(np.asarray(outputs[k]), case.data["outputs/" + k]) for k in outputs
                 if "outputs/" + k in case.data]
        pairs += [(np.asarray(grads[k]), case.data["grads/" + k]) for k in grads
                  if "grads/" + k in case.data]
        if not pairs or (call.cot is not None and not grads):
            raise AssertionError(f"{what}: nothing of the baseline to check against the case")
        mine, theirs = zip(*pairs)
        worst = max(worst, check_same(what, mine, theirs, rtol))
    return worst


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def _per_example(stats, n):
    """Harness timing stats of a campaign of ``n`` examples, as times per example."""
    return {"median_s": stats["median_s"] / n, "min_s": stats["min_s"] / n,
            "repeats": stats["repeats"], "times_s": [t / n for t in stats["times_s"]],
            "examples_per_call": n}


def _row(figure, shape, ref, base, base_name, note, check=None, **extra):
    """A table row in the harness's row schema (see ``harness.Context.compare``)."""
    return {"figure": figure, "shape": dict(shape), "refimpl": ref,
            "baseline": dict(base, name=base_name),
            "speedup": base["median_s"] / ref["median_s"], "target_speedup": None,
            "target_met": None, "check": check, "note": note, **extra}


def _examples(report):
    return sum(t["examples"] for t in report["ops"].values())


def _problems(report):
    """Failures or discarded examples of a campaign (the reference should have neither)."""
    out = []
    for name, t in report["ops"].items():
        if t["failures"]:
            out.append(f"{name}: {t['failures']} failing task(s), shrunk: the time includes "
                       "shrinking")
        if t["discarded"]:
            out.append(f"{name}: {len(t['discarded'])} discarded example(s)")
    return out


#: Names of the recorded parts in the notes.
PARTS = {"draw_spec": "drawing the example", "build": "golden case (reference x4, bounds)"}


def _breakdown(rec, n):
    """Where a recorded campaign's time went, per example, as a note fragment."""
    total = rec["total_s"]
    parts = [(PARTS.get(k) or f"backend {k.split(':')[1]} + verifier", s)
             for k, s in rec["parts"].items()]
    parts.append(("hypothesis and the rest", total - sum(s for _, s in parts)))
    return (f"recording run {format_time(total / n)} per example: "
            + ", ".join(f"{name} {100 * s / total:.0f} %" for name, s in parts))


def _mix(cases):
    kinds = {}
    for c in cases:
        k = ("invalid" if c.result == "invalid" else
             "forward only" if NO_GRADS in c.flags else "fwd+VJP")
        kinds[k] = kinds.get(k, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in kinds.items())


def examples_for(ctx, name, limits, out):
    """N of op ``name``: the fixed table; for an op not in it, ~TARGET_S from a calibration."""
    if ctx.quick:
        return QUICK_EXAMPLES
    if name in EXAMPLES:
        return EXAMPLES[name]
    run = campaign([name], 10, limits, out)
    run()  # compile
    t0 = time.perf_counter()
    run()
    per = (time.perf_counter() - t0) / 10
    return int(min(MAX_EXAMPLES, max(10, 10 * round(TARGET_S / per / 10))))


def op_row(ctx, name, limits, out, figure=None, extra_note=""):
    """Conform on ``N`` examples of op ``name`` beside refimpl's fwd + VJP on the same."""
    n = examples_for(ctx, name, limits, out)
    ctx.params.setdefault("examples", {})[figure or name] = n
    run = campaign([name], n, limits, out)
    ctx.progress(f"{figure or name}: warm-up (10 examples) and recording run (N={n})")
    campaign([name], min(n, 10), limits, out)()  # Numba kernels compiled or loaded
    rec = record(run)
    report, cases = rec["report"], rec["cases"]
    judged = _examples(report)
    base, calls = baseline_of(cases)
    (results,) = warm_up([base])
    err = check_baseline(calls, results)
    def timed():
        report = run()
        if _examples(report) != judged:  # the same examples in every repeat
            raise AssertionError(f"{figure or name}: a repeat judged {_examples(report)} "
                                 f"examples, the recording run {judged}")

    ctx.progress(f"{figure or name}: timing {ctx.repeats} repeats")
    conf_t, base_t = time_calls([timed, base], ctx.repeats)
    conf, ref = _per_example(conf_t, judged), _per_example(base_t, judged)
    forms = report["ops"][name]["forms"]
    ratio = conf["median_s"] / ref["median_s"]
    note = (f"**{1 / conf['median_s']:.3g} examples/s**; conform = {ratio:.3g} x the reference's "
            f"fwd + VJP on the same examples; forms {'+'.join(forms)}; {_mix(cases)}; "
            + _breakdown(rec, judged))
    problems = _problems(report)
    if problems:
        note += "; **" + "; ".join(problems) + "**"
    if extra_note:
        note += "; " + extra_note
    ctx.rows.append(_row(
        figure or name, {"examples": judged}, conf, ref, "refimpl op.fwd + op.vjp, same examples",
        note, check={"rtol": 1e-12, "max_rel_err": err}, examples_per_s=1 / conf["median_s"],
        conform_over_reference=ratio, forms=forms, cases=len(cases)))
    ctx.progress(f"{figure or name}: conform {format_time(conf['median_s'])} per example "
                 f"({1 / conf['median_s']:.3g} examples/s), reference "
                 f"{format_time(ref['median_s'])}, ratio {ratio:.3g}")


def pair_row(ctx, figure, shape, runs, base_name, note):
    """Two campaigns of the same examples timed interleaved: (measured, baseline)."""
    ctx.progress(f"{figure}: warm-up")
    reports = warm_up(runs)
    n = [_examples(r) for r in reports]
    if n[0] != n[1]:
        raise AssertionError(f"{figure}: the campaigns judged {n[0]} and {n[1]} examples")
    ctx.progress(f"{figure}: timing {ctx.repeats} repeats")
    ref_t, base_t = time_calls(runs, ctx.repeats)
    ref, base = _per_example(ref_t, n[0]), _per_example(base_t, n[0])
    problems = [p for r in reports for p in _problems(r)]
    note = note.format(eps=1 / ref["median_s"], base_eps=1 / base["median_s"],
                       ratio=ref["median_s"] / base["median_s"],
                       inv=base["median_s"] / ref["median_s"])
    if problems:
        note += "; **" + "; ".join(problems) + "**"
    ctx.rows.append(_row(figure, dict(shape, examples=n[0]), ref, base, base_name, note,
                         examples_per_s=1 / ref["median_s"]))
    ctx.progress(f"{figure}: {format_time(ref['median_s'])} vs {format_time(base['median_s'])} "
                 "per example")


def pool_startup(limits, out, repeats=3):
    """Median seconds of a campaign of two 1-example tasks on the pool: mostly starting it
    (spawning the workers, their imports, the adapter, the first calls)."""
    run = campaign(QUICK_POOL_OPS, 1, limits, out, workers=POOL_WORKERS)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@register("conform", title="refimpl conform (issue 24): examples per second", order=60,
          description="One row per registered op: `conform` with the NumPy adapter of the "
                      "reference (`tests/conform_adapters.py:reference`), seed 0, float64, "
                      "the default limits (`Limits()`: B <= 2, H <= 16, L <= 128, N <= 16, "
                      "V <= 64, features <= 32), `workers=1`, a campaign of `examples` "
                      "examples of that op (the shape column; fixed per op, about 2 s). "
                      "**Every time is per example** (campaign time / examples; "
                      "**examples/s**, its inverse, leads each note). Baseline, timed "
                      "interleaved in the same repeats: refimpl's `op.fwd` + `op.vjp` once on "
                      "each of the same examples (the golden cases conform built, recorded in "
                      "an untimed run after a warm-up; the baseline's outputs and gradients "
                      "checked against them), so speedup = reference / conform, and its "
                      "inverse, conform / reference in the notes, is what conform costs in "
                      "reference evaluations: it draws the example (the strategies; some run "
                      "the op to put values at a threshold), builds the golden case as "
                      "`refimpl golden generate` does (the reference once and on 3 perturbed "
                      "copies, with gradients; the bounds), runs the backend in each form "
                      "(whole; chunked and step by step for an op with a state) and the "
                      "verifier. The breakdown in each note times those parts in the recording "
                      "run (one run, not a median); \"the rest\" is hypothesis's engine, the "
                      "end-state probe of an op with a state (one forward) and conform's "
                      "bookkeeping. Last rows: a float32 campaign "
                      "(`reference32`) beside the same at float64, and a process pool "
                      "(workers=2, start-up included) beside workers=1. The machine is shared: "
                      "the load averages at the start and end are in results.json "
                      "(`params`).")
def conform_group(ctx):
    limits = QUICK_LIMITS if ctx.quick else Limits()
    ops = list(all_ops())
    ctx.params.update(limits=dataclasses.asdict(limits), seed=SEED, adapter="reference")
    ctx.params["loadavg_start"] = list(os.getloadavg())  # a shared machine: how busy it was
    with tempfile.TemporaryDirectory(prefix="bench-conform-") as out:
        for name in ops:
            op_row(ctx, name, limits, out)
        f32_ops = QUICK_F32_OPS if ctx.quick else F32_OPS
        n32 = QUICK_EXAMPLES if ctx.quick else F32_EXAMPLES
        pair_row(ctx, f"float32: {'+'.join(f32_ops)}", {"ops": len(f32_ops), "each": n32},
                 [campaign(f32_ops, n32, limits, out, REFERENCE32, "float32"),
                  campaign(f32_ops, n32, limits, out)],
                 "the same campaign at float64 (reference)",
                 "`reference32` judged at the float32 profile: {eps:.3g} examples/s, float32 / "
                 "float64 = {ratio:.3g} (the golden cases are built in float64 either way; "
                 "the adapter rounds to float32)")

        pool_ops = QUICK_POOL_OPS if ctx.quick else [n for n in ops if n not in POOL_SKIP]
        npool = QUICK_EXAMPLES if ctx.quick else POOL_EXAMPLES
        ctx.progress("process pool: start-up")
        startup = None if ctx.quick else pool_startup(limits, out)
        load = os.getloadavg()[0]
        ctx.params.update(pool_startup_s=startup, pool_loadavg=load)
        pair_row(ctx, f"process pool: workers={POOL_WORKERS} vs 1",
                 {"ops": len(pool_ops), "each": npool},
                 [campaign(pool_ops, npool, limits, out, workers=POOL_WORKERS),
                  campaign(pool_ops, npool, limits, out)],
                 "the same campaign, workers=1",
                 f"{{eps:.3g}} examples/s on {POOL_WORKERS} spawned worker processes (one "
                 f"thread each; their start-up, imports and Numba cache loads included, every "
                 f"repeat) vs {{base_eps:.3g}} in this process: speedup {{inv:.3g}}; a mixed "
                 f"campaign of {len(pool_ops)} ops "
                 + (f"(all but {', '.join(POOL_SKIP)}) " if POOL_SKIP and not ctx.quick
                    else "")
                 + f"x {npool} examples, tasks of 10 examples; "
                 + ("" if startup is None else f"starting the pool (a campaign of two "
                    f"1-example tasks, median of 3) takes {startup:.2f} s; ")
                 + f"load average "
                 f"{load:.2f} (1 min) on {os.cpu_count()} cores before this row")
    ctx.params["loadavg_end"] = list(os.getloadavg())


if __name__ == "__main__":
    sys.exit("run it with: python benchmarks/run.py --only conform")
