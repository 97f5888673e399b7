"""``refimpl plot`` (training curves of a run) and ``refimpl raster`` (spikes of one sample).

Both draw with :mod:`refimpl.plot`, which needs matplotlib, the optional extra ``plot``;
without it they stop with one line saying how to install it.
"""
import os

import click
import numpy as np

from refimpl import plot as P
from refimpl.model import check_inputs, model_inputs
from refimpl.tasks import data_from_recipe, load_npz, make_task
from refimpl.text import Vocab, eval_windows, text_from_recipe
from refimpl.train import load_checkpoint

from . import options
from .common import fail

#: Errors the library raises for bad input or files: shown as one line (MatplotlibMissing is
#: an ImportError).
USER_ERRORS = (OSError, ValueError, TypeError, ImportError)


def _rates(rates):
    return ", ".join("-" if r is None else f"{r:.3f}" for r in rates)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@options.image_out_opt(described="RUN_DIR/training.png")
def plot(run_dir, out):
    """Draw the training curves of a run into one image.

    RUN_DIR is the folder 'refimpl train --out RUN_DIR' wrote (a classifier or, with --text, a
    language model); its metrics.json holds one entry per epoch. The image has four panels per
    epoch: train and test (validation) loss; accuracy, or bits per byte/char beside the unigram
    and bigram baselines; the firing rate of each layer; and the energy estimate per sample
    (per token) beside the ANN baseline. Needs matplotlib: pip install 'refimpl[plot]'.

    Examples:

    \b
      refimpl plot runs/make-run
      refimpl plot runs/make-run --out curves.svg
    """
    try:
        P.require_matplotlib()
    except ImportError as e:
        fail(e)
    try:
        P.check_output(out or os.path.join(run_dir, "training.png"))
    except USER_ERRORS as e:
        fail(f"--out: {e}")
    try:
        path, metrics, _ = P.plot_training(run_dir, out)
    except USER_ERRORS as e:
        fail(e)
    m = metrics[-1]
    if P.metrics_kind(metrics) == "lm":
        unit = m["unit"]
        what = (f"validation {m['val_bits_per_token']:.3f} bits/{unit} (bigram "
                f"{m['bigram_bits_per_token']:.3f})")
    else:
        what = f"test accuracy {m['test_accuracy']:.3f}"
    click.echo(f"wrote {path}")
    click.echo(f"{len(metrics)} epochs: {what}, firing rate per layer "
               f"{_rates(m['firing_rate'])}")


def _sample_of(ckpt, task, data, text, sample):
    """The one input the raster draws and a description of it: ``(x, what)``."""
    cfg, recipe = ckpt.cfg, ckpt.data_recipe or {}
    given = [name for name, v in (("--task", task), ("--data", data), ("--text", text))
             if v is not None]
    if len(given) > 1:
        raise click.UsageError(f"give at most one of --task, --data, --text (got "
                               f"{' and '.join(given)})")
    if cfg.head == "lm":
        if task is not None or data is not None:
            fail(f"{given[0]} names classifier data, but the checkpoint is a language model; "
                 f"pass --text FILE, or nothing for its recorded text")
        return _lm_window(ckpt, text, sample)
    if text is not None:
        fail("--text applies to a language model checkpoint; this one is a classifier: pass "
             "--task NAME or --data FILE.npz, or nothing for its recorded data")
    try:
        if task is not None:
            same = recipe.get("task") == task  # its recorded size, length and seed
            ds = make_task(task, n=recipe["samples"], L=recipe["length"],
                           seed=recipe["seed"]) if same else make_task(task)
        elif data is not None:
            ds = load_npz(data, tokens=cfg.vocab)
        elif recipe:
            ds = data_from_recipe(recipe)
        else:
            fail("the checkpoint does not record its data (older refimpl); pass --task NAME or "
                 "--data FILE.npz")
    except USER_ERRORS as e:
        fail(e)
    n = len(ds["y_test"])
    if sample >= n:
        fail(f"--sample {sample} is out of range: the test split of {ds['name']} has {n} "
             f"samples (0..{n - 1})")
    x = ds["x_test"][sample]
    try:
        check_inputs(cfg, model_inputs(cfg, x[None]))
    except (ValueError, TypeError) as e:
        fail(f"data does not fit the checkpoint's model: {e}")
    return x, (f"test sample {sample} of {ds['name']} (label {int(ds['y_test'][sample])})",
               int(ds["y_test"][sample]))


