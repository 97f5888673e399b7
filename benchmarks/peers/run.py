"""refimpl beside PyTorch CPU eager, the same model in the same run: ``make bench-peers``.

Runs in the project venv (refimpl) and drives a PyTorch worker in the benchmark environment
``.venv-peers`` (``benchmarks/peers/torch_model.py --worker``, torch never a refimpl
dependency). For each point of the grid (shape x family) it times one training step (forward +
backward + AdamW + the ``rho >= 0`` projection) of the classifier (:data:`SHAPES`) or of the
language model (:data:`LM_SHAPES`, issue 25: the model of ``benchmarks/lm_runs.py``) on

- refimpl float64 (``refimpl.model.loss_and_grads`` + ``refimpl.optim.adamw_step``),
- refimpl float32, when ``refimpl.model.ModelConfig`` accepts ``dtype`` (else ``-``),
- PyTorch float64 and float32 (``torch.set_num_threads(2)``),

all from the same initial parameters (refimpl ``init_model``, seed 0) and the same batch. After
one warm-up step each, every contender runs its timed steps back to back in two blocks (all
contenders in order, then in reverse order, a rest before each block: :data:`BLOCK_REST`);
medians of ``--repeats`` timed steps, fewer where a step is slow: each contender gets at most
``--max-seconds`` of timed steps per point (at least one), and the table says how many it got.

Before timing, the float64 correctness check (``torch_model.py --check``) must pass for both
heads: the torch model loaded with refimpl's parameters gives refimpl's loss and gradients (its
tolerance and why: ``torch_model.RTOL``), so the timing compares the same model.

Writes ``benchmarks/peers/results.json`` (``check`` and ``points`` for the classifier,
``lm_check`` and ``lm_points`` for the language model) and the generated region ``peers`` of
``BENCHMARKS.md`` (atomically; other regions and hand-written text kept), one table per head.
``--quick`` runs one tiny shape per head into a temporary folder (a smoke test). Progress goes
to stderr.
"""
import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(HERE.parent) not in sys.path:  # benchmarks/: the harness's machine record helpers
    sys.path.insert(0, str(HERE.parent))

from bench_training import sdn_weights  # noqa: E402
from harness import cpu_model  # noqa: E402

from refimpl import model as M  # noqa: E402
from refimpl import threads  # noqa: E402
from refimpl.atomic import atomic_write_text  # noqa: E402
from refimpl.memory import retain_freed_memory  # noqa: E402
from refimpl.optim import adamw_init, adamw_step, make_groups  # noqa: E402

FAMILIES = ("gelu", "binary", "lif", "sdn", "refractory")
#: name -> shape of the classifier; 2 layers, 10 classes, d_input 1 everywhere.
SHAPES = {
    "L40": dict(B=64, H=64, N=64, L=40),
    "L1024": dict(B=32, H=128, N=64, L=1024),
    "L4096": dict(B=8, H=128, N=64, L=4096),
}
#: name -> shape of the language model (a shape with a vocabulary ``V`` is one): the model of
#: benchmarks/lm_runs.py (2 layers, H 64, N 32, bytes), its training batch at context 128 and
#: the same 4096 tokens per step at context 1024.
LM_SHAPES = {
    "lm128": dict(B=32, H=64, N=32, L=128, V=256),
    "lm1024": dict(B=4, H=64, N=32, L=1024, V=256),
}
QUICK_SHAPES = {"quick": dict(B=4, H=8, N=4, L=32), "quick-lm": dict(B=2, H=8, N=4, L=32, V=256)}
LAYERS, CLASSES, LR, WD = 2, 10, 1e-3, 1e-2
#: The language model's learning rate (benchmarks/lm_runs.py); its AdamW groups follow from it.
LM_LR = 3e-3
TORCH_THREADS = 2
CONTENDERS = ("refimpl64", "torch64", "refimpl32", "torch32")
#: Negative controls of the check per head, as torch_model.CONTROLS and LM_CONTROLS (that file
#: needs torch to import).
CONTROLS = {"classifier": (("gelu", "ln_eps"), ("lif", "detach_reset")),
            "lm": (("gelu", "lm_roll"), ("lif", "lm_mean_all"))}
SCHEMA = "refimpl-bench-peers"
REGION = "peers"


def log(msg):
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The refimpl side
# --------------------------------------------------------------------------------------------



