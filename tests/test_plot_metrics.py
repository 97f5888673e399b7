"""``refimpl plot`` refuses a metrics.json refimpl could not have written (issue 23): a string, a
NaN, a negative or above-1 rate, an accuracy above 1, a negative loss or energy, epochs out of
order. One line naming the entry, the key, the rule and the value; nothing drawn or written.
:func:`refimpl.plot.metrics_kind` is the check (:func:`refimpl.plot.read_run` and
:func:`refimpl.plot.training_figure` call it), so the library refuses too."""
import copy
import json
import os
import re

import pytest
from click.testing import CliRunner

from refimpl import plot as P
from refimpl.cli.main import main

#: Two epochs of each kind, as refimpl writes them (the second layer without spikes: null).
VALID = {
    "classifier": [{"epoch": e, "loss": 1.2 - e / 10, "test_loss": 1.3, "train_accuracy": 0.5,
                    "test_accuracy": 0.4 + e / 10, "firing_rate": [0.1, None],
                    "energy_pj": 10.0, "energy_ann_pj": 100.0} for e in range(2)],
    "lm": [{"epoch": e, "loss": 3.0, "val_loss": 3.2, "unit": "byte",
            "train_bits_per_token": 4.3, "val_bits_per_token": 4.6 - e / 10,
            "unigram_bits_per_token": 4.0, "bigram_bits_per_token": 3.5, "firing_rate": [0.0],
            "energy_per_token_pj": 0.0, "energy_ann_per_token_pj": 50.0} for e in range(2)],
}

RATE = "must be a number in [0, 1], or null for a layer without spikes"
NUMBER = "must be a finite number >= 0"

# (kind, epoch entry, key, bad value, the error's "key must be ..." part)
BAD = [
    ("classifier", 1, "firing_rate", [float("nan"), None], f"firing_rate[0] {RATE}, got nan"),
    ("classifier", 0, "firing_rate", [-0.5, None], f"firing_rate[0] {RATE}, got -0.5"),
    ("classifier", 0, "firing_rate", [0.1, 1.5], f"firing_rate[1] {RATE}, got 1.5"),
    ("classifier", 0, "firing_rate", [0.1, "0.2"], f"firing_rate[1] {RATE}, got '0.2'"),
    ("classifier", 1, "firing_rate", [0.1], "firing_rate must be a list of one rate per layer "
                                            "(2), got [0.1]"),
    ("classifier", 0, "firing_rate", 0.1, "firing_rate must be a list of one rate per layer"),
    ("classifier", 0, "loss", "1.2", f"loss {NUMBER}, got '1.2'"),
    ("classifier", 0, "loss", -0.1, f"loss {NUMBER}, got -0.1"),
    ("classifier", 1, "test_loss", float("inf"), f"test_loss {NUMBER}, got inf"),
    ("classifier", 0, "test_accuracy", 1.2, "test_accuracy must be a number in [0, 1], got 1.2"),
    ("classifier", 0, "train_accuracy", True, "train_accuracy must be a number in [0, 1], got "
                                              "True"),
    ("classifier", 1, "energy_pj", -5.0, f"energy_pj {NUMBER}, got -5.0"),
    ("classifier", 0, "epoch", "0", "epoch must be an integer >= 0, got '0'"),
    ("classifier", 0, "epoch", -1, "epoch must be an integer >= 0, got -1"),
    ("classifier", 1, "epoch", 0, "epoch must be greater than the previous entry's (0), got 0"),
    ("lm", 0, "unit", 5, "unit must be a non-empty string, got 5"),
    ("lm", 1, "val_bits_per_token", float("nan"), f"val_bits_per_token {NUMBER}, got nan"),
    ("lm", 0, "energy_ann_per_token_pj", None, f"energy_ann_per_token_pj {NUMBER}, got None"),
]


def _bad(kind, entry, key, value):
    metrics = copy.deepcopy(VALID[kind])
    metrics[entry][key] = value
    return metrics


def test_every_drawn_metric_has_a_rule():
    drawn = {k for keys in P.METRIC_KEYS.values() for k in keys} - {"firing_rate"}
    assert drawn <= set(P.METRIC_VALUES), drawn - set(P.METRIC_VALUES)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_metrics_as_refimpl_writes_them_are_accepted(kind):
    assert P.metrics_kind(VALID[kind]) == kind


@pytest.mark.parametrize("kind, entry, key, value, message", BAD)
def test_an_impossible_metric_is_refused_in_one_line(kind, entry, key, value, message):
    with pytest.raises(ValueError, match=re.escape(f"metrics: epoch entry {entry}: {message}")):
        P.metrics_kind(_bad(kind, entry, key, value))


def test_the_issues_metrics_json_of_strings_is_refused(tmp_path):
    """Every value a string (what the issue measured: plot printed "could not convert string
    to float: '['")."""
    metrics = [{k: (v if k == "epoch" else str(v)) for k, v in m.items()}
               for m in VALID["classifier"]]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=re.escape("epoch entry 0: loss must be a finite "
                                                   "number >= 0, got '1.2'")):
        P.read_run(tmp_path)


@pytest.mark.parametrize("kind, entry, key, value, message",
                         [BAD[0], BAD[1], BAD[6], BAD[-2]])
def test_cli_plot_refuses_it_and_writes_nothing(tmp_path, kind, entry, key, value, message):
    pytest.importorskip("matplotlib")  # plot asks for matplotlib first
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(_bad(kind, entry, key, value)))  # NaN as JSON's NaN
    before = path.read_bytes()
    r = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, r.output
    assert f"{path}: epoch entry {entry}: {message}" in lines[0], lines[0]
    assert "wrote" not in r.output
    assert os.listdir(tmp_path) == ["metrics.json"] and path.read_bytes() == before


def test_cli_plot_draws_valid_metrics(tmp_path):
    """The control: the same folder with the valid metrics is drawn."""
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.json").write_text(json.dumps(VALID["classifier"]))
    r = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "training.png").is_file()
