"""``refimpl train`` and ``refimpl evaluate``: parse, call refimpl.train, draw progress.

Every choice comes from a library registry and every default from the library's config
classes, so a new task, activation family, surrogate or grad mode appears here by itself.
"""
import dataclasses

import click
import numpy as np

from refimpl.activations import ACTIVATIONS, FAMILY_OPTIONS
from refimpl.h5io import FileFormatError
from refimpl.model import NEURON_IMPLS, NORMS, ModelConfig, check_inputs, model_inputs
from refimpl.precision import PRECISIONS
from refimpl.neurons import GRAD_MODES
from refimpl.sdn import load_weights
from refimpl.stream import ModelStream, evaluate_stream, stream_support
from refimpl.ssm import DISCRETIZATIONS, DT_RANGE, INITS
from refimpl.surrogates import SURROGATES
from refimpl.tasks import data_from_recipe, load_data
from refimpl.train import (TrainConfig, evaluate as evaluate_model, evaluate_logits,
                           load_checkpoint, lock_output, plan)

from . import options
from .common import choice, fail, progress, progress_bar
from .text_commands import text_options, train_text

#: Errors the library raises for bad input or files: shown as one line.
USER_ERRORS = (OSError, ValueError, TypeError)  # FileFormatError is a ValueError


def _default(cls, name):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


SAMPLES_DEFAULT = 1000

#: Families with a spiking neuron (``--surrogate``, ``--grad-mode`` apply to them only) and
#: families whose neuron PMBC can run (``--neuron-impl``), from the registry.
NEURON_FAMILIES = [k for k, fam in ACTIVATIONS.items() if fam.neuron is not None]
PMBC_FAMILIES = [k for k, fam in ACTIVATIONS.items() if getattr(fam, "pmbc", False)]


def data_options(f, recorded=False):
    """``--task | --data`` with ``--tokens``, ``--samples``, ``--length``, ``--seed``: the data
    options ``train`` and ``evaluate`` share (``recorded``: no defaults, the checkpoint's
    recorded data fills what is not given)."""
    rec = "as recorded in the checkpoint" if recorded else None

    def default(value):
        return None if recorded else value

    return options.compose(
        options.task_opt(rec),
        options.data_opt(rec),
        options.tokens_opt(default(0), rec),
        options.samples_opt(default(SAMPLES_DEFAULT), rec),
        options.length_opt(None, f"{rec}, else the task's" if recorded else "the task's"),
        options.seed_opt(default(_default(TrainConfig, "seed")), rec),
    )(f)


def recorded_data_options(f):
    return data_options(f, recorded=True)


#: The data options only a built-in task reads (``evaluate`` also: --seed, which seeds nothing
#: else there); --tokens is read by a --data file only.
TASK_ONLY = ("samples", "length")


def _given(*names):
    """The flags, among the running command's parameters ``names``, whose value is not the
    command's default: the options given that matter (one given at its default changes nothing
    and is accepted wherever, as --surrogate '' is for any family)."""
    ctx = click.get_current_context()
    params = {p.name: p for p in ctx.command.params}
    return [params[n].opts[0] for n in names if ctx.params[n] != params[n].get_default(ctx)]


def _drop(flags, where):
    """Stop with one line: ``flags`` (a non-empty list) do not apply ``where``."""
    verb, it = ("applies", "it") if len(flags) == 1 else ("apply", "them")
    fail(f"{'/'.join(flags)} {verb} {where}: drop {it}")


def _load_data(task, data, tokens, samples, length, seed, task_only=TASK_ONLY):
    if (task is None) == (data is None):
        raise click.UsageError("give exactly one of --task NAME or --data FILE.npz")
    if task is not None and _given("tokens"):
        _drop(["--tokens"], f"to --data (integer inputs) only; the built-in task {task} makes "
                            f"its own inputs")
    if data is not None and _given(*task_only):
        _drop(_given(*task_only), "to a built-in task (--task) only; a --data file holds its "
                                  "own sequences")
    try:
        return load_data(task, data, tokens=tokens, n=samples, L=length, seed=seed)
    except USER_ERRORS as e:
        fail(e)


