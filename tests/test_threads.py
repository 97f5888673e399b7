"""refimpl.threads: the setting, the free-core count, BLAS on one thread, the pool (issue 25)."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from refimpl import threads


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("auto", None),
                                             (" auto ", None), ("1", 1), ("4", 4), (3, 3)])
def test_the_setting_is_auto_or_a_positive_integer(value, expected):
    assert threads.parse_setting(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "2x", 0])
def test_a_bad_setting_names_the_variable_and_what_it_takes(value):
    with pytest.raises(threads.ThreadsSettingError, match=r"REFIMPL_THREADS must be 'auto' or "
                                                          r"a positive integer"):
        threads.parse_setting(value)


def test_a_bad_environment_setting_stops_the_import_with_one_line():
    env = dict(os.environ, REFIMPL_THREADS="many")
    p = subprocess.run([sys.executable, "-c", "import refimpl.threads"], env=env,
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "REFIMPL_THREADS must be 'auto' or a positive integer number of threads, got " \
           "'many'" in p.stderr


def test_a_fixed_setting_is_the_count_whatever_the_load():
    with threads.using(3):
        assert threads.count() == 3
        assert threads.setting() == 3
    assert threads.setting() is None or "REFIMPL_THREADS" in os.environ


@pytest.mark.parametrize("cores, busy, expected", [(2, 0, 2), (2, 1, 1), (2, 2, 1), (2, 5, 1),
                                                    (8, 3, 5), (4, None, 4), (2, 0.4, 2),
                                                    (2, 0.6, 1), (2, 1.33, 1), (4, 1.6, 2)])
def test_auto_takes_the_cores_the_other_processes_leave(monkeypatch, cores, busy, expected):
    monkeypatch.setattr(threads, "cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
    monkeypatch.setattr(threads, "_sample", {"at": -1.0, "busy": None, "cpu": None})
    with threads.using("auto"):
        assert threads.count() == expected


def test_the_sample_is_reused_for_a_while(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: calls.append(1) or 0)
    monkeypatch.setattr(threads, "_sample", {"at": -1.0, "busy": None, "cpu": None})
    with threads.using("auto"):
        for _ in range(100):
            threads.count()
    assert len(calls) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_busy_processes_are_counted_and_this_process_is_not():
    """Two spinning processes keep min(2, cores) cores busy (other load only adds), seen both
    as an instant and over a window; then two busy threads of this process are not counted:
    the window's figure stays below what the machine's busy time alone would say."""
    spin = "while True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        time.sleep(0.5)  # both started and spinning
        assert threads.running_elsewhere() >= 2
        a = threads.cpu_sample()
        time.sleep(0.5)
        b = threads.cpu_sample()
        assert threads.busy_between(a, b) >= min(2, threads.cores()) - 0.3
    finally:
        for p in procs:
            p.kill()
            p.wait()
    stop = threading.Event()

    def spin_here():
        x = np.ones(1 << 16)
        while not stop.is_set():
            np.sqrt(x, out=x)  # releases the GIL: two threads really run beside each other
    mine = [threading.Thread(target=spin_here) for _ in range(2)]
    for t in mine:
        t.start()
    try:
        a = threads.cpu_sample()
        time.sleep(0.5)
        b = threads.cpu_sample()
    finally:
        stop.set()
        for t in mine:
            t.join()
    here = (b.here - a.here) / (b.wall - a.wall)
    assert here >= 0.5  # this process was busy ...
    assert threads.busy_between(a, b) <= (b.machine - a.machine) / (b.wall - a.wall) - 0.4
    # ... and that is not counted as other processes' load


def test_busy_between_is_the_machine_less_this_process_per_second():
    a = threads.CpuSample(machine=100.0, here=10.0, wall=50.0)
    b = threads.CpuSample(machine=101.5, here=10.5, wall=50.5)  # 1.5 s busy, 0.5 s ours
    assert threads.busy_between(a, b) == pytest.approx(2.0)
    c = threads.CpuSample(machine=100.2, here=10.5, wall=50.5)  # tick rounding: never < 0
    assert threads.busy_between(a, c) == 0.0


def test_the_cpu_sample_reads_proc_stat(tmp_path):
    tick = threads._TICK
    (tmp_path / "stat").write_text(f"cpu  {3 * tick} 0 {tick} {50 * tick} {2 * tick} 0 0 "
                                   f"{tick} 0 0\ncpu0 1 2 3\n")
    sample = threads.cpu_sample(str(tmp_path))
    assert sample.machine == pytest.approx(5.0)  # user + system + steal; not idle, iowait


@pytest.mark.parametrize("window_busy, running, expected", [
    (1.9, 3, 1.9),  # busy on both measures: a busy loop or another training
    (1.9, 0, 0.0),  # a burst that has ended (the window began before it)
    (0.0, 4, 0.0),  # threads waking for an instant
])
def test_busy_is_the_smaller_of_the_window_and_the_instant(tmp_path, monkeypatch, window_busy,
                                                          running, expected):
    fake = _fake_proc(tmp_path, running + 1, "R")  # this process's one running thread
    tick = threads._TICK
    (tmp_path / "stat").write_text(f"cpu  {round(window_busy * tick)} 0 0 0 0 0 0 0 0 0\n")
    before = threads.CpuSample(machine=0.0, here=0.0, wall=0.0)
    monkeypatch.setattr(threads, "_sample", {"at": -1.0, "busy": None, "cpu": before})
    monkeypatch.setattr(threads.time, "monotonic", lambda: 1.0)  # a 1 s window
    monkeypatch.setattr(threads.os, "times", lambda: os.times_result((0.0, 0.0, 0.0, 0.0, 0.0)))
    assert threads.busy_elsewhere(fake) == pytest.approx(expected)


def test_a_short_window_falls_back_to_the_instant(tmp_path, monkeypatch):
    fake = _fake_proc(tmp_path, 5, "RRS")
    (tmp_path / "stat").write_text("cpu  100 0 0 1000 0 0 0 0 0 0\n")
    monkeypatch.setattr(threads, "_sample", {"at": -1.0, "busy": None,
                                             "cpu": threads.cpu_sample(fake)})
    assert threads.busy_elsewhere(fake) == 3  # within MIN_WINDOW: running_elsewhere's count


def _fake_proc(tmp_path, running, states):
    """A /proc with ``running`` runnable threads machine-wide and this process's threads in
    ``states`` (one letter each)."""
    (tmp_path / "loadavg").write_text(f"0.50 0.40 0.30 {running}/321 4567\n")
    for i, state in enumerate(states):
        d = tmp_path / "self" / "task" / str(100 + i)
        d.mkdir(parents=True)
        (d / "stat").write_text(f"{100 + i} (python (x) y) {state} 1 2 3 4\n")
    return str(tmp_path)


@pytest.mark.parametrize("running, states, expected", [(5, "RRS", 3), (3, "RRR", 0),
                                                       (1, "RRSS", 0), (7, "S", 7)])
def test_this_process_running_threads_are_not_counted_as_busy(tmp_path, running, states,
                                                              expected):
    """Runnable machine-wide minus this process's own running threads (a thread name with
    parentheses and spaces does not move the state field)."""
    assert threads.running_elsewhere(_fake_proc(tmp_path, running, states)) == expected


def test_an_unreadable_proc_means_unknown(tmp_path):
    assert threads.running_elsewhere(str(tmp_path)) is None
    assert threads.cpu_sample(str(tmp_path)) is None
    assert threads.busy_elsewhere(str(tmp_path)) is None


def test_blas_runs_on_one_thread_inside_refimpl_and_gets_its_setting_back():
    from threadpoolctl import threadpool_info, threadpool_limits
    with threadpool_limits(limits=2, user_api="blas"):
        before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        assert before and all(n == 2 for n in before)
        with threads.owned():
            with threads.owned():  # nested: still one, and the outer exit restores
                inside = [i["num_threads"] for i in threadpool_info()
                          if i["user_api"] == "blas"]
            assert all(n == 1 for n in inside)
            assert [n for *_, n in threads.blas_threads()] == before  # what the user set
        after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    assert after == before


def test_run_covers_every_item_once_on_several_threads():
    seen, names = [], set()
    lock = threading.Lock()

    def fn(i0, i1):
        with lock:
            seen.extend(range(i0, i1))
            names.add(threading.current_thread().name)
        time.sleep(0.01)
    with threads.using(3):
        threads.run(fn, 10)
    assert sorted(seen) == list(range(10))
    assert len(names) == 3  # the caller and two pool threads


def test_run_below_the_size_threshold_stays_on_the_caller():
    names = []
    with threads.using(4):
        threads.run(lambda i0, i1: names.append((i0, i1, threading.current_thread().name)), 8,
                    size=threads.MIN_ELEMENTS - 1)
    assert names == [(0, 8, threading.current_thread().name)]


def test_run_raises_a_ranges_exception_after_every_range_finished():
    done = []

    def fn(i0, i1):
        if i0 > 0:
            raise KeyError(f"range {i0}")
        time.sleep(0.05)
        done.append(i0)
    with threads.using(2), pytest.raises(KeyError, match="range"):
        threads.run(fn, 4)
    assert done == [0]


def test_a_run_nested_in_a_pool_thread_stays_on_that_thread():
    """A range that itself calls run must not wait for pool threads it occupies (deadlock)."""
    inner = []

    def fn(i0, i1):
        threads.run(lambda j0, j1: inner.append((j0, j1)), 4)
    with threads.using(2):
        t = threading.Thread(target=threads.run, args=(fn, 2))
        t.start()
        t.join(timeout=20)
    assert not t.is_alive()
    assert sorted(inner) == [(0, 2), (0, 4), (2, 4)]  # the caller's split in two, the pool
    # thread's whole
