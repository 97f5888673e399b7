"""benchmarks/lm_runs.py smoke test: the corpus (English shipped with Python) and one quick run."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import lm_runs  # noqa: E402


def test_corpus_is_deterministic_english_of_the_size_asked():
    a, b = lm_runs.stdlib_english(200_000), lm_runs.stdlib_english(200_000)
    assert a == b and len(a.encode()) >= 200_000
    words = a.lower().split()
    assert words.count("the") > len(words) / 100  # prose, not code: "the" is ~4-6 % of words


def test_quick_run_writes_json_and_region(tmp_path):
    lm_runs.main(["--quick", "--only-family", "lif", "--out-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "lm_runs.json").read_text())
    (r,) = doc["runs"]
    assert r["family"] == "lif" and r["sample"].startswith("The ")
    assert 0 < r["val_bits_per_byte"] < 8 and r["bigram_bits_per_byte"] > 0
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "generated:begin lm-runs" in md and "| lif |" in md
