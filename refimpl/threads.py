"""Who uses the cores while refimpl computes, and how many of them it takes.

refimpl has one owner of the cores: its own pool of threads. A pass that is worth splitting
(:func:`run`) runs on :func:`count` threads over disjoint ranges of rows (batch rows, channels,
``B*H`` neuron rows), the calling thread taking the first range; every other thread source is
held to one thread while refimpl computes:

- **BLAS** (NumPy's OpenBLAS and any other BLAS that threadpoolctl finds loaded) runs on one
  thread inside :func:`owned` (entered by :func:`run` and by the model's entry points) and gets
  its own setting back on the way out. refimpl's large GEMMs are split over rows by :func:`run`
  instead, so no BLAS thread spins while refimpl's threads work, or the reverse.
- **Numba**: no kernel is compiled with ``parallel=True`` (they would spin up Numba's OpenMP
  pool beside this one, and they cannot be cached on disk, so every process would compile them
  again: issue 25); the serial kernels release the GIL (``nogil``) and :func:`run` calls them on
  row ranges.
- **scipy.fft** takes ``workers=count()`` (its pool sleeps between calls).

How many threads: the one documented setting is the environment variable ``REFIMPL_THREADS``
(read when refimpl is imported; :func:`set_threads` changes it at run time):

- ``auto`` (the default): the cores this process may run on (``os.sched_getaffinity``) less the
  cores other processes keep busy (Linux: the smaller of the machine's busy CPU time in
  ``/proc/stat`` less this process's own over the window since the previous sample, and the
  other processes' threads running at the sample; taken at most every :data:`SAMPLE_SECONDS`;
  :func:`busy_elsewhere`), rounded, at least 1. On a quiet 2-core
  machine that is 2; with a browser tab or another training busy on a core, 1, so refimpl does
  not make two threads wait for each other on one core (issue 25 measured a 12-40x loss from
  such oversubscription). Where ``/proc`` is not readable the count is the cores available.
- ``N`` (an integer >= 1): exactly ``N`` threads, whatever the load.

Results do not depend on the count: every split writes disjoint outputs, sums across a split
are kept per row and added in row order, and BLAS on one thread sums each GEMM in its own
fixed order (tests/test_speed_threads.py: float64 and float32 bit-identical at 1 and 2 threads).
"""
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

ENV = "REFIMPL_THREADS"

#: Elements a pass must touch before :func:`run` splits it (handing a range to another thread
#: costs tens of microseconds; below this size one thread is as fast).
MIN_ELEMENTS = 1 << 18

#: Seconds a sample of the other processes' running threads is reused (reading ``/proc`` costs
#: tens of microseconds; a training step takes tens of milliseconds, a streamed step far less).
SAMPLE_SECONDS = 0.2


class ThreadsSettingError(ValueError):
    """``REFIMPL_THREADS`` (or :func:`set_threads`) is neither ``auto`` nor a positive integer."""


def parse_setting(value, name=ENV):
    """``None`` for ``auto`` (or unset/empty), else the positive integer ``value`` names."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "auto"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1 or str(n) != text.lstrip("+"):
        raise ThreadsSettingError(f"{name} must be 'auto' or a positive integer number of "
                                  f"threads, got {value!r}")
    return n


_fixed = parse_setting(os.environ.get(ENV))
#: The last reading of busy_elsewhere() and when (monotonic), and the CPU sample it ended with.
_sample = {"at": -1.0, "busy": None, "cpu": None}


class _Local(threading.local):
    in_pool = False  # this thread is one of the pool's: a nested pass runs on it alone


_local = _Local()


def set_threads(n):
    """Set the thread count for this process: ``None`` or ``"auto"`` (follow the free cores),
    or a positive integer. Returns the previous setting (``None`` for auto)."""
    global _fixed
    previous, _fixed = _fixed, parse_setting(n, "threads")
    return previous


def setting():
    """The current setting: ``None`` (auto) or the fixed count."""
    return _fixed


@contextlib.contextmanager
def using(n):
    """Run the body with :func:`set_threads` ``(n)`` and restore the setting afterwards."""
    previous = set_threads(n)
    try:
        yield
    finally:
        set_threads(previous)


def cores():
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _running_here(proc="/proc"):
    """This process's threads that are running or runnable now (state ``R``)."""
    n = 0
    task = f"{proc}/self/task"
    for tid in os.listdir(task):
        try:
            with open(f"{task}/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        if stat[stat.rfind(b")") + 2:][:1] == b"R":  # the field after "pid (comm)"
            n += 1
    return n


