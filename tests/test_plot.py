"""``refimpl plot`` / ``refimpl raster`` and :mod:`refimpl.plot`: the files (format, size,
determinism, change with the data), what the raster draws (exactly the recorded spikes, the
threshold at spike_threshold), and every error as one line."""
import inspect
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from refimpl import model as M  # noqa: E402
from refimpl import plot as P  # noqa: E402
from refimpl.cli.main import main  # noqa: E402
from refimpl.lm_train import train_lm  # noqa: E402
from refimpl.optim import adamw_init  # noqa: E402
from refimpl.tasks import make_task  # noqa: E402
from refimpl.text import load_text  # noqa: E402
from refimpl.train import TrainConfig, save_checkpoint, train  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Floors well below what a figure of text, axes and curves takes (a blank 1000 x 700 PNG is
# about 5 KB): a file above them has drawn panels, not an empty canvas.
PNG_FLOOR, SVG_FLOOR = 20_000, 30_000
TINY = dict(d_model=8, d_state=4, n_layers=2)


def run(args):
    return CliRunner().invoke(main, args)


def one_line_error(r, fragment):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [l for l in r.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, r.output
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory):
    """A trained two-epoch lif classifier run folder (recall, 40 samples of 16 steps)."""
    out = str(tmp_path_factory.mktemp("clf") / "run")
    ds = make_task("recall", n=40, L=16, seed=0)
    cfg = M.ModelConfig.for_data(ds, activation="lif", **TINY)
    train(cfg, TrainConfig(epochs=2, batch_size=16), ds, out)
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A trained two-epoch binary language model on a small text (context 16)."""
    d = tmp_path_factory.mktemp("lm")
    path = d / "text.txt"
    path.write_text("the spiking state space model reads one byte at a time. " * 12)
    text = load_text(str(path), context=16)
    cfg = M.ModelConfig.for_lm(text.vocab.size, activation="binary", **TINY)
    train_lm(cfg, TrainConfig(epochs=2, batch_size=4), text, str(d / "run"))
    return str(d / "run")


def _checkpoint(path, activation, recipe):
    """An untrained checkpoint of ``activation`` on recall (5 inputs, 4 classes)."""
    cfg = M.ModelConfig(n_classes=4, d_input=5, activation=activation, **TINY)
    p, buf = M.init_model(cfg, 0)
    save_checkpoint(str(path), cfg, TrainConfig(epochs=1), p, buf, adamw_init(p), 1, [], recipe)
    return str(path)


def _png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > PNG_FLOOR, len(data)
    return data


def _svg(path):
    data = open(path, "rb").read()
    root = ET.fromstring(data)
    assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
    assert len(data) > SVG_FLOOR, len(data)
    return data


def _by_gid(fig, gid):
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, (gid, len(found))
    return found[0]


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["clf_run", "lm_run"])
def test_training_curves_files_are_deterministic_and_follow_the_data(which, request, tmp_path):
    run_dir = request.getfixturevalue(which)
    metrics, config = P.read_run(run_dir)
    ext = "png" if which == "clf_run" else "svg"  # each format once (rendering is slow)
    check = _png if ext == "png" else _svg
    P.save_figure(P.training_figure(metrics, config), tmp_path / f"a.{ext}")
    P.save_figure(P.training_figure(metrics, config), tmp_path / f"b.{ext}")
    assert check(tmp_path / f"a.{ext}") == check(tmp_path / f"b.{ext}")
    changed = json.loads(json.dumps(metrics))
    changed[0]["loss"] *= 1.5
    P.save_figure(P.training_figure(changed, config), tmp_path / f"c.{ext}")
    assert check(tmp_path / f"c.{ext}") != check(tmp_path / f"a.{ext}")


def _lines(ax):
    return {l.get_label(): l.get_ydata() for l in ax.get_lines()}


def test_classifier_curves_draw_the_metrics(clf_run):
    metrics, config = P.read_run(clf_run)
    fig = P.training_figure(metrics, config)
    loss, acc, rate, energy = fig.axes
    assert "epoch" == loss.get_xlabel() == rate.get_xlabel()
    assert "nats" in loss.get_ylabel() and "pJ" in energy.get_ylabel()
    assert "spikes per neuron per step" == rate.get_ylabel()
    np.testing.assert_array_equal(_lines(loss)["test"], [m["test_loss"] for m in metrics])
    np.testing.assert_array_equal(_lines(acc)["train"], [m["train_accuracy"] for m in metrics])
    for i in range(2):
        np.testing.assert_array_equal(_lines(rate)[f"layer {i}"],
                                      [m["firing_rate"][i] for m in metrics])
    np.testing.assert_array_equal(_lines(energy)["ANN baseline (all MAC)"],
                                  [m["energy_ann_pj"] for m in metrics])
    np.testing.assert_array_equal(_by_gid(fig, "chance").get_ydata(), [0.25, 0.25])


def test_lm_curves_draw_bits_and_the_labelled_baselines(lm_run):
    metrics, config = P.read_run(lm_run)
    fig = P.training_figure(metrics, config)
    bits = fig.axes[1]
    assert bits.get_ylabel() == "bits per byte"
    np.testing.assert_array_equal(_lines(bits)["validation"],
                                  [m["val_bits_per_token"] for m in metrics])
    for name in ("unigram", "bigram"):
        line = _by_gid(fig, name)
        b = metrics[-1][f"{name}_bits_per_token"]
        np.testing.assert_array_equal(line.get_ydata(), [b, b])
        assert line.get_label() == f"{name} baseline ({b:.2f})"
    assert "per byte" in fig.axes[3].get_ylabel()


def test_gelu_curves_say_no_spikes(clf_run, tmp_path):
    metrics, config = P.read_run(clf_run)
    for m in metrics:
        m["firing_rate"] = [None, None]
    config["model"]["activation"] = "gelu"
    fig = P.training_figure(metrics, config)
    assert "no spikes" in _by_gid(fig, "no-spikes").get_text()
    assert not fig.axes[2].get_lines()


def test_cli_plot_writes_the_default_file(clf_run, lm_run):
    for run_dir in (clf_run, lm_run):
        r = run(["plot", run_dir])
        assert r.exit_code == 0, r.output
        path = os.path.join(run_dir, "training.png")
        assert f"wrote {os.path.abspath(path)}" in r.output
        _png(path)
    assert "bits/byte" in r.output


def test_cli_plot_errors(clf_run, tmp_path):
    one_line_error(run(["plot", str(tmp_path)]), "metrics.json not found")
    one_line_error(run(["plot", clf_run, "--out", str(tmp_path / "x.pdf")]),
                   "--out: cannot write")
    (tmp_path / "metrics.json").write_text("[]")
    one_line_error(run(["plot", str(tmp_path)]), "non-empty list")
    assert os.listdir(tmp_path) == ["metrics.json"]  # nothing written


# --------------------------------------------------------------------------------------------
# Raster
# --------------------------------------------------------------------------------------------

RASTER_CASES = ["binary", "lif", "refractory", "binary_gsu"]


def _recorded(activation, sample=1):
    """An untrained model of ``activation``, the record of sample ``sample`` of ``x`` from
    model_fwd itself (the raster's oracle; a batch of one, as record_sample runs it: another
    batch size may round differently) and the record :func:`record_sample` makes."""
    cfg = M.ModelConfig(n_classes=4, d_input=3, activation=activation, **TINY)
    p, buf = M.init_model(cfg, 0)
    x = 3.0 * np.random.default_rng(1).normal(size=(3, 24, 3))  # scale 3: the lif fires
    _, _, _, st = M.model_fwd(cfg, p, buf, x[sample:sample + 1], record=True)
    oracle = [{k: a[0] for k, a in layer.items()} for layer in st["record"]]
    record, rates, _ = P.record_sample(cfg, p, buf, x[sample])
    return cfg, oracle, record, rates


@pytest.mark.parametrize("activation", RASTER_CASES)
def test_raster_draws_exactly_the_recorded_spikes(activation):
    cfg, oracle, record, rates = _recorded(activation)
    fig = P.raster_figure(cfg, record, rates=rates)
    for i in range(cfg.n_layers):
        if activation == "binary_gsu":
            events = oracle[i]["Tx"]  # (H, L)
            drawn = {v: _by_gid(fig, f"raster.{i}.{v:+d}").get_offsets() for v in (1, -1)}
        else:
            events = oracle[i]["s"]
            drawn = {1: _by_gid(fig, f"raster.{i}").get_offsets()}
        assert np.count_nonzero(events) > 0  # the case draws something
        for v, xy in drawn.items():
            got = np.zeros_like(events)
            got[xy[:, 1].astype(int), xy[:, 0].astype(int)] = v  # (channel, time step)
            assert len(xy) == np.count_nonzero(events == v)
            np.testing.assert_array_equal(got, np.where(events == v, v, 0))


@pytest.mark.parametrize("activation", ["binary", "lif", "refractory"])
def test_raster_membranes_and_threshold(activation):
    cfg, oracle, record, _ = _recorded(activation)
    fig = P.raster_figure(cfg, record, layer=1)
    theta = M.spike_threshold(cfg)
    np.testing.assert_array_equal(_by_gid(fig, "threshold.1").get_ydata(), [theta, theta])
    s, h = oracle[1]["s"], oracle[1]["h"]  # (H, L)
    count = s.sum(axis=1)  # (H,)
    traced = [int(a.get_gid().split(".")[2]) for ax in fig.axes for a in ax.get_lines()
              if (a.get_gid() or "").startswith("membrane.1.")]
    assert len(traced) == min(P.MAX_TRACES, cfg.d_model)
    assert sorted(count[traced], reverse=True) == sorted(count, reverse=True)[:len(traced)]
    for c in traced:
        np.testing.assert_array_equal(_by_gid(fig, f"membrane.1.{c}").get_ydata(), h[c])
        marks = _by_gid(fig, f"spikes.1.{c}")
        np.testing.assert_array_equal(marks.get_xdata(), np.flatnonzero(s[c]))
    assert not any((a.get_gid() or "").startswith("raster.0") for ax in fig.axes
                   for a in ax.get_children())  # layer=1 draws only layer 1


def test_gsu_threshold_is_the_one_the_forward_used():
    cfg, oracle, record, _ = _recorded("binary_gsu")
    fig = P.raster_figure(cfg, record)
    for i in range(cfg.n_layers):
        thr = _by_gid(fig, f"threshold.{i}").get_ydata()  # (L,)
        v, Tx = oracle[i]["v"], oracle[i]["Tx"]  # (H, L)
        # Ter(v) is nonzero exactly where |v| reaches the drawn threshold
        np.testing.assert_array_equal(Tx != 0, np.abs(v) >= thr[None, :])


@pytest.mark.parametrize("ext", ["png", "svg"])
def test_raster_files_are_deterministic_and_follow_the_sample(ext, tmp_path):
    check = _png if ext == "png" else _svg
    for name, sample in (("a", 0), ("b", 0), ("c", 1)):
        cfg, _, record, rates = _recorded("lif", sample)
        P.save_figure(P.raster_figure(cfg, record, rates=rates), tmp_path / f"{name}.{ext}")
    assert check(tmp_path / f"a.{ext}") == check(tmp_path / f"b.{ext}")
    assert check(tmp_path / f"a.{ext}") != check(tmp_path / f"c.{ext}")


def test_cli_raster_classifier_and_lm(clf_run, lm_run, tmp_path):
    ckpt = os.path.join(clf_run, "checkpoint.h5")
    r = run(["raster", ckpt, "--sample", "3"])
    assert r.exit_code == 0, r.output
    assert f"wrote {os.path.join(clf_run, 'raster.png')}" in r.output
    assert "test sample 3 of recall" in r.output
    _png(os.path.join(clf_run, "raster.png"))
    r = run(["raster", ckpt, "--task", "recall", "--layer", "1", "--out",
             str(tmp_path / "r.svg")])
    assert r.exit_code == 0, r.output
    _svg(tmp_path / "r.svg")
    r = run(["raster", os.path.join(lm_run, "checkpoint.h5"), "--out", str(tmp_path / "l.png")])
    assert r.exit_code == 0, r.output
    assert "window 0 of the validation part of text.txt" in r.output
    _png(tmp_path / "l.png")


def test_cli_raster_errors(clf_run, lm_run, tmp_path):
    ckpt = os.path.join(clf_run, "checkpoint.h5")
    out = ["--out", str(tmp_path / "r.png")]
    one_line_error(run(["raster", ckpt, "--sample", "8"] + out),
                   "--sample 8 is out of range: the test split of recall has 8 samples (0..7)")
    one_line_error(run(["raster", ckpt, "--layer", "2"] + out),
                   "--layer 2 is out of range: the model has 2 layers (0..1)")
    one_line_error(run(["raster", ckpt, "--out", str(tmp_path / "r.jpg")]),
                   "must end in .png or .svg")
    one_line_error(run(["raster", ckpt, "--text", os.path.join(lm_run, "metrics.json")] + out),
                   "--text applies to a language model")
    one_line_error(run(["raster", os.path.join(lm_run, "checkpoint.h5"), "--sample", "99"]
                       + out), "--sample 99 is out of range")
    recipe = {"task": "recall", "samples": 10, "length": 8, "seed": 0}
    gelu = _checkpoint(tmp_path / "gelu.h5", "gelu", recipe)
    one_line_error(run(["raster", gelu] + out), "needs a spiking family")
    assert sorted(os.listdir(tmp_path)) == ["gelu.h5"]  # nothing written


def test_without_matplotlib_one_line_install_hint(clf_run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    with pytest.raises(ImportError, match=r"pip install 'refimpl\[plot\]'"):
        P.require_matplotlib()
    for args in (["plot", clf_run, "--out", str(tmp_path / "a.png")],
                 ["raster", os.path.join(clf_run, "checkpoint.h5"), "--out",
                  str(tmp_path / "b.png")]):
        one_line_error(run(args), "pip install 'refimpl[plot]'")
    assert not os.listdir(tmp_path)


def test_library_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None; import refimpl.plot, "
            "refimpl.cli.main; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_help_has_examples_and_a_line_per_option():
    for name in ("plot", "raster"):
        cmd = main.commands[name]
        assert "Examples:\n\n\b\n" in inspect.cleandoc(cmd.help), name
        for param in cmd.params:
            if param.param_type_name == "option":
                assert param.help, (name, param.name)
        r = run([name, "--help"])
        assert r.exit_code == 0 and f"refimpl {name} runs/make-run" in r.output
