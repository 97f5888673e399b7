"""Campaigns of independent tasks: in this process, on a pool of local processes, or on a Dask
cluster, with the same results in the same order (issue 24, "Campaigns past one machine").

A campaign is ``fn(task)`` for every task of a list; the tasks carry everything they draw from
(their own seeds, or cases drawn before), so a result never depends on where, when or next to
what its task ran. :func:`run_tasks` returns the results in task order; :func:`iter_tasks`
yields them in task order as soon as each one and all before it are done (``refimpl golden
generate`` writes a suite's file while the next suite computes).

Where the tasks run:

- ``workers=1``: in this process, one after the other (no pool).
- ``workers=None`` (the default) or ``N``: a pool of local processes, one per core available to
  this process (``os.sched_getaffinity``) or ``N``, never more than there are tasks (a pool of
  one is this process). Workers are started with the ``spawn`` method, never ``fork`` (Numba's
  threading layer and OpenBLAS's threads do not survive a fork), each with one thread
  (``REFIMPL_THREADS`` and, for code outside refimpl, ``OPENBLAS_NUM_THREADS``,
  ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` = 1: :data:`WORKER_ENV`), so that the pool uses one
  core per process. A worker imports the module of ``fn`` afresh: what a process registers at
  run time (a reset, a golden suite) is not registered there, so run such work with
  ``workers=1``.
- ``scheduler="tcp://host:port"``: on that Dask cluster through ``dask.distributed`` (the
  optional extra: ``pip install 'refimpl[dask]'``); its workers need the same refimpl.
  ``workers`` must be None then.

``fn`` and the tasks must pickle (``fn`` a module-level function). A task's exception reaches
the caller as itself (its type and message; the worker's traceback is its ``__cause__``): the
first failing task in task order; the tasks after it are cancelled. Ctrl-C (or any exception,
or closing :func:`iter_tasks` early) terminates the pool's processes: none is left behind, and
a worker whose parent died (SIGKILL) exits within a second. Workers ignore SIGINT: the terminal
sends it to the whole process group, and the parent alone decides.
"""
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

#: The environment of every pool worker, set when it starts (before it imports NumPy or Numba).
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1", "REFIMPL_THREADS": "1"}

#: How to install the optional Dask support.
DASK_INSTALL = "pip install 'refimpl[dask]'"


class CampaignError(Exception):
    """An error of the machinery, never of a task (a task's exception is raised as itself):
    each is also of the built-in type that says what it is, and its message is one line."""


class OptionsError(CampaignError, ValueError):
    """``workers`` and ``scheduler`` together, or a value neither takes."""


class DaskMissing(CampaignError, ImportError):
    """``scheduler`` given without ``dask.distributed`` installed."""


class SchedulerUnreachable(CampaignError, OSError):
    """No Dask scheduler answers at the address given."""


class WorkerDied(CampaignError, BrokenProcessPool):
    """A pool worker ended abruptly (killed, out of memory, a crash in compiled code)."""


#: Tasks submitted ahead per worker thread (a bound on the tasks and results held at once).
AHEAD = 4


def available_cores():
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pool_size(workers=None, n_tasks=None):
    """The processes :func:`run_tasks` would use: ``workers`` or one per available core, at
    most ``n_tasks`` (when known) and at least 1."""
    n = available_cores() if workers is None else int(workers)
    if n_tasks is not None:
        n = min(n, n_tasks)
    return max(n, 1)


def check_options(workers, scheduler):
    """Refuse ``workers`` with ``scheduler`` (they exclude each other), ``workers`` that is not
    None or a whole number >= 1, a ``scheduler`` that is not an address (:class:`OptionsError`,
    a ``ValueError``)."""
    if scheduler is not None and workers is not None:
        raise OptionsError(f"workers={workers} (--workers) and scheduler={scheduler!r} "
                           f"(--scheduler) exclude each other: the Dask cluster decides where "
                           f"tasks run; pass one of them (with scheduler=, workers=None)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise OptionsError(f"workers must be a whole number >= 1 (1 = in this process) or "
                           f"None (one process per core), got {workers!r}")
    if scheduler is not None and not (isinstance(scheduler, str) and scheduler.strip()):
        raise OptionsError(f"scheduler must be a Dask scheduler address such as "
                           f"'tcp://host:8786', got {scheduler!r}")


