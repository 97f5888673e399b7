"""The benchmark harness: group registry, timing, machine record, results JSON, BENCHMARKS.md.

A benchmark *group* is a function registered with :func:`register`; it receives a
:class:`Context` and adds rows to it with :meth:`Context.compare` (refimpl beside a plain NumPy
baseline of the same math, checked with ``allclose`` before anything is timed) or
:meth:`Context.absolute` (refimpl alone). ``run.py`` imports every ``benchmarks/bench_*.py``
module, so a later issue adds a group by adding one file::

    from harness import register
    from refimpl.neurons import NeuronConfig, neuron_fwd

    @register("neurons", title="Spiking neurons", order=20)
    def neurons(ctx):
        x = ...  # (B, H, L) float64
        cfg = NeuronConfig(reset="hard", tau=0.125, theta=1.0)
        ctx.compare("LIF hard reset", {"B": 8, "H": 128, "L": 2048},
                    refimpl=lambda: neuron_fwd(x, cfg), baseline=lambda: numpy_lif(x),
                    baseline_name="NumPy loop over t", rtol=1e-12)

Timing: one warm-up call per function (it triggers Numba compilation and is not timed), then
``repeats`` timed calls with the garbage collector off. When a figure has a baseline the two
are timed alternately (refimpl, baseline, refimpl, ...) so that load changes on a shared
machine hit both alike. Each figure records the median (the reported number), the min and
every individual time.

The runners (``run.py``, ``task_runs.py``) write files with :mod:`refimpl.atomic` (a temporary
file in the same folder, renamed into place), so an interrupted run never leaves half a results
file.

This module is not part of the library: it may print, and it never changes refimpl's state.
"""
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

SCHEMA = "refimpl-benchmarks"
SCHEMA_VERSION = 1

#: name -> Group, filled by :func:`register` when the ``bench_*`` modules are imported.
GROUPS = {}

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    fn: object
    title: str
    description: str
    order: int


