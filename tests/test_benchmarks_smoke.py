"""Smoke test of the benchmark harness (benchmarks/run.py) on quick shapes, one repeat.

Runs the real script in a subprocess, writing into a temporary folder, so the committed
benchmarks/results.json and BENCHMARKS.md are never touched.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"

NOTE = "Hand-written note: training took 3 h (must survive regeneration)."


def test_bench_quick_writes_json_and_markdown(tmp_path):
    # A BENCHMARKS.md with hand-written text around a stale generated region.
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- generated:begin group:ssm -->\nSTALE\n"
                  "<!-- generated:end group:ssm -->\n\n## Notes\n\n" + NOTE + "\n")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--repeats", "1", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == "refimpl-benchmarks" and doc["schema_version"] == 1
    for key in ("date", "cpu_model", "cpu_count", "python", "numpy", "numba", "scipy",
                "refimpl_threads"):
        assert key in doc["machine"], key
    ssm = doc["groups"]["ssm"]
    assert ssm["quick"] is True and ssm["repeats"] == 1
    figures = {r["figure"]: r for r in ssm["rows"]}
    for name in ("S4D kernel generation (zoh)", "FFT convolution forward",
                 "FFT convolution forward + backward", "recurrence (whole sequence)",
                 "S4D layer forward + backward"):
        assert name in figures, name
    for r in ssm["rows"]:
        assert r["refimpl"]["repeats"] == 1
        assert 0 < r["refimpl"]["min_s"] <= r["refimpl"]["median_s"]
    kernel = figures["S4D kernel generation (zoh)"]
    assert kernel["baseline"]["median_s"] > 0
    assert kernel["speedup"] > 0 and kernel["target_speedup"] == 10
    assert kernel["check"]["max_rel_err"] <= kernel["check"]["rtol"]

    check_stream_group(doc["groups"]["stream"])

    text = md.read_text()
    assert NOTE in text and "STALE" not in text
    assert text.count("<!-- generated:begin group:stream -->") == 1
    assert text.count("<!-- generated:begin group:ssm -->") == 1
    assert "<!-- generated:begin machine -->" in text
    assert "| S4D kernel generation (zoh) |" in text
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_bench_list_is_a_table():
    proc = subprocess.run([sys.executable, str(RUN), "--list"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["group", "title"] and set(lines[1]) <= {"-", " "}
    assert {line.split()[0] for line in lines[2:]} >= {"ssm", "neurons", "training"}


def check_stream_group(g):
    """The ``stream`` group (issue 12): per-step rows for every family and both batch sizes,
    single-step latencies, and the state's bytes per stream as the state table implies."""
    assert g["quick"] is True
    p = g["params"]
    H, N2, n_layers = p["H"], p["N"] // 2, p["layers"]
    rows = {r["figure"]: r for r in g["rows"]}
    for fam in p["families"]:
        for batch, n_step in p["batches"]:
            step = rows[f"{fam} B={batch}: step() x{n_step} vs parallel"]
            chunk = rows[f"{fam} B={batch}: chunks of {p['chunk']} vs parallel"]
            assert step["refimpl"]["steps_per_call"] == n_step
            assert chunk["refimpl"]["steps_per_call"] == p["L"]
            assert step["baseline"]["steps_per_call"] == p["L"]
            lat = step["refimpl"]["latency"]
            assert lat["steps"] == n_step * g["repeats"]
            assert 0 < lat["median_s"] <= lat["p99_s"] <= lat["max_s"]
            assert step["speedup"] == step["baseline"]["median_s"] / step["refimpl"]["median_s"]
        mem = p["memory"][fam]
        # bytes per stream from the state table of refimpl/stream.py: ssm.x complex128 (H, N2)
        # per layer, pool.sum float64 (H,), plus the family's entries per layer
        per_layer = {"gelu": 0, "binary_gsu": 0, "sdn": 8 * H * 8}.get(fam, 2 * H * 8)
        assert mem["state_bytes_per_stream"] == n_layers * (16 * H * N2 + per_layer) + 8 * H, fam
        assert mem["param_bytes"] > 0 and mem["step_coeff_bytes"] > 0
