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