def _lm_window(ckpt, text, sample):
    """A language model's input: window ``sample`` of the recorded text's validation part, or
    of the whole file ``text`` (encoded with the checkpoint's vocabulary)."""
    recipe = ckpt.data_recipe or {}
    if "vocab_json" not in recipe:
        fail("the checkpoint does not record its text (older refimpl)")
    context = recipe["context"]
    try:
        if text is None:
            td = text_from_recipe({k: v for k, v in recipe.items() if k != "vocab_json"})
            ids, where = td.val, f"the validation part of {os.path.basename(td.path)}"
        else:
            with open(text, "rb") as f:
                raw = f.read()
            ids = Vocab.from_json(recipe["vocab_json"]).encode(raw)  # (T,)
            where = os.path.basename(text)
        w = eval_windows(ids, context)  # (n, context + 1)
    except USER_ERRORS as e:
        fail(e)
    if sample >= len(w):
        fail(f"--sample {sample} is out of range: {where} has {len(w)} windows of "
             f"{context} + 1 tokens (0..{len(w) - 1})")
    return w[sample], (f"window {sample} of {where} ({context + 1} tokens)", None)


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@options.task_opt(described="the recorded data; with the recorded task, its samples, length "
                           "and seed")
@options.data_opt()
@options.text_opt(described="the validation part of the recorded text")
@click.option("--sample", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which test sample (classifier) or text window (language model).")
@click.option("--layer", type=click.IntRange(min=0),
              help="Draw only this layer (0 = the first; default: every layer).")
@options.image_out_opt(described="raster.png next to CHECKPOINT")
def raster(checkpoint, task, data, text_path, sample, layer, out):
    """Draw the spikes and membranes of one sample as a raster.

    CHECKPOINT is OUT/checkpoint.h5 of a 'refimpl train' run with a spiking family. One sample
    (test sample or text window --sample of the recorded data, or of the --task, --data or
    --text given) runs through the model in eval mode, recording every layer. Per layer the
    image shows the spikes of every channel over time (binary_gsu: the GSU's ternary
    activations, +1 and -1) and, below, the membrane of the (at most four) most active
    channels against the threshold, spike times marked. Needs matplotlib: pip install
    'refimpl[plot]'.

    Examples:

    \b
      refimpl raster runs/make-run/checkpoint.h5
      refimpl raster runs/make-run/checkpoint.h5 --sample 3 --layer 1 --out raster.svg
    """
    out = os.path.join(os.path.dirname(checkpoint), "raster.png") if out is None else out
    try:
        P.require_matplotlib()
    except ImportError as e:
        fail(e)
    try:
        P.check_output(out)
    except USER_ERRORS as e:
        fail(f"--out: {e}")
    try:
        ckpt = load_checkpoint(checkpoint)
        P.check_raster_family(ckpt.cfg)
    except USER_ERRORS as e:  # FileFormatError is a ValueError
        fail(e)
    cfg = ckpt.cfg
    if layer is not None and layer >= cfg.n_layers:
        fail(f"--layer {layer} is out of range: the model has {cfg.n_layers} layer"
             f"{'s' if cfg.n_layers > 1 else ''} (0..{cfg.n_layers - 1})")
    x, (what, label) = _sample_of(ckpt, task, data, text_path, sample)
    try:
        record, rates, logits = P.record_sample(cfg, ckpt.params, ckpt.buffers, x)
        predicted = "" if label is None else f", predicted {int(np.argmax(logits))}"
        run = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))
        title = f"{cfg.activation} model of {run}: {what}{predicted}"
        P.save_figure(P.raster_figure(cfg, record, layer, title, rates), out)
    except USER_ERRORS as e:
        fail(e)
    click.echo(f"wrote {os.path.abspath(out)}")
    click.echo(f"{what}{predicted}: firing rate per layer {_rates(rates)}")