def running_elsewhere(proc="/proc"):
    """Threads of other processes that are running or waiting for a core right now (the
    runnable count of ``/proc/loadavg`` less this process's running threads), or ``None``
    where ``/proc`` does not tell. An instant: a burst counts as much as a busy loop."""
    try:
        with open(f"{proc}/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])  # "R/T": runnable/total
        return max(0, running - _running_here(proc))
    except (OSError, ValueError, IndexError):
        return None


class CpuSample(NamedTuple):
    """CPU seconds used so far by the whole machine and by this process, and when."""
    machine: float  # busy seconds of all CPUs (user, nice, system, irq, softirq, steal)
    here: float  # user + system seconds of this process (all its threads)
    wall: float  # time.monotonic()


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_sample(proc="/proc"):
    """A :class:`CpuSample` now (``/proc/stat``'s first line), or ``None`` where unreadable."""
    try:
        with open(f"{proc}/stat", "rb") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user .. steal, in ticks
        busy = sum(fields) - fields[3] - fields[4]  # less idle and iowait
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return CpuSample(busy / _TICK, t.user + t.system, time.monotonic())


#: Shortest window over which :func:`busy_elsewhere` averages (shorter: the ticks of
#: ``/proc/stat``, 10 ms, would be too coarse; it reads the instant of :func:`running_elsewhere`).
MIN_WINDOW = 0.05


def busy_between(a, b):
    """Cores' worth of CPU time other processes used between samples ``a`` and ``b``."""
    return max(0.0, (b.machine - a.machine) - (b.here - a.here)) / (b.wall - a.wall)


def busy_elsewhere(proc="/proc"):
    """Cores other processes keep busy: the smaller of their average over the window since the
    previous call (at least :data:`MIN_WINDOW` ago; the first window starts when refimpl is
    imported) and the instant count of :func:`running_elsewhere`; the instant alone over a
    shorter window; ``None`` where ``/proc`` does not tell.

    Busy loops and other trainings are busy on both measures. Each measure alone misleads in
    one case the other gets right: an instant catches another program's threads waking for a
    millisecond, and a window that began long ago still holds a burst that has ended (a
    benchmark's other contender, whose block ran just before this one's)."""
    now = cpu_sample(proc)
    before = _sample["cpu"]
    instant = running_elsewhere(proc)
    if now is None or before is None or now.wall - before.wall < MIN_WINDOW:
        return instant
    _sample["cpu"] = now
    window = busy_between(before, now)
    return window if instant is None else min(window, float(instant))


def count():
    """Threads for the next parallel pass: the fixed setting, or (auto) the free cores."""
    if _local.in_pool:  # a pass nested in a pool thread's range stays on that thread
        return 1
    if _fixed is not None:
        return _fixed
    now = time.monotonic()
    if now - _sample["at"] > SAMPLE_SECONDS:
        _sample["busy"], _sample["at"] = busy_elsewhere(), now
    n = cores()
    busy = _sample["busy"]
    return n if busy is None else max(1, min(n, int(n - busy + 0.5)))


# --------------------------------------------------------------------------------------------
# BLAS on one thread while refimpl computes
# --------------------------------------------------------------------------------------------

_blas = {"libs": None, "depth": 0, "saved": None}
_blas_lock = threading.Lock()


def _blas_libs():
    """threadpoolctl's controllers of the loaded BLAS libraries (found once, on first use)."""
    if _blas["libs"] is None:
        from threadpoolctl import ThreadpoolController
        _blas["libs"] = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas["libs"]


class _Owned(contextlib.ContextDecorator):
    """:func:`owned`'s context (a class, not a generator: it is entered on every pass of a
    streamed token, so its cost matters: a counter under a lock when nested)."""

    def __enter__(self):
        with _blas_lock:
            if _blas["depth"] == 0:
                libs = _blas_libs()
                _blas["saved"] = [lib.get_num_threads() for lib in libs]
                for lib in libs:
                    lib.set_num_threads(1)
            _blas["depth"] += 1
        return self

    def __exit__(self, *exc):
        with _blas_lock:
            _blas["depth"] -= 1
            if _blas["depth"] == 0:
                for lib, n in zip(_blas["libs"], _blas["saved"]):
                    lib.set_num_threads(n)
        return False


_OWNED = _Owned()


def owned():
    """refimpl owns the cores for the body (a context manager, or a decorator:
    ``@threads.owned()``): BLAS on one thread, its own setting restored when the outermost
    ``owned`` exits. Re-entrant, from any thread, and cheap when nested (a counter)."""
    return _OWNED


def blas_threads():
    """``[(library, version, threads outside refimpl)]`` of the loaded BLAS libraries."""
    libs = _blas_libs()
    saved = _blas["saved"] if _blas["depth"] else None
    return [(lib.internal_api, lib.version, saved[i] if saved else lib.get_num_threads())
            for i, lib in enumerate(libs)]


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------

_POOLS = {}  # pid -> ThreadPoolExecutor (a forked child starts afresh)


def _mark_pool_thread():
    _local.in_pool = True


def _pool(workers):
    key = os.getpid()
    pool = _POOLS.get(key)
    if pool is None or pool._max_workers < workers:
        if pool is not None:
            pool.shutdown(wait=False)
        pool = _POOLS[key] = ThreadPoolExecutor(max(workers, cores() - 1),
                                                thread_name_prefix="refimpl",
                                                initializer=_mark_pool_thread)
    return pool


def sum_in_order(parts):
    """``parts[0] + parts[1] + ...`` added in index order into a new array: the partial results
    of a split pass (one per batch row or fixed block, never per thread), so the sum is the same
    at any thread count. ``parts``: an array whose first axis indexes the parts (at least one)."""
    total = parts[0].copy()
    for j in range(1, len(parts)):
        total += parts[j]
    return total


def run(fn, n_items, size=None):
    """Run ``fn(i0, i1)`` over contiguous ranges covering ``range(n_items)``, inside
    :func:`owned` (BLAS on one thread).

    On :func:`count` threads (at most ``n_items``), the calling thread taking the first range,
    when the pass touches at least :data:`MIN_ELEMENTS` elements (``size``; ``None``: always
    split); else in one call. ``fn`` must write disjoint outputs per item and release the GIL
    for its work (the ``nogil`` Numba kernels, BLAS, scipy.fft), so the result is the same for
    any split. An exception in any range is raised after every range has finished (the first
    range's first).
    """
    with _OWNED:
        n = 1 if size is not None and size < MIN_ELEMENTS else min(count(), n_items)
        if n <= 1:
            fn(0, n_items)
            return
        bounds = [n_items * k // n for k in range(n + 1)]
        futures = [_pool(n - 1).submit(fn, bounds[k], bounds[k + 1]) for k in range(1, n)]
        try:
            fn(bounds[0], bounds[1])
        finally:
            wait(futures)
        for f in futures:
            f.result()


_sample["cpu"] = cpu_sample()  # the first window of busy_elsewhere() starts at import