def register(name, title, description="", order=100):
    """Decorator registering ``fn(ctx)`` as the benchmark group ``name``.

    ``order`` sorts the groups in listings and in a freshly created BENCHMARKS.md (existing
    generated regions keep their place in the file).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"group name must match [a-z][a-z0-9_]*, got {name!r}")

    def deco(fn):
        if name in GROUPS:
            raise ValueError(f"benchmark group {name!r} is registered twice "
                             f"({GROUPS[name].fn.__module__} and {fn.__module__})")
        GROUPS[name] = Group(name, fn, title, description, order)
        return fn

    return deco


def sorted_groups():
    return sorted(GROUPS.values(), key=lambda g: (g.order, g.name))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _stats(times):
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "times_s": list(times),
    }


def warm_up(fns):
    """Call each of ``fns`` once (Numba compiles here); returns their outputs."""
    return [fn() for fn in fns]


def time_calls(fns, repeats):
    """Time each of ``fns`` ``repeats`` times, interleaved, with the garbage collector off.

    Returns, per function, ``{"median_s", "min_s", "repeats", "times_s"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = [[] for _ in fns]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [_stats(t) for t in times]


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_same(figure, ref_out, base_out, rtol):
    """Assert that refimpl and the baseline computed the same numbers.

    Each output pair must satisfy ``max|ref - base| <= rtol * max|base|`` (a normwise relative
    bound: the right measure for FFT and summation-order differences). Returns the largest
    normwise relative error seen.
    """
    ref_out, base_out = _as_tuple(ref_out), _as_tuple(base_out)
    if len(ref_out) != len(base_out):
        raise AssertionError(f"{figure}: refimpl returned {len(ref_out)} outputs, "
                             f"the baseline {len(base_out)}")
    worst = 0.0
    for k, (a, b) in enumerate(zip(ref_out, base_out)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise AssertionError(f"{figure}: output {k} has shape {a.shape} in refimpl "
                                 f"but {b.shape} in the baseline")
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        atol = rtol * max(scale, np.finfo(np.float64).tiny)
        np.testing.assert_allclose(a, b, rtol=0, atol=atol,
                                   err_msg=f"{figure}: refimpl and baseline differ (output {k})")
        if b.size:
            worst = max(worst, float(np.max(np.abs(a - b))) / max(scale, np.finfo(float).tiny))
    return worst


class Context:
    """What a group function receives: run settings and the row collector."""

    def __init__(self, group, repeats, quick, progress):
        self.group = group
        self.repeats = repeats
        self.quick = quick
        self.progress = progress
        self.rows = []
        self.params = {}

    def compare(self, figure, shape, refimpl, baseline, baseline_name, rtol,
                target_speedup=None, note=""):
        """Time ``refimpl()`` beside ``baseline()`` after checking they agree to ``rtol``.

        ``shape`` is a dict such as ``{"B": 8, "H": 128, "N": 64, "L": 2048}``;
        ``target_speedup`` (baseline / refimpl) is optional. ``rtol=None`` marks a baseline
        that is a *bound* rather than the same math (e.g. a streaming copy of the same bytes):
        its outputs are not compared.
        """
        self.progress(f"{figure} [{format_shape(shape)}]: warm-up and check")
        ref_out, base_out = warm_up([refimpl, baseline])
        err = None if rtol is None else check_same(figure, ref_out, base_out, rtol)
        del ref_out, base_out
        self.progress(f"{figure}: timing {self.repeats} repeats")
        ref_t, base_t = time_calls([refimpl, baseline], self.repeats)
        speedup = base_t["median_s"] / ref_t["median_s"]
        row = {
            "figure": figure,
            "shape": dict(shape),
            "refimpl": ref_t,
            "baseline": dict(base_t, name=baseline_name),
            "speedup": speedup,
            "target_speedup": target_speedup,
            # targets hold at the reference shapes only: not judged on --quick shapes
            "target_met": (None if target_speedup is None or self.quick
                           else bool(speedup >= target_speedup)),
            "check": None if rtol is None else {"rtol": rtol, "max_rel_err": err},
            "note": note,
        }
        self.rows.append(row)
        self.progress(f"{figure}: refimpl {format_time(ref_t['median_s'])}, "
                      f"baseline {format_time(base_t['median_s'])}, speedup {speedup:.2f}x"
                      + ("" if row["target_met"] is None else
                         f" (target >= {target_speedup:g}x: "
                         f"{'met' if row['target_met'] else 'MISSED'})"))
        return row

    def absolute(self, figure, shape, refimpl, note=""):
        """Time ``refimpl()`` alone (no baseline)."""
        self.progress(f"{figure} [{format_shape(shape)}]: warm-up and timing "
                      f"{self.repeats} repeats")
        warm_up([refimpl])
        (ref_t,) = time_calls([refimpl], self.repeats)
        row = {
            "figure": figure,
            "shape": dict(shape),
            "refimpl": ref_t,
            "baseline": None,
            "speedup": None,
            "target_speedup": None,
            "target_met": None,
            "check": None,
            "note": note,
        }
        self.rows.append(row)
        self.progress(f"{figure}: refimpl {format_time(ref_t['median_s'])}")
        return row


# --------------------------------------------------------------------------------------------
# Machine record
# --------------------------------------------------------------------------------------------


def cpu_model():
    """The CPU model name (/proc/cpuinfo, lscpu, or platform), for the machine records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit(root):
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], **run)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module):
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
        return None


def _threads_now():
    """refimpl's thread count when the run starts (auto: the free cores then)."""
    from refimpl import threads
    return threads.count()


def machine_info(root):
    """Where and with what the figures were measured."""
    import numba

    import refimpl
    from refimpl import config

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": _version("scipy"),
        "refimpl": refimpl.__version__,
        "git_commit": _git_commit(root),
        "REFIMPL_THREADS_env": os.environ.get("REFIMPL_THREADS"),
        "refimpl_threads": _threads_now(),
        "refimpl_fastmath": bool(config.FASTMATH),
        "thread_env": {k: os.environ[k] for k in
                       ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                       if k in os.environ},
    }


# --------------------------------------------------------------------------------------------
# Files: results JSON (written atomically by refimpl.atomic)
# --------------------------------------------------------------------------------------------


def load_results(path):
    """The stored results, or an empty document when the file does not exist yet.

    A file that exists but cannot be read as this schema is an error (it may hold other
    groups' results: never overwrite it silently).
    """
    path = Path(path)
    if not path.exists():
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "machine": None,
                "groups": {}}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read {path}: {e}; fix or delete it, then rerun") from e
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise SystemExit(f"{path} is not a {SCHEMA} file; fix or delete it, then rerun")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise SystemExit(f"{path} has schema_version {doc.get('schema_version')!r}, this harness "
                         f"writes {SCHEMA_VERSION}; rerun all groups into a fresh file")
    doc.setdefault("groups", {})
    return doc


