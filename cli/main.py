"""The ``refimpl`` command: a thin click layer over the library (parse, call, write, show)."""
import importlib.metadata
import os
import platform

import click

import refimpl
from refimpl.campaign import CampaignError, check_options
from refimpl.equivalence import CHECKS, run_checks
from refimpl.table import render_table

from . import options
from .common import choice, fail, progress
from .conform_commands import conform
from .golden_commands import golden
from .plot_commands import plot, raster
from .sdn_commands import sdn
from .text_commands import generate
from .train_commands import evaluate, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(refimpl.__version__, prog_name="refimpl")
def main():
    """refimpl: the CPU reference implementation of spiking state space models.

    Golden traces for backend authors, parallel-vs-iterative proofs, and CPU training of
    small spiking SSMs (SpikingSSM, SPikE-SSM, Binary S4D). See README.md and DESIGN.md;
    'refimpl COMMAND --help' shows a command's options and examples.

    Examples:

    \b
      refimpl train --task recall --activation lif --epochs 3 --out runs/recall
      refimpl golden check
      refimpl info
    """


@main.command()
def info():
    """Versions, the threads refimpl uses (and why), and Numba status.

    Prints the versions of refimpl, Python and its dependencies, the cores, the thread
    setting (REFIMPL_THREADS: auto or a number) and what each pool uses now: refimpl's own pool
    (which runs the large passes, the GEMMs and the PMBC rows), scipy.fft's workers, BLAS (one
    thread inside refimpl; its own setting outside), Numba (no parallel kernels); whether
    Numba's JIT and fast-math are on, and the cache folder: what to attach to a bug report or a
    benchmark.

    Examples:

    \b
      refimpl info
    """
    import h5py
    import numba
    import numpy
    import scipy

    from refimpl import config, threads

    busy = threads.busy_elsewhere()
    setting = threads.setting()
    rows = [
        ("refimpl", refimpl.__version__),
        ("python", platform.python_version()),
        ("numpy", numpy.__version__),
        ("scipy", scipy.__version__),
        ("numba", numba.__version__),
        ("h5py", h5py.__version__),
        ("click", importlib.metadata.version("click")),
        ("threadpoolctl", importlib.metadata.version("threadpoolctl")),
        ("platform", platform.platform()),
        ("cpu cores", f"{os.cpu_count()} ({threads.cores()} available to this process)"),
        ("busy elsewhere", "unknown (no /proc)" if busy is None else
         f"{busy:.2f} cores kept busy by other processes (since refimpl started)"),
        ("threads setting", f"{threads.ENV}=" + (
            f"{setting} (fixed)" if setting is not None else
            "auto (the available cores less those other processes keep busy, sampled as "
            "refimpl runs)")),
        ("refimpl pool", f"{threads.count()} thread(s) now (the large passes, GEMMs split by "
                         f"rows, PMBC rows)"),
        ("fft workers", f"{threads.count()} now (scipy.fft workers=)"),
        ("blas", "; ".join(f"{api} {version}: 1 thread inside refimpl, {n} outside"
                           for api, version, n in threads.blas_threads()) or "none loaded"),
        ("numba threads", "no parallel kernels (refimpl's pool calls the cached serial ones)"),
        ("numba JIT", "disabled (NUMBA_DISABLE_JIT=1)" if numba.config.DISABLE_JIT else "enabled"),
        ("fastmath", f"{config.FASTMATH} (reference path requires False)"),
        ("cache dir", numba.config.CACHE_DIR or "next to the sources (__pycache__)"),
        ("blas build", _blas_name(numpy)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _blas_name(numpy):
    """NumPy's BLAS (used by the channel-mixing GEMMs) from its build configuration."""
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy: no mode="dicts"
        return "see numpy.show_config()"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


@main.command()
@click.option("--cases", default=50, show_default=True, type=click.IntRange(min=1),
              help="Random cases per check.")
@options.seed_opt(0)
@click.option("--check", "checks", multiple=True, type=choice(CHECKS),
              help="Run only these checks (repeatable).")
@options.workers_opt
@options.scheduler_opt
def equivalence(cases, seed, checks, workers, scheduler):
    """Check parallel forms against iterative ones on random cases.

    Every check (refimpl.equivalence.CHECKS) draws --cases random cases from --seed and
    compares the forms of one op: the S4D convolution (direct, FFT, recurrence, scan), PMBC
    against the iterative neuron, and, per activation family, a causal model run in parallel,
    step by step and in chunks. The table gives per check the worst error and the spike
    mismatches beyond the rounding bound (expected 0). The cases run on a pool of local
    processes (--workers), or on a Dask cluster (--scheduler); the table is the same.

    Examples:

    \b
      refimpl equivalence
      refimpl equivalence --check pmbc --check model-lif --cases 200 --seed 1
      refimpl equivalence --cases 10000 --scheduler tcp://10.0.0.5:8786
    """
    names = list(checks) or list(CHECKS)
    try:
        check_options(workers, scheduler)
        with progress(cases * len(names), "equivalence") as bar:
            rows = run_checks(names, cases, seed=seed, progress=bar.update, workers=workers,
                              scheduler=scheduler)
    except CampaignError as e:
        fail(e)
    header = ("forms compared", "cases", "worst error", "spike mismatches",
              "iterations min/med/max")
    table = []
    for r in rows:
        it = r["iterations"]
        flips = r.get("flips")
        mism = _fmt(r["spike_mismatches"], "d") + (f" (+{flips} within bound)" if flips else "")
        table.append((r["forms"], r["cases"], _fmt(r["worst_error"], ".2e"), mism,
                      "-" if it is None else f"{it[0]} / {it[1]:g} / {it[2]}"))
    click.echo(render_table(header, table))


main.add_command(train)
main.add_command(evaluate)
main.add_command(generate)
main.add_command(golden)
main.add_command(conform)
main.add_command(sdn)
main.add_command(plot)
main.add_command(raster)


if __name__ == "__main__":
    main()
