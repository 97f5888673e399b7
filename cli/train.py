"""``refimpl train`` and ``refimpl evaluate``: parse, call refimpl.train, draw progress."""
import os
import sys

import click
import numpy as np

FAMILY_NAMES = ["gelu", "binary", "binary_gsu", "lif", "sdn", "refractory"]


def _fail(msg):
    raise click.ClickException(msg)


def _load_data(task, data, tokens, n, length, seed):
    from refimpl.tasks import TASKS, load_npz, make_task

    if (task is None) == (data is None):
        raise click.UsageError("give exactly one of --task NAME or --data FILE.npz")
    try:
        if task is not None:
            return make_task(task, n=n, L=length, seed=seed)
        return load_npz(data, tokens=tokens)
    except (ValueError, TypeError) as e:
        _fail(str(e))


def _load_sdn(path):
    from refimpl.sdn import load_weights

    try:
        return load_weights(path)[0]
    except (ValueError, TypeError, OSError) as e:
        _fail(str(e))


@click.command()
@click.option("--task", type=click.Choice(["adding", "listops", "recall", "parity"]), help="Built-in task.")
@click.option("--data", type=click.Path(dir_okay=False), help="User data (.npz: x_train, y_train, x_test, y_test).")
@click.option("--tokens", default=0, type=click.IntRange(min=0), help="Vocabulary size for integer inputs (uses an embedding).")
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(min=2), help="Samples of a built-in task (train + test).")
@click.option("--length", default=None, type=click.IntRange(min=1), help="Sequence length of a built-in task (default: the task's).")
@click.option("--activation", default="lif", show_default=True, type=click.Choice(FAMILY_NAMES))
@click.option("--layers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--d-model", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--d-state", default=16, show_default=True, type=click.IntRange(min=2))
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-2, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--weight-decay", default=1e-2, show_default=True, type=click.FloatRange(min=0))
@click.option("--dropout", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--norm", default="layer", show_default=True, type=click.Choice(["layer", "batch"]))
@click.option("--prenorm/--postnorm", default=False, show_default=True)
@click.option("--bidirectional/--causal", default=False, show_default=True)
@click.option("--grad-mode", default="bptt", show_default=True, type=click.Choice(["bptt", "detach_reset", "sltt"]))
@click.option("--neuron-impl", default="pmbc", show_default=True, type=click.Choice(["pmbc", "iterative"]), help="refractory family only.")
@click.option("--sdn-weights", type=click.Path(dir_okay=False), help="SDN weights (.h5 from 'refimpl sdn train' or the published .npz); sdn family only.")
@click.option("--clip-norm", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Gradient-norm clipping (0 = off).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.h5 (bit-exact).")
@click.option("--overwrite", is_flag=True, help="Start again even if OUT/checkpoint.h5 exists.")
def train(task, data, tokens, samples, length, activation, layers, d_model, d_state, epochs,
          batch_size, lr, weight_decay, dropout, norm, prenorm, bidirectional, grad_mode,
          neuron_impl, sdn_weights, clip_norm, seed, out_dir, resume, overwrite):
    """Train a spiking SSM classifier on a built-in task or an .npz file."""
    from refimpl.h5io import FileFormatError
    from refimpl.model import ModelConfig
    from refimpl.train import TrainConfig
    from refimpl.train import train as run

    ds = _load_data(task, data, tokens, samples, length, seed)
    x = ds["x_train"]
    try:
        cfg = ModelConfig(n_classes=ds["n_classes"], d_input=1 if ds["vocab"] else (x.shape[2] if x.ndim == 3 else 1),
                          vocab=ds["vocab"], d_model=d_model, d_state=d_state, n_layers=layers,
                          activation=activation, norm=norm, prenorm=prenorm,
                          bidirectional=bidirectional, dropout=dropout, grad_mode=grad_mode,
                          neuron_impl=neuron_impl)
        tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           clip_norm=clip_norm, seed=seed)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    sdn = None
    if activation == "sdn" and not resume:
        if not sdn_weights:
            _fail("--activation sdn needs --sdn-weights FILE (train one with 'refimpl sdn train')")
        sdn = _load_sdn(sdn_weights)
    steps = -(-len(ds["y_train"]) // batch_size)
    done = 0
    ckpt = os.path.join(out_dir, "checkpoint.h5")
    if resume and os.path.exists(ckpt):
        from refimpl.train import load_checkpoint
        try:
            done = min(load_checkpoint(ckpt)[5], epochs)
        except FileFormatError as e:
            _fail(str(e))
    click.echo(f"training {activation} on {ds['name']}: {len(ds['y_train'])} train / "
               f"{len(ds['y_test'])} test, L = {x.shape[1]}, {epochs} epochs -> {out_dir}", err=True)
    bar = click.progressbar(length=max(epochs - done, 0) * steps, label="train", file=sys.stderr,
                            item_show_func=lambda s: s)
    state = {"done": 0}

    def progress(ev):
        if "step" in ev:
            rates = [r for r in ev["rates"] if r is not None]
            rate = f" rate {np.mean(rates):.3f}" if rates else ""
            bar.update(1, f"epoch {ev['epoch'] + 1} loss {ev['loss']:.4f}{rate}")
        else:
            m = ev["metrics"]
            bar.update(0, f"epoch {m['epoch'] + 1} train acc {m['train_accuracy']:.3f} "
                          f"test acc {m['test_accuracy']:.3f}")

    try:
        with bar:
            metrics = run(cfg, tcfg, ds, out_dir, resume=resume, sdn_weights=sdn, progress=progress,
                          overwrite=overwrite)
    except (FileFormatError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        _fail(str(e))
    _summary(metrics, cfg)


def _summary(metrics, cfg):
    if not metrics:
        click.echo("no epochs run")
        return
    m = metrics[-1]
    click.echo(f"activation        {cfg.activation}")
    click.echo(f"epochs            {m['epoch'] + 1}")
    click.echo(f"train loss        {m['loss']:.4f}")
    click.echo(f"train accuracy    {m['train_accuracy']:.4f}")
    click.echo(f"test accuracy     {m['test_accuracy']:.4f}")
    rates = ", ".join("-" if r is None else f"{r:.3f}" for r in m["firing_rate"])
    click.echo(f"firing rate       {rates}")
    click.echo(f"energy / sample   {m['energy_pj'] / 1e6:.3f} uJ (ANN baseline {m['energy_ann_pj'] / 1e6:.3f} uJ)")


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--task", type=click.Choice(["adding", "listops", "recall", "parity"]))
@click.option("--data", type=click.Path(dir_okay=False))
@click.option("--tokens", default=0, type=click.IntRange(min=0))
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(min=2))
@click.option("--length", default=None, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of a built-in task's generator.")
def evaluate(checkpoint, task, data, tokens, samples, length, seed):
    """Evaluate a checkpoint on the test split of a task or data file."""
    from refimpl.h5io import FileFormatError
    from refimpl.model import check_inputs
    from refimpl.train import evaluate as run
    from refimpl.train import load_checkpoint

    try:
        cfg, _, params, buffers, _, epoch, _ = load_checkpoint(checkpoint)
    except FileFormatError as e:
        _fail(str(e))
    ds = _load_data(task, data, tokens, samples, length, seed)
    try:
        check_inputs(cfg, ds["x_test"][:1], ds["y_test"][:1])
        r = run(cfg, params, buffers, ds["x_test"], ds["y_test"])
    except (ValueError, TypeError) as e:
        _fail(f"data does not fit the checkpoint's model: {e}")
    click.echo(f"test accuracy     {r['accuracy']:.4f}")
    click.echo(f"test loss         {r['loss']:.4f}")
    click.echo("firing rate       " + ", ".join("-" if v is None else f"{v:.3f}" for v in r["rates"]))