def run_tasks(fn, tasks, *, workers=None, scheduler=None, progress=None, label="tasks"):
    """``[fn(task) for task in tasks]``, in task order (never completion order), computed in
    this process (``workers=1``), on a pool of local processes (``workers=None``: one per
    available core, at most one per task; or ``workers=N``) or on the Dask cluster at
    ``scheduler`` (then ``workers`` must be None). The results are the same whichever.

    ``progress(n)`` is called in this process with the number of tasks just finished (1) as
    they finish. ``label`` names the campaign in the errors of the machinery
    (:class:`CampaignError`: :class:`OptionsError`, :class:`DaskMissing`,
    :class:`SchedulerUnreachable`, :class:`WorkerDied`). A task's own exception is raised as
    itself: the first failing task in task order, the others cancelled. See the module
    docstring.
    """
    return list(iter_tasks(fn, tasks, workers=workers, scheduler=scheduler, progress=progress,
                           label=label))


def iter_tasks(fn, tasks, *, workers=None, scheduler=None, progress=None, label="tasks"):
    """:func:`run_tasks` as a generator: each result in task order, as soon as it and every
    result before it are done. ``tasks`` may be any iterable (a generator is consumed
    lazily: a few tasks per worker ahead, :data:`AHEAD`). Close the generator (or use it in a
    ``with contextlib.closing(...)`` block) to stop early: the pool is terminated.

    The options are checked here, before anything runs (:class:`OptionsError`, a
    ``ValueError``), and so is the Dask extra (:class:`DaskMissing`, an ``ImportError``)."""
    check_options(workers, scheduler)
    if scheduler is not None:
        return _ordered(_Dask(scheduler, label), fn, tasks, progress)
    n_tasks = len(tasks) if hasattr(tasks, "__len__") else None
    n = pool_size(workers, n_tasks)
    if n == 1:
        return _in_process(fn, tasks, progress)
    return _ordered(_Pool(n, label), fn, tasks, progress)


def _in_process(fn, tasks, progress):
    for task in tasks:
        result = fn(task)
        if progress is not None:
            progress(1)
        yield result


def _ordered(backend, fn, tasks, progress):
    """Submit ``tasks`` a window ahead, yield the results in task order, raise the first
    failure in task order once every task before it is done; shut the backend down (abruptly
    on any exception, Ctrl-C or an early close)."""
    ok = False
    try:
        window = AHEAD * backend.slots()
        todo = enumerate(tasks)
        running, done = {}, {}  # index -> future; index -> result not yielded yet
        failed = None  # (index, future) of the first failure in task order seen so far
        more, nxt = True, 0
        while True:
            while more and failed is None and len(running) + len(done) < window:
                try:
                    i, task = next(todo)
                except StopIteration:
                    more = False
                    break
                running[i] = backend.submit(fn, task)
            while nxt in done:
                result = done.pop(nxt)
                nxt += 1
                yield result
            if failed is not None and not any(i < failed[0] for i in running):
                backend.reraise(failed[1])  # every task before it succeeded
            if not running:
                if not more:
                    break
                continue
            limit = failed[0] if failed is not None else None
            wanted = [f for i, f in running.items() if limit is None or i < limit]
            index = {id(f): i for i, f in running.items()}
            for i in sorted(index[id(f)] for f in backend.wait(wanted)):
                if i not in running:
                    continue  # cancelled: a task before it failed
                f = running.pop(i)
                if backend.failed(f):
                    if failed is None or i < failed[0]:
                        failed = (i, f)
                        for j in [j for j in running if j > i]:  # not needed any more
                            backend.cancel(running.pop(j))
                else:
                    done[i] = backend.result(f)
                    if progress is not None:
                        progress(1)
        ok = True
    finally:
        backend.close(abort=not ok)


# --------------------------------------------------------------------------------------------
# A pool of local processes
# --------------------------------------------------------------------------------------------


