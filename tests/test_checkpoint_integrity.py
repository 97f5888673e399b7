"""Checkpoints are checked before use (issue 23): their digest, dtypes and finiteness.

Every reader (``refimpl generate``, ``evaluate``, ``evaluate --stream``, ``raster``,
``ModelStream.from_checkpoint``, ``train --resume``) refuses a damaged checkpoint with one
``Error:`` line naming the array, exit status 1, no traceback and the file system exactly as it
was; ``--resume`` of a run rewrites a damaged ``metrics.json`` / ``config.json`` from the
checkpoint. The damage is done the way it happens: values edited in place in the HDF5 file (a
NaN, an infinity, one flipped bit), a dataset rewritten in another dtype, a JSON file cut short.
"""
import hashlib
import json
import os
import re
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from refimpl import model as M
from refimpl import sdn
from refimpl.cli.main import main
from refimpl.h5io import FileFormatError
from refimpl.optim import adamw_init
from refimpl.stream import ModelStream
from refimpl.train import TrainConfig, load_checkpoint, save_checkpoint
from test_train_robustness import snapshot  # every file under a folder with its bytes

MODEL = ["--d-model", "8", "--d-state", "4", "--layers", "1", "--epochs", "1",
         "--batch-size", "8"]
CLASSIFIER = ["--task", "recall", "--samples", "48", "--length", "12", "--activation", "lif",
              "--norm", "batch"] + MODEL
WORDS = ["spike", "state", "space", "model", "neuron"]


def run(args):
    return CliRunner().invoke(main, args)


