"""Threads that cooperate and a fast first step (issue 25): refimpl before and after, one run.

    .venv/bin/python benchmarks/contention.py [--before REF] [--seconds 8] [--only contention]
    .venv/bin/python benchmarks/contention.py --quick --out-dir /tmp/contention-quick

Two versions of refimpl run side by side: *before*, the code at ``--before`` (default
``1f81af2``), checked out into a temporary ``git worktree`` and imported through ``PYTHONPATH``
(its ``cli/`` and ``golden/`` linked into it as ``refimpl.cli`` and ``refimpl.golden.data``, as
the installed package has them: the editable install would otherwise import the working tree's
CLI over the old library), and *after*, the working tree. Every figure comes from a fresh
process (the ``--child`` mode of this script, or the ``refimpl`` command) that prints the
``refimpl`` it imported, checked against the version it should be. The thread variables
(:data:`THREAD_VARS`, e.g. a ``NUMBA_NUM_THREADS`` of the shell) are removed from the
children's environment: what is measured is each version's own thread settings. A child imports
refimpl before NumPy, so that settings applied on import act as they would in a user's program.

What is measured:

- **Contention.** One training step (``loss_and_grads(training=True)`` + ``adamw_step`` +
  ``project``, as ``benchmarks/peers/run.py``; ``retain_freed_memory`` first, as the trainers)
  of the classifier (lif, B=64 H=64 N=64 L=40, 2 layers, 10 classes, float64 inputs) and of the
  language model (lif, bytes, d_model 64, d_state 32, 2 layers, int64 tokens (32, 128)): two
  warm-up steps, then steps for ``--seconds`` (at least :data:`MIN_STEPS`), the median reported.
  Under 0 (quiet), 2 and 4 busy processes: single-threaded spinners (``while True: pass``)
  started :data:`SPIN_UP` s before the child and killed after it. The ratio is the median under
  load over the quiet median of the same version in the same run; the issue's targets are
  ``<= 2.5x`` with 2 busy processes and ``<= 5x`` with 4 (:data:`TARGETS`). The versions are
  interleaved point by point (before quiet, after quiet, before 2 busy, ...) so that a drift of
  the machine hits both.
- **Generate.** One small language model per family (:data:`FAMILIES`; ``refimpl train
  --text`` of the working tree on :data:`TEXT_BYTES` bytes of Python's pydoc topics, one epoch:
  the quality does not matter here), then per version and family the wall time of a fresh
  ``refimpl generate CKPT --length 20``, compilation included: with a warm Numba cache (one
  run discarded, then the median of ``--repeats``) and a cold one (``NUMBA_CACHE_DIR`` a new
  empty folder each time, median of ``--repeats``); and, in one process with a warm cache, the
  steady tokens/s of :data:`STEADY_TOKENS` tokens from ``refimpl.sampling.generate`` counted
  after its first step (whose time, compilation included, is reported too).

The 1-minute load average is recorded at the start and the end of every point. Results go to
``benchmarks/contention.json`` and the generated region ``contention`` of ``BENCHMARKS.md``
(written atomically; other regions and hand-written text kept); ``--out-dir`` writes both
there instead, and ``--quick`` (a smoke test: short budgets, one repeat, lif only) requires it.
Progress goes to stderr. The module imports only the standard library at the top: the children
run it too, and must import refimpl first.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SCHEMA = "refimpl-bench-contention"
REGION = "contention"
DEFAULT_BEFORE = "1f81af2"
FAMILIES = ("gelu", "binary", "lif", "sdn", "refractory")
SHARED_SDN = ROOT.parent / "shared" / "external" / "sdn_spikingssm_tau0125.npz"
#: Removed from every child's environment: each version chooses its own threads.
THREAD_VARS = ("REFIMPL_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "REFIMPL_FFT_WORKERS")
#: Also removed: the children's imports and Numba cache are set per version and per run.
PATH_VARS = ("PYTHONPATH", "NUMBA_CACHE_DIR")
BUSY = (0, 2, 4)
#: busy processes -> the issue's largest ratio to the quiet step.
TARGETS = {2: 2.5, 4: 5.0}
STEPS = ("classifier", "lm")
STEP_TITLES = {"classifier": "classifier step (lif, B=64 H=64 N=64 L=40)",
               "lm": "LM step (lif, bytes, d_model 64, d_state 32, (32, 128) tokens)"}
WARMUP_STEPS = 2
MIN_STEPS = 5
SPIN_UP = 1.0
TEXT_BYTES = 30_000
GEN_TOKENS = 20
STEADY_TOKENS = 300
PROMPT = "The "
CHILD_TIMEOUT = 900
#: The console script's body, plus the files it imported on stderr (checked per run).
LAUNCH = ("import sys, refimpl, refimpl.cli.main as m; "
          "print('[imported]', refimpl.__file__, m.__file__, file=sys.stderr, flush=True); "
          "sys.argv[0] = 'refimpl'; sys.exit(m.main())")


def log(msg):
    print(f"[contention] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Children (a fresh process per figure; refimpl imported first)
# --------------------------------------------------------------------------------------------


def _loaded():
    """What the child imported: the thread settings the imported refimpl left in force (Numba's,
    and the count of refimpl's own pool, ``refimpl.threads.count()`` as the run ends, None in
    versions without one) and the files of every ``refimpl`` module loaded."""
    import importlib
    from importlib.machinery import PathFinder

    import numba

    import refimpl
    # only the version's own refimpl.threads: the editable install would find the working
    # tree's for a version that has none
    own = PathFinder.find_spec("refimpl.threads", refimpl.__path__) is not None
    return {"refimpl_file": refimpl.__file__,
            "refimpl_files": sorted({m.__file__ for k, m in sys.modules.items()
                                     if k.split(".")[0] == "refimpl"
                                     and getattr(m, "__file__", None)}),
            "numba_num_threads": numba.config.NUMBA_NUM_THREADS,
            "numba_get_num_threads": numba.get_num_threads(),
            "refimpl_threads": importlib.import_module("refimpl.threads").count() if own
            else None,
            "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ}}


def child_step(which, seconds):
    """Time training steps of ``which`` (:data:`STEPS`); prints a JSON line."""
    from refimpl import model as M
    from refimpl.memory import retain_freed_memory
    from refimpl.optim import adamw_init, adamw_step, make_groups

    import numpy as np

    retain_freed_memory()
    rng = np.random.default_rng(0)
    if which == "classifier":
        cfg = M.ModelConfig(n_classes=10, d_input=1, d_model=64, d_state=64, n_layers=2,
                            activation="lif")
        x = rng.standard_normal((64, 40, 1))  # (B, L, 1)
        labels = rng.integers(0, 10, 64).astype(np.int64)  # (B,)
    else:
        cfg = M.ModelConfig.for_lm(256, d_model=64, d_state=32, n_layers=2, activation="lif")
        x = rng.integers(0, 256, (32, 128)).astype(np.int64)  # (B, L) tokens
        labels = None
    p, buf = M.init_model(cfg, 0)
    opt, groups = adamw_init(p), make_groups(p, 1e-3, 1e-2, M.optimizer_rules(1e-3))
    state = {"buf": buf}

    def step():
        _, _, g, state["buf"], _ = M.loss_and_grads(cfg, p, state["buf"], x, labels,
                                                    training=True)
        adamw_step(p, g, opt, groups)
        M.project(p, cfg)

    for _ in range(WARMUP_STEPS):
        step()
    times = []
    end = time.perf_counter() + seconds
    while len(times) < MIN_STEPS or time.perf_counter() < end:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, **_loaded()}))


def child_steady(checkpoint, length):
    """Generate ``length`` tokens through ``refimpl.sampling.generate``; prints a JSON line with
    the prompt's time, the first step's and the tokens/s after the first step."""
    from refimpl.sampling import generate
    from refimpl.stream import ModelStream
    from refimpl.text import Vocab
    from refimpl.train import load_checkpoint

    ck = load_checkpoint(checkpoint)
    ids = Vocab.from_json(ck.data_recipe["vocab_json"]).encode(PROMPT)[None]  # (1, P)
    stream = ModelStream.from_model(ck.cfg, ck.params, ck.buffers)
    marks = []  # marks[i]: token i is out; token i >= 1 took the step after marks[i - 1]
    _, info = generate(stream, ids, length, temperature=1.0, seed=0,
                       progress=lambda n: marks.append(time.perf_counter()))
    print(json.dumps({"prompt_s": info["prompt_seconds"], "first_step_s": marks[1] - marks[0],
                      "steady_tokens_per_s": (length - 2) / (marks[-1] - marks[1]),
                      **_loaded()}))


def child_main(argv):
    kind, *args = argv
    if kind == "step":
        child_step(args[0], float(args[1]))
    elif kind == "steady":
        child_steady(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown child {kind!r}")


# --------------------------------------------------------------------------------------------
# The two versions and the processes that run them
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Version:
    name: str  # "before" or "after"
    root: Path  # the tree whose refimpl (and cli) the children must import
    pythonpath: str | None


def _git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def before_tree(ref):
    """A detached ``git worktree`` of ``ref`` in a temporary folder, its ``cli/`` and
    ``golden/`` linked where the installed package has them; removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="refimpl-before-"))
    tree = tmp / "tree"
    try:
        _git("worktree", "add", "--detach", str(tree), ref)
        for link, target in (("refimpl/cli", "../cli"), ("refimpl/golden/data", "../../golden")):
            if (tree / link).parent.is_dir() and not (tree / link).exists():
                (tree / link).symlink_to(target)
        yield tree
    finally:
        if tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def child_env(version, cache_dir=None):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS + PATH_VARS}
    if version.pythonpath:
        env["PYTHONPATH"] = version.pythonpath
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    return env


