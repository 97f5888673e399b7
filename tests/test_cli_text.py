"""``refimpl train --text`` and ``refimpl generate`` (issue 14): a run on a generated text, the
generated text, determinism, and every bad input as one line."""
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from refimpl.cli import text_commands as text_cli
from refimpl.cli.main import main as cli_main
from refimpl.progress import EpochEnd

WORDS = ["spike", "state", "space", "model", "neuron", "threshold"]
SMALL = ["--context", "16", "--epochs", "1", "--d-model", "8", "--d-state", "4",
         "--layers", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 800)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_run(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lm"
    r = CliRunner().invoke(cli_main, ["train", "--text", str(text_file), "--vocab", "chars",
                                      "--out", str(out)] + SMALL)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_train_text_writes_metrics_and_shows_tokens_per_second(lm_run):
    out, output = lm_run
    m = json.loads((out / "metrics.json").read_text())[-1]
    for k in ("val_bits_per_token", "unigram_bits_per_token", "bigram_bits_per_token",
              "firing_rate", "energy_per_token_pj", "tokens_per_second"):
        assert k in m
    assert "bits/char" in output and "tok/s" in output and "bigram" in output


def test_generate_is_deterministic_and_decodes(lm_run):
    out, _ = lm_run
    args = ["generate", str(out / "checkpoint.h5"), "--prompt", "spike ", "--length", "30",
            "--temperature", "0.8", "--seed", "3"]
    a, b = CliRunner().invoke(cli_main, args), CliRunner().invoke(cli_main, args)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout and a.stdout.startswith("spike ")
    assert len(a.stdout.rstrip("\n")) == len("spike ") + 30  # chars: one token per character
    assert set(a.stdout.rstrip("\n")) <= set(" ".join(WORDS))  # the stored vocabulary
    c = CliRunner().invoke(cli_main, args[:-1] + ["4"])
    assert c.stdout != a.stdout


def _one_line_error(r, match):
    assert r.exit_code != 0
    err = r.output.strip().splitlines()[-1]
    assert err.startswith("Error:") and match in err, r.output


@pytest.mark.parametrize("content, extra, match", [
    (b"", [], "empty"),
    (b"short text", [], "too short"),
    (bytes(range(256)) * 40, ["--vocab", "chars"], "not UTF-8"),
])
def test_train_text_bad_input(tmp_path, content, extra, match):
    path = tmp_path / "t.bin"
    path.write_bytes(content)
    r = CliRunner().invoke(cli_main, ["train", "--text", str(path), "--out",
                                      str(tmp_path / "o")] + SMALL + extra)
    _one_line_error(r, match)
    assert not (tmp_path / "o").exists()


def test_train_text_refuses_bidirectional_and_mixed_data(text_file, tmp_path):
    r = CliRunner().invoke(cli_main, ["train", "--text", str(text_file), "--bidirectional",
                                      "--out", str(tmp_path / "o")] + SMALL)
    _one_line_error(r, "must be causal")
    r = CliRunner().invoke(cli_main, ["train", "--text", str(text_file), "--task", "recall",
                                      "--out", str(tmp_path / "o")] + SMALL)
    _one_line_error(r, "drop --task")


@pytest.mark.parametrize("args, match", [
    (["--prompt", "spike \u00e9", "--length", "5"], "'\u00e9'"),
    (["--prompt", "spike", "--length", "0"], "--length must be >= 1"),
])
def test_generate_bad_input(lm_run, args, match):
    out, _ = lm_run
    r = CliRunner().invoke(cli_main, ["generate", str(out / "checkpoint.h5")] + args)
    _one_line_error(r, match)


def test_generate_refuses_a_classifier_checkpoint(tmp_path):
    out = tmp_path / "clf"
    r = CliRunner().invoke(cli_main, ["train", "--task", "recall", "--samples", "64",
                                      "--length", "12", "--epochs", "1", "--d-model", "8",
                                      "--d-state", "4", "--layers", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli_main, ["generate", str(out / "checkpoint.h5"), "--prompt", "a"])
    _one_line_error(r, "classifier checkpoint")



class _Cut(Exception):
    pass


def test_resumed_text_run_counts_the_remaining_steps(text_file, tmp_path, monkeypatch):
    """Off a terminal the bar prints ``train: done/total``: a 3-epoch run cut after epoch 1 and
    resumed counts the steps of the 2 epochs still to run, not of the whole run."""
    args = ["train", "--text", str(text_file), "--out", str(tmp_path / "lm")] + SMALL
    args[args.index("--epochs") + 1] = "3"
    real = text_cli.train_lm

    def cut_after_first_epoch(*a, progress=None, **k):
        def on_event(ev):
            progress(ev)
            if isinstance(ev, EpochEnd):
                raise _Cut()
        return real(*a, progress=on_event, **k)

    monkeypatch.setattr(text_cli, "train_lm", cut_after_first_epoch)
    first = CliRunner().invoke(cli_main, args)
    assert isinstance(first.exception, _Cut), first.output
    monkeypatch.undo()
    r = CliRunner().invoke(cli_main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    whole = int(re.search(r"train: 0/(\d+)", first.output).group(1))
    rest = int(re.search(r"train: 0/(\d+)", r.output).group(1))
    assert rest * 3 == whole * 2 and "resuming after epoch 1" in r.output, r.output
    assert re.search(rf"train: {rest}/{rest} \(100 %\)", r.output), r.output
