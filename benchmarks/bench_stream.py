"""Benchmark group ``stream``: a model run one time step at a time (issue 12).

Issue 12 asks for "per-step latency and memory per stream of a 2-layer H=128 N=64 model, beside
the parallel form's time per step at L=1024 (a ratio, same run)". For every activation family
(LayerNorm post-norm, ``d_input = 1``, 10 classes, random init; ``sdn`` with random fused SDN
weights of the published shapes) and for one stream (``B = 1``) and 64 streams in lockstep
(``B = 64``), three functions are timed interleaved in the same repeats:

- **step**: :meth:`refimpl.stream.ModelStream.step` from the zero state, once per time step
  (1024 steps per repeat at ``B = 1``, 128 at ``B = 64``); every step is also timed on its own,
  so the latency of a single step has a median and a 99th percentile over all timed steps;
- **chunked**: :meth:`~refimpl.stream.ModelStream.run` over L = 1024 steps in chunks of 64;
- **parallel**: :func:`refimpl.model.model_fwd` (eval) on the whole ``(B, 1024)`` sequence.

Every figure in the table is a time **per time step** (call time / steps of the call), so the
speedup column is ``parallel per step / form per step`` and the issue's ratio
``form / parallel`` is its inverse (stated in each note). Memory per stream: the
:class:`~refimpl.stream.StreamState` arrays' bytes divided by ``B``; the parameters and buffers
(and the step coefficients ``dA, dB, C, D`` a stream derives from them) are shared by all
streams and stated separately.

``python benchmarks/bench_stream.py --profile lif`` profiles :meth:`ModelStream.step`
(cProfile) and prints where a step's time goes; the numbers in BENCHMARKS.md's ``stream``
notes come from it.
"""
import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # run as a script: the harness lives next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import format_time, register, time_calls, warm_up  # noqa: E402
from refimpl import model as M  # noqa: E402
from refimpl.activations import ACTIVATIONS  # noqa: E402
from refimpl.sdn.fused import random_weights as sdn_weights  # noqa: E402
from refimpl.s4d import LAYER_PARAMS, s4d_step_coeffs  # noqa: E402
from refimpl.stream import ModelStream  # noqa: E402

FULL = {"H": 128, "N": 64, "layers": 2, "L": 1024, "chunk": 64}
QUICK = {"H": 8, "N": 4, "layers": 2, "L": 32, "chunk": 8}
#: (streams B, steps per repeat of the step form)
FULL_BATCHES = ((1, 1024), (64, 128))
QUICK_BATCHES = ((1, 32), (4, 8))
FAMILIES = ("lif", "refractory", "sdn", "gelu", "binary", "binary_gsu")


def families():
    """The families above, then any family registered later (so a new one is measured too)."""
    return FAMILIES + tuple(k for k in ACTIVATIONS if k not in FAMILIES)


def make_stream(activation, s):
    cfg = M.ModelConfig(n_classes=10, d_input=1, d_model=s["H"], d_state=s["N"],
                        n_layers=s["layers"], activation=activation, norm="layer")
    w = sdn_weights(np.random.default_rng(0)) if cfg.family.needs_sdn_weights else None
    p, buf = M.init_model(cfg, 0, sdn_weights=w)
    return ModelStream(cfg, p, buf)


