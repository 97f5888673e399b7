"""refimpl.threads: the setting, the free-core count, BLAS on one thread, the pool (issue 25)."""
import os
import subprocess
import sys
import threading
import time

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
                                                    (8, 3, 5), (4, None, 4)])
def test_auto_takes_the_cores_the_other_processes_leave(monkeypatch, cores, busy, expected):
    monkeypatch.setattr(threads, "cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
    monkeypatch.setattr(threads, "_sample", {"at": -1.0, "busy": None})
    with threads.using("auto"):
        assert threads.count() == expected


def test_the_sample_is_reused_for_a_while(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: calls.append(1) or 0)
    monkeypatch.setattr(threads, "_sample", {"at": -1.0, "busy": None})
    with threads.using("auto"):
        for _ in range(100):
            threads.count()
    assert len(calls) == 1


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux /proc")
def test_busy_processes_are_counted_and_this_process_is_not():
    """Two spinning processes are seen (other load only adds to the count); this process's own
    busy threads are not."""
    spin = "while True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        seen = 0
        deadline = time.monotonic() + 10
        while seen < 2 and time.monotonic() < deadline:  # until both have started spinning
            time.sleep(0.1)
            seen = threads.busy_elsewhere()
        assert seen >= 2
    finally:
        for p in procs:
            p.kill()
            p.wait()


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
    assert threads.busy_elsewhere(_fake_proc(tmp_path, running, states)) == expected


def test_an_unreadable_proc_means_unknown(tmp_path):
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
