"""Where refimpl's training step spends its time, per grid point, beside the machine's bounds.

``python benchmarks/peers/profile_step.py [--only-shape L40] [--only-family lif]
[--dtype float64] [--steps N]``: progress on stderr, ``benchmarks/peers/profile.json`` and a
markdown table on stdout (issue 13: "the largest remaining cost at each shape named, with the
bound it is up against").

The step is ``run.py::refimpl_step`` (the one ``make bench-peers`` times), on the grid of
``run.py`` (shapes x families x float64/float32). Each thread setting runs in its own worker
process (``--worker``) so that the environment takes effect before NumPy, Numba and BLAS load:

- 2 threads (the machine's, as the benchmark): ``REFIMPL_THREADS=2`` (refimpl's pool, its
  FFT workers; BLAS runs on one thread inside refimpl);
- 1 thread: the same with 1, where no work hides behind the main thread's waits for workers.

Per point: one warm-up step (Numba compiles), then ``N`` steps under cProfile, with the
callables cProfile cannot see (a NumPy ufunc or C-level array function is not a Python
function, so its time would land in its caller's ``tottime``) replaced for that run by thin
Python wrappers named after them, which also count calls and array bytes:

- every ufunc and C array function of the ``numpy`` namespace (``np.tanh``, ``np.matmul``,
  ``np.ascontiguousarray``, ...) and every ufunc imported into a refimpl module (scipy's
  ``erf``); the array operators (``a * b``, ``@``) stay inline and are counted in their caller;
- every Numba dispatcher found in the attributes of the loaded ``refimpl`` modules (counting
  only: under a profiler a dispatcher reports its kernel's time under its Python function's
  code object, which is how the ``numba`` category finds it, :data:`NUMBA_KERNELS`);
- ``refimpl.conv._rfft`` / ``_irfft`` (FFT calls, rows and lengths).

The wrappers' own time (the ``instrument`` entry, 2-5 ms per step) is left out of the shares;
``plain_ms`` is the step timed afterwards without profiler or wrappers. With 2 threads the
row-parallel passes (``refimpl.layers._over_batch``) run on pool threads that cProfile does not
follow: their time shows as ``wait``; the 1-thread run splits it into categories.

``tottime`` is grouped into categories (:func:`category`): ``gemm`` (``np.matmul``/``dot``,
``tensordot``, and the refimpl functions whose own time is their ``@`` products:
:data:`GEMM_FUNCTIONS`), ``fft`` (scipy.fft / pocketfft), ``numba`` (the kernels),
``numpy`` (ufuncs, reductions, einsum), ``copy`` (contiguous copies, casts, allocation),
``wait`` (``_thread.lock.acquire``: the main thread waiting for work on other threads) and
``python`` (the rest: validation, dispatch, dict building, and the inline array operators of
refimpl's own functions).

The bounds, measured in the same worker: the GEMM rate of the step's largest product
``(2H, H) @ (H, B L)`` per dtype, the scipy.fft rate at the step's transform length (GFLOP/s at
2.5 n log2 n per real transform), and the memory bandwidth of a large ``np.copyto`` (read +
write bytes) and of a read-only ``sum``. The work per step: GEMM FLOPs counted from the model
(:func:`gemm_flops`), the FFT calls seen, and the bytes of the arrays handed to the Numba
kernels and NumPy functions (each argument counted once: a lower bound of their traffic).
"""
import argparse
import cProfile
import importlib.util
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE / "profile.json"
SCHEMA = "refimpl-profile-step"
THREADS = (2, 1)
DTYPES = ("float64", "float32")
#: A shape small enough that the step's array work is negligible: its time is the step's
#: fixed cost (Python, validation, dispatch, allocation), the floor under the L40 point.
FLOOR_SHAPE = dict(B=2, H=4, N=2, L=8)
#: Profiled steps per shape (after one warm-up step), unless ``--steps``.
DEFAULT_STEPS = {"L40": 20, "L1024": 3, "L4096": 2}

