"""Options a run would not read are refused, not ignored (issue 23).

Each refusal is what ``--tie-embedding`` without ``--text`` always was: one ``Error:`` line,
exit status 1, no traceback, before anything is computed, printed or written, the inputs (text,
data file, checkpoint) as they were. An initial S4D step outside ``refimpl.ssm.DT_RANGE`` is
refused by the option's type, as ``--dt-min 0`` always was (click: exit status 2). Each refusal
has its control: the same option where it applies, or at its default, is accepted.
"""
import re

import numpy as np
import pytest
from click.testing import CliRunner

from refimpl import model as M
from refimpl.activations import ACTIVATIONS
from refimpl.cli.main import main
from refimpl.optim import adamw_init
from refimpl.ssm import DT_RANGE, s4d_init
from refimpl.tasks import make_task
from refimpl.train import TrainConfig, save_checkpoint
from test_train_robustness import snapshot

TINY = ["--d-model", "4", "--d-state", "2", "--layers", "1", "--epochs", "1",
        "--batch-size", "8"]
TASK = ["--task", "recall", "--samples", "20", "--length", "8"]


def run(args):
    return CliRunner().invoke(main, args)


def refused(root, args, fragment, status=1):
    """``args`` stop with one ``Error:`` line holding ``fragment``, exit ``status``, no
    traceback, no result printed, and nothing under ``root`` changed."""
    before = snapshot(root)
    r = run(args)
    assert r.exit_code == status, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, r.output
    assert fragment in lines[0], lines[0]
    for result in ("training ", "evaluating ", "test accuracy", "streamed"):
        assert result not in r.output, r.output  # refused before any work or result
    assert snapshot(root) == before, "a refused command must leave its inputs as they were"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with a text file, an .npz data file, and untrained checkpoints on recall
    (causal and bidirectional) recording their data."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "t.txt").write_text("the spiking state space model reads bytes. " * 30)
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x_train=rng.normal(size=(20, 8)), y_train=rng.integers(0, 2, 20),
             x_test=rng.normal(size=(6, 8)), y_test=rng.integers(0, 2, 6))
    ds = make_task("recall", n=20, L=8, seed=0)
    for name, bidirectional in (("c.h5", False), ("bi.h5", True)):
        cfg = M.ModelConfig.for_data(ds, d_model=4, d_state=2, n_layers=1,
                                     bidirectional=bidirectional)
        p, buf = M.init_model(cfg, 0)
        save_checkpoint(str(root / name), cfg, TrainConfig(epochs=1), p, buf, adamw_init(p), 1,
                        [], ds["recipe"])
    return root


def _args(args, root):
    return [a.format(root=root) for a in args]


SDN_FAMILIES = "/".join(k for k, fam in ACTIVATIONS.items() if fam.needs_sdn_weights)
NO_SDN = next(k for k, fam in ACTIVATIONS.items() if not fam.needs_sdn_weights)

# (arguments of refimpl train, fragment of the one error line)
TRAIN_REFUSALS = [
    (["--text", "{root}/t.txt", "--tokens", "5"], "drop --tokens"),
    (["--text", "{root}/t.txt", "--samples", "30"], "drop --samples"),
    (["--text", "{root}/t.txt", "--task", "recall"], "drop --task"),
    (TASK + ["--vocab", "chars"], "--vocab applies to --text (language models) only"),
    (TASK + ["--context", "64"], "--context applies to --text (language models) only"),
    (TASK + ["--val-frac", "0.2"], "--val-frac applies to --text (language models) only"),
    (TASK + ["--tie-embedding"], "--tie-embedding applies to --text (language models) only"),
    (["--data", "{root}/d.npz", "--context", "64", "--vocab", "chars"],
     "--vocab/--context apply to --text"),
    (TASK + ["--activation", NO_SDN, "--sdn-weights", "{root}/d.npz"],
     f"--sdn-weights applies to --activation {SDN_FAMILIES} only; --activation {NO_SDN} "
     f"does not use it"),
    (TASK + ["--tokens", "5"], "--tokens applies to --data (integer inputs) only"),
    (["--data", "{root}/d.npz", "--samples", "30"], "--samples applies to a built-in task"),
    (["--data", "{root}/d.npz", "--length", "8"], "--length applies to a built-in task"),
]