def check_imported(version, *files):
    """Raise unless every imported file lies in the version's tree."""
    for f in files:
        if not Path(f).resolve().is_relative_to(version.root.resolve()):
            raise RuntimeError(f"the {version.name} child imported {f}, not the code in "
                               f"{version.root}")


def run(version, argv, workdir, cache_dir=None):
    """Run ``python argv`` for ``version`` in ``workdir`` (so that no ``refimpl`` folder of the
    current directory shadows it): ``(wall seconds, stdout, stderr)``."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], cwd=workdir, env=child_env(version, cache_dir),
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    wall = time.perf_counter() - t0
    if r.returncode:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the {version.name} child {' '.join(argv[:4])} ... failed "
                           f"(exit {r.returncode}):\n{tail}")
    return wall, r.stdout, r.stderr


def run_child(version, workdir, *args):
    """A ``--child`` of this script: its JSON, checked to come from the version's refimpl."""
    _, out, _ = run(version, [str(Path(__file__).resolve()), "--child", *map(str, args)],
                    workdir)
    res = json.loads(out.strip().splitlines()[-1])
    check_imported(version, *res.pop("refimpl_files"))
    return res


def run_cli(version, workdir, args, cache_dir=None):
    """``refimpl ARGS`` of the version: ``(wall seconds, the last line of stderr)``."""
    wall, _, err = run(version, ["-c", LAUNCH, *args], workdir, cache_dir)
    lines = err.strip().splitlines()
    imported = next(ln for ln in lines if ln.startswith("[imported] "))
    check_imported(version, *imported.split()[1:3])
    return wall, lines[-1]