#: refimpl functions whose own time (``tottime``) is their ``@`` GEMMs (read from the code: the
#: GLU's channel-mixing products, the Toeplitz convolution's per-channel products, the SDN's
#: small per-token products); the copies and ufuncs they call are wrapped and counted apart.
GEMM_FUNCTIONS = {
    ("refimpl.layers", "glu_fwd"), ("refimpl.layers", "glu_bwd"),
    ("refimpl.layers", "chanmix"), ("refimpl.layers", "chanmix_dW"),
    ("refimpl.conv", "_toeplitz_fwd"), ("refimpl.conv", "_toeplitz_bwd"),
    ("refimpl.sdn.fused", "fused_fwd"), ("refimpl.sdn.fused", "fused_bwd"),
}
#: NumPy callables counted as ``gemm`` / ``copy`` (the other wrapped ones are ``numpy``).
NUMPY_GEMM = {"matmul", "dot", "tensordot", "vdot", "inner", "outer"}
NUMPY_COPY = {"ascontiguousarray", "asfortranarray", "copyto", "concatenate", "stack", "copy",
              "empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full",
              "full_like", "array", "asarray", "astype", "ravel", "transpose", "reshape",
              "moveaxis", "swapaxes", "hstack", "vstack", "require"}
CATEGORIES = ("gemm", "fft", "numba", "numpy", "copy", "wait", "python")
#: ``(module, name)`` of every Numba dispatcher in the loaded refimpl modules (filled by
#: :class:`Instrument`). A dispatcher called under a profiler reports its time under its Python
#: function's code object (Numba's tracing support), so these entries are the kernels' time.
NUMBA_KERNELS = set()


def log(msg):
    print(f"[profile] {msg}", file=sys.stderr, flush=True)


def load_run():
    """``benchmarks/peers/run.py`` as a module (``import run`` would find benchmarks/run.py)."""
    spec = importlib.util.spec_from_file_location("peers_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def median_time(fn, repeats, min_seconds=0.0, best=False):
    """Median seconds of ``fn()`` over ``repeats`` calls (more while under ``min_seconds``);
    ``best``: ``(median, minimum)``."""
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return (statistics.median(times), min(times)) if best else statistics.median(times)


# --------------------------------------------------------------------------------------------
# Counting wrappers
# --------------------------------------------------------------------------------------------


def _nbytes(args, kwargs):
    n = 0
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, np.ndarray):
            n += a.nbytes
        elif isinstance(a, (tuple, list)):
            n += sum(x.nbytes for x in a if isinstance(x, np.ndarray))
    return n


def _named_wrapper(fn, name, kind, counts):
    """A Python function calling ``fn``, whose profile entry reads ``<kind>:name``; counts calls
    and the bytes of the arrays passed in and returned (``counts[name] = [calls, bytes]``)."""
    rec = counts.setdefault(name, [0, 0])

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        rec[0] += 1
        rec[1] += _nbytes(args, kwargs) + (out.nbytes if "out" not in kwargs
                                           and isinstance(out, np.ndarray) else 0)
        return out

    code = call.__code__.replace(co_name=name, co_qualname=name, co_filename=f"<{kind}>")
    w = types.FunctionType(code, call.__globals__, name, None, call.__closure__)
    for attr in ("reduce", "accumulate", "outer", "at", "reduceat", "nin", "nout", "nargs",
                 "identity", "types", "ntypes", "signature"):
        if hasattr(fn, attr):  # ufunc methods (np.add.reduce, ...) stay usable
            setattr(w, attr, getattr(fn, attr))
    w.__wrapped__ = fn
    return w


