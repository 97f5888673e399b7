"""``refimpl golden``: generate, verify, check and show golden HDF5 traces (thin click layer).

All the work is in :mod:`refimpl.golden`; this module parses options, prints what the library
returns and turns file errors into one-line messages (no traceback).
"""
import json
import math
import os
import sys

import click

from refimpl import golden as G
from refimpl.atomic import atomic_write_json, check_destination
from refimpl.campaign import CampaignError, check_options
from refimpl.h5io import FileFormatError

from . import options
from .common import fail, progress


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # NaN / inf are not JSON
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _write_report(path, report, error=None):
    """Write the JSON report; a failed write (a full disk, an I/O error) stops the command with
    one line (after ``error``, the command's own failure, if there is one), the report file as
    it was before."""
    try:
        atomic_write_json(path, _jsonable(report))
    except OSError as e:
        fail(f"{error}; and --json: {e}" if error else f"--json: {e}")


def _check_json(path, inputs=(), golden_dirs=()):
    """Refuse a ``--json`` destination before any work: one of the command's input files,
    anything inside a golden folder (the one read and the installed set), a place where no
    file can be created, or an existing file that is not JSON (an earlier report may be
    replaced; any other file is not ours to destroy)."""
    if not path:
        return
    protected = [*inputs, *golden_dirs, G.DEFAULT_DIR]
    try:
        path = check_destination(path, overwrite=True, protected=protected)
    except (OSError, ValueError) as e:
        fail(f"--json: {e}")
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):
            fail(f"--json: refusing to replace {path}: it exists and is not a JSON report; "
                 f"remove it or choose another path")


@click.group()
def golden():
    """Golden HDF5 traces: the contract with other backends.

    One file per suite (golden/SCHEMA.md) holds, case by case, the inputs, outputs and
    gradients of one op. 'show' lists what a suite or file holds, 'verify' checks a backend's
    candidate file against the golden files, 'check' recomputes the committed files with the
    installed refimpl, and 'generate' writes them.

    Examples:

    \b
      refimpl golden show fftconv
      refimpl golden verify my_backend/neuron.h5 --precision float32 --select reset=hard
      refimpl golden check --suite neuron
    """


@golden.command()
@options.suites_opt
@click.option("--out", "out_dir", default=str(G.DEFAULT_DIR), show_default=True,
              type=click.Path(file_okay=False), help="Folder for <suite>.h5.")
@options.overwrite_opt
@click.option("--missing-only", is_flag=True,
              help="Write only the suites whose file is absent (continue an interrupted run; "
                   "every suite file is written atomically, so a present one is complete).")
@options.seed_opt(0)
@click.option("--size", default="small", show_default=True, type=click.Choice(G.SIZES),
              help="'small' is the committed set; 'large' has 8x longer sequences.")
@options.workers_opt
@options.scheduler_opt
def generate(suites, out_dir, overwrite, missing_only, seed, size, workers, scheduler):
    """Write the golden files, one <suite>.h5 per suite.

    Every file is float64, deterministic for --seed and written atomically; generation refuses
    to run with fast-math on. After an interrupted run, --missing-only writes the absent
    suites. The default --out is the committed set: replacing it needs --overwrite. The cases
    are computed on a pool of local processes (--workers) or on a Dask cluster (--scheduler),
    and the files written here, one suite at a time: the same files whichever.

    Examples:

    \b
      refimpl golden generate --suite neuron --out /tmp/golden
      refimpl golden generate --suite fftconv --size large --out golden-large --workers 2
      refimpl golden generate --out golden-new --missing-only
    """
    names = list(suites) or list(G.SUITES)
    try:
        check_options(workers, scheduler)
        names = [n for n, _ in G.plan_generate(out_dir, names, overwrite, missing_only)]
    except (OSError, RuntimeError, ValueError) as e:
        fail(e)
    try:
        total = sum(len(G.suite_specs(n, seed, size)) for n in names)
        with progress(total, "golden cases") as bar:
            paths = G.generate(out_dir, names, seed=seed, size=size, overwrite=overwrite,
                               progress=bar.update, missing_only=missing_only, workers=workers,
                               scheduler=scheduler) if names else []
    except (CampaignError, OSError, RuntimeError, ValueError) as e:
        fail(e)
    if missing_only and not paths:
        click.echo(f"{out_dir}: every requested suite file exists; nothing to write")
    for p in paths:
        gf = G.read_golden(p)
        counts = {}
        for c in gf.cases.values():
            counts[c.result] = counts.get(c.result, 0) + 1
        detail = ", ".join(f"{v} {k}" for k, v in counts.items())
        click.echo(f"{p}: {len(gf.cases)} cases ({detail}), {os.path.getsize(p) / 1024:.0f} KiB")


@golden.command()
@click.argument("candidates", nargs=-1, required=True, type=click.Path(dir_okay=False))
@options.golden_dir_opt
@options.json_opt
@click.option("--skip", multiple=True, metavar="PATTERN",
              help="Skip cases or datasets matching a glob over 'ID' or 'ID/outputs/NAME' "
                   "(e.g. '*/outputs/iterations'); repeatable. Skipped ones never fail.")