def refimpl_float32_available():
    """Whether refimpl has a float32 training path: ``ModelConfig`` has a ``dtype`` field."""
    return "dtype" in {f.name for f in dataclasses.fields(M.ModelConfig)}


def head_of(s):
    """``"lm"`` for a shape with a vocabulary ``V`` (a language model), else ``"classifier"``:
    refimpl's ``ModelConfig.head`` and the key of torch_model.HEADS."""
    return "lm" if "V" in s else "classifier"


def problem(family, s, dtype=None):
    """``(cfg, params, buffers, x, labels)`` of one grid point (seed 0). A language model
    (``ModelConfig.for_lm``, untied decoder, as benchmarks/lm_runs.py) reads tokens drawn
    uniformly from its vocabulary, ``x`` int64 ``(B, L)``, and has no labels (None): its
    targets are ``x`` shifted by one."""
    extra = {} if dtype is None else {"dtype": dtype}
    size = dict(d_model=s["H"], d_state=s["N"], n_layers=LAYERS, activation=family, **extra)
    lm = head_of(s) == "lm"
    cfg = (M.ModelConfig.for_lm(s["V"], **size) if lm
           else M.ModelConfig(n_classes=CLASSES, d_input=1, **size))
    w = sdn_weights() if cfg.family.needs_sdn_weights else None
    p, buf = M.init_model(cfg, 0, sdn_weights=w)
    rng = np.random.default_rng(0)
    if lm:
        return cfg, p, buf, rng.integers(0, s["V"], (s["B"], s["L"])), None  # (B, L) int64
    x = rng.standard_normal((s["B"], s["L"], 1))  # (B, L, 1)
    labels = rng.integers(0, CLASSES, s["B"]).astype(np.int64)
    return cfg, p, buf, x, labels


def groups_for(p, s):
    """refimpl's AdamW groups (name lists) at the shape's learning rate: what both sides use."""
    lr = LM_LR if head_of(s) == "lm" else LR
    return make_groups(p, lr, WD, M.optimizer_rules(lr))


def refimpl_step(family, s, dtype="float64"):
    """A closure running one refimpl training step (benchmarks/bench_training.py's make_step,
    plus the projection the torch side does too) of the classifier or, for a shape with ``V``,
    the language model (``labels`` None); float32 through ``ModelConfig(dtype=)``."""
    retain_freed_memory()  # as refimpl.train runs its steps (refimpl/memory.py)
    cfg, p, buf, x, labels = problem(family, s, None if dtype == "float64" else dtype)
    x = M.model_inputs(cfg, x)  # float32 rounds float inputs once (as trainers do), not tokens
    opt = adamw_init(p)
    groups = groups_for(p, s)
    state = {"p": p, "buf": buf}

    def step():
        loss, _, g, state["buf"], _ = M.loss_and_grads(cfg, state["p"], state["buf"], x, labels,
                                                       training=True)
        adamw_step(state["p"], g, opt, groups)
        M.project(state["p"], cfg)
        return float(loss)

    return step


# --------------------------------------------------------------------------------------------
# The torch side: a worker process in .venv-peers
# --------------------------------------------------------------------------------------------


def peers_python(arg=None):
    """The benchmark environment's python: ``--peers-python``, ``$REFIMPL_PEERS_PYTHON`` or
    ``.venv-peers/bin/python``."""
    exe = arg or os.environ.get("REFIMPL_PEERS_PYTHON") or str(ROOT / ".venv-peers" / "bin" /
                                                               "python")
    if not Path(exe).exists():
        raise SystemExit(f"no PyTorch environment at {exe}: run `make bench-peers` (it builds "
                         ".venv-peers), or pass --peers-python PATH / set REFIMPL_PEERS_PYTHON")
    return exe


def peer_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    return env


