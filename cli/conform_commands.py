"""``refimpl conform``: property-based differential testing of a live backend (issue 24)."""
import json
import sys

import click

from refimpl.atomic import atomic_write_text
from refimpl.campaign import CampaignError
from refimpl.h5io import FileFormatError
from refimpl.conform.limits import Limits
from refimpl.ops import all_ops, config_fields
from refimpl.table import render_table

from . import options
from .common import fail, progress


#: The --max-* options: a field of Limits each (its default), its least value, its help.
LIMIT_OPTIONS = (("batch", 1, "Largest batch B of an example."),
                 ("channels", 1, "Largest channel count H."),
                 ("length", 1, "Largest sequence length L."),
                 ("state", 2, "Largest S4D state size N (even)."),
                 ("vocab", 1, "Largest vocabulary or class count V."),
                 ("features", 1, "Largest input and output width of linear."))


def _parse_config(values):
    """``--config [OP.]NAME=VALUE`` -> ``{op or None: {name: value}}`` (numbers and booleans
    parsed, strings kept)."""
    out = {}
    for text in values:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{text!r}: expected NAME=VALUE or OP.NAME=VALUE",
                                     param_hint="--config")
        op, _, name = key.strip().rpartition(".")
        low = raw.strip().lower()
        if low in ("true", "false"):
            value = low == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw.strip()
        out.setdefault(op or None, {})[name] = value
    return out


def _list_ops():
    rows = []
    for name, op in all_ops().items():
        cfg = ", ".join(config_fields(op.config)) if op.config is not None else "-"
        opt = [n for n in op.inputs + op.params if n in op.optional]
        rows.append([name, ", ".join(op.inputs) or "-",
                     ", ".join(op.params) + (f" (optional: {', '.join(opt)})" if opt else ""),
                     ", ".join(op.outputs), cfg,
                     ", ".join(op.state._fields) if op.state is not None else "-"])
    click.echo(render_table(["op", "inputs", "params", "outputs", "config", "state"], rows))


def _report_table(report):
    rows = []
    for name, t in report["ops"].items():
        if "skipped" in t:
            rows.append([name, "-", "-", "SKIPPED", t["skipped"]])
            continue
        m = t["minimal"]
        forms = "+".join(t["forms"]) + ("" if t["gradients"] else " (forward only)")
        if m is None:
            rows.append([name, str(t["examples"]), forms, "PASS", "-"])
        else:
            first = m["rows"][0] if m["rows"] else {}
            size = " ".join(f"{k}={v}" for k, v in m["sizes"].items())
            what = f"{first.get('status', '')} {first.get('tensor', '')} {first.get('index', '')}"
            if first.get("tensor", "-") == "-":  # a case-level row (ERROR, NOT_REJECTED)
                what = f"{first.get('status', '')}: {first.get('detail', '')[:120]}"
            rows.append([name, str(t["examples"]), forms, "FAIL",
                         f"{m['path']} ({m['form']}; {size}): {what.strip()}"])
    return render_table(["op", "examples", "forms", "verdict", "minimal case"], rows)


@click.command()
@click.argument("adapter", required=False)
@click.option("--op", "ops", multiple=True, metavar="NAME",
              help="Only this op (repeatable); default: every op the adapter provides.")
@options.backend_precision_opt
@click.option("--examples", default=20, show_default=True, type=click.IntRange(min=1),
              help="Examples per op (drawn by hypothesis; a failure ends its task early).")
@options.seed_opt()
@options.compose(*(click.option(f"--max-{field}", f"max_{field}", default=getattr(Limits, field),
                                show_default=True, type=click.IntRange(min=low), help=text)
                   for field, low, text in LIMIT_OPTIONS))
@click.option("--config", "config", multiple=True, metavar="[OP.]NAME=VALUE",
              help="Fix a configuration field in every example (e.g. reset=soft, "
                   "neuron.spike_condition=gt); repeatable; over the adapter's CONFIG.")
@click.option("--no-invalid", is_flag=True,
              help="Never draw invalid examples (the backend need not reject anything).")