def memory(stream, batch):
    """Bytes: the state per stream, the parameters + buffers, the derived step coefficients."""
    st = stream.init_state(batch)
    state = sum(a.nbytes for a in st.arrays.values())
    if state % batch:
        raise AssertionError(f"state bytes {state} are not a multiple of B = {batch}")
    cfg, p = stream.cfg, stream.params
    params = sum(a.nbytes for tree in (p, stream.buffers) for a in tree.values())
    coeffs = sum(a.nbytes for i in range(cfg.n_layers)
                 for a in s4d_step_coeffs({k: p[f"layers.{i}.ssm.{k}"] for k in LAYER_PARAMS},
                                          cfg.disc))
    return {"state_bytes_per_stream": state // batch, "param_bytes": params,
            "step_coeff_bytes": coeffs,
            "state_entries": {k: a.nbytes // batch for k, a in st.arrays.items()}}


def format_bytes(n):
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def _per_step(stats, steps):
    """Harness timing stats of a call of ``steps`` time steps, as times per step."""
    return {"median_s": stats["median_s"] / steps, "min_s": stats["min_s"] / steps,
            "repeats": stats["repeats"], "times_s": [t / steps for t in stats["times_s"]],
            "steps_per_call": steps}


def _row(figure, shape, ref, base, base_name, note):
    """A table row in the harness's row schema (see ``harness.Context.compare``)."""
    return {"figure": figure, "shape": dict(shape), "refimpl": ref,
            "baseline": dict(base, name=base_name),
            "speedup": base["median_s"] / ref["median_s"], "target_speedup": None,
            "target_met": None, "check": None, "note": note}


def measure(ctx, activation, s, batch, n_step):
    """Time step / chunked / parallel for one family and ``batch`` streams; add two rows."""
    stream = make_stream(activation, s)
    cfg, L = stream.cfg, s["L"]
    x = np.random.default_rng(1).standard_normal((batch, L))  # (B, L)
    xs = np.ascontiguousarray(x.T)  # (L, B): xs[t] is step t's input, a contiguous (B,)
    latencies = []

    def step_form():
        st = stream.init_state(batch)
        times = np.empty(n_step)
        for t in range(n_step):
            t0 = time.perf_counter()
            logits, st = stream.step(xs[t], st)
            times[t] = time.perf_counter() - t0
        latencies.append(times)
        return logits  # (B, C) after n_step steps

    def chunked_form():
        return stream.run(x, s["chunk"])[:, -1]  # (B, C) after L steps

    def parallel_form():
        return M.model_fwd(cfg, stream.params, stream.buffers, x)[0]  # (B, C)

    ctx.progress(f"{activation} B={batch}: warm-up")
    step_out, chunk_out, par_out = warm_up([step_form, chunked_form, parallel_form])
    latencies.clear()
    ctx.progress(f"{activation} B={batch}: timing {ctx.repeats} repeats "
                 f"(step x{n_step}, chunked and parallel x{L})")
    st_t, ch_t, par_t = time_calls([step_form, chunked_form, parallel_form], ctx.repeats)
    step, chunk, par = _per_step(st_t, n_step), _per_step(ch_t, L), _per_step(par_t, L)
    lat = np.concatenate(latencies)  # (repeats * n_step,) single-step latencies
    step["latency"] = {"median_s": float(np.median(lat)),
                       "p99_s": float(np.percentile(lat, 99)), "max_s": float(lat.max()),
                       "steps": int(lat.size)}
    mem = memory(stream, batch)
    ctx.params.setdefault("memory", {})[activation] = mem
    # Measured, not asserted (the forms are checked in tests/test_stream*.py): how far the
    # chunked form's last logits are from model_fwd's, relative to max(1, max|logits|).
    scale = max(1.0, float(np.abs(par_out).max()))
    chunk_err = float(np.abs(chunk_out - par_out).max()) / scale
    step_err = (float(np.abs(step_out - par_out).max()) / scale) if n_step == L else None
    shape = {"B": batch, "H": s["H"], "N": s["N"], "layers": s["layers"]}
    base_name = f"parallel (model_fwd eval, L={L}), per step"
    lat_ = step["latency"]
    note = (f"single-step latency median {format_time(lat_['median_s'])}, p99 "
            f"{format_time(lat_['p99_s'])} over {lat_['steps']} steps; throughput "
            f"{batch / step['median_s']:.3g} time steps/s ({batch} stream"
            f"{'s' if batch > 1 else ''}); step/parallel = "
            f"{step['median_s'] / par['median_s']:.3g}")
    if step_err is not None:
        note += f"; last logits vs model_fwd: {step_err:.1e} (relative)"
    if batch == 1:
        note += (f"; memory: state {format_bytes(mem['state_bytes_per_stream'])} per stream, "
                 f"parameters + buffers {format_bytes(mem['param_bytes'])} shared "
                 f"(+ step coefficients {format_bytes(mem['step_coeff_bytes'])})")
    name = f"{activation} B={batch}"
    ctx.rows.append(_row(f"{name}: step() x{n_step} vs parallel", dict(shape, steps=n_step),
                         step, par, base_name, note))
    ctx.rows.append(_row(
        f"{name}: chunks of {s['chunk']} vs parallel", dict(shape, steps=L), chunk, par,
        base_name, f"chunked/parallel = {chunk['median_s'] / par['median_s']:.3g}; last logits "
                   f"vs model_fwd: {chunk_err:.1e} (relative)"))
    ctx.progress(f"{activation} B={batch}: step {format_time(step['median_s'])}, chunked "
                 f"{format_time(chunk['median_s'])}, parallel {format_time(par['median_s'])} "
                 "per time step")


@register("stream", title="Streaming (issue 12): per-step latency and memory per stream",
          order=50,
          description="float64; 2-layer H=128 N=64 classifier (d_input=1, 10 classes, LayerNorm "
                      "post-norm, random init), one stream (B=1) and 64 in lockstep (B=64). "
                      "**Every time is per time step**: step() (one call per step, from the "
                      "zero state), chunked forward (chunks of 64 over L=1024), beside the "
                      "parallel form (model_fwd eval on L=1024) timed in the same repeats; "
                      "speedup = parallel / form, so form/parallel (in the notes) is its "
                      "inverse. Memory per stream = StreamState bytes / B.")
def stream_group(ctx):
    s = QUICK if ctx.quick else FULL
    batches = QUICK_BATCHES if ctx.quick else FULL_BATCHES
    ctx.params.update(s, batches=[list(b) for b in batches], families=list(families()))
    for activation in families():
        for batch, n_step in batches:
            measure(ctx, activation, s, batch, n_step)


# --------------------------------------------------------------------------------------------
# Profile of one step (python benchmarks/bench_stream.py --profile FAMILY)
# --------------------------------------------------------------------------------------------

#: Function names whose whole time (with what they call) is input or state validation.
_VALIDATION = ("check_array", "check_shape", "check_state", "check_inputs", "_check_ln_vth",
               "check_int", "check_real", "check_name")


def _is_validation(func):
    return func[2] in _VALIDATION


def profile_steps(activation, batch, steps, top):
    """cProfile ``steps`` calls of ModelStream.step (after warm-up); print a cost breakdown."""
    stream = make_stream(activation, FULL)
    xs = np.random.default_rng(1).standard_normal((steps + 8, batch))  # (T, B)
    st = stream.init_state(batch)
    for t in range(8):  # warm-up: Numba compilation, caches
        _, st = stream.step(xs[t], st)
    t0 = time.perf_counter()
    for t in range(steps):
        _, st = stream.step(xs[t], st)
    wall = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        stream.check_state(st, batch)
    check = (time.perf_counter() - t0) / steps
    prof = cProfile.Profile()
    prof.enable()
    for t in range(steps):
        _, st = stream.step(xs[t], st)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    # Validation: time in validation functions called from outside validation (no double count).
    valid = sum(ct for func, (_, _, _, _, callers) in stats.stats.items() if _is_validation(func)
                for caller, (_, _, _, ct) in callers.items() if not _is_validation(caller))
    calls = sum(nc for (_, nc, _, _, _) in stats.stats.values())
    print(f"{activation} B={batch}: step() {format_time(wall)} per step unprofiled, "
          f"{format_time(total / steps)} profiled ({calls / steps:.0f} Python-level calls per "
          f"step)")
    print(f"validation (check_* functions and what they call): {format_time(valid / steps)} "
          f"per step, {100 * valid / total:.0f} % of the profiled time; ModelStream.check_state "
          f"alone {format_time(check)} per call unprofiled")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"\ntop {top} by own time, per step:")
    for (path, line, name), (_, nc, tt, ct, _) in rows:
        print(f"  {format_time(tt / steps):>9} own {format_time(ct / steps):>9} cum "
              f"{nc / steps:6.1f} calls  {Path(path).name}:{line}({name})")
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description="profile ModelStream.step of the benchmark model")
    p.add_argument("--profile", metavar="FAMILY", default="lif", choices=families())
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    profile_steps(args.profile, args.batch, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