def _model_option(name, type_, help_=None, **kw):
    flag = "--" + name.replace("_", "-")
    return click.option(flag, name, default=_default(ModelConfig, name), show_default=True,
                        type=type_, help=help_, **kw)


def _train_option(name, type_, help_=None):
    flag = "--" + name.replace("_", "-")
    return click.option(flag, name, default=_default(TrainConfig, name), show_default=True,
                        type=type_, help=help_)


@click.command()
@data_options
@text_options
@_model_option("activation", choice(ACTIVATIONS), "Activation family (refimpl.activations).")
@click.option("--layers", "n_layers", default=_default(ModelConfig, "n_layers"),
              show_default=True, type=click.IntRange(min=1), help="Number of blocks.")
@_model_option("d_model", click.IntRange(min=1), "Channels H (the width of every block).")
@_model_option("d_state", click.IntRange(min=2),
               "Real state size N per channel (even: N/2 complex modes).")
@_model_option("init", choice(INITS), "S4D initialisation of A (refimpl.ssm.INITS).")
@_model_option("disc", choice(DISCRETIZATIONS),
               "Discretization of the S4D layers (refimpl.ssm.DISCRETIZATIONS).")
@_model_option("dt_min", click.FloatRange(*DT_RANGE),
               "Smallest initial S4D step dt: per channel, ln dt ~ U[ln dt-min, ln dt-max] "
               "(then trained); the range is refimpl.ssm.DT_RANGE.")
@_model_option("dt_max", click.FloatRange(*DT_RANGE),
               "Largest initial S4D step dt (>= --dt-min).")
@_model_option("norm", choice(NORMS), "Normalisation in every block: layer (LayerNorm) or "
               "batch (BatchNorm; its running statistics are saved in the checkpoint).")
@click.option("--prenorm/--postnorm", default=_default(ModelConfig, "prenorm"),
              show_default=True,
              help="Normalise a block's input (pre) or its output after the residual (post).")
@click.option("--bidirectional/--causal", default=_default(ModelConfig, "bidirectional"),
              show_default=True,
              help="S4D kernels over the whole sequence, both directions (classifiers only), "
                   "or causal (step t reads steps <= t).")
@_model_option("dropout", click.FloatRange(0, 1, max_open=True),
               "Dropout probability on the activation and on the mixing output (one mask per "
               "sample and channel, shared over time; training only).")
@_model_option("grad_mode", choice(GRAD_MODES),
               "Backward of the spiking neuron through time (refimpl.neurons.GRAD_MODES); "
               f"{'/'.join(NEURON_FAMILIES)} only.")
@_model_option("surrogate", click.Choice([""] + list(SURROGATES)),
               "Surrogate gradient of the spike ('' = the family's own, refimpl.activations); "
               f"{'/'.join(NEURON_FAMILIES)} only.")
@_model_option("neuron_impl", choice(NEURON_IMPLS),
               f"Forward of the {'/'.join(PMBC_FAMILIES)} neuron: PMBC (parallel) or the "
               "iterative loop; exact either way.")
@_model_option("dtype", choice(PRECISIONS), "Compute precision: float32 is the faster training "
               "variant (float64 master weights; never a reference), float64 the reference.")
@click.option("--sdn-weights", type=click.Path(dir_okay=False),
              help="SDN weights (.h5 from 'refimpl sdn train' or the published .npz); "
                   "sdn family only.")
@options.epochs_opt(_default(TrainConfig, "epochs"))
@options.batch_size_opt(_default(TrainConfig, "batch_size"))
@options.lr_opt(_default(TrainConfig, "lr"))
@options.weight_decay_opt(_default(TrainConfig, "weight_decay"))
@_train_option("clip_norm", click.FloatRange(min=0),
               "Clip the global gradient norm to this value (0 = off).")
@click.option("--out", "out_dir", default="runs/train", show_default=True,
              type=click.Path(file_okay=False),
              help="Run folder: checkpoint.h5, metrics.json and config.json, rewritten after "
                   "every epoch.")