@click.option("--out", "out", default="conform-failures", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder for the minimal failing cases (<op>.h5, golden format).")
@options.workers_opt
@options.scheduler_opt
@click.option("--command", metavar="CMD", default=None,
              help="A backend that is not Python: CMD reads {cases} and writes {candidate} "
                   "(golden candidate layout); needs --op.")
@click.option("--replay", metavar="CASES.h5", type=click.Path(dir_okay=False), default=None,
              help="Instead of a campaign: run the adapter on the cases of this golden-format "
                   "file and write its candidate to --candidate.")
@click.option("--candidate", metavar="OUT.h5", type=click.Path(dir_okay=False), default=None,
              help="With --replay: the candidate file to write.")
@click.option("--list-ops", is_flag=True, help="List the ops, their arguments and exit.")
@options.json_opt
def conform(adapter, ops, precision, examples, seed, config, no_invalid, out, workers,
            scheduler, command, replay, candidate, list_ops, json_path, **max_sizes):
    """Check a backend against refimpl on examples drawn by hypothesis.

    ADAPTER names a Python adapter: a file (path/to/adapter.py) or module, optionally with
    :NAME for an object in it, with a function per op it implements (the protocol:
    `python -c "import refimpl.conform; help(refimpl.conform)"`). For each op, hypothesis draws
    configurations and inputs up to the --max-* sizes (values near thresholds, tiny and huge
    dt, stateful starts, invalid inputs to reject); refimpl builds the golden case (reference
    and bounds), the backend computes it (whole, chunked and step by step where it has those
    forms), the verifier judges it at --precision. A failure is shrunk to a minimal case and
    written to --out/<op>.h5, a golden-format file that `refimpl golden verify` reproduces.
    Deterministic for a seed and a number of examples, whatever --workers or --scheduler.
    Exits 1 on any failure.

    Examples:

    \b
      refimpl conform my_backend.py --op neuron --precision float32 --max-length 4096
      refimpl conform --command './mybackend {cases} {candidate}' --op fftconv
      refimpl conform my_backend.py --replay failures/neuron.h5 --candidate cand.h5

    The last writes the candidate of a minimal case, which `refimpl golden verify cand.h5
    --golden failures/` judges (a regression case to commit beside the backend).
    """
    from refimpl.conform import engine as E  # hypothesis: loaded when conform runs, not at start
    if list_ops:
        _list_ops()
        return
    if (adapter is None) == (command is None):
        fail("give an ADAPTER (a Python file or module) or --command, not both or neither")
    if replay is not None or candidate is not None:
        if replay is None or candidate is None:
            fail("--replay and --candidate go together: the case file and the candidate to "
                 "write")
        try:
            path = E.replay(adapter, replay, candidate, command=command)
        except (E.AdapterError, FileFormatError, ValueError, OSError) as e:
            fail(e)
        click.echo(f"wrote {path}; check it with: refimpl golden verify {path} --golden "
                   f"{_dir_of(replay)} --precision {precision}")
        return
    fixed = _parse_config(config)
    limits = Limits(**{field: max_sizes[f"max_{field}"] for field, _, _ in LIMIT_OPTIONS})
    try:
        if None in fixed:  # unqualified NAME=VALUE: every op whose config has NAME
            common = fixed.pop(None)
            for name in (ops or all_ops()):
                op = all_ops().get(name)
                fields = config_fields(op.config) if op is not None and op.config else ()
                sel = {k: v for k, v in common.items() if k in fields}
                if sel:
                    fixed[name] = {**sel, **fixed.get(name, {})}
        tasks, _, _ = E.plan(adapter, ops, examples, seed, precision, limits, fixed,
                             not no_invalid, command)
        with progress(len(tasks), f"conform ({examples} examples per op)") as bar:
            report = E.conform(adapter, ops=ops or None, precision=precision,
                               examples=examples, seed=seed, limits=limits, out=out,
                               workers=workers, scheduler=scheduler, fixed=fixed,
                               invalid=not no_invalid, command=command,
                               progress=bar.update)
    except (E.AdapterError, CampaignError, ValueError, OSError, ImportError) as e:
        fail(e)
    click.echo(_report_table(report))
    for name, t in report["ops"].items():
        if t.get("discarded"):  # refimpl could not build an example: a gap of the strategies
            click.echo(f"note: {name}: {len(t['discarded'])} example(s) discarded, refimpl "
                       f"could not build them: {t['discarded'][0]}", err=True)
        if t.get("removed"):
            click.echo(f"note: {name} passes now: removed {t['removed']} of an earlier run",
                       err=True)
    failed = [n for n, t in report["ops"].items() if t["failures"]]
    if failed:
        click.echo(f"FAILED: {', '.join(failed)}; reproduce a minimal case with "
                   f"`refimpl conform ADAPTER --replay {out}/<op>.h5 --candidate cand.h5` "
                   f"and `refimpl golden verify cand.h5 --golden {out} --precision {precision}`")
    else:
        click.echo(f"PASSED: {len(report['ops'])} op(s) at {precision}")
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2, default=str) + "\n")
    if failed:
        sys.exit(1)


def _dir_of(path):
    import os
    return os.path.dirname(os.path.abspath(path))
