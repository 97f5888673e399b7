"""``make bench-peers`` (benchmarks/peers, issue 13): the PyTorch peer and its driver.

Two kinds of tests:

- Without torch: the driver's pieces that need no PyTorch (the BENCHMARKS.md region merge, the
  rendered table and its ratios, the float32 detection, the missing-environment message).
- With a PyTorch environment (``.venv-peers/bin/python`` from ``make bench-peers``, or
  ``$REFIMPL_PEERS_PYTHON``; skipped otherwise): the quick run end to end in a temporary folder,
  whose first step is the float64 correctness check. The torch model loaded with refimpl's
  parameters must give refimpl's loss and gradients within ``torch_model.RTOL`` (its comment
  derives the bound), and two deliberately wrong models (LayerNorm eps 1e-6; LIF without the
  gradient through the reset) must be rejected by the same check, so it can fail.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl import model as M

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run = _load("peers_run", PEERS / "run.py")  # not "run": benchmarks/run.py has that name


def _peers_python():
    exe = os.environ.get("REFIMPL_PEERS_PYTHON") or str(ROOT / ".venv-peers" / "bin" / "python")
    return exe if Path(exe).exists() else None


needs_torch = pytest.mark.skipif(_peers_python() is None,
                                 reason="no PyTorch environment (.venv-peers: make bench-peers, "
                                        "or set REFIMPL_PEERS_PYTHON)")


# --------------------------------------------------------------------------------------------
# Without torch
# --------------------------------------------------------------------------------------------

HAND = "Hand-written paragraph under the region (must survive)."


def test_merge_region_replaces_only_its_region():
    old = ("# B\n\n<!-- generated:begin group:ssm -->\nSSM\n<!-- generated:end group:ssm -->\n\n"
           "<!-- generated:begin peers -->\nSTALE\n<!-- generated:end peers -->\n\n" + HAND + "\n")
    new = run.merge_region(old, "peers", "FRESH\n")
    assert "STALE" not in new and "FRESH" in new and HAND in new and "\nSSM\n" in new
    assert new.count("<!-- generated:begin peers -->") == 1
    assert new.index("FRESH") < new.index(HAND)
    assert run.merge_region(new, "peers", "FRESH\n") == new  # idempotent


def test_merge_region_appends_when_absent_and_refuses_broken_markers():
    assert run.merge_region("# B\n\ntext\n", "peers", "X").endswith(
        "text\n\n<!-- generated:begin peers -->\nX\n<!-- generated:end peers -->\n")
    assert run.merge_region(None, "peers", "X").count("generated:end peers") == 1
    with pytest.raises(ValueError, match="unbalanced"):
        run.merge_region("<!-- generated:begin peers -->\nX\n", "peers", "Y")
    with pytest.raises(ValueError, match="unbalanced"):
        run.merge_region("<!-- generated:end peers -->\n<!-- generated:begin peers -->\n",
                         "peers", "Y")


def _timing(median, n=5, repeats=5):
    return {"median_s": median, "min_s": median, "times_s": [median] * n, "warmup_s": median,
            "repeats": n, "capped": n < repeats, "first_loss": 2.3}


def _doc():
    check = [{"family": f, "variant": "", "shape": dict(B=2, H=8, N=4, L=16, layers=2),
              "loss_rel_err": 1e-16, "grad_rel_err_max": 2e-13, "grad_worst": "decoder.W",
              "min_spike_margin": None if f == "gelu" else 1e-3, "rtol": 1e-9, "ok": True}
             for f in run.FAMILIES]
    check.append({**check[2], "variant": "detach_reset", "grad_rel_err_max": 1.0, "ok": False,
                  "control": True})
    s = run.SHAPES["L1024"]
    points = [
        {"shape_name": "L1024", "shape": s, "family": "gelu", "loadavg_1min": 0.54,
         "timings": {"refimpl64": _timing(2.0), "torch64": _timing(4.0),
                     "torch32": _timing(1.0)}},
        {"shape_name": "L1024", "shape": s, "family": "lif",
         "timings": {"refimpl64": _timing(3.0), "torch64": _timing(60.0, n=2),
                     "torch32": _timing(5.0), "refimpl32": {"error": "TypeError: x"}}},
    ]
    machine = {"date": "2026-11-27T00:00:00+00:00", "git_commit": "abc", "cpu_model": "CPU",
               "cpu_count": 2, "numpy": "2", "NUMBA_NUM_THREADS": 2, "torch_torch": "2.13.0",
               "torch_threads": 2, "loadavg_start": [1.0, 1, 1], "loadavg_end": [2.0, 2, 2]}
    return {"schema": run.SCHEMA, "quick": False, "machine": machine, "repeats": 5,
            "max_seconds": 120.0, "refimpl_float32": False, "check": check, "points": points}


def test_render_ratios_caps_and_missing_float32():
    text = run.render(_doc())
    rows = [line for line in text.splitlines() if line.startswith("| B=32")]
    assert rows[0] == ("| B=32 H=128 N=64 L=1024 | `gelu` | 2 s (2 s) | 4 s (4 s) | 0.50 | - | "
                       "1 s (1 s) | - | 5/5/-/5 | 0.5 |")
    assert rows[1].startswith("| B=32 H=128 N=64 L=1024 | `lif` | 3 s (3 s) | 60 s (60 s) | "
                              "0.05 | error |")
    assert rows[1].endswith("| 5/2/-/5 | - |")  # torch64 capped at 2 timed steps
    assert "refimpl f32: `-` until" in text
    assert "Negative control lif with `detach_reset`: rejected" in text
    assert "lif refimpl32: TypeError: x" in text
    assert "load average 1.0 at the start, 2.0 at the end" in text


def test_ratio_is_refimpl_over_torch():
    row = {"refimpl64": _timing(1.0), "torch64": _timing(4.0)}
    assert run.ratio(row, "refimpl64", "torch64") == 0.25
    assert run.ratio(row, "refimpl32", "torch32") is None


def test_float32_detection_follows_model_config():
    has = "dtype" in {f.name for f in dataclasses.fields(M.ModelConfig)}
    assert run.refimpl_float32_available() is has


def test_missing_environment_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("REFIMPL_PEERS_PYTHON", raising=False)
    with pytest.raises(SystemExit, match="make bench-peers"):
        run.peers_python(str(tmp_path / "nope" / "python"))


# --------------------------------------------------------------------------------------------
# With torch
# --------------------------------------------------------------------------------------------


@needs_torch
def test_quick_run_checks_the_model_and_writes_results(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n" + HAND + "\n")
    proc = subprocess.run(
        [sys.executable, str(PEERS / "run.py"), "--quick", "--repeats", "1", "--out-dir",
         str(tmp_path), "--peers-python", _peers_python()],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == run.SCHEMA and doc["quick"] is True

    checks = [r for r in doc["check"] if not r.get("control")]
    controls = [r for r in doc["check"] if r.get("control")]
    assert sorted(r["family"] for r in checks) == sorted(run.FAMILIES)
    for r in checks:  # the same model: loss and every gradient within RTOL (see its comment)
        assert r["ok"] and not r["missing"], r
        assert r["loss_rel_err"] <= r["rtol"] and r["grad_rel_err_max"] <= r["rtol"], r
        if r["family"] != "gelu":  # spikes fire, none decided within the tolerance
            assert r["min_spike_margin"] > 1e3 * r["rtol"], r
            assert 0.01 < r["spike_rate"] < 0.99, r
    assert {(r["family"], r["variant"]) for r in controls} == {("gelu", "ln_eps"),
                                                               ("lif", "detach_reset")}
    for r in controls:  # wrong models are rejected, by far
        assert not r["ok"] and r["grad_rel_err_max"] > 1e3 * r["rtol"], r

    assert [p["family"] for p in doc["points"]] == list(run.FAMILIES)
    for p in doc["points"]:
        t = p["timings"]
        for k in ("refimpl64", "torch64", "torch32"):
            assert 0 < t[k]["min_s"] <= t[k]["median_s"] and t[k]["repeats"] >= 1, (p, k)
        # the same model from the same parameters: the first step's loss agrees
        assert abs(t["torch64"]["first_loss"] - t["refimpl64"]["first_loss"]) <= 1e-9 * abs(
            t["refimpl64"]["first_loss"]), p
    assert doc["machine"]["torch_threads"] == run.TORCH_THREADS

    text = md.read_text()
    assert HAND in text and text.count("<!-- generated:begin peers -->") == 1
    assert "**Quick smoke-test shapes: not a measurement.**" in text
    assert not list(tmp_path.glob("*.tmp"))