@contextlib.contextmanager
def busy(n):
    """``n`` single-threaded spinners, running :data:`SPIN_UP` s before the body; all killed on
    exit, whatever ends the body."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        if n:
            time.sleep(SPIN_UP)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def load1():
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------------------------
# The two benchmarks
# --------------------------------------------------------------------------------------------


def bench_contention(versions, workdir, seconds):
    """Every (busy, step, version) point, interleaved; ``{"points", "summary"}``."""
    points = []
    for n in BUSY:
        for which in STEPS:
            for v in versions:
                start = load1()
                with busy(n):
                    res = run_child(v, workdir, "step", which, seconds)
                    end = load1()
                med = statistics.median(res["times"])
                points.append({"step": which, "version": v.name, "busy": n, "median_s": med,
                               "steps": len(res["times"]), "load_start": start,
                               "load_end": end, **res})
                log(f"{which} step, {v.name}, {n} busy: {med * 1e3:.1f} ms (median of "
                    f"{len(res['times'])}; load {start:.1f} -> {end:.1f})")
    summary = {}
    for which in STEPS:
        for v in versions:
            med = {p["busy"]: p["median_s"] for p in points
                   if (p["step"], p["version"]) == (which, v.name)}
            ratio = {n: med[n] / med[0] for n in TARGETS}
            summary.setdefault(which, {})[v.name] = {
                "median_s": {str(n): med[n] for n in BUSY},
                "ratio": {str(n): ratio[n] for n in TARGETS},
                "met": {str(n): ratio[n] <= TARGETS[n] for n in TARGETS}}
    return {"points": points, "summary": summary}


def make_checkpoints(after, workdir, families, errors):
    """One small language model per family, trained by the working tree's ``refimpl train``:
    ``{family: checkpoint path}``; a family that cannot be trained here is left out, why in
    ``errors[family]["after"]``."""
    from pydoc_data.topics import topics

    from refimpl.activations import ACTIVATIONS
    text = "\n\n".join(topics[k] for k in sorted(topics)).encode()[:TEXT_BYTES]
    corpus = workdir / "corpus.txt"
    corpus.write_bytes(text)
    out = {}
    for fam in families:
        extra = []
        if ACTIVATIONS[fam].needs_sdn_weights:
            if not SHARED_SDN.exists():
                errors[fam] = {"after": f"not trained: no SDN weights at {SHARED_SDN}"}
                log(f"skip sdn: no SDN weights at {SHARED_SDN}")
                continue
            extra = ["--sdn-weights", str(SHARED_SDN)]
        run_dir = workdir / f"lm-{fam}"
        log(f"training the {fam} model ({len(text):,} bytes, one epoch)")
        try:
            run_cli(after, workdir, ["train", "--text", str(corpus), "--activation", fam,
                                     "--d-model", "64", "--d-state", "32", "--layers", "2",
                                     "--context", "128", "--epochs", "1", "--out",
                                     str(run_dir), "--overwrite", *extra])
        except RuntimeError as e:
            errors[fam] = {"after": f"not trained: {e}"}
            log(f"{fam}: {e}")
            continue
        out[fam] = str(run_dir / "checkpoint.h5")
    return out


def bench_generate(versions, workdir, families, repeats):
    """Per family: warm and cold ``refimpl generate`` wall times and the steady rate of every
    version, interleaved; ``{"checkpoints", "runs", "steady", "summary", "errors"}``."""
    runs, steady, summary, errors = [], {}, {}, {}
    ckpts = make_checkpoints(versions[-1], workdir, families, errors)
    for fam, ckpt in ckpts.items():
        args = ["generate", ckpt, "--prompt", PROMPT, "--length", str(GEN_TOKENS), "--seed", "0"]
        ok = []
        for v in versions:  # the discarded warm-up run; it also checks that v reads the file
            try:
                run_cli(v, workdir, args)
                ok.append(v)
            except RuntimeError as e:
                errors.setdefault(fam, {})[v.name] = str(e)
                log(f"{fam}: {e}")
        for cache in ["warm"] * repeats + ["cold"] * repeats:
            for v in ok:
                cold = cache == "cold"
                with (tempfile.TemporaryDirectory(prefix="numba-cold-") if cold
                      else contextlib.nullcontext()) as fresh:  # fresh: None when warm
                    start = load1()
                    wall, line = run_cli(v, workdir, args, fresh)
                runs.append({"family": fam, "version": v.name, "cache": cache, "wall_s": wall,
                             "load_start": start, "load_end": load1(), "cli": line})
        for v in ok:
            steady.setdefault(fam, {})[v.name] = run_child(v, workdir, "steady", ckpt,
                                                           STEADY_TOKENS)
        for v in ok:
            st = steady[fam][v.name]
            s = {f"{c}_s": statistics.median(r["wall_s"] for r in runs if (
                r["family"], r["version"], r["cache"]) == (fam, v.name, c))
                for c in ("warm", "cold")}
            s.update({k: st[k] for k in ("prompt_s", "first_step_s", "steady_tokens_per_s")})
            summary.setdefault(fam, {})[v.name] = s
            log(f"{fam}, {v.name}: {GEN_TOKENS} tokens in {s['warm_s']:.2f} s warm, "
                f"{s['cold_s']:.2f} s cold; first step {s['first_step_s'] * 1e3:.0f} ms, "
                f"{s['steady_tokens_per_s']:.0f} tokens/s")
    return {"checkpoints": ckpts, "runs": runs, "steady": steady, "summary": summary,
            "errors": errors}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _ms(t):
    return f"{t * 1e3:.1f} ms"


def _s(t):
    return f"{t:.2f} s"


def _pool(point):
    """The threads a point ran on: refimpl's pool where the version has one, else Numba's."""
    r = point["refimpl_threads"]
    return point["numba_get_num_threads"] if r is None else r


def _pair(d, key, fmt):
    """``before -> after`` of one figure (``-`` where a version has none)."""
    return " → ".join(fmt(d[v][key]) if v in d else "-" for v in ("before", "after"))


def _measured(run):
    """When and on what a section was measured."""
    b, a = run["versions"]["before"], run["versions"]["after"]
    return (f"Measured {run['date']} (1-minute load average {run['loadavg'][0]:.2f} at the "
            f"start, {run['loadavg'][1]:.2f} at the end); *before*: refimpl at `{b['ref']}` "
            f"(`{b['commit']}`), *after*: the working tree at `{a['commit']}`."
            + (" **Quick smoke test: not the reference figures.**"
               if run["settings"]["quick"] else ""))


def render(doc):
    m = doc["machine"]
    lines = ["## Threads under contention and the first step (issue 25)", "",
             f"On {m['cpu_model']} ({m['cpu_count']} cores, {m['cpu_affinity']} usable). Every "
             "figure comes from a fresh process without "
             + ", ".join(f"`{k}`" for k in THREAD_VARS) + " in its environment, so that each "
             "version runs on the threads it chooses itself; the versions alternate point by "
             "point (`benchmarks/contention.py`; raw times, loads and thread settings in "
             "`benchmarks/contention.json`). Each ratio and each before/after pair comes from "
             "one run."]
    c = doc.get("contention")
    if c:
        st = c["run"]["settings"]
        lines += ["", f"One training step (forward, backward, AdamW, projection): the median "
                      f"of the steps of {st['seconds']:g} s (at least {MIN_STEPS}) after "
                      f"{WARMUP_STEPS} warm-up steps, quiet and beside 2 and 4 busy processes "
                      "(single-threaded `while True: pass`, started "
                      f"{SPIN_UP:g} s before); x = the median under load / the quiet median of "
                      "the same version; threads: the version's pool (refimpl's, else Numba's) "
                      "at the end of the quiet / 2 busy / 4 busy point. " + _measured(c["run"]),
                  "",
                  "| step | version | threads | quiet | 2 busy | x | 4 busy | x | "
                  "target | met | load (1 min) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
        target = " / ".join(f"≤ {TARGETS[n]:g}x" for n in TARGETS)
        for which in STEPS:
            for name, r in c["summary"][which].items():
                pts = [p for p in c["points"] if (p["step"], p["version"]) == (which, name)]
                loads = [x for p in pts for x in (p["load_start"], p["load_end"])]
                med, ratio = r["median_s"], r["ratio"]
                met = " / ".join("yes" if r["met"][str(n)] else "**no**" for n in TARGETS)
                lines.append(f"| {STEP_TITLES[which]} | {name} | "
                             f"{' / '.join(str(_pool(p)) for p in pts)} | "
                             f"{_ms(med['0'])} | "
                             f"{_ms(med['2'])} | {ratio['2']:.2f}x | {_ms(med['4'])} | "
                             f"{ratio['4']:.2f}x | {target} | {met} | "
                             f"{min(loads):.1f}-{max(loads):.1f} |")
    g = doc.get("generate")
    if g:
        n = g["run"]["settings"]["repeats"]
        lines += ["", f"`refimpl generate CKPT --length {GEN_TOKENS}` from a fresh process, "
                      "wall time, Numba's compilation included: warm cache (one run discarded, "
                      f"then the median of {n}) and cold (`NUMBA_CACHE_DIR` a new empty folder "
                      f"each run, median of {n}). First step and steady tokens/s: "
                      f"{STEADY_TOKENS} tokens through `refimpl.sampling.generate` in one "
                      "process (warm cache): its first step, compilation included, and the "
                      "rate of the steps after it. Models: bytes, d_model 64, d_state 32, "
                      f"2 layers, one epoch on {TEXT_BYTES // 1000} KB of Python's pydoc "
                      "topics, trained by the *after* code. Each cell: before → after. "
                      + _measured(g["run"]), "",
                  f"| family | {GEN_TOKENS} tokens, warm cache | {GEN_TOKENS} tokens, cold "
                  "cache | first step | steady tokens/s |",
                  "|---|---:|---:|---:|---:|"]
        for fam, d in g["summary"].items():
            lines.append(f"| {fam} | {_pair(d, 'warm_s', _s)} | {_pair(d, 'cold_s', _s)} | "
                         f"{_pair(d, 'first_step_s', _ms)} | "
                         f"{_pair(d, 'steady_tokens_per_s', lambda t: f'{t:.0f}')} |")
        errors = [f"- {fam}, {name}: {e.splitlines()[-1]}"
                  for fam, errs in g["errors"].items() for name, e in errs.items()]
        lines += [""] + errors if errors else []
    return "\n".join(lines) + "\n"


def machine(cpu_model):
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "python_executable": sys.executable}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/contention.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=DEFAULT_BEFORE, help="git ref of the *before* code")
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="timed steps per contention point (after the warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="generate runs per median")
    ap.add_argument("--only", choices=("contention", "generate"),
                    help="run one benchmark; the other's figures stay as the JSON holds them")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test (0.5 s per point, one repeat, lif only; needs --out-dir)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="write contention.json and BENCHMARKS.md here (required with --quick)")
    args = ap.parse_args(argv)
    if args.quick and args.out_dir is None:
        ap.error("--quick would overwrite the committed results: pass --out-dir")
    if args.quick:
        args.seconds, args.repeats = 0.5, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    import harness

    from refimpl.atomic import atomic_write_json, atomic_write_text

    out_json = (args.out_dir or HERE) / "contention.json"
    out_md = (args.out_dir or ROOT) / "BENCHMARKS.md"
    doc = json.loads(out_json.read_text()) if out_json.exists() else {"schema": SCHEMA}
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"{out_json} is not a {SCHEMA} file; fix or delete it, then rerun")
    dirty = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    with tempfile.TemporaryDirectory(prefix="refimpl-contention-") as tmp, \
            before_tree(args.before) as tree:
        workdir = Path(tmp)
        versions = [Version("before", tree, str(tree)), Version("after", ROOT, None)]
        run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "versions": {"before": {"ref": args.before, "path": str(tree),
                                       "commit": _git("rev-parse", "--short=12", "HEAD",
                                                      cwd=tree)},
                            "after": {"path": str(ROOT), "modified": dirty,
                                      "commit": _git("rev-parse", "--short=12", "HEAD")
                                      + ("+dirty" if dirty else "")}},
               "child_env": {"removed": {k: os.environ.get(k) for k in THREAD_VARS + PATH_VARS},
                             "PYTHONPATH": {"before": str(tree), "after": None},
                             "NUMBA_CACHE_DIR": "cold generate runs: a new empty folder each; "
                                                "else unset (the cache beside the sources)",
                             "cwd": "a temporary folder"},
               "settings": {"seconds": args.seconds, "repeats": args.repeats,
                            "quick": args.quick, "warmup_steps": WARMUP_STEPS,
                            "min_steps": MIN_STEPS, "spin_up_s": SPIN_UP}}
        doc["machine"] = machine(harness.cpu_model())
        log(f"before = {args.before} ({run['versions']['before']['commit']}) in {tree}; "
            f"after = {ROOT} ({run['versions']['after']['commit']})")
        benches = {"contention": lambda: bench_contention(versions, workdir, args.seconds),
                   "generate": lambda: bench_generate(
                       versions, workdir, ("lif",) if args.quick else FAMILIES, args.repeats)}
        for name, bench in benches.items():
            if args.only in (None, name):
                start = load1()
                doc[name] = bench()
                doc[name]["run"] = {**run, "loadavg": [start, load1()]}
                # after each benchmark: an interrupted run keeps what it measured
                atomic_write_json(out_json, doc)
                md = out_md.read_text() if out_md.exists() else None
                atomic_write_text(out_md, harness.merge_markdown(md, {REGION: render(doc)}))
                log(f"wrote {out_json} and the {REGION!r} region of {out_md}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        main()