class Worker:
    """``torch_model.py --worker`` over pipes (JSON lines)."""

    def __init__(self, exe, threads=TORCH_THREADS):
        self.proc = subprocess.Popen(
            [exe, str(HERE / "torch_model.py"), "--worker", "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=peer_env())

    def ask(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker died (exit {self.proc.wait()}) on {req}")
        ans = json.loads(line)
        if "error" in ans:
            raise RuntimeError(f"torch worker: {ans['error']} (request {req['cmd']})")
        return ans

    def close(self):
        """End the worker (its stdin closes: it returns); killed, by its id, if it hangs."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


#: Rest (s) before each block of timed steps. Timing the contenders step by step in turn was
#: unfair: each process's BLAS and OpenMP threads spin-wait after their work (OpenBLAS's for
#: about 2^28 cycles, ~0.1 s), so a step timed right after the other process's step shared the
#: cores with those spinning threads. Measured at L=40 (gelu, float64, 15 steps each): PyTorch
#: 52-57 ms alone, 123 ms interleaved; refimpl 27-35 ms alone, 40 ms interleaved.
BLOCK_REST = 0.5


#: Shapes of the correctness check per head, as torch_model.CHECK_SHAPES: small enough for
#: --quick too (the cost is compilation).
CHECK_SHAPES = {"classifier": dict(B=4, H=16, N=8, L=64),
                "lm": dict(B=3, H=16, N=8, L=32, V=256)}


def _save_npz(path, x, labels, p, buf, **extra):
    """The worker's ``.npz`` of a problem (``labels`` left out for a language model)."""
    np.savez(path, x=x, **({} if labels is None else {"labels": labels}), **extra,
             **{"p." + k: v for k, v in p.items()}, **{"buf." + k: v for k, v in buf.items()})


def run_check(worker, tmp, head="classifier"):
    """The float64 correctness check of one head: refimpl's loss and gradients here, the torch
    model's in the worker (``torch_model.compare``); one dict per family, then the negative
    controls (:data:`CONTROLS`: deliberately wrong models that must be rejected)."""
    shape = CHECK_SHAPES[head]
    rows, ref = [], {}
    for fam, variant in [(f, "") for f in FAMILIES] + list(CONTROLS[head]):
        if fam not in ref:
            cfg, p, buf, x, labels = problem(fam, shape)
            loss, _, g, _, _ = M.loss_and_grads(cfg, p, buf, x, labels, training=True)
            npz = os.path.join(tmp, f"check-{head}-{fam}.npz")
            _save_npz(npz, x, labels, p, buf, loss=loss, **{"g." + k: v for k, v in g.items()})
            ref[fam] = npz
        r = worker.ask(cmd="compare", npz=ref[fam], family=fam, n_layers=LAYERS,
                       variant=variant, head=head)
        rows.append({**r, "control": True} if variant else r)
    bad = [r for r in rows if r["ok"] == bool(r.get("control"))]
    if bad:
        raise SystemExit("the torch model does not match refimpl (float64 loss and gradients), "
                         "or a negative control passed the check; timing would compare "
                         "different models:\n" + "\n".join(json.dumps(r) for r in bad))
    return rows


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_point(family, s, worker, tmp, repeats, max_seconds, f32):
    """Timings of one grid point in alternating blocks: ``{contender: {...}}``."""
    _, p, buf, x, labels = problem(family, s)
    npz = os.path.join(tmp, "point.npz")
    _save_npz(npz, x, labels, p, buf)
    groups = groups_for(p, s)
    runners, out = {}, {}
    runners["refimpl64"] = _local(refimpl_step(family, s))
    for dt in ("64", "32"):
        key = f"{family}-{dt}"
        worker.ask(cmd="setup", key=key, npz=npz, family=family, n_layers=LAYERS,
                   dtype=f"float{dt}", groups=groups, head=head_of(s))
        runners[f"torch{dt}"] = _remote(worker, key)
    if f32:
        try:
            runners["refimpl32"] = _local(refimpl_step(family, s, "float32"))
        except Exception as e:  # noqa: BLE001 - the other engineer's API may differ: say so
            out["refimpl32"] = {"error": f"{type(e).__name__}: {e}"}
    warm, times, losses = {}, {k: [] for k in runners}, {}
    for k, run in runners.items():  # warm-up (compilation, allocator), timed for the cap
        try:
            warm[k], losses[k] = run()
        except Exception as e:  # noqa: BLE001 - recorded, the other contenders go on
            out[k] = {"error": f"{type(e).__name__}: {e}"}
    runners = {k: v for k, v in runners.items() if k in warm}
    want = {k: max(1, min(repeats, int(max_seconds // max(warm[k], 1e-9)))) for k in runners}
    # Two blocks per contender, back to back within a block (as a training loop runs), in
    # order and then in reverse order (drift of the machine falls on both alike), with a rest
    # before each block (see BLOCK_REST).
    order = list(runners)
    for block, keys in enumerate((order, order[::-1])):
        for k in keys:
            n = (want[k] + 1 - block) // 2  # ceil for the first block, floor for the second
            if n:
                time.sleep(BLOCK_REST)
            for _ in range(n):
                t, _ = runners[k]()
                times[k].append(t)
    for k in runners:
        out[k] = {"median_s": statistics.median(times[k]), "min_s": min(times[k]),
                  "times_s": times[k], "warmup_s": warm[k], "repeats": len(times[k]),
                  "capped": len(times[k]) < repeats, "first_loss": losses[k]}
    for dt in ("64", "32"):
        worker.ask(cmd="drop", key=f"{family}-{dt}")
    return out


def _local(step):
    def run():
        t0 = time.perf_counter()
        loss = step()
        return time.perf_counter() - t0, loss
    return run


def _remote(worker, key):
    def run():
        ans = worker.ask(cmd="step", key=key)
        return ans["seconds"], ans["loss"]
    return run


def ratio(row, a, b):
    """``row[a] / row[b]`` medians (< 1: ``a`` faster), or None."""
    ta, tb = row.get(a, {}).get("median_s"), row.get(b, {}).get("median_s")
    return None if ta is None or tb is None else ta / tb


# --------------------------------------------------------------------------------------------
# Results: JSON and the BENCHMARKS.md region
# --------------------------------------------------------------------------------------------


def machine(torch_info):
    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "loadavg_start": list(os.getloadavg()),
            "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS,
            "REFIMPL_THREADS": os.environ.get(threads.ENV) or "auto",
            "git_commit": _git_commit(), **{f"torch_{k}": v for k, v in torch_info.items()}}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info



def _git_commit():
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--",
                                "refimpl"], timeout=10).returncode  # refimpl/ as timed
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except OSError:
        return None


def _fmt_time(t):
    if t is None:
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _cell(c):
    if c is None:
        return "-"
    if "error" in c:
        return "error"
    return f"{_fmt_time(c['median_s'])} ({_fmt_time(c['min_s'])})"


def _fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}"


def _fmt_rate(tokens_per_s):
    """Tokens per second to 3 significant digits: ``43.1k tok/s``."""
    for scale, suffix in ((1e6, "M"), (1e3, "k"), (1, "")):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.3g}{suffix} tok/s"
    return f"{tokens_per_s:.3g} tok/s"


def _lm_cell(c, tokens):
    """A language model's cell: median (fastest) step, then ``tokens`` per median step."""
    if c is None or "error" in c:
        return _cell(c)
    return f"{_cell(c)}, {_fmt_rate(tokens / c['median_s'])}"


#: What each negative control gets wrong (torch_model.VARIANT), for the text.
CONTROL_ERRORS = {
    "ln_eps": "LayerNorm eps 1e-6",
    "detach_reset": "no gradient through the reset",
    "lm_roll": "targets shifted with `torch.roll`, so position L-1 is scored against token 0",
    "lm_mean_all": "the loss divided by B L instead of B (L-1)",
}


def _check_text(rows):
    """The check's sentence: agreement over the families, then each negative control."""
    chk = [r for r in rows if not r.get("control")]
    controls = [r for r in rows if r.get("control")]
    worst_l = max(r["loss_rel_err"] for r in chk)
    worst_g = max(chk, key=lambda r: r["grad_rel_err_max"])
    margins = [r["min_spike_margin"] for r in chk if r["min_spike_margin"] is not None]
    rates = [f"{r['family']} {r['spike_rate']:.2f}" for r in chk if r.get("spike_rate")]
    margin = (f"; smallest spike margin |h - theta| {min(margins):.1e}" if margins else "")
    margin += f"; spike rates {', '.join(rates)}" if rates else ""
    return (f"Same model: PyTorch float64 loaded with refimpl's parameters gives refimpl's loss "
            f"and gradients on {len(chk)} families (shape {_fmt_shape(chk[0]['shape'])}): loss "
            f"within {worst_l:.1e}, every gradient within {worst_g['grad_rel_err_max']:.1e} of "
            f"its largest entry (worst: {worst_g['family']} `{worst_g['grad_worst']}`; "
            f"tolerance {chk[0]['rtol']:g}, see `torch_model.RTOL`){margin}."
            + "".join(f" Negative control {r['family']} with `{r['variant']}`: rejected "
                      f"(gradients off by {r['grad_rel_err_max']:.1e}"
                      + (f"; {CONTROL_ERRORS[r['variant']]}" if r["variant"] in CONTROL_ERRORS
                         else "") + ")." for r in controls))


def _table(points, cell):
    """The timing table of ``points``; ``cell(timing, shape)`` formats one contender."""
    lines = ["| shape | family | refimpl f64 | PyTorch f64 | ratio f64 | refimpl f32 | "
             "PyTorch f32 | ratio f32 | n | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in points:
        t, s = r["timings"], r["shape"]
        n = "/".join(str(t[k]["repeats"]) if k in t and "repeats" in t[k] else "-"
                     for k in CONTENDERS)
        lines.append(" | ".join([
            f"| {_fmt_shape(s)}", f"`{r['family']}`", cell(t.get("refimpl64"), s),
            cell(t.get("torch64"), s), _fmt_ratio(ratio(t, "refimpl64", "torch64")),
            cell(t.get("refimpl32"), s), cell(t.get("torch32"), s),
            _fmt_ratio(ratio(t, "refimpl32", "torch32")), n,
            "-" if r.get("loadavg_1min") is None else f"{r['loadavg_1min']:.1f}"]) + " |")
    return lines


def render(doc):
    """The ``peers`` region's markdown from the results document: the classifier's table
    (when it has points, or no language-model points either), then the language model's."""
    m = doc["machine"]
    lm_points = doc.get("lm_points", [])
    lines = ["## Peers: refimpl beside PyTorch CPU eager (issues 13, 25)", "",
             f"Run {m['date']} at commit `{m.get('git_commit')}`; {m['cpu_model']}, "
             f"{m['cpu_count']} cores; PyTorch {m.get('torch_torch')} CPU eager, "
             f"{m.get('torch_threads')} threads (`torch.set_num_threads`); refimpl with "
             # results before refimpl.threads name Numba's count
             + (f"REFIMPL_THREADS={m['REFIMPL_THREADS']}" if "REFIMPL_THREADS" in m
                else f"NUMBA_NUM_THREADS={m.get('NUMBA_NUM_THREADS')}")
             + f", NumPy {m['numpy']}"
             + (f"; load average {m['loadavg_start'][0]:.1f} at the start, "
                f"{m['loadavg_end'][0]:.1f} at the end (a shared machine)"
                if "loadavg_end" in m else "") + ". "
             f"{LAYERS} layers; one training step = forward + "
             "backward + AdamW (+ `rho >= 0`), from refimpl's `init_model` seed 0, the same "
             "batch on both sides. Median (and fastest) of the timed steps after one warm-up step, "
             "each contender's steps back to back in two blocks (contenders in order, then "
             f"reversed, {BLOCK_REST:g} s of rest before each block); at most "
             f"{doc['max_seconds']:g} s of timed steps per "
             "contender and point (the `n` column: timed steps of refimpl64 / torch64 / "
             "refimpl32 / torch32; fewer than "
             f"{doc['repeats']} means capped; `load`: the 1-minute load average when the point "
             "started, on 2 cores). Ratio = refimpl / PyTorch (< 1: refimpl faster).",
             ""]
    if doc.get("quick"):
        lines += ["**Quick smoke-test shapes: not a measurement.**", ""]
    earlier = sorted({(p["shape_name"], p.get("date", "?")[:10], p.get("commit", "?"))
                      for p in doc["points"] + lm_points if p.get("date", "") < m["date"]})
    if earlier:
        lines += ["Rows kept from earlier runs (`--only-shape` reran the others; `results.json` "
                  "has every point's date): " + ", ".join(
                      f"{shape} ({day}" + ("" if commit == "?" else f", commit `{commit}`") + ")"
                      for shape, day, commit in earlier) + ".", ""]
    if doc["points"] or not lm_points:
        lines += ["### Classifier (issue 13)", "",
                  f"{CLASSES} classes, d_input 1 (`x` drawn from N(0, 1)), lr {LR:g}. "
                  + _check_text(doc["check"]), ""]
        lines += _table(doc["points"], lambda c, s: _cell(c))
    if lm_points:
        lines += ["", "### Language model (issue 25)", "",
                  "The model of `benchmarks/lm_runs.py`: `ModelConfig.for_lm(V, ...)` (untied "
                  "decoder), tokens drawn uniformly from the V = 256 bytes, loss the mean "
                  "next-token cross-entropy over positions 0 .. L-2, lr "
                  f"{LM_LR:g}; the same model in PyTorch: `F.embedding`, the blocks, a per-token "
                  "`F.linear` decoder, `F.cross_entropy` on the shifted tokens. Each cell: median "
                  "(fastest) step, then tokens per second = B L / median step. "
                  + _check_text(doc["lm_check"]), ""]
        lines += _table(lm_points, lambda c, s: _lm_cell(c, s["B"] * s["L"]))
    errs = [f"- {r['shape_name']} {r['family']} {k}: {c['error']}"
            for r in doc["points"] + lm_points for k, c in r["timings"].items() if "error" in c]
    if not doc.get("refimpl_float32"):
        lines += ["", "refimpl f32: `-` until `refimpl train --dtype float32` exists "
                  "(`refimpl.model.ModelConfig` has no `dtype` field in this run)."]
    if errs:
        lines += ["", "Errors:"] + errs
    return "\n".join(lines) + "\n"


def _fmt_shape(s):
    return " ".join(f"{k}={s[k]}" for k in ("B", "H", "N", "L", "V") if k in s)


_MARK = re.compile(r"^<!-- generated:(begin|end) (\S+) -->[ \t]*$", re.MULTILINE)


def merge_region(existing, rid, body):
    """``existing`` with the region ``rid`` replaced by ``body`` (appended when absent); the
    marker format of benchmarks/harness.py, so ``make bench`` keeps this region as it is."""
    wrapped = f"<!-- generated:begin {rid} -->\n{body.rstrip()}\n<!-- generated:end {rid} -->"
    if existing is None:
        return "# Benchmarks\n\n" + wrapped + "\n"
    begins = [m for m in _MARK.finditer(existing) if m.group(2) == rid and m.group(1) == "begin"]
    ends = [m for m in _MARK.finditer(existing) if m.group(2) == rid and m.group(1) == "end"]
    if not begins and not ends:
        return existing.rstrip("\n") + "\n\n" + wrapped + "\n"
    if len(begins) != 1 or len(ends) != 1 or ends[0].start() < begins[0].end():
        raise ValueError(f"BENCHMARKS.md: the markers of region {rid!r} are unbalanced; fix "
                         "them by hand")
    return existing[:begins[0].start()] + wrapped + existing[ends[0].end():]


def load(path):
    if not path.exists():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"{path} is not a {SCHEMA} file; fix or delete it, then rerun")
    return doc


# --------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/peers/run.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--only-shape", action="append", choices=list(SHAPES) + list(LM_SHAPES),
                    help="only this shape (repeatable; lm128, lm1024: the language model); "
                         "other stored points are kept")
    ap.add_argument("--only-family", action="append", choices=FAMILIES,
                    help="only this family (repeatable); other stored points are kept")
    ap.add_argument("--quick", action="store_true",
                    help="one tiny shape per head (classifier, language model), 2 repeats, "
                         "into --out-dir or a temporary folder")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="write results.json and BENCHMARKS.md here instead of "
                         "benchmarks/peers/results.json and ./BENCHMARKS.md")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per contender (5)")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="cap on the timed steps per contender and point (default 120 s; "
                         "at least one step is always timed)")
    ap.add_argument("--torch-threads", type=int, default=TORCH_THREADS,
                    help=f"torch.set_num_threads of the peer (default {TORCH_THREADS}, the "
                         "machine's cores)")
    ap.add_argument("--markdown-only", action="store_true",
                    help="run nothing; rewrite the BENCHMARKS.md region from the stored JSON")
    ap.add_argument("--peers-python", default=None,
                    help="python of the PyTorch environment (default .venv-peers/bin/python)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.quick:
        if args.only_shape:
            ap.error("--quick has its own tiny shape; drop --only-shape")
        args.repeats = min(args.repeats, 2)
        if args.out_dir is None:
            args.out_dir = Path(tempfile.mkdtemp(prefix="refimpl-peers-"))
    return args


def write_markdown(doc, md_path):
    existing = md_path.read_text(encoding="utf-8") if md_path.exists() else None
    atomic_write_text(md_path, merge_region(existing, REGION, render(doc)))


#: Display order of the points: shapes as in SHAPES, LM_SHAPES, families as in FAMILIES.
order = {(s, f): i for i, (s, f) in enumerate(
    (s, f) for s in list(SHAPES) + list(LM_SHAPES) + list(QUICK_SHAPES) for f in FAMILIES)}


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out_dir
    json_path = (out_dir or HERE) / "results.json"
    md_path = out_dir / "BENCHMARKS.md" if out_dir else ROOT / "BENCHMARKS.md"
    if args.markdown_only:
        doc = load(json_path)
        if doc is None:
            raise SystemExit(f"no {json_path} to render: run the benchmark first")
        write_markdown(doc, md_path)
        log(f"wrote the '{REGION}' region of {md_path}")
        return 0
    exe = peers_python(args.peers_python)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    grid = {**SHAPES, **LM_SHAPES}
    shapes = QUICK_SHAPES if args.quick else {k: grid[k] for k in (args.only_shape or grid)}
    families = args.only_family or FAMILIES
    f32 = refimpl_float32_available()
    worker = Worker(exe, args.torch_threads)
    try:
        # both heads whatever the shapes: the stored document's checks cover every point kept
        log("checking the torch models against refimpl (float64 loss and gradients)")
        with tempfile.TemporaryDirectory(prefix="refimpl-peers-") as tmp:
            check, lm_check = run_check(worker, tmp), run_check(worker, tmp, "lm")
        for r in check + lm_check:
            tag = "  control " if r.get("control") else "  "
            log(f"{tag}{r['head']} {r['family']} {r['variant']}: loss {r['loss_rel_err']:.1e}, "
                f"grads {r['grad_rel_err_max']:.1e} (tolerance {r['rtol']:g})"
                + ("" if r["ok"] else ": rejected"))
        info = worker.ask(cmd="info")
        mach = machine({"torch": info["torch"], "threads": info["threads"],
                        "interop_threads": info["interop_threads"]})
        log(f"{mach['cpu_model']} ({mach['cpu_count']} cores), torch {info['torch']} with "
            f"{info['threads']} threads, refimpl float32: {'yes' if f32 else 'no'}")
        old = None if args.quick else load(json_path)
        kept = old["points"] + old.get("lm_points", []) if old and not old.get("quick") else []
        new = []

        def save():  # after every point: an interrupted run keeps what it measured
            mach["loadavg_end"] = list(os.getloadavg())
            done = {(p["shape_name"], p["family"]) for p in new}  # stored points not yet rerun
            keep = [p for p in kept if (p["shape_name"], p["family"]) not in done]  # stay
            points = sorted(keep + new, key=lambda p: order[(p["shape_name"], p["family"])])
            heads = {h: [p for p in points if head_of(p["shape"]) == h]
                     for h in ("classifier", "lm")}
            # version 2: the language model's check and points beside the classifier's
            doc = {"schema": SCHEMA, "schema_version": 2, "quick": args.quick,
                   "machine": mach, "repeats": args.repeats, "max_seconds": args.max_seconds,
                   "refimpl_float32": f32, "check": check, "points": heads["classifier"],
                   "lm_check": lm_check, "lm_points": heads["lm"]}
            atomic_write_text(json_path, json.dumps(doc, indent=1) + "\n")
            write_markdown(doc, md_path)

        with tempfile.TemporaryDirectory(prefix="refimpl-peers-") as tmp:
            for sname, s in shapes.items():
                for fam in families:
                    t0, load1 = time.perf_counter(), os.getloadavg()[0]
                    n_threads = threads.count()  # auto: the cores other processes leave free
                    t = time_point(fam, s, worker, tmp, args.repeats, args.max_seconds, f32)
                    new.append({"shape_name": sname, "shape": s, "family": fam, "timings": t,
                                "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                                "loadavg_1min": load1, "refimpl_threads": n_threads,
                                "commit": mach.get("git_commit")})
                    log(f"{sname} {fam}: " + ", ".join(f"{k} {_cell(c)}" for k, c in t.items())
                        + f" ({time.perf_counter() - t0:.0f} s, load {load1:.1f}, refimpl "
                        f"threads {n_threads})")
                    save()
    finally:
        worker.close()
    log(f"wrote {json_path} and the '{REGION}' region of {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
