"""``refimpl train`` / ``refimpl evaluate`` through CliRunner: a run, its files, and every bad
input as a one-line error with a nonzero exit, no traceback, and nothing half-written."""
import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from refimpl import model as M
from refimpl.cli.main import main

SMALL = ["--samples", "64", "--length", "16", "--d-model", "8", "--d-state", "4",
         "--layers", "1", "--epochs", "2", "--batch-size", "16"]


def run(args):
    return CliRunner().invoke(main, args)


def one_line_error(r, fragment):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [l for l in r.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, r.output
    assert fragment in lines[0], lines[0]


def test_train_writes_metrics_config_checkpoint_and_evaluates(tmp_path):
    out = tmp_path / "run"
    r = run(["train", "--task", "parity", "--activation", "lif", "--out", str(out)] + SMALL)
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and "firing rate" in r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [0, 1]
    for key in ("loss", "train_accuracy", "test_accuracy", "firing_rate", "sparsity", "mac", "ac",
                "energy_pj"):
        assert key in metrics[-1]
    assert 0 < metrics[-1]["firing_rate"][0] < 1
    assert metrics[-1]["sparsity"][0] == pytest.approx(1 - metrics[-1]["firing_rate"][0])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["activation"] == "lif"
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert f.attrs["schema"] == "refimpl-checkpoint" and int(f.attrs["epoch"]) == 2
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    r = run(["evaluate", str(out / "checkpoint.h5"), "--task", "parity", "--samples", "64",
             "--length", "16"])
    assert r.exit_code == 0, r.output
    acc = float(r.output.split("test accuracy")[1].split()[0])
    assert acc == pytest.approx(metrics[-1]["test_accuracy"], abs=5e-5)  # printed to 4 places


def test_train_refuses_to_clobber_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    args = ["train", "--task", "adding", "--activation", "gelu", "--out", out] + SMALL
    assert run(args).exit_code == 0
    one_line_error(run(args), "exists; pass --resume")
    r = run(args + ["--resume"])  # a finished run: nothing left to do
    assert r.exit_code == 0, r.output
    assert len(json.loads(open(os.path.join(out, "metrics.json")).read())) == 2


def save(tmp_path, name="d.npz", **arrays):
    rng = np.random.default_rng(0)
    base = {"x_train": rng.normal(size=(20, 10)), "y_train": rng.integers(0, 2, 20),
            "x_test": rng.normal(size=(6, 10)), "y_test": rng.integers(0, 2, 6)}
    base.update(arrays)
    base = {k: v for k, v in base.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **base)
    return str(path)


BAD_DATA = {
    "missing key": (dict(y_test=None), "missing key(s) ['y_test']"),
    "mismatched lengths": (dict(y_train=np.zeros(19, dtype=np.int64)),
                           "x_train has 20 samples but y_train has 19"),
    "NaN values": (dict(x_test=np.full((6, 10), np.nan)), "x_test contains NaN or inf values"),
    "labels out of range": (dict(y_train=np.full(20, -1)), "labels must be >= 0"),
    "declared classes exceeded": (dict(n_classes=np.array(2), y_test=np.array([0, 1, 2, 0, 1, 0])),
                                  "labels out of range: max label 2"),
    "float labels": (dict(y_train=np.zeros(20)), "y_train must hold integer labels"),
    "complex inputs": (dict(x_train=np.zeros((20, 10), dtype=np.complex64)),
                       "x_train must be float64 (or float32/float16), got complex64"),
    "integer inputs without --tokens": (dict(x_train=np.zeros((20, 10), dtype=np.int64)),
                                        "pass --tokens V"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_file(tmp_path, name):
    arrays, fragment = BAD_DATA[name]
    out = tmp_path / "run"
    r = run(["train", "--data", save(tmp_path, **arrays), "--out", str(out)] + SMALL[4:])
    one_line_error(r, fragment)
    assert not out.exists(), "nothing may be written when the input is bad"


def test_data_file_not_npz(tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"not a zip")
    one_line_error(run(["train", "--data", str(p), "--out", str(tmp_path / "o")]),
                   "not a .npz (zip) file")


def test_tokens_out_of_vocabulary(tmp_path):
    x = np.random.default_rng(0).integers(0, 9, (20, 10))
    path = save(tmp_path, x_train=x, x_test=x[:6])
    one_line_error(run(["train", "--data", path, "--tokens", "5", "--out", str(tmp_path / "o")]),
                   "tokens must lie in [0, 5)")


def test_unknown_activation(tmp_path):
    r = run(["train", "--task", "adding", "--activation", "relu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Invalid value for '--activation'" in r.output
    assert not (tmp_path / "o").exists()


def test_sdn_needs_weights(tmp_path):
    one_line_error(run(["train", "--task", "adding", "--activation", "sdn", "--out",
                        str(tmp_path / "o")] + SMALL), "needs --sdn-weights")


def test_sdn_family_trains_with_a_weights_file_and_rejects_a_bad_one(tmp_path):
    from refimpl.sdn import save_weights

    rng = np.random.default_rng(0)
    w = {"w0": rng.normal(0, .3, (8, 1, 8)), "w1": np.zeros(8), "w2": rng.normal(0, .3, (8, 8, 1)),
         "w3": np.zeros(8), "w4": rng.normal(0, .3, (1, 8, 1)), "w5": np.zeros(1)}
    npz = tmp_path / "w.npz"
    np.savez(npz, **w)
    h5 = tmp_path / "w.h5"
    save_weights(str(h5), w)
    for path in (npz, h5):
        out = tmp_path / f"run-{path.suffix[1:]}"
        r = run(["train", "--task", "recall", "--activation", "sdn", "--sdn-weights", str(path),
                 "--out", str(out)] + SMALL)
        assert r.exit_code == 0, r.output
        assert (out / "checkpoint.h5").exists()
    np.savez(tmp_path / "bad.npz", **{**w, "w2": np.zeros((8, 8))})
    one_line_error(run(["train", "--task", "recall", "--activation", "sdn", "--sdn-weights",
                        str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")] + SMALL), "w2")
    assert not (tmp_path / "o").exists()


def test_corrupted_checkpoint(tmp_path):
    p = tmp_path / "c.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # HDF5 signature, truncated body
    one_line_error(run(["evaluate", str(p), "--task", "adding"]), "c.h5")


def test_incompatible_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run(["train", "--task", "adding", "--activation", "gelu", "--out", str(out)] + SMALL)
    assert r.exit_code == 0
    with h5py.File(out / "checkpoint.h5", "a") as f:
        del f["params/decoder.W"]
    one_line_error(run(["evaluate", str(out / "checkpoint.h5"), "--task", "adding"]),
                   "parameters do not match")
    with h5py.File(out / "checkpoint.h5", "a") as f:
        f.attrs["schema_version"] = 99
    one_line_error(run(["evaluate", str(out / "checkpoint.h5"), "--task", "adding"]),
                   "schema_version 99")


def test_checkpoint_does_not_fit_data(tmp_path):
    out = tmp_path / "run"
    r = run(["train", "--task", "adding", "--activation", "gelu", "--out", str(out)] + SMALL)
    assert r.exit_code == 0
    one_line_error(run(["evaluate", str(out / "checkpoint.h5"), "--task", "parity"]),
                   "data does not fit the checkpoint's model")


def test_choices_come_from_the_library_registries():
    """A name registered in the library is accepted by the CLI without touching the CLI."""
    from refimpl.activations import ACTIVATIONS
    from refimpl.tasks import TASKS

    params = {p.name: p for p in main.commands["train"].params}
    assert list(params["activation"].type.choices) == list(ACTIVATIONS)
    assert list(params["task"].type.choices) == list(TASKS)
    assert params["d_model"].default == M.ModelConfig.__dataclass_fields__["d_model"].default


# --- model options on the command line (issue 15) -------------------------------------------

#: Every model option away from its ModelConfig default (refractory: the family that uses all).
MODEL_OPTIONS = {"activation": "refractory", "surrogate": "atan", "disc": "bilinear",
                 "init": "inv", "dt_min": 0.02, "dt_max": 0.02, "grad_mode": "sltt",
                 "neuron_impl": "iterative", "norm": "batch", "prenorm": True, "dropout": 0.1}
TINY = ["--samples", "32", "--length", "8", "--d-model", "4", "--d-state", "2", "--layers", "1",
        "--epochs", "1", "--batch-size", "16"]


def model_args(options):
    args = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name == "prenorm":
            args.append("--prenorm" if value else "--postnorm")
        else:
            args += [flag, str(value)]
    return args


def test_every_model_config_field_is_an_option_with_its_default():
    """A field added to ModelConfig must get an option (or be derived from the data)."""
    import dataclasses

    from refimpl.ssm import DISCRETIZATIONS, INITS
    from refimpl.surrogates import SURROGATES

    params = {p.name: p for p in main.commands["train"].params}
    parsed = main.commands["train"].make_context("train", []).params  # every option's default
    derived = {"n_classes", "d_input", "vocab", "head"}  # from the data or --text
    for f in dataclasses.fields(M.ModelConfig):
        if f.name in derived:
            continue
        assert f.name in params, f"ModelConfig.{f.name} has no option on refimpl train"
        assert parsed[f.name] == f.default, f.name
    assert list(params["surrogate"].type.choices) == [""] + list(SURROGATES)
    assert list(params["disc"].type.choices) == list(DISCRETIZATIONS)
    assert list(params["init"].type.choices) == list(INITS)


@pytest.fixture(scope="module")
def model_options_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("opts") / "run"
    args = ["train", "--task", "parity", "--out", str(out)] + TINY + model_args(MODEL_OPTIONS)
    r = run(args)
    assert r.exit_code == 0, r.output
    return out, args


def test_model_options_reach_config_json_and_the_checkpoint(model_options_run):
    from refimpl.train import load_checkpoint

    out, _ = model_options_run
    written = json.loads((out / "config.json").read_text())["model"]
    ckpt = load_checkpoint(str(out / "checkpoint.h5"))
    for name, value in MODEL_OPTIONS.items():
        assert written[name] == value, name
        assert getattr(ckpt.cfg, name) == value, name
    # --dt-min = --dt-max fixes every initial step: log_dt starts at ln 0.02 in every channel.
    # Two AdamW steps at the SSM-dynamics rate min(lr, 1e-3) move it by at most ~2e-3; the
    # default range [ln 1e-3, ln 1e-1] is 4.6 wide, so 1e-2 separates the two.
    np.testing.assert_allclose(ckpt.params["layers.0.ssm.log_dt"], np.log(0.02), atol=1e-2)
    assert "layers.0.norm.running_mean" in ckpt.buffers  # --norm batch reached the model


@pytest.mark.parametrize("name, other", [("surrogate", "sigmoid"), ("disc", "zoh"),
                                         ("init", "lin"), ("dt_max", 0.05),
                                         ("grad_mode", "bptt"), ("neuron_impl", "pmbc")])
def test_resume_refuses_a_changed_model_option(model_options_run, name, other):
    out, args = model_options_run
    changed = model_args({**MODEL_OPTIONS, name: other})
    base = [a for a in args if a not in model_args(MODEL_OPTIONS)]
    assert len(base) + len(changed) == len(args)  # every model option was replaced
    one_line_error(run(base + changed + ["--resume"]), "was written with other settings")
    assert run(args + ["--resume"]).exit_code == 0  # the same options resume (nothing to do)


def test_model_options_reach_a_language_model(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("spike state space model neuron threshold " * 40, encoding="utf-8")
    out = tmp_path / "lm"
    options = {"surrogate": "atan", "disc": "bilinear", "init": "real", "dt_min": 0.01,
               "dt_max": 0.03, "grad_mode": "detach_reset"}
    r = run(["train", "--text", str(text), "--context", "16", "--d-model", "4", "--d-state",
             "2", "--layers", "1", "--epochs", "1", "--batch-size", "8", "--out", str(out)]
            + model_args(options))
    assert r.exit_code == 0, r.output
    written = json.loads((out / "config.json").read_text())["model"]
    assert {k: written[k] for k in options} == options
    assert written["head"] == "lm"
    # evaluate scores classifiers: a language model's checkpoint is one line, not a KeyError
    one_line_error(run(["evaluate", str(out / "checkpoint.h5")]), "is a language model")


@pytest.mark.parametrize("args, fragment", [
    (["--activation", "gelu", "--surrogate", "atan"], "--surrogate applies to --activation"),
    (["--activation", "binary_gsu", "--grad-mode", "sltt"], "--grad-mode applies to --activation"),
    (["--activation", "lif", "--neuron-impl", "iterative"], "--neuron-impl applies to "
                                                            "--activation refractory only"),
    (["--dt-min", "0.5", "--dt-max", "0.1"], "--dt-min (0.5) must be <= --dt-max (0.1)"),
    (["--dt-min", "0"], "'--dt-min'"),
    (["--surrogate", "nope"], "'--surrogate'"),
    (["--disc", "euler"], "'--disc'"),
    (["--init", "random"], "'--init'"),
])
def test_bad_model_options_are_one_line_errors(tmp_path, args, fragment):
    out = tmp_path / "run"
    one_line_error(run(["train", "--task", "parity", "--out", str(out)] + TINY + args), fragment)
    assert not out.exists()  # refused before anything is written


def test_model_option_at_its_default_is_accepted_for_any_family(tmp_path):
    """--surrogate '' and --grad-mode bptt are the defaults: gelu takes them (no error)."""
    out = tmp_path / "run"
    r = run(["train", "--task", "parity", "--activation", "gelu", "--surrogate", "",
             "--grad-mode", "bptt", "--out", str(out)] + TINY)
    assert r.exit_code == 0, r.output
