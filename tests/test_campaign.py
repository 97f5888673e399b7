"""Campaigns past one machine (issue 24): :func:`refimpl.campaign.run_tasks` gives the same
results in the same order in this process, on a pool of local processes and on a Dask
``LocalCluster``; a task's exception reaches the caller as itself; Ctrl-C, an error or an early
close leaves no worker behind; ``refimpl equivalence`` and ``refimpl golden generate`` give the
same table and the same files whatever ``--workers`` or ``--scheduler``.

The pool's workers start with ``spawn`` and import this module (its functions are the tasks);
the Dask workers run only refimpl's and the standard library's functions. One ``LocalCluster``
(2 worker processes, 1 thread each) serves the module.
"""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from click.testing import CliRunner

from refimpl import campaign
from refimpl import golden as G
from refimpl.campaign import iter_tasks, run_tasks
from refimpl.cli.main import main
from refimpl.equivalence import CHECKS, run_checks

psutil = pytest.importorskip("psutil")  # installed with the dask extra (make install)


# -- tasks (module level: a spawned worker imports them from here) ----------------------------

def _square(i):
    """``(i, i * i, pid, the worker's thread settings)``; later tasks finish first."""
    time.sleep(0.02 * (i % 4 == 0))
    return i, i * i, os.getpid(), {k: os.environ.get(k) for k in campaign.WORKER_ENV}


def _fails(i):
    """Task 3 fails late, task 5 at once, task 4 would run for a minute."""
    if i == 3:
        time.sleep(0.5)
        raise KeyError(f"task {i} is broken")
    if i == 5:
        raise ValueError(f"task {i} is broken too")
    if i == 4:
        time.sleep(60)
    return i


def _slow(i):
    time.sleep(0.3)
    return os.getpid()


def _children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _gone(pids, timeout=10.0):
    """Whether none of ``pids`` is alive within ``timeout`` seconds (zombies count as gone)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def cluster():
    """A Dask LocalCluster: 2 worker processes with 1 thread each; closed after the module."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        yield c.scheduler_address


# -- run_tasks --------------------------------------------------------------------------------

def test_in_process_and_pool_give_the_results_in_task_order():
    tasks = list(range(12))
    env = {k: os.environ.get(k) for k in campaign.WORKER_ENV}
    seen = {1: [], 2: []}
    here = run_tasks(_square, tasks, workers=1, progress=seen[1].append)
    pool = run_tasks(_square, tasks, workers=2, progress=seen[2].append)
    assert [r[:2] for r in here] == [r[:2] for r in pool] == [(i, i * i) for i in tasks]
    assert seen[1] == seen[2] == [1] * len(tasks)  # one call per finished task
    assert {r[2] for r in here} == {os.getpid()}
    assert os.getpid() not in {r[2] for r in pool} and len({r[2] for r in pool}) <= 2
    assert all(r[3] == campaign.WORKER_ENV for r in pool)  # one thread per worker
    assert {k: os.environ.get(k) for k in campaign.WORKER_ENV} == env  # ours unchanged
    assert run_tasks(_square, [], workers=2) == []
    assert run_tasks(_square, iter(tasks), workers=2)[5][:2] == (5, 25)  # any iterable


def test_the_pool_is_one_per_core_at_most_one_per_task():
    assert campaign.pool_size(None) == campaign.available_cores()
    assert campaign.pool_size(None, 1) == 1 and campaign.pool_size(8, 3) == 3
    (r,) = run_tasks(_square, [7])  # a pool of one is this process
    assert r[2] == os.getpid()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_failing_task_in_task_order_raises_as_itself(workers):
    before = _children()
    t0 = time.perf_counter()
    with pytest.raises(KeyError, match="task 3 is broken"):
        run_tasks(_fails, range(8), workers=workers)
    assert time.perf_counter() - t0 < 30  # task 4 (a minute) was cancelled, not awaited
    assert _gone(_children() - before), "a worker outlived the failed campaign"


def test_closing_the_generator_early_terminates_the_pool():
    before = _children()
    results = iter_tasks(_slow, range(40), workers=2)
    first = next(results)
    workers = _children() - before
    assert first != os.getpid() and workers
    results.close()
    assert _gone(workers)