@options.resume_opt
@options.overwrite_opt
def train(task, data, tokens, samples, length, seed, sdn_weights, epochs, batch_size, lr,
          weight_decay, clip_norm, out_dir, resume, overwrite, text_path, text_vocab, context,
          val_frac, tie_embedding, max_text_bytes, **model_options):
    """Train a spiking SSM classifier, or (--text) a language model.

    A classifier learns a built-in task (--task) or an .npz file (--data); with --text FILE a
    causal language model learns next-token prediction on a text file. After every epoch OUT
    gets checkpoint.h5, metrics.json (loss, accuracy or bits per token, firing rate per layer,
    energy) and config.json, each written atomically; 'refimpl evaluate' and 'refimpl
    generate' read the checkpoint. Choices and defaults come from the library's registries and
    config classes.

    --seed seeds a built-in task and the training (initialisation, batch order, dropout). A
    batch holds --batch-size samples (--text: windows). AdamW warms up, then follows a cosine
    schedule; the SSM dynamics use min(--lr, 1e-3), and they, biases, norms, D, thresholds and
    rho get no weight decay.

    An option the run would not read is refused, not ignored: the --text options without
    --text, --task/--data/--tokens/--samples/--length with it, --tokens with a built-in task,
    --samples/--length with --data, and a family option (--surrogate, --grad-mode,
    --neuron-impl, --sdn-weights) for a family that does not use it.

    Examples:

    \b
      refimpl train --task recall --activation lif --epochs 3 --out runs/recall
      refimpl train --data mydata.npz --activation refractory --surrogate atan --out runs/mine
      refimpl train --text notes.txt --context 128 --epochs 3 --out runs/lm
    """
    _check_model_options(model_options)
    act = model_options["activation"]
    if sdn_weights is not None and not ACTIVATIONS[act].needs_sdn_weights:
        users = [k for k, fam in ACTIVATIONS.items() if fam.needs_sdn_weights]
        _drop(["--sdn-weights"], f"to --activation {'/'.join(users)} only; --activation {act} "
                                 f"does not use it")
    if text_path is not None:
        classifier_data = _given("task", "data", "tokens", "samples", "length")
        if classifier_data:
            fail(f"--text trains a language model on the file: drop "
                 f"{'/'.join(classifier_data)} (--context sets the window, --vocab the tokens)")
    else:
        text_only = _given("text_vocab", "context", "val_frac", "tie_embedding",
                           "max_text_bytes")
        if text_only:
            _drop(text_only, "to --text (language models) only")
    try:
        tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, clip_norm=clip_norm, seed=seed)
        weights = None
        if ACTIVATIONS[act].needs_sdn_weights and not resume:
            if not sdn_weights:
                fail(f"--activation {act} needs --sdn-weights FILE (train one with "
                     "'refimpl sdn train')")
            weights = load_weights(sdn_weights)[0]
    except USER_ERRORS as e:
        fail(e)
    if text_path is not None:
        return train_text(text_path, text_vocab, context, val_frac, tcfg, out_dir, overwrite,
                          resume, weights, dict(model_options, tie_embedding=tie_embedding),
                          max_text_bytes)
    ds = _load_data(task, data, tokens, samples, length, seed)
    try:
        cfg = ModelConfig.for_data(ds, **model_options)
    except USER_ERRORS as e:
        fail(e)

    def epoch_summary(ev):
        m = ev.metrics
        return (f"epoch {m['epoch'] + 1} train acc {m['train_accuracy']:.3f} "
                f"test acc {m['test_accuracy']:.3f}")

    # Everything is validated; the lock makes this process the folder's only writer (plan again
    # under it: a resumed run must start from the checkpoint as it is now). A failure inside
    # leaves the folder as it was (lock_output removes the lock, and a folder it created).
    try:
        with lock_output(out_dir):
            run = plan(cfg, tcfg, ds, out_dir, resume=resume, sdn_weights=weights,
                       overwrite=overwrite)
            dtype = "" if cfg.dtype == "float64" else f" in {cfg.dtype}"
            click.echo(f"training {cfg.activation}{dtype} on {ds['name']}: "
                       f"{len(ds['y_train'])} train / {len(ds['y_test'])} test, "
                       f"L = {ds['x_train'].shape[1]}, {epochs} epochs -> {out_dir}", err=True)
            with progress_bar(run.remaining_steps, "train", epoch_summary) as on_event:
                metrics = run.run(on_event)
    except USER_ERRORS as e:
        fail(e)
    _summary(metrics, cfg)