def dump_results(doc):
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


# --------------------------------------------------------------------------------------------
# BENCHMARKS.md
# --------------------------------------------------------------------------------------------

BEGIN = "<!-- generated:begin {} -->"
END = "<!-- generated:end {} -->"
#: A marker is a line of its own, so prose that quotes one is not taken for one.
_REGION_RE = re.compile(r"^<!-- generated:(begin|end) (\S+) -->[ \t]*$", re.MULTILINE)

_PREAMBLE = """# Benchmarks

Timings of refimpl on the machine below, each beside a plain NumPy baseline of the same math
measured in the same run (speedup = baseline median / refimpl median). Regenerate with
`make bench` (all groups) or `.venv/bin/python benchmarks/run.py --only GROUP`; the raw
numbers, including every individual time, are in `benchmarks/results.json`.

Each region between a `generated:begin NAME` and a `generated:end NAME` comment line is rewritten
from the JSON on every run; everything outside those regions is kept, so add notes there.
"""

_NOTES = """## Notes

(Hand-written notes go here, outside the generated regions.)
"""


def format_time(s):
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def format_shape(shape):
    return " ".join(f"{k}={v}" for k, v in shape.items())


def render_machine(m):
    if not m:
        return "## Machine\n\n(no run recorded yet)\n"
    cores = f"{m['cpu_count']}"
    if m.get("cpu_affinity") not in (None, m["cpu_count"]):
        cores += f" ({m['cpu_affinity']} usable by this process)"
    lines = [
        "## Machine",
        "",
        f"Latest run: {m['date']}" + (f", refimpl {m['refimpl']} at commit `{m['git_commit']}`"
                                      if m.get("git_commit") else f", refimpl {m['refimpl']}"),
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']} |",
        f"| cores | {cores} |",
        f"| memory | {m['mem_total_gib']} GiB |" if m.get("mem_total_gib") else None,
        f"| platform | {m['platform']} |",
        f"| Python | {m['python']} |",
        f"| NumPy / SciPy / Numba | {m['numpy']} / {m['scipy']} / {m['numba']} |",
        f"| refimpl threads | {m.get('refimpl_threads', '?')} at the start "
        f"(REFIMPL_THREADS: {m.get('REFIMPL_THREADS_env') or 'auto'}) |",
        f"| refimpl fastmath | {'on' if m['refimpl_fastmath'] else 'off'} |",
    ]
    if m.get("thread_env"):
        lines.append("| thread settings | "
                     + ", ".join(f"{k}={v}" for k, v in m["thread_env"].items()) + " |")
    return "\n".join(x for x in lines if x is not None) + "\n"