def refused(root, args, *fragments):
    """Run ``args``: one ``Error:`` line holding ``fragments``, exit 1, no traceback, nothing
    under ``root`` created, changed or removed."""
    before = snapshot(root)
    r = run(args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.output.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert snapshot(root) == before, "a refused command must leave every file as it was"
    return errors[0]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A finished one-epoch language-model run: (folder, the train command)."""
    root = tmp_path_factory.mktemp("lm")
    text = root / "words.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 600)))
    args = ["train", "--text", str(text), "--vocab", "chars", "--context", "16",
            "--out", str(root / "run")] + MODEL
    r = run(args)
    assert r.exit_code == 0, r.output
    return root / "run", args


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory):
    """A finished one-epoch classifier run with BatchNorm buffers: (folder, the command)."""
    out = tmp_path_factory.mktemp("clf") / "run"
    args = ["train", "--out", str(out)] + CLASSIFIER
    r = run(args)
    assert r.exit_code == 0, r.output
    return out, args


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit(folder, name, change):
    """Apply ``change(array) -> array`` to dataset ``name`` of the folder's checkpoint, in
    place if the dtype stays (as damage on disk would), else by rewriting the dataset."""
    path = folder / "checkpoint.h5"
    with h5py.File(path, "r+") as f:
        a = f[name][()]
        b = change(a.copy())
        if b.dtype == a.dtype:
            f[name][...] = b
        else:
            del f[name]
            f.create_dataset(name, data=b)
    return str(path)


def set_flat(i, value):
    def change(a):
        a.flat[i] = value
        return a
    return change


def flip_bit(i, bit):
    """Flip bit ``bit`` of element ``i`` of a float64 array (62: the exponent's top bit)."""
    def change(a):
        u = a.view(np.uint64)
        u.flat[i] ^= np.uint64(1 << bit)
        return a
    return change


def as_dtype(dtype):
    return lambda a: a.astype(dtype)


def generate_args(ckpt):
    return ["generate", str(ckpt), "--prompt", "spike ", "--length", "8"]


# ------------------------------------------------------------------------- the digest itself

def test_a_checkpoint_carries_the_digest_its_docstring_defines(lm_run):
    """An oracle written from the definition (refimpl.train's docstring), not from the code."""
    path = lm_run[0] / "checkpoint.h5"
    entries = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                a = np.ascontiguousarray(obj[()])
                entries[name] = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode()
                                               + a.tobytes()).hexdigest()
        f.visititems(visit)
        for k in ("model_config", "train_config", "metrics", "data_recipe", "epoch"):
            v = f.attrs[k]
            v = int(v) if k == "epoch" else json.loads(v)
            text = json.dumps(v, sort_keys=True, separators=(",", ":"))
            entries[k] = hashlib.sha256(text.encode()).hexdigest()
        stored, table = f.attrs["digest"], json.loads(f.attrs["digest_entries"])
    lines = "".join(f"{k} {entries[k]}\n" for k in sorted(entries))
    assert stored == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    assert table == {k: v[:16] for k, v in entries.items()}
    assert load_checkpoint(path).digest == stored


# ------------------------------------------------------- generate: every measured bad outcome

@pytest.mark.parametrize("change, fragments", [
    (set_flat(3, np.nan), ["parameter decoder.W is not finite: nan at index [0, 3]"]),
    (set_flat(9, -np.inf), ["parameter decoder.W is not finite: -inf at index [1, 1]"]),
    (flip_bit(3, 62), ["parameters do not match their digest (damaged or edited)",
                       "parameter decoder.W differs"]),
    (flip_bit(3, 0), ["parameters do not match their digest", "parameter decoder.W differs"]),
    (as_dtype(np.int32), ["parameter decoder.W has dtype int32, expected float64"]),
    (as_dtype(np.float16), ["parameter decoder.W has dtype float16, expected float64"]),
    (as_dtype(np.float32), ["parameter decoder.W has dtype float32, expected float64"]),
], ids=["nan", "inf", "exponent-bit", "last-mantissa-bit", "int32", "float16", "float32"])
def test_generate_refuses_a_damaged_checkpoint(lm_run, tmp_path, change, fragments):
    ckpt = edit(copy_run(lm_run[0], tmp_path), "params/decoder.W", change)
    line = refused(tmp_path, generate_args(ckpt), "checkpoint", *fragments)
    assert ckpt in line


def test_generate_still_runs_the_undamaged_copy(lm_run, tmp_path):
    """The damage, not the copying, is what the refusals above see."""
    r = run(generate_args(copy_run(lm_run[0], tmp_path) / "checkpoint.h5"))
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("spike ")


# ------------------------------------------------------- the other readers of the same damage

def test_evaluate_raster_and_stream_refuse_nan_weights(clf_run, tmp_path):
    pytest.importorskip("matplotlib")
    ckpt = edit(copy_run(clf_run[0], tmp_path), "params/decoder.W", set_flat(0, np.nan))
    what = "parameter decoder.W is not finite: nan at index [0, 0]"
    refused(tmp_path, ["evaluate", ckpt], what)
    refused(tmp_path, ["evaluate", ckpt, "--stream"], what)
    refused(tmp_path, ["raster", ckpt, "--out", str(tmp_path / "raster.png")], what)
    refused(tmp_path, ["raster", ckpt], what)  # the default image beside the checkpoint
    with pytest.raises(FileFormatError, match=r"decoder\.W is not finite"):
        ModelStream.from_checkpoint(ckpt)


@pytest.mark.parametrize("name, change, fragment", [
    ("buffers/layers.0.norm.running_var", set_flat(2, np.inf),
     "buffer layers.0.norm.running_var is not finite: inf at index [2]"),
    ("buffers/layers.0.norm.running_var", flip_bit(2, 52),
     "buffer layers.0.norm.running_var differs"),
    ("optimizer/exp_avg_sq/layers.0.mix.W", set_flat(5, np.nan),
     "optimizer state exp_avg_sq/layers.0.mix.W is not finite: nan at index [0, 5]"),
    ("optimizer/exp_avg/encoder.b", flip_bit(0, 1),
     "optimizer state exp_avg/encoder.b differs"),
    ("optimizer/step", lambda a: a + 1, "optimizer state step differs"),
    ("buffers/layers.0.norm.running_mean", as_dtype(np.float32),
     "buffer layers.0.norm.running_mean has dtype float32"),
], ids=["buffer-inf", "buffer-bit", "moment-nan", "moment-bit", "step", "buffer-float32"])
def test_every_array_is_checked_and_named(clf_run, tmp_path, name, change, fragment):
    ckpt = edit(copy_run(clf_run[0], tmp_path), name, change)
    with pytest.raises(FileFormatError, match="checkpoint .*" + re.escape(fragment)):
        load_checkpoint(ckpt)
    refused(tmp_path, ["evaluate", ckpt], fragment)


def test_edited_attributes_and_digests_are_named(clf_run, tmp_path):
    folder = copy_run(clf_run[0], tmp_path)
    ckpt = str(folder / "checkpoint.h5")
    with h5py.File(ckpt, "r") as f:
        attrs = dict(f.attrs)

    def with_attrs(**changes):
        with h5py.File(ckpt, "r+") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            for k, v in changes.items():
                if v is None:
                    del f.attrs[k]
                else:
                    f.attrs[k] = v

    metrics = json.loads(attrs["metrics"])
    metrics[0]["test_accuracy"] = 1.0
    with_attrs(metrics=json.dumps(metrics))
    with pytest.raises(FileFormatError, match="do not match their digest.*attribute metrics "
                                              "differs"):
        load_checkpoint(ckpt)
    with_attrs(epoch=2)
    with pytest.raises(FileFormatError, match="attribute epoch differs"):
        load_checkpoint(ckpt)
    with_attrs(digest="sha256:" + "0" * 64)
    with pytest.raises(FileFormatError, match="the digest itself was changed"):
        load_checkpoint(ckpt)
    with_attrs(digest=None)  # the table is still there: a new file whose digest was deleted
    with pytest.raises(FileFormatError, match="the digest itself was changed or deleted"):
        load_checkpoint(ckpt)
    with_attrs(digest_entries="{not json")
    edit(folder, "params/decoder.b", flip_bit(0, 3))
    with pytest.raises(FileFormatError, match="do not match their digest.*cannot be told"):
        load_checkpoint(ckpt)


def test_an_optimizer_state_without_step_is_a_file_error_not_a_key_error(clf_run, tmp_path):
    ckpt = copy_run(clf_run[0], tmp_path) / "checkpoint.h5"
    with h5py.File(ckpt, "r+") as f:
        del f["optimizer/step"]
    with pytest.raises(FileFormatError, match="optimizer state step must be an integer"):
        load_checkpoint(ckpt)
    with h5py.File(ckpt, "r+") as f:
        del f["optimizer/exp_avg/decoder.W"]
    with pytest.raises(FileFormatError, match="exp_avg has no moment of parameter decoder.W"):
        load_checkpoint(ckpt)


# ------------------------------------------------------------------ checkpoints before digests

def _strip_digest(ckpt):
    """Make ``ckpt`` a checkpoint as refimpl wrote it before digests: the same file without
    the two digest attributes."""
    with h5py.File(ckpt, "r+") as f:
        del f.attrs["digest"], f.attrs["digest_entries"]


def test_a_checkpoint_without_a_digest_loads_with_the_other_checks(lm_run, tmp_path):
    folder = copy_run(lm_run[0], tmp_path)
    ckpt = folder / "checkpoint.h5"
    new = load_checkpoint(ckpt)
    _strip_digest(ckpt)
    old = load_checkpoint(ckpt)
    assert old.digest is None and new.digest.startswith("sha256:")
    for k in new.params:
        np.testing.assert_array_equal(old.params[k], new.params[k])
    assert old.metrics == new.metrics and old.cfg == new.cfg
    r = run(generate_args(ckpt))
    assert r.exit_code == 0, r.output
    edit(folder, "params/decoder.W", set_flat(3, np.nan))
    refused(tmp_path, generate_args(ckpt), "parameter decoder.W is not finite")


def test_a_finished_run_without_a_digest_resumes(clf_run, tmp_path):
    folder = copy_run(clf_run[0], tmp_path)
    _strip_digest(folder / "checkpoint.h5")
    resume(clf_run[1], folder)
    assert load_checkpoint(folder / "checkpoint.h5").digest is None  # no epoch ran: unchanged


# -------------------------------------------------------------------------- the writer's side

def test_save_checkpoint_refuses_what_readers_refuse_and_writes_nothing(tmp_path):
    cfg = M.ModelConfig(n_classes=2, d_input=3, d_model=4, d_state=4, n_layers=1)
    p, b = M.init_model(cfg, 0)
    tcfg, path = TrainConfig(epochs=1), tmp_path / "c.h5"
    bad = {**p, "decoder.W": p["decoder.W"].astype(np.float32)}
    with pytest.raises(ValueError, match="refusing to write .*parameter decoder.W has dtype "
                                         "float32"):
        save_checkpoint(str(path), cfg, tcfg, bad, b, adamw_init(p), 1, [])
    nan = {**p, "encoder.b": np.full_like(p["encoder.b"], np.nan)}
    with pytest.raises(ValueError, match=r"parameter encoder.b is not finite: nan at index \[0\]"):
        save_checkpoint(str(path), cfg, tcfg, nan, b, adamw_init(p), 1, [])
    assert os.listdir(tmp_path) == []
    save_checkpoint(str(path), cfg, tcfg, p, b, adamw_init(p), 1, [])
    assert load_checkpoint(path).epoch == 1


# ------------------------------------------------------------------------------------- resume

def at(args, folder):
    """A ``train`` command with ``--out folder`` and ``--resume``."""
    i = args.index("--out")
    return args[:i + 1] + [str(folder)] + args[i + 2:] + ["--resume"]


def resume(args, folder):
    r = run(at(args, folder))
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    return r


def test_resume_refuses_a_damaged_checkpoint_and_leaves_the_folder(clf_run, lm_run, tmp_path):
    folder = copy_run(clf_run[0], tmp_path, "clf")
    edit(folder, "params/layers.0.mix.W", flip_bit(7, 62))
    refused(tmp_path, at(clf_run[1], folder), "parameter layers.0.mix.W differs")
    folder = copy_run(lm_run[0], tmp_path, "lm")
    edit(folder, "params/embedding.E", set_flat(4, np.nan))
    refused(tmp_path, at(lm_run[1], folder),
            "parameter embedding.E is not finite: nan at index [0, 4]")


@pytest.mark.parametrize("damage", ["truncated metrics", "deleted config", "stale metrics",
                                    "deleted both"])
def test_resume_of_a_finished_lm_run_restores_its_json_files(lm_run, tmp_path, damage):
    src = lm_run[0]
    folder = copy_run(src, tmp_path)
    metrics, config = folder / "metrics.json", folder / "config.json"
    if damage == "truncated metrics":
        metrics.write_bytes((src / "metrics.json").read_bytes()[:100])
    elif damage == "deleted config":
        config.unlink()
    elif damage == "stale metrics":  # killed between the checkpoint's rename and its own
        metrics.write_text("[]\n")
    else:
        metrics.unlink()
        config.unlink()
    ckpt = (folder / "checkpoint.h5").read_bytes()
    resume(lm_run[1], folder)
    assert metrics.read_bytes() == (src / "metrics.json").read_bytes()
    assert config.read_bytes() == (src / "config.json").read_bytes()
    assert (folder / "checkpoint.h5").read_bytes() == ckpt
    assert sorted(os.listdir(folder)) == ["checkpoint.h5", "config.json", "metrics.json"]
    if damage == "truncated metrics":  # what the issue measured: refimpl plot failed
        pytest.importorskip("matplotlib")
        r = run(["plot", str(folder), "--out", str(tmp_path / "curves.png")])
        assert r.exit_code == 0, r.output


def test_resume_of_a_finished_classifier_run_restores_its_json_files(clf_run, tmp_path):
    src = clf_run[0]
    folder = copy_run(src, tmp_path)
    (folder / "config.json").write_bytes((src / "config.json").read_bytes()[:50])
    (folder / "metrics.json").unlink()
    resume(clf_run[1], folder)
    assert snapshot(folder) == snapshot(src)


def test_resume_leaves_intact_json_files_untouched(clf_run, tmp_path):
    folder = copy_run(clf_run[0], tmp_path)
    before = {n: os.stat(folder / n).st_ino for n in ("metrics.json", "config.json")}
    resume(clf_run[1], folder)
    assert {n: os.stat(folder / n).st_ino for n in before} == before  # not replaced


# --------------------------------------------------------------------------- SDN weight files

def test_sdn_training_state_with_a_nan_is_refused(tmp_path):
    p, b = sdn.init_train_params(0)
    path = tmp_path / "w.h5"
    sdn.save_weights(path, sdn.fold(p, b), p, b)
    name = sorted(p)[0]
    with h5py.File(path, "r+") as f:
        a = f[f"train/params/{name}"][()]
        a.flat[0] = np.nan
        f[f"train/params/{name}"][...] = a
    with pytest.raises(FileFormatError, match=f"/train/params/{name} contains non-finite"):
        sdn.load_training_state(path)