def test_scheduler_and_workers_exclude_each_other():
    with pytest.raises(ValueError, match=r"--workers.*--scheduler"):
        run_tasks(_square, [1], workers=2, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="whole number"):
        run_tasks(_square, [1], workers=0)
    r = CliRunner().invoke(main, ["equivalence", "--cases", "1", "--workers", "2",
                                  "--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    error = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "--workers" in error[0] and "--scheduler" in error[0], r.output
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "glu", "--out", "x",
                                  "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "exclude each other" in r.output, r.output


def test_without_distributed_a_scheduler_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` fails
    with pytest.raises(ImportError, match=r"pip install 'refimpl\[dask\]'"):
        run_tasks(_square, [1], scheduler="tcp://127.0.0.1:1")
    r = CliRunner().invoke(main, ["equivalence", "--cases", "1",
                                  "--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert lines == ["Error: --scheduler (scheduler=) needs dask.distributed, which is not "
                     "installed: pip install 'refimpl[dask]'"], r.output


def test_a_scheduler_address_is_checked_by_the_cli():
    r = CliRunner().invoke(main, ["equivalence", "--scheduler", "nowhere"])
    assert r.exit_code == 2 and "not a Dask scheduler address" in r.output, r.output


def test_dask_gives_the_same_results_and_raises_the_task_error(cluster):
    tasks = list(range(30))
    assert run_tasks(math.factorial, tasks, scheduler=cluster) == \
        run_tasks(math.factorial, tasks, workers=1)
    seen = []
    run_tasks(math.sqrt, [1.0, 4.0], scheduler=cluster, progress=seen.append)
    assert seen == [1, 1]
    with pytest.raises(ValueError, match="math domain error"):
        run_tasks(math.sqrt, [1.0, 4.0, -1.0, 9.0], scheduler=cluster)


# -- the two commands -------------------------------------------------------------------------

def test_equivalence_rows_are_the_same_bits_everywhere(cluster):
    names, n = list(CHECKS), 2
    here = run_checks(names, n, seed=5, workers=1)
    assert here == run_checks(names, n, seed=5, workers=None)
    assert here == run_checks(names, n, seed=5, workers=None, scheduler=cluster)
    assert here[1] == CHECKS["pmbc"](n, seed=5)  # a check alone: its own row
    # the command: the same table in this process, on the pool and on the cluster
    args = ["equivalence", "--cases", "2", "--seed", "5", "--check", "ssm", "--check", "pmbc"]
    tables = []
    for extra in (["--workers", "1"], [], ["--scheduler", cluster]):
        r = CliRunner().invoke(main, args + extra)
        assert r.exit_code == 0, r.output
        tables.append(r.stdout)
        assert "equivalence: 4/4 (100 %)" in r.stderr  # progress per case, pool or not
    assert tables[0] == tables[1] == tables[2]


def _same_golden(a, b):
    ga, gb = G.read_golden(a), G.read_golden(b)
    assert {k: v for k, v in ga.attrs.items() if k != "created"} == \
        {k: v for k, v in gb.attrs.items() if k != "created"}
    assert list(ga.cases) == list(gb.cases)
    for cid, ca in ga.cases.items():
        cb = gb.cases[cid]
        assert (ca.op, ca.comment, ca.flags, ca.result, ca.config, ca.extra, ca.meta) == \
            (cb.op, cb.comment, cb.flags, cb.result, cb.config, cb.extra, cb.meta), cid
        assert list(ca.data) == list(cb.data), cid
        for k in ca.data:
            assert ca.data[k].dtype == cb.data[k].dtype, (cid, k)
            np.testing.assert_array_equal(ca.data[k], cb.data[k], err_msg=f"{cid} {k}")


def test_golden_generate_writes_the_same_files_on_a_pool(tmp_path):
    outs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        r = CliRunner().invoke(main, ["golden", "generate", "--suite", "glu", "--suite", "gsu",
                                      "--out", str(out), "--workers", workers])
        assert r.exit_code == 0, r.output
        assert "golden cases: 12/12 (100 %)" in r.stderr
        outs[workers] = out
    assert sorted(os.listdir(outs["1"])) == sorted(os.listdir(outs["2"])) == ["glu.h5", "gsu.h5"]
    for name in ("glu.h5", "gsu.h5"):
        _same_golden(outs["1"] / name, outs["2"] / name)
    # the library: build_suite in this process and on the pool
    cases = G.build_suite("glu", seed=0, workers=2)
    committed = G.read_golden(outs["1"] / "glu.h5").cases
    assert [c.id for c in cases] == list(committed)


# -- Ctrl-C and a killed parent ---------------------------------------------------------------

SLEEPERS = textwrap.dedent("""
    import time
    from refimpl.campaign import run_tasks
    print("start", flush=True)
    run_tasks(time.sleep, [60] * 4, workers=2)
""")


def _start_sleepers():
    """A campaign of two workers in its own session; returns it and its workers' pids."""
    p = subprocess.Popen([sys.executable, "-c", SLEEPERS], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout.readline() == "start\n"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        kids = [c for c in psutil.Process(p.pid).children()
                if "resource_tracker" not in " ".join(c.cmdline())]
        if len(kids) >= 2:
            return p, [c.pid for c in kids]
        time.sleep(0.05)
    p.kill()
    raise AssertionError("the pool did not start")


def test_ctrl_c_leaves_no_worker_and_no_worker_traceback():
    p, workers = _start_sleepers()
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and err.count("KeyboardInterrupt") == 1, err  # the parent's
    assert _gone(workers, 5)


def test_a_killed_parent_leaves_no_worker():
    p, workers = _start_sleepers()
    os.kill(p.pid, signal.SIGKILL)  # the parent alone: no chance to clean up
    p.communicate(timeout=30)
    assert _gone(workers, 5)  # the workers' watchdog
