"""benchmarks/contention.py (issue 25): the ratios and verdicts it reports, from fabricated step
times (no spinners, no children: the measurement itself is the benchmark's, not a test's)."""
import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import contention  # noqa: E402

#: (step, version, busy) -> step times in seconds, chosen so that each verdict is known by hand.
TIMES = {("classifier", "before", 0): [0.020, 0.022, 0.021],
         ("classifier", "before", 2): [0.070, 0.070, 0.071],  # 70 / 21 = 3.33x: over 2.5x
         ("classifier", "before", 4): [0.100, 0.105, 0.110],  # 105 / 21 = 5.0x: not over 5x
         ("classifier", "after", 0): [0.025, 0.025, 0.026],
         ("classifier", "after", 2): [0.050, 0.050, 0.050],  # 2.0x
         ("classifier", "after", 4): [0.080, 0.080, 0.080],  # 3.2x
         ("lm", "before", 0): [0.100],
         ("lm", "before", 2): [0.400],  # 4x
         ("lm", "before", 4): [0.600],  # 6x
         ("lm", "after", 0): [0.070],
         ("lm", "after", 2): [0.120],  # 1.71x
         ("lm", "after", 4): [0.200]}  # 2.86x


def test_ratios_and_verdicts_are_the_medians_over_the_quiet_median(monkeypatch, tmp_path):
    state = {"busy": None}

    @contextlib.contextmanager
    def busy(n):
        state["busy"] = n
        yield

    def run_child(version, workdir, *args):
        mode, which, seconds = args
        return {"times": TIMES[(which, version.name, state["busy"])], "threads": 1}

    monkeypatch.setattr(contention, "busy", busy)
    monkeypatch.setattr(contention, "run_child", run_child)
    versions = [contention.Version("before", tmp_path, None),
                contention.Version("after", tmp_path, None)]
    out = contention.bench_contention(versions, tmp_path, 1.0)
    s = out["summary"]
    assert s["classifier"]["before"]["ratio"]["2"] == pytest.approx(0.070 / 0.021)
    assert s["classifier"]["before"]["met"] == {"2": False, "4": True}  # 5.0x is within 5x
    assert s["classifier"]["after"]["met"] == {"2": True, "4": True}
    assert s["lm"]["before"]["ratio"]["4"] == pytest.approx(6.0)
    assert s["lm"]["before"]["met"] == {"2": False, "4": False}
    assert s["lm"]["after"]["ratio"]["2"] == pytest.approx(0.12 / 0.07)
    assert len(out["points"]) == 12


def test_quick_needs_an_out_dir():
    with pytest.raises(SystemExit):
        contention.parse_args(["--quick"])