class Instrument:
    """Install the wrappers (:func:`_named_wrapper`) for one profiled run; ``restore()`` after.

    Only after a warm-up step: a Numba kernel compiled while the wrappers are in place would
    see a Python function where it expects a dispatcher or a ufunc."""

    def __init__(self):
        import numba

        import refimpl.conv as conv
        self.saved = []  # (obj, attr, original)
        self.numba, self.numpy, self.fft = {}, {}, []
        disp = numba.core.registry.CPUDispatcher
        for modname, mod in list(sys.modules.items()):
            if not modname.startswith("refimpl") or mod is None:
                continue
            for attr, val in list(vars(mod).items()):
                if isinstance(val, disp):
                    f = val.py_func
                    NUMBA_KERNELS.add((f.__module__, f.__name__))
                    self._patch(mod, attr, _named_wrapper(val, f"{f.__module__}.{f.__name__}",
                                                          "numba", self.numba))
                elif isinstance(val, np.ufunc) and attr != "np":  # imported ufuncs (scipy's erf)
                    self._patch(mod, attr, _named_wrapper(val, attr, "numpy", self.numpy))
        ftypes = (np.ufunc, types.BuiltinFunctionType, type(np.ascontiguousarray),
                  type(np.concatenate))
        for attr in dir(np):
            val = getattr(np, attr, None)
            if isinstance(val, ftypes) and not attr.startswith("_"):
                self._patch(np, attr, _named_wrapper(val, attr, "numpy", self.numpy))
        for attr in ("_rfft", "_irfft"):
            self._patch(conv, attr, self._fft_counter(getattr(conv, attr), attr))

    def _patch(self, obj, attr, new):
        self.saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)

    def _fft_counter(self, fn, name):
        calls = self.fft

        def counted(a, n):
            calls.append((name, n, a.size // a.shape[-1], a.dtype.itemsize))
            return fn(a, n)
        return counted

    def restore(self):
        for obj, attr, orig in reversed(self.saved):
            setattr(obj, attr, orig)
        self.saved = []


def category(key):
    """The category of one pstats entry ``(filename, line, name)``."""
    filename, _, name = key
    if filename == "<numba>" or filename == __file__:  # a wrapper (the kernel's time: below)
        return "instrument"
    if filename == "<numpy>":
        return "gemm" if name in NUMPY_GEMM else "copy" if name in NUMPY_COPY else "numpy"
    if "_thread.lock" in name or "acquire" in name and filename == "~":
        return "wait"
    if "pocketfft" in name or "pocketfft" in filename or f"{os.sep}scipy{os.sep}fft" in filename:
        return "fft"
    if filename == "~":  # other C functions and methods
        if any(s in name for s in ("'copy'", "'astype'", "'reshape'", "'ravel'", "'transpose'",
                                   "'flatten'", "ascontiguousarray", "concatenate", "empty",
                                   "zeros")):
            return "copy"
        if "numpy" in name or "ufunc" in name or "ndarray" in name:
            return "numpy"
        return "python"
    mod = module_of(filename)
    if (mod, name) in NUMBA_KERNELS:
        return "numba"
    if (mod, name) in GEMM_FUNCTIONS:
        return "gemm"
    if mod.startswith("numpy"):
        return "gemm" if name in NUMPY_GEMM else "copy" if name in NUMPY_COPY else "numpy"
    return "python"


def module_of(filename):
    """Dotted module name of a source file under site-packages or the repository."""
    p = Path(filename)
    parts = p.with_suffix("").parts
    for anchor in ("site-packages", ROOT.name):
        if anchor in parts:
            rest = parts[len(parts) - parts[::-1].index(anchor):]
            return ".".join(r for r in rest if r != "__init__")
    return p.stem


def label(key):
    filename, _, name = key
    if filename in ("<numba>", "<numpy>", "~"):
        return name if filename != "<numpy>" else f"np.{name}"
    return f"{module_of(filename)}.{name}"


# --------------------------------------------------------------------------------------------
# Work per step and machine bounds
# --------------------------------------------------------------------------------------------


def gemm_flops(s, layers, toeplitz_max_l):
    """GEMM FLOPs of one step from the model: per layer the GLU's ``(2H, H) @ (H, B L)``
    forward, its ``dW`` and ``dx`` (``3 x 2 (2H) H B L``), and for ``L <= toeplitz_max_l`` the
    Toeplitz convolution's ``y = u T^T``, ``du = dy T`` and ``dT = dy^T u`` (``3 x 2 B H L^2``).
    The encoder (``d_input = 1``) and decoder (``B x H x 10``) are negligible and left out."""
    B, H, L = s["B"], s["H"], s["L"]
    per_layer = 3 * 2 * (2 * H) * H * B * L
    if L <= toeplitz_max_l:
        per_layer += 3 * 2 * B * H * L * L
    return layers * per_layer


def fft_flops(n):
    return 2.5 * n * math.log2(n)


def measure_bounds(shapes, threads):
    """GEMM, FFT and memory rates on this worker's threads (medians)."""
    import scipy.fft as sfft

    from refimpl.conv import fft_length
    rng = np.random.default_rng(0)
    out = {"gemm": {}, "fft": {}, "memory": {}}
    for name, s in shapes.items():
        B, H, L = s["B"], s["H"], s["L"]
        for dt in DTYPES:
            W = rng.standard_normal((2 * H, H)).astype(dt)
            X = rng.standard_normal((H, B * L)).astype(dt)
            O = np.empty((2 * H, B * L), dt)  # (2H, B L): no page faults per product
            t, tb = median_time(lambda: np.matmul(W, X, out=O), 7, 0.3, best=True)
            fl = 2 * 2 * H * H * B * L
            out["gemm"][f"{name}/{dt}"] = {"shape": f"({2 * H},{H})@({H},{B * L})",
                                          "gflops": fl / t / 1e9, "best_gflops": fl / tb / 1e9}
            n = fft_length(L)
            u = rng.standard_normal((B, H, L)).astype(dt)
            uf = sfft.rfft(u, n=n, axis=-1)
            tf = median_time(lambda: sfft.rfft(u, n=n, axis=-1, workers=threads), 7, 0.3)
            ti = median_time(lambda: sfft.irfft(uf, n=n, axis=-1, workers=threads), 7, 0.3)
            rows = B * H
            out["fft"][f"{name}/{dt}"] = {
                "n": n, "rows": rows,
                "rfft_per_s": rows / tf, "irfft_per_s": rows / ti,
                "rfft_gflops": rows * fft_flops(n) / tf / 1e9,
                "irfft_gflops": rows * fft_flops(n) / ti / 1e9}
    a = np.ones(1 << 25)  # 256 MB, far beyond the caches
    b = np.empty_like(a)
    t, tb = median_time(lambda: np.copyto(b, a), 5, 0.5, best=True)
    out["memory"]["copy_gbs"] = 2 * a.nbytes / t / 1e9  # read + write
    out["memory"]["copy_best_gbs"] = 2 * a.nbytes / tb / 1e9
    t, tb = median_time(lambda: a.sum(), 5, 0.5, best=True)
    out["memory"]["read_gbs"] = a.nbytes / t / 1e9
    out["memory"]["read_best_gbs"] = a.nbytes / tb / 1e9
    return out


# --------------------------------------------------------------------------------------------
# One grid point
# --------------------------------------------------------------------------------------------


def profile_point(run, family, shape, dtype, steps):
    from refimpl import conv
    s = run.SHAPES[shape]
    step = run.refimpl_step(family, s, dtype)
    step()  # warm-up: Numba compiles, pools start, glibc settles
    load0 = os.getloadavg()[0]
    inst = Instrument()
    prof = cProfile.Profile()
    walls = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            prof.enable()
            step()
            prof.disable()
            walls.append(time.perf_counter() - t0)
    finally:
        inst.restore()
    plain = median_time(step, min(steps, 5))  # without the profiler and wrappers
    st = pstats.Stats(prof)
    cats = {c: 0.0 for c in CATEGORIES + ("instrument",)}
    funcs = {c: {} for c in CATEGORIES + ("instrument",)}
    ncalls = 0
    for key, (_, nc, tt, _, _) in st.stats.items():
        c = category(key)
        cats[c] += tt
        lab = label(key)
        funcs[c][lab] = funcs[c].get(lab, 0.0) + tt
        ncalls += nc
    overhead = cats.pop("instrument")  # the wrappers' own time, left out of the shares
    total = sum(cats.values())
    ms = {c: 1e3 * v / steps for c, v in cats.items()}
    top = {c: [[k, round(1e3 * v / steps, 3)] for k, v in
               sorted(funcs[c].items(), key=lambda kv: -kv[1])[:5]] for c in CATEGORIES}
    fft_calls = {}
    fft_fl = 0.0
    for name, n, rows, _ in inst.fft:
        e = fft_calls.setdefault(f"{name} n={n}", [0, 0])
        e[0] += 1
        e[1] += rows
        fft_fl += rows * fft_flops(n)
    numba_bytes = sum(b for _, b in inst.numba.values())
    numpy_bytes = sum(b for k, (_, b) in inst.numpy.items()
                      if k not in NUMPY_GEMM and k not in NUMPY_COPY)
    copy_bytes = sum(b for k, (_, b) in inst.numpy.items() if k in NUMPY_COPY)
    return {
        "family": family, "shape": shape, "dtype": dtype, "steps": steps,
        "wall_ms": 1e3 * statistics.median(walls), "plain_ms": 1e3 * plain,
        "profiled_ms": 1e3 * total / steps, "instrument_ms": 1e3 * overhead / steps,
        "load1": [load0, os.getloadavg()[0]],
        "categories_ms": ms,
        "share": {c: (v / total if total else 0.0) for c, v in cats.items()},
        "top": top, "calls_per_step": ncalls / steps,
        "work": {
            "gemm_flops": gemm_flops(s, run.LAYERS, conv.TOEPLITZ_MAX_L),
            "fft_calls": {k: [v[0] // steps, v[1] // steps] for k, v in fft_calls.items()},
            "fft_flops": fft_fl / steps,
            "numba_bytes": numba_bytes / steps, "numpy_bytes": numpy_bytes / steps,
            "copy_bytes": copy_bytes / steps,
            "numba_calls": {k: [c // steps, b // steps] for k, (c, b) in inst.numba.items()
                            if c},
        },
        "itemsize": np.dtype(dtype).itemsize,
    }


def worker(args):
    """Run the selected points on this process's threads; JSON on stdout."""
    from refimpl import threads
    from refimpl.memory import retain_freed_memory
    threads.set_threads(args.threads)  # as REFIMPL_THREADS, set by the parent too
    retain_freed_memory()  # as the step runs (run.refimpl_step): the bounds without page faults
    run = load_run()
    shapes = {k: v for k, v in run.SHAPES.items() if not args.only_shape or k in args.only_shape}
    log(f"threads={args.threads}: refimpl {threads.count()}; bounds ...")
    res = {"threads": args.threads, "bounds": measure_bounds(shapes, args.threads), "points": []}
    fams = args.only_family or run.FAMILIES
    dtypes = [args.dtype] if args.dtype else DTYPES
    res["floor_ms"] = {}  # the step at a tiny shape: Python, validation and dispatch alone
    for dtype in dtypes:
        for fam in fams:
            step = run.refimpl_step(fam, FLOOR_SHAPE, dtype)
            step()
            res["floor_ms"][f"{fam}/{dtype}"] = 1e3 * median_time(step, 20, 0.2)
    log(f"threads={args.threads}: floor {res['floor_ms']}")
    for shape in shapes:
        for dtype in dtypes:
            for fam in fams:
                steps = args.steps or DEFAULT_STEPS.get(shape, 2)
                t0 = time.perf_counter()
                r = profile_point(run, fam, shape, dtype, steps)
                res["points"].append(r)
                log(f"threads={args.threads} {shape} {fam} {dtype}: {r['plain_ms']:.1f} ms/step "
                    f"({time.perf_counter() - t0:.1f} s)")
    json.dump(res, sys.stdout)


# --------------------------------------------------------------------------------------------
# Reading: the bound each category is up against
# --------------------------------------------------------------------------------------------


def bound_text(cat, p, bounds):
    """One sentence comparing ``cat``'s time at point ``p`` with its bound."""
    ms = p["categories_ms"][cat]
    sec = ms / 1e3
    w = p["work"]
    k = f"{p['shape']}/{p['dtype']}"
    if cat == "gemm":
        rate = w["gemm_flops"] / sec / 1e9 if sec else 0.0
        ref = bounds["gemm"][k]["gflops"]
        verdict = "FLOP-bound" if rate >= 0.7 * ref else "below the GEMM rate"
        return (f"GEMM {ms:.0f} ms for {w['gemm_flops'] / 1e9:.2f} GFLOP = {rate:.1f} GFLOP/s "
                f"against {ref:.1f} measured: {verdict}")
    if cat == "fft":
        rate = w["fft_flops"] / sec / 1e9 if sec else 0.0
        ref = bounds["fft"][k]
        refr = 0.5 * (ref["rfft_gflops"] + ref["irfft_gflops"])
        verdict = "FFT-bound" if rate >= 0.7 * refr else "below the FFT rate"
        return (f"FFT {ms:.0f} ms for {w['fft_flops'] / 1e9:.2f} GFLOP (2.5 n log2 n) = "
                f"{rate:.1f} GFLOP/s against {refr:.1f} measured: {verdict}")
    if cat in ("numba", "numpy", "copy"):
        nbytes = w[f"{cat}_bytes"]
        gbs = nbytes / sec / 1e9 if sec else 0.0
        ref = bounds["memory"]["copy_gbs"]
        verdict = "bandwidth-bound" if gbs >= 0.5 * ref else "not bandwidth-bound"
        what = {"numba": "Numba kernels", "numpy": "NumPy ufuncs/reductions",
                "copy": "copies/allocation"}[cat]
        return (f"{what} {ms:.0f} ms for >= {nbytes / 1e9:.2f} GB of arguments = {gbs:.1f} "
                f"GB/s against {ref:.1f} copy: {verdict}")
    if cat == "wait":
        return f"waits {ms:.0f} ms: work on other threads (the 1-thread profile splits it)"
    return (f"Python {ms:.0f} ms, {p['calls_per_step']:.0f} calls per step "
            f"({1e3 * sec / max(p['calls_per_step'], 1):.1f} us each)")


def table(results):
    """Markdown: per point, 2 threads (the benchmark's) with the 1-thread total beside it."""
    by = {(r["threads"], p["shape"], p["family"], p["dtype"]): (p, r["bounds"])
          for r in results for p in r["points"]}
    t1, t2 = results[0]["threads"], results[-1]["threads"]
    lines = [f"| point | step {t1}t / {t2}t ms | top 3 ({t1}t) | top 3 ({t2}t) | largest "
             f"({t2}t) vs its bound |", "|---|---:|---|---|---|"]

    def top3(p):
        return ", ".join(f"{c} {p['categories_ms'][c]:.0f} ({100 * p['share'][c]:.0f}%)"
                         for c in sorted(CATEGORIES, key=lambda c: -p["categories_ms"][c])[:3])
    for (t, shape, fam, dt), (p, _) in by.items():
        if t != t1:
            continue
        q, qb = by.get((t2, shape, fam, dt), (None, None))
        one = f"{q['plain_ms']:.0f}" if q else "-"
        big = max(CATEGORIES, key=lambda c: q["categories_ms"][c]) if q else None
        floor = next((r["floor_ms"].get(f"{fam}/{dt}") for r in results
                      if r["threads"] == t2), None)
        if shape == "L40" and floor is not None:
            one += f" (floor {floor:.1f})"
        lines.append(f"| {shape} {fam} {dt} | {p['plain_ms']:.0f} / {one} | {top3(p)} | "
                     f"{top3(q) if q else '-'} | {bound_text(big, q, qb) if q else '-'} |")
    return "\n".join(lines)


def bounds_table(results):
    lines = ["| threads | bound | " + " | ".join(
        f"{k}" for k in results[0]["bounds"]["gemm"]) + " |"]
    lines.append("|---|---|" + "---:|" * len(results[0]["bounds"]["gemm"]))
    for r in results:
        b = r["bounds"]
        lines.append(f"| {r['threads']} | GEMM GFLOP/s median (best) | " + " | ".join(
            f"{v['gflops']:.1f} ({v['best_gflops']:.1f})" for v in b["gemm"].values()) + " |")
        lines.append(f"| {r['threads']} | rfft / irfft GFLOP/s | " + " | ".join(
            f"{v['rfft_gflops']:.1f} / {v['irfft_gflops']:.1f} (n={v['n']})"
            for v in b["fft"].values()) + " |")
    for r in results:
        m = r["bounds"]["memory"]
        lines.append(f"\nmemory ({r['threads']} thread(s)): copy {m['copy_gbs']:.1f} GB/s "
                     f"(read+write), read-only sum {m['read_gbs']:.1f} GB/s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only-shape", action="append", help="L40, L1024 or L4096 (repeatable)")
    ap.add_argument("--only-family", action="append", help="a family (repeatable)")
    ap.add_argument("--dtype", choices=DTYPES)
    ap.add_argument("--steps", type=int, help="profiled steps per point (default per shape: "
                    f"{DEFAULT_STEPS})")
    ap.add_argument("--threads", type=int, choices=THREADS, action="append",
                    help="thread settings to run (default both)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)
    results = []
    t0 = time.perf_counter()
    load = [os.getloadavg()]
    for t in args.threads or THREADS:
        env = dict(os.environ, REFIMPL_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t),
                   OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(t)]
        for flag, vals in (("--only-shape", args.only_shape), ("--only-family",
                                                               args.only_family)):
            for v in vals or ():
                cmd += [flag, v]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
        results.append(json.loads(out))
        load.append(os.getloadavg())
    sys.path.insert(0, str(HERE.parent))
    from harness import cpu_model
    doc = {"schema": SCHEMA, "cpu": cpu_model(), "cpus": os.cpu_count(),
           "loadavg": load, "seconds": time.perf_counter() - t0, "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(bounds_table(results))
    print()
    print(table(results))
    log(f"wrote {args.out} in {doc['seconds']:.0f} s; load averages {load}")


if __name__ == "__main__":
    main()
