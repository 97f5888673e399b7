"""``refimpl train`` / ``evaluate`` under adversarial input (issue 11, training and data part).

Every failure: one ``Error:`` line naming the problem and the fix, a nonzero exit, no traceback,
and the file system exactly as it was before the command (a snapshot of listing + contents).
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from refimpl.cli.main import main
from refimpl.tasks import load_npz
from refimpl.train import OutputLocked, lock_output

SMALL = ["--samples", "64", "--length", "16", "--d-model", "8", "--d-state", "4",
         "--layers", "1", "--epochs", "2", "--batch-size", "16"]
MODEL = SMALL[4:]  # without the task's --samples / --length


def run(args):
    return CliRunner().invoke(main, args)


def snapshot(root):
    """Every file and folder under ``root`` with its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def refused(root, args, *fragments):
    """Run ``args``; assert a one-line error containing ``fragments`` and no change under
    ``root``. Returns the error line."""
    before = snapshot(root)
    r = run(args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "Warning" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, r.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(root) == before, "a refused command must leave the folder as it was"
    return lines[0]


def save(tmp_path, name="d.npz", **arrays):
    rng = np.random.default_rng(0)
    base = {"x_train": rng.normal(size=(20, 10)), "y_train": rng.integers(0, 2, 20),
            "x_test": rng.normal(size=(6, 10)), "y_test": rng.integers(0, 2, 6)}
    base.update(arrays)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


def train_args(data_path, out):
    return ["train", "--data", data_path, "--out", str(out)] + MODEL


# ---------------------------------------------------------------- item 2, 9, 10: data files

def test_huge_label_refused_before_allocating(tmp_path):
    y = np.zeros(20, dtype=np.int64)
    y[1], y[3] = 1, 10**9
    refused(tmp_path, train_args(save(tmp_path, y_train=y), tmp_path / "o"),
            "max label 1000000000", "[0, 1000)", "np.unique(y, return_inverse=True)")


def test_huge_declared_n_classes_refused(tmp_path):
    refused(tmp_path, train_args(save(tmp_path, n_classes=np.int64(10**12)), tmp_path / "o"),
            "n_classes = 1000000000000 is too large", "omit n_classes")


def test_many_classes_within_the_cap_are_accepted(tmp_path):
    y = np.arange(20) % 5
    d = load_npz(save(tmp_path, y_train=y, y_test=y[:6], n_classes=np.int64(1000)))
    assert d["n_classes"] == 1000


def test_n_classes_must_be_an_integer(tmp_path):
    refused(tmp_path, train_args(save(tmp_path, n_classes=np.float64(2.7)), tmp_path / "o"),
            "n_classes must be an integer, got 2.7")
    assert load_npz(save(tmp_path, "f.npz", n_classes=np.float64(3.0)))["n_classes"] == 3


def test_uint64_label_beyond_int64_names_the_value(tmp_path):
    y = np.zeros(20, dtype=np.uint64)
    y[1], y[2] = 1, 2**63 + 5
    refused(tmp_path, train_args(save(tmp_path, y_train=y), tmp_path / "o"),
            f"max label {2**63 + 5}", "[0, 1000)")


def test_raw_pickle_member_is_refused_and_never_unpickled(tmp_path):
    path = save(tmp_path, y_test=None)

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with zipfile.ZipFile(path, "a") as z:
        z.writestr("y_test.npy", pickle.dumps(Boom()))
    refused(tmp_path, train_args(path, tmp_path / "o"),
            "member 'y_test' is not a NumPy array", "not unpickled")
    assert not (tmp_path / "pwned").exists()


def test_text_file_is_not_a_npz(tmp_path):
    p = tmp_path / "d.npz"
    p.write_text("x_train,y_train\n1,2\n")
    line = refused(tmp_path, train_args(str(p), tmp_path / "o"), "not a .npz (zip) file",
                   "np.savez")
    assert "pickle" not in line


def test_npy_file_is_not_a_npz(tmp_path):
    p = tmp_path / "d.npz"
    with open(p, "wb") as f:
        np.save(f, np.zeros(3))
    refused(tmp_path, train_args(str(p), tmp_path / "o"), "single-array .npy file")


def test_float32_data_is_widened_exactly(tmp_path):
    x = np.random.default_rng(1).normal(size=(20, 10)).astype(np.float32)
    d = load_npz(save(tmp_path, x_train=x, x_test=x[:6]))
    assert d["x_train"].dtype == np.float64
    np.testing.assert_array_equal(d["x_train"].astype(np.float32), x)  # round-trips: exact
    r = run(train_args(save(tmp_path, "f.npz", x_train=x, x_test=x[:6]), tmp_path / "o"))
    assert r.exit_code == 0, r.output


def test_float32_inf_is_still_refused(tmp_path):
    x = np.zeros((20, 10), dtype=np.float32)
    x[0, 0] = np.inf
    refused(tmp_path, train_args(save(tmp_path, x_train=x), tmp_path / "o"), "NaN or inf")


# ---------------------------------------------------------------- item 4 and 10: options

@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_clip_norm_refused_before_anything_is_written(tmp_path, value):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    r = run(["train", "--task", "parity", "--out", str(out), "--clip-norm", value] + SMALL)
    assert r.exit_code in (1, 2) and "clip" in r.output.lower() and "Traceback" not in r.output
    assert snapshot(tmp_path) == before


def test_negative_seed_names_the_option(tmp_path):
    r = run(["train", "--task", "parity", "--seed", "-5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'--seed'" in r.output and "-5" in r.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- item 4: divergence

def test_divergence_stops_with_epoch_and_step_and_writes_nothing(tmp_path):
    line = refused(tmp_path, ["train", "--task", "parity", "--lr", "1e308",
                              "--out", str(tmp_path / "o")] + SMALL,
                   "diverged at epoch 1, step", "lower --lr", "nothing was written")
    assert "remove NaN/inf before calling" not in line  # does not blame the input


def test_huge_data_diverges_with_a_clear_message(tmp_path):
    rng = np.random.default_rng(0)
    x = np.where(rng.random((20, 10)) < 0.5, -1e308, 1e308)
    refused(tmp_path, train_args(save(tmp_path, x_train=x, x_test=x[:6]), tmp_path / "o"),
            "diverged at epoch 1, step 1", "rescale the data")


def test_divergence_after_a_good_epoch_keeps_that_epoch(tmp_path, monkeypatch):
    """Library level: a NaN loss in epoch 2 leaves epoch 1's files, consistent and untouched."""
    from refimpl import model as M
    from refimpl.model import ModelConfig
    from refimpl.tasks import make_task
    from refimpl.train import Diverged, TrainConfig, load_checkpoint, train

    data = make_task("parity", n=64, L=16)
    cfg = ModelConfig.for_data(data, d_model=8, d_state=4, n_layers=1)
    out = str(tmp_path / "o")
    calls = {"n": 0}
    real = M.loss_and_grads

    def poisoned(*a, **k):
        calls["n"] += 1
        res = real(*a, **k)
        return (np.nan,) + res[1:] if calls["n"] == 6 else res  # 4 steps per epoch

    monkeypatch.setattr(M, "loss_and_grads", poisoned)
    with pytest.raises(Diverged, match=r"epoch 2, step 2: the loss \(nan\).*last completed"):
        train(cfg, TrainConfig(epochs=3, batch_size=16), data, out)
    assert sorted(os.listdir(out)) == ["checkpoint.h5", "config.json", "metrics.json"]
    assert load_checkpoint(os.path.join(out, "checkpoint.h5")).epoch == 1
    assert len(json.load(open(os.path.join(out, "metrics.json")))) == 1


# ---------------------------------------------------------------- item 5: the folder's lock

def test_lock_is_exclusive_and_removed(tmp_path):
    out = str(tmp_path / "o")
    with lock_output(out):
        assert os.path.exists(os.path.join(out, ".lock"))
        with pytest.raises(OutputLocked, match="in use by another run"):
            with lock_output(out):
                pass
    assert not os.path.exists(out)  # created by the lock, empty: removed again


def _train_cmd(out, epochs):
    return [sys.executable, "-m", "refimpl.cli.main", "train", "--task", "parity", "--samples",
            "2000", "--length", "64", "--d-model", "16", "--d-state", "4", "--layers", "1",
            "--batch-size", "8", "--epochs", str(epochs), "--out", out]


def test_concurrent_run_refused_and_a_kill_leaves_no_blocking_lock(tmp_path):
    out = str(tmp_path / "o")
    first = subprocess.Popen(_train_cmd(out, 50), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(out, ".lock")):
            assert first.poll() is None and time.monotonic() < deadline, "first run never started"
            time.sleep(0.05)
        before = snapshot(out)
        second = subprocess.run(_train_cmd(out, 50), capture_output=True, text=True)
        assert second.returncode == 1, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "in use by another run" in errors[0], second.stderr
        assert "Traceback" not in second.stderr
        assert set(snapshot(out)) <= set(before) | {"checkpoint.h5", "metrics.json",
                                                    "config.json"}
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert os.path.exists(os.path.join(out, ".lock"))  # stale file of the killed run
    again = subprocess.run(_train_cmd(out, 1)[:-2] + ["--samples", "64", "--out", out,
                                                      "--overwrite"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert not os.path.exists(os.path.join(out, ".lock"))


# ---------------------------------------------------------------- items 7, 8: resume, recipe

def test_resume_refuses_another_schedule_or_other_data(tmp_path):
    out = tmp_path / "o"
    args = ["train", "--task", "adding", "--activation", "gelu", "--out", str(out)] + SMALL
    assert run(args).exit_code == 0
    more = list(args)
    more[more.index("--epochs") + 1] = "3"
    refused(tmp_path, more + ["--resume"], "a run of 2 epochs, not 3", "--epochs 2")
    longer = list(args)
    longer[longer.index("--length") + 1] = "17"
    refused(tmp_path, longer + ["--resume"], "trained on other data", "--length 16")
    assert run(args + ["--resume"]).exit_code == 0  # same options: the same run


def test_recipe_is_recorded_and_evaluate_reuses_it(tmp_path):
    out = tmp_path / "o"
    r = run(["train", "--task", "recall", "--activation", "gelu", "--out", str(out)] + SMALL)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == {"task": "recall", "samples": 64, "length": 16, "seed": 0}
    acc = json.loads((out / "metrics.json").read_text())[-1]["test_accuracy"]
    r = run(["evaluate", str(out / "checkpoint.h5")])
    assert r.exit_code == 0, r.output
    assert "recall (samples 64, length 16, seed 0)" in r.output
    assert float(r.output.split("test accuracy")[1].split()[0]) == pytest.approx(acc, abs=5e-5)
    r = run(["evaluate", str(out / "checkpoint.h5"), "--samples", "200"])  # override one
    assert r.exit_code == 0 and "recall (samples 200, length 16, seed 0)" in r.output, r.output


def test_evaluate_reuses_a_recorded_file_and_checks_its_hash(tmp_path):
    path = save(tmp_path)
    out = tmp_path / "o"
    assert run(train_args(path, out)).exit_code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["data"] == os.path.abspath(path) and len(cfg["data"]["sha256"]) == 64
    r = run(["evaluate", str(out / "checkpoint.h5")])
    assert r.exit_code == 0, r.output
    save(tmp_path, x_test=np.ones((6, 10)))  # the file changes
    refused(tmp_path, ["evaluate", str(out / "checkpoint.h5")], "has changed since training",
            "pass --data")
    os.remove(path)
    refused(tmp_path, ["evaluate", str(out / "checkpoint.h5")], "no longer exists")


# ---------------------------------------------------------------- item 10: info

def test_info_shows_each_pool_and_the_blas_threads_outside_refimpl(monkeypatch):
    """The threads each pool uses (issue 25): BLAS's own setting (3, as the user set it through
    threadpoolctl here) is what refimpl restores; inside refimpl BLAS runs on one thread."""
    from threadpoolctl import threadpool_limits
    monkeypatch.setenv("REFIMPL_THREADS", "2")  # read at import; the CLI reads the module's
    from refimpl import threads
    with threads.using(2), threadpool_limits(limits=3, user_api="blas"):
        r = run(["info"])
    assert r.exit_code == 0
    lines = {line.split("  ")[0]: line for line in r.output.splitlines()}
    assert "1 thread inside refimpl, 3 outside" in lines["blas"]
    assert "REFIMPL_THREADS=2 (fixed)" in lines["threads setting"]
    assert "2 thread(s) now" in lines["refimpl pool"]
    assert "no parallel kernels" in lines["numba threads"]