@options.backend_precision_opt
@click.option("--select", "select", multiple=True, metavar="EXPR",
              help="Only cases with NAME=VALUE (a case attribute, e.g. 'reset=hard') or "
                   "'flag:NAME'; repeatable (all must hold).")
@options.verbose_opt
def verify(candidates, golden_dir, json_path, skip, precision, select, verbose):
    """Compare a backend's candidate files with the golden ones.

    Each of CANDIDATES (one file per suite) has root attributes schema =
    'refimpl-golden-candidate', schema_version = 1, suite = '<suite>', and
    /cases/<id>/outputs/<name> and /cases/<id>/grads/<name> datasets (an 'error' attribute on
    /cases/<id> says the backend rejected the case). Prints PASS or the worst mismatch per
    tensor; exits 1 on any MISMATCH, MISSING, SHAPE, DTYPE, NOT_REJECTED, ERROR or EXTRA row.
    Golden files are only read (by default the installed committed set). UNTESTABLE rows (not a
    test at this precision) and ACCEPTABLE rows never fail. --json never replaces a candidate, a
    golden file or a non-JSON file.

    Examples:

    \b
      refimpl golden verify my_backend/fftconv.h5 my_backend/neuron.h5
      refimpl golden verify my_backend/neuron.h5 --precision float32 --select reset=hard
      refimpl golden verify out/*.h5 --skip '*/outputs/iterations' --json report.json
    """
    _check_json(json_path, candidates, [golden_dir])
    try:
        report = G.verify(candidates, golden_dir, skip=skip, precision=precision,
                          select=select)
    except (FileFormatError, G.SelectError) as e:
        if json_path:
            _write_report(json_path, {"passed": False, "error": str(e), "files": []}, e)
        fail(e)
    _finish(report, json_path, verbose)


def _finish(report, json_path, verbose):
    """Print the report table, write the JSON report if asked, exit 1 on any failure."""
    click.echo(G.format_report(report, verbose=verbose), nl=False)
    if json_path:
        _write_report(json_path, report)
    if not report["passed"]:
        sys.exit(1)


@golden.command()
@options.golden_dir_opt
@options.suites_opt
@options.json_opt
@options.verbose_opt
def check(golden_dir, suites, json_path, verbose):
    """Recompute the committed golden cases with the installed refimpl.

    Every committed case is recomputed and compared (a regression test), then rebuilt from its
    definition: STALE (fails) where the file differs beyond rounding, DRIFT (informational)
    where it differs only within rounding (golden/SCHEMA.md). Exits 1 on any failure.

    Examples:

    \b
      refimpl golden check
      refimpl golden check --suite neuron --suite pmbc -v
      refimpl golden check --json check.json
    """
    names = list(suites) or list(G.SUITES)
    _check_json(json_path, (), [golden_dir])
    try:
        total = sum(len(G.suite_specs(n)) for n in names)
        with progress(total, "golden check") as bar:
            report = G.check(golden_dir, names, progress=bar.update)
    except FileFormatError as e:
        fail(e)
    _finish(report, json_path, verbose)


@golden.command()
@click.argument("file", metavar="FILE_OR_SUITE")
@click.option("--case", "case_id", help="Show one case in detail (datasets, shapes, tolerances).")
def show(file, case_id):
    """Show what a golden or candidate file holds.

    Lists the suite, the cases, their flags and shapes; with --case, one case in detail.
    FILE_OR_SUITE is a file, or a suite name for the installed committed file.

    Examples:

    \b
      refimpl golden show neuron
      refimpl golden show neuron --case 0001
      refimpl golden show my_backend/neuron.h5
    """
    try:
        click.echo(G.show(file, case_id), nl=False)
    except (FileFormatError, KeyError) as e:
        fail(e.args[0] if isinstance(e, KeyError) else e)


@golden.command()
@options.golden_dir_opt
@options.suites_opt
@click.option("--precision", "precisions", multiple=True, type=click.Choice(list(G.PROFILES)),
              help="Profile (repeatable); default: bfloat16 and float16.")
def coverage(golden_dir, suites, precisions):
    """How many golden tensors are a real test at each precision.

    Judges refimpl's own answer, rounded to the format, against the golden files, and counts
    per suite the tensors of the valid cases that are compared against a bound below their
    magnitude (tested), that are UNTESTABLE (the bound reaches the magnitude, or the case
    overflows the format), and that are not compared (an internal spike may flip at the
    format's bound). Prints a Markdown table (golden/SCHEMA.md, "Coverage").

    Examples:

    \b
      refimpl golden coverage
      refimpl golden coverage --precision bfloat16 --suite block
    """
    names = list(suites) or list(G.SUITES)
    precisions = list(precisions) or ["bfloat16", "float16"]
    try:
        total = len(precisions) * sum(len(G.suite_specs(n)) for n in names)
        with progress(total, "golden coverage") as bar:
            tables = {p: G.coverage(golden_dir, names, p, progress=bar.update)
                      for p in precisions}
    except FileFormatError as e:
        fail(e)
    click.echo(G.format_coverage(tables), nl=False)