def render_group(name, g, latest_machine):
    m = g.get("machine") or {}
    lines = [f"## `{name}`: {g.get('title') or name}", ""]
    if g.get("description"):
        lines += [g["description"], ""]
    when = f"Measured {m.get('date', '?')}"
    if latest_machine and (m.get("cpu_model"), m.get("cpu_count")) != (
            latest_machine.get("cpu_model"), latest_machine.get("cpu_count")):
        when += f" on another machine ({m.get('cpu_model')}, {m.get('cpu_count')} cores)"
    n = g["repeats"]
    when += (f"; median of {n} repeat{'s' if n != 1 else ''} after a warm-up call "
             "(min in parentheses); "
             "speedup = baseline median / refimpl median.")
    lines.append(when)
    if g.get("quick"):
        lines += ["", "**Quick smoke-test shapes: these are not the reference figures.** "
                      "Rerun without `--quick`."]
    lines += ["",
              "| figure | shape | refimpl median (min) | baseline | baseline median (min) "
              "| speedup | target | met |",
              "|---|---|---:|---|---:|---:|---:|:---:|"]
    for r in g["rows"]:
        ref = r["refimpl"]
        base = r.get("baseline")
        cells = [
            r["figure"],
            format_shape(r["shape"]),
            f"{format_time(ref['median_s'])} ({format_time(ref['min_s'])})",
            base["name"] if base else "-",
            f"{format_time(base['median_s'])} ({format_time(base['min_s'])})" if base else "-",
            f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-",
            f">= {r['target_speedup']:g}x" if r.get("target_speedup") is not None else "-",
            {True: "yes", False: "**no**", None: "-" if not g.get("quick") else "n/a"}[
                r.get("target_met")],
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"- {r['figure']}: {r['note']}" for r in g["rows"] if r.get("note")]
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def render_regions(doc):
    """Region id -> generated markdown, in display order (machine first, then the groups)."""
    regions = {"machine": render_machine(doc.get("machine"))}
    order = {g.name: (g.order, g.name) for g in GROUPS.values()}
    names = sorted(doc["groups"], key=lambda n: order.get(n, (10**9, n)))
    for name in names:
        regions[f"group:{name}"] = render_group(name, doc["groups"][name], doc.get("machine"))
    return regions


def _wrap(rid, body):
    return f"{BEGIN.format(rid)}\n{body.rstrip()}\n{END.format(rid)}"


def merge_markdown(existing, regions):
    """Replace the generated regions of ``existing`` with ``regions``; keep all other text.

    Regions present in ``regions`` but not in the file are appended; regions in the file that
    ``regions`` does not know are left as they are. Unbalanced or nested markers raise
    ValueError rather than risk deleting hand-written text.
    """
    if existing is None:
        parts = [_PREAMBLE] + [_wrap(rid, body) + "\n" for rid, body in regions.items()]
        return "\n".join(parts + [_NOTES])
    spans = []
    open_id, open_at = None, None
    for m in _REGION_RE.finditer(existing):
        kind, rid = m.group(1), m.group(2)
        if kind == "begin":
            if open_id is not None:
                raise ValueError(f"BENCHMARKS.md: region {rid!r} begins inside region "
                                 f"{open_id!r}; fix the markers by hand")
            open_id, open_at = rid, m.start()
        else:
            if rid != open_id:
                raise ValueError(f"BENCHMARKS.md: 'generated:end {rid}' does not close an open "
                                 f"region (open: {open_id!r}); fix the markers by hand")
            spans.append((open_at, m.end(), rid))
            open_id = None
    if open_id is not None:
        raise ValueError(f"BENCHMARKS.md: region {open_id!r} has no end marker; fix by hand")
    seen = {rid for _, _, rid in spans}
    if len(seen) != len(spans):
        raise ValueError("BENCHMARKS.md: a generated region appears twice; fix by hand")
    new = "".join("\n\n" + _wrap(rid, body) for rid, body in regions.items() if rid not in seen)
    if not spans:  # no generated region yet: append everything at the end
        return existing.rstrip("\n") + new + "\n"
    out, pos = [], 0
    for start, end, rid in spans:
        out.append(existing[pos:start])
        out.append(_wrap(rid, regions[rid]) if rid in regions else existing[start:end])
        pos = end
    out.append(new)  # new regions go right after the last generated one (notes stay below)
    out.append(existing[pos:])
    return "".join(out)