@pytest.mark.parametrize("args, fragment", TRAIN_REFUSALS)
def test_train_refuses_an_option_the_run_would_not_read(inputs, tmp_path, args, fragment):
    out = tmp_path / "run"
    refused(inputs, ["train", "--out", str(out)] + TINY + _args(args, inputs), fragment)
    assert not out.exists()


def test_the_same_options_where_they_apply_or_at_their_defaults_are_accepted(inputs, tmp_path):
    """The controls: --tokens 0, --vocab bytes, --context 128 (the defaults) with a task,
    --seed with --text, and --dt-min / --dt-max at the ends of DT_RANGE train."""
    lo, hi = (f"{v!r}" for v in DT_RANGE)
    for i, args in enumerate([TASK + ["--tokens", "0", "--vocab", "bytes", "--context", "128",
                                      "--dt-min", lo, "--dt-max", hi],
                              ["--text", str(inputs / "t.txt"), "--context", "16", "--seed",
                               "3", "--vocab", "chars"]]):
        r = run(["train", "--out", str(tmp_path / str(i))] + TINY + args)
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, flag", [
    (["--dt-min", "1e-300", "--dt-max", "1e300"], "'--dt-min'"),  # the range
    (["--dt-min", "1e-9"], "'--dt-min'"),
    (["--dt-max", "1e3"], "'--dt-max'"),
])
def test_train_refuses_a_dt_outside_dt_range_as_it_refuses_dt_min_0(inputs, tmp_path, args,
                                                                     flag):
    out = tmp_path / "run"
    refused(inputs, ["train", "--out", str(out)] + TINY + TASK + args,
            f"Invalid value for {flag}", status=2)
    assert not out.exists()


@pytest.mark.parametrize("field", ["dt_min", "dt_max"])
@pytest.mark.parametrize("value", [1e-300, 9.9e-9, 100.5, 1e300])
def test_the_library_refuses_a_dt_outside_dt_range(field, value):
    """The range is checked before the order (dt_min = 100.5 > dt_max: its range is named)."""
    kw = {"dt_min": 1e-3, "dt_max": 1e-1, field: value}
    msg = re.escape(f"{field} must be in [1e-08, 100] (refimpl.ssm.DT_RANGE), got {value:g}")
    with pytest.raises(ValueError, match=msg):
        s4d_init(2, 4, **kw)
    with pytest.raises(ValueError, match=msg):
        M.ModelConfig(n_classes=2, **kw)


def test_the_ends_of_dt_range_draw_finite_parameters():
    lo, hi = DT_RANGE
    p = s4d_init(2, 4, dt_min=lo, dt_max=hi)
    assert np.all(np.isfinite(p["log_dt"]))
    assert np.log(lo) <= p["log_dt"].min() and p["log_dt"].max() <= np.log(hi)


# (arguments of refimpl evaluate after the checkpoint c.h5, fragment of the one error line)
EVALUATE_REFUSALS = [
    (["--stream", "--tokens", "5"], "--tokens applies to --data (integer inputs) only; the "
                                    "built-in task recall makes its own inputs"),
    (["--tokens", "5"], "--tokens applies to --data"),
    (["--task", "recall", "--tokens", "5"], "--tokens applies to --data"),
    (["--data", "{root}/d.npz", "--seed", "1"], "--seed applies to a built-in task"),
    (["--data", "{root}/d.npz", "--samples", "30"], "--samples applies to a built-in task"),
    (["--batch-size", "8"], "--batch-size applies to --stream only"),
]


@pytest.mark.parametrize("args, fragment", EVALUATE_REFUSALS)
def test_evaluate_refuses_an_option_it_would_not_read(inputs, args, fragment):
    refused(inputs, ["evaluate", str(inputs / "c.h5")] + _args(args, inputs), fragment)


def test_evaluate_refuses_a_stream_before_it_prints_a_result(inputs):
    """It used to print the parallel form's accuracy, then refuse --stream."""
    refused(inputs, ["evaluate", str(inputs / "bi.h5"), "--stream"],
            "a bidirectional model cannot stream")


def test_evaluate_accepts_the_options_it_reads(inputs):
    """The controls: the recorded task, --batch-size at its default without --stream."""
    r = run(["evaluate", str(inputs / "c.h5"), "--batch-size", "64", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "recall (samples 20, length 8, seed 1)" in r.output