def _worker_init(parent):
    """In every pool worker: SIGINT ignored (the parent handles Ctrl-C and terminates the
    pool), and a watchdog that ends the worker when its parent is gone (a SIGKILLed parent
    cannot terminate it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="refimpl-parent-watchdog").start()


def _watch_parent(parent, interval=0.5):
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


@contextlib.contextmanager
def _spawning():
    """Around the starts of pool workers: :data:`WORKER_ENV` in the environment they inherit,
    SIGINT blocked in the starting thread (a worker inherits the mask, so a Ctrl-C during its
    start-up cannot kill it with a traceback; the parent's own Ctrl-C stays pending and is
    delivered after). The parent's environment and mask are restored after."""
    old = {k: os.environ.get(k) for k in WORKER_ENV}
    mask = (hasattr(signal, "pthread_sigmask")
            and threading.current_thread() is threading.main_thread())
    os.environ.update(WORKER_ENV)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if mask else None
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _Pool:
    """``concurrent.futures.ProcessPoolExecutor`` on the ``spawn`` method (workers start on
    the first submits, which :func:`_spawning` wraps)."""

    def __init__(self, n, label):
        self.n, self.label = n, label
        self.ex = concurrent.futures.ProcessPoolExecutor(
            max_workers=n, mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init, initargs=(os.getpid(),))

    def slots(self):
        return self.n

    def submit(self, fn, task):
        with _spawning():
            return self.ex.submit(fn, task)

    def wait(self, futures):
        return concurrent.futures.wait(
            futures, return_when=concurrent.futures.FIRST_COMPLETED).done

    def failed(self, f):
        return f.cancelled() or f.exception() is not None

    def result(self, f):
        return f.result()

    def reraise(self, f):
        try:
            f.result()
        except BrokenProcessPool as e:
            raise WorkerDied(
                f"{self.label}: a worker process died abruptly (killed, out of memory, or a "
                f"crash in compiled code); run with workers=1 (--workers 1) to see the failing "
                f"task in this process") from e
        raise RuntimeError(f"{self.label}: a task failed without an exception")  # unreachable

    def cancel(self, f):
        f.cancel()

    def close(self, abort):
        if not abort:
            self.ex.shutdown(wait=True)
            return
        terminate = getattr(self.ex, "terminate_workers", None)  # Python >= 3.14
        if terminate is not None:
            terminate()
            return
        procs = list((getattr(self.ex, "_processes", None) or {}).values())
        manager = getattr(self.ex, "_executor_manager_thread", None)
        self.ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        if manager is not None:
            manager.join(5)


# --------------------------------------------------------------------------------------------
# A Dask cluster
# --------------------------------------------------------------------------------------------


class _Dask:
    """A ``dask.distributed`` client of the scheduler at ``address`` (imported here, so that a
    missing extra fails before anything runs; connected by :meth:`slots`, inside the
    campaign, so that the client is always closed)."""

    def __init__(self, address, label):
        try:
            import distributed
        except ImportError:
            raise DaskMissing(f"--scheduler (scheduler=) needs dask.distributed, which is not "
                              f"installed: {DASK_INSTALL}") from None
        self.distributed, self.label, self.address = distributed, label, address
        self.client, self.futures = None, set()

    def slots(self):
        try:
            self.client = self.distributed.Client(self.address, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise SchedulerUnreachable(f"{self.label}: cannot reach the Dask scheduler at "
                                       f"{self.address}: {' '.join(str(e).split())}") from None
        return max(1, sum(self.client.nthreads().values()))

    def submit(self, fn, task):
        f = self.client.submit(fn, task, pure=False)
        self.futures.add(f)
        return f

    def wait(self, futures):
        with self.client.as_current():  # not the default client: another may be in use
            return self.distributed.wait(futures, return_when="FIRST_COMPLETED").done

    def failed(self, f):
        return f.status != "finished"

    def result(self, f):
        r = f.result()
        self.futures.discard(f)
        return r

    def reraise(self, f):
        f.result()  # the task's exception (Dask re-raises it with the remote traceback)
        raise RuntimeError(f"{self.label}: a task ended as {f.status!r} on the Dask cluster at "
                           f"{self.address}")

    def cancel(self, f):
        f.cancel()
        self.futures.discard(f)

    def close(self, abort):
        if self.client is None:
            return
        try:
            if abort and self.futures:
                self.client.cancel(list(self.futures))
        finally:
            self.futures.clear()
            self.client.close()