def _check_model_options(options):
    """Refuse what ModelConfig accepts but the model would ignore, or the S4D initialisation
    would refuse only later: --surrogate, --grad-mode or --neuron-impl set (to anything but its
    default) for a family that does not use it, and --dt-min > --dt-max."""
    act = options["activation"]
    used = ACTIVATIONS[act].options  # what the family reads (refimpl.activations)
    for name in FAMILY_OPTIONS:
        if options[name] != _default(ModelConfig, name) and name not in used:
            families = [k for k, fam in ACTIVATIONS.items() if name in fam.options]
            fail(f"--{name.replace('_', '-')} applies to --activation {'/'.join(families)} "
                 f"only; --activation {act} does not use it: drop it")
    if options["dt_min"] > options["dt_max"]:
        fail(f"--dt-min ({options['dt_min']:g}) must be <= --dt-max ({options['dt_max']:g})")


def _rates(rates):
    return ", ".join("-" if r is None else f"{r:.3f}" for r in rates)


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
    click.echo(f"firing rate       {_rates(m['firing_rate'])}")
    click.echo(f"energy / sample   {m['energy_pj'] / 1e6:.3f} uJ "
               f"(ANN baseline {m['energy_ann_pj'] / 1e6:.3f} uJ)")


def _eval_data(ckpt, task, data, tokens, samples, length, seed):
    """The data ``evaluate`` scores: the checkpoint's recorded recipe, with the options given
    now overriding it (a different --task or --data starts from the usual defaults)."""
    recipe = ckpt.data_recipe
    given = {"tokens": tokens, "samples": samples, "length": length, "seed": seed}
    if task is None and data is None:
        if recipe is None:
            fail("the checkpoint does not record its data (older refimpl); pass --task or --data")
        if "task" in recipe:
            task = recipe["task"]
        else:
            if any(v is not None for k, v in given.items() if k != "tokens"):
                fail("--samples/--length/--seed apply to a built-in task, but the checkpoint was "
                     "trained on a data file; pass --task to choose one")
            if tokens is None or tokens == recipe.get("tokens", 0):
                try:
                    return data_from_recipe(recipe)
                except USER_ERRORS as e:
                    fail(f"cannot rebuild the recorded data: {e}")
            data = recipe["data"]
    if task is not None and recipe is not None and recipe.get("task") == task:
        defaults = recipe
    else:
        defaults = {"samples": SAMPLES_DEFAULT, "length": None,
                    "seed": _default(TrainConfig, "seed")}
    samples = defaults["samples"] if samples is None else samples
    length = defaults["length"] if length is None else length
    seed = defaults["seed"] if seed is None else seed
    return _load_data(task, data, tokens or 0, samples, length, seed,
                      task_only=TASK_ONLY + ("seed",))


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@recorded_data_options
@click.option("--stream", is_flag=True,
              help="Also run the test set step by step (the deployed, recurrent form) and "
                   "report its accuracy, throughput and per-step latency.")
@options.batch_size_opt(64)
def evaluate(checkpoint, task, data, tokens, samples, length, seed, stream, batch_size):
    """Score a classifier checkpoint on a test split.

    CHECKPOINT (OUT/checkpoint.h5 of 'refimpl train') is evaluated on the test split of its
    recorded data (task, samples, length and seed, or the .npz file checked by SHA-256); the
    data options given override the recorded ones. Prints test accuracy, loss and the firing
    rate per layer.

    With --stream the test set also runs one time step at a time from the model's state
    (refimpl.stream), as a chip or an online system runs it, --batch-size sequences in
    lockstep (--batch-size applies to --stream only), and the predictions are compared with
    the parallel form's. A checkpoint that cannot stream is refused before anything is scored.

    Examples:

    \b
      refimpl evaluate runs/recall/checkpoint.h5
      refimpl evaluate runs/recall/checkpoint.h5 --samples 2000 --seed 1
      refimpl evaluate runs/recall/checkpoint.h5 --stream --batch-size 32
    """
    try:
        ckpt = load_checkpoint(checkpoint)
    except FileFormatError as e:
        fail(e)
    if ckpt.cfg.head != "classifier":
        fail(f"{checkpoint} is a language model (refimpl train --text); evaluate scores "
             f"classifiers: its validation bits per token are in metrics.json next to it, and "
             f"'refimpl generate' samples from it")
    if not stream and _given("batch_size"):
        _drop(["--batch-size"], "to --stream only (sequences in lockstep); the parallel form "
                                "scores the test set at once")
    st = _stream(ckpt) if stream else None  # refused before any result is printed
    ds = _eval_data(ckpt, task, data, tokens, samples, length, seed)
    rec = ds.get("recipe", {})
    what = (f"{rec['task']} (samples {rec['samples']}, length {rec['length']}, seed "
            f"{rec['seed']})" if "task" in rec else ds["name"])
    click.echo(f"evaluating on the test split of {what}", err=True)
    try:
        check_inputs(ckpt.cfg, model_inputs(ckpt.cfg, ds["x_test"][:1]), ds["y_test"][:1])
        r = evaluate_model(ckpt.cfg, ckpt.params, ckpt.buffers, ds["x_test"], ds["y_test"])
    except (ValueError, TypeError) as e:
        fail(f"data does not fit the checkpoint's model: {e}")
    click.echo(f"test accuracy     {r['accuracy']:.4f}")
    click.echo(f"test loss         {r['loss']:.4f}")
    click.echo(f"firing rate       {_rates(r['rates'])}")
    if stream:
        _evaluate_stream(ckpt, st, ds, batch_size)


def _stream(ckpt):
    """The checkpoint's model as a stream (``evaluate --stream``), or one line saying why it
    cannot stream (:func:`refimpl.stream.stream_support`), before anything is computed."""
    reason = stream_support(ckpt.cfg)
    if reason:
        fail(reason)
    try:
        st = ModelStream.from_model(ckpt.cfg, ckpt.params, ckpt.buffers)
    except ValueError as e:
        fail(e)
    if st.trained_dtype != "float64":
        click.echo(f"note: trained with --dtype {st.trained_dtype}; the stream runs in float64 "
                   "from the stored float64 master weights (the reference form)", err=True)
    return st


def _evaluate_stream(ckpt, st, ds, batch_size):
    """The ``--stream`` part of ``evaluate``: ``st`` step by step, beside the parallel form."""
    x, y = ds["x_test"], ds["y_test"]
    total = len(y) * x.shape[1]
    parallel = []
    with progress(total, "streaming (steps x sequences)") as bar:
        r = evaluate_stream(st, x, y, batch_size=batch_size, progress=bar.update,
                            predictions=parallel)
    # the parallel form the stream equals: float64, from the master weights
    ref = np.concatenate([evaluate_logits(st.cfg, ckpt.params, ckpt.buffers, x[i:i + 256])
                          for i in range(0, len(y), 256)]).argmax(1)
    same = int((np.asarray(parallel) == ref).sum())
    click.echo(f"streamed accuracy {r['accuracy']:.4f}   (step by step, {len(y)} sequences, "
               f"{batch_size} in lockstep)")
    click.echo(f"streamed loss     {r['loss']:.4f}")
    click.echo(f"predictions       {same} of {len(y)} equal to the parallel form's")
    click.echo(f"throughput        {r['steps_per_second']:.0f} time steps/s "
               f"({r['steps_per_second'] / min(batch_size, len(y)):.0f} steps/s per sequence)")
    click.echo(f"latency per step  {r['latency_ms']:.3f} ms median, {r['latency_p99_ms']:.3f} ms "
               f"p99 (a step of {min(batch_size, len(y))} sequences)")
