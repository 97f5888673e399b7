"""CPU training of spiking SSM classifiers: the task, evaluation, checkpoints, resume.

The loop itself, with its guards (option checks before writing, the folder's lock, divergence
with epoch and step, finite parameters after every update, progress events, atomic checkpoints,
resume), is :mod:`refimpl.loop`; this module plugs the classifier into it
(:class:`ClassifierTask`) and holds what classifiers and language models share
(:class:`ModelTask`: the model's AdamW groups and projection, the run folder and its
checkpoint).

Determinism: every random choice derives from the seed and the position in the run
(``default_rng([seed, epoch])`` shuffles an epoch, ``default_rng([seed, epoch, step])`` draws
its dropout masks), the optimizer state is plain arrays, and HDF5 stores float64 exactly, so
a run resumed from a checkpoint is bit-identical to the uninterrupted run.

Outputs in ``out_dir``: ``checkpoint.h5`` (schema ``refimpl-checkpoint`` v1, written
atomically after every epoch), ``metrics.json`` and ``config.json`` (atomic too, written with
each checkpoint, so the three always describe the same completed epoch). Both the checkpoint
and ``config.json`` record how the data was made (the data set's ``recipe``: task, samples,
length, seed, or the ``.npz`` path and SHA-256). A run owns its folder
(:func:`~refimpl.loop.lock_output`); a non-finite loss, gradient or parameter stops it with
:class:`~refimpl.loop.Diverged` before anything of that epoch is written. The library never
prints: pass ``progress`` to receive :mod:`refimpl.progress` events.

:func:`plan` validates everything and reads a checkpoint to resume (once) before anything is
written; the :class:`TrainingRun` it returns knows how many updates remain, so a caller can
size a progress bar, and :meth:`TrainingRun.run` does the work (the caller holds the lock).
:func:`train` is both in one call, under the lock.
"""
import dataclasses
import json
import os
from typing import NamedTuple

import numpy as np

from . import loop
from . import model as M
from ._checks import check_int, check_real
from .atomic import atomic_write_json
from .h5io import FileFormatError, atomic_h5, open_h5, read_tree, write_tree
from .layers import cross_entropy_fwd
# The loop's names that the CLI and users import from here (as before the loop was shared):
from .loop import LOCK_NAME, Diverged, OutputLocked, lock_output  # noqa: F401
from .optim import adamw_init

CHECKPOINT_SCHEMA = "refimpl-checkpoint"
CHECKPOINT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, cosine schedule with warm-up); validated on construction."""
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 1e-2
    warmup_frac: float = 0.1
    clip_norm: float = 0.0  # 0 = no clipping
    seed: int = 0

    def __post_init__(self):
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_real("lr", self.lr, 0.0, lo_open=True)
        check_real("weight_decay", self.weight_decay, 0.0)
        check_real("warmup_frac", self.warmup_frac, 0.0, 1.0, hi_open=True)
        check_real("clip_norm", self.clip_norm, 0.0)
        check_int("seed", self.seed, 0)


def save_checkpoint(path, cfg, tcfg, params, buffers, opt_state, epoch, metrics,
                    data_recipe=None):
    """Atomically write a checkpoint (overwrites ``path``); ``data_recipe`` records how the
    training data was made (see :mod:`refimpl.tasks`)."""
    attrs = {"model_config": json.dumps(dataclasses.asdict(cfg)),
             "train_config": json.dumps(dataclasses.asdict(tcfg)),
             "epoch": int(epoch), "metrics": json.dumps(metrics),
             "data_recipe": json.dumps(data_recipe)}
    with atomic_h5(path, CHECKPOINT_SCHEMA, CHECKPOINT_VERSION, overwrite=True, attrs=attrs) as f:
        write_tree(f.create_group("params"), params)
        write_tree(f.create_group("buffers"), buffers)
        write_tree(f.create_group("optimizer"), opt_state)


class Checkpoint(NamedTuple):
    """A training checkpoint as :func:`load_checkpoint` reads it."""
    cfg: M.ModelConfig
    tcfg: TrainConfig
    params: dict  # name -> float64 array
    buffers: dict  # name -> float64 array (BatchNorm statistics, SDN weights)
    opt: dict  # AdamW state (refimpl.optim)
    epoch: int  # epochs completed
    metrics: list  # per-epoch metrics, as in metrics.json
    data_recipe: dict = None  # how the training data was made (None: not recorded)


def load_checkpoint(path):
    """Read a checkpoint into a :class:`Checkpoint`; raises :class:`FileFormatError` (one line)
    on a bad file."""
    f = open_h5(path, CHECKPOINT_SCHEMA, (CHECKPOINT_VERSION,))
    try:
        with f:
            cfg = M.ModelConfig(**json.loads(f.attrs["model_config"]))
            tcfg = TrainConfig(**json.loads(f.attrs["train_config"]))
            epoch = int(f.attrs["epoch"])
            metrics = json.loads(f.attrs["metrics"])
            recipe = json.loads(f.attrs["data_recipe"]) if "data_recipe" in f.attrs else None
            params = read_tree(f["params"])
            buffers = read_tree(f["buffers"]) if "buffers" in f else {}
            opt = read_tree(f["optimizer"])
    except FileFormatError:
        raise
    except Exception as e:  # missing groups/attrs, bad JSON, invalid config
        raise FileFormatError(f"{path}: incompatible or corrupted checkpoint "
                              f"({type(e).__name__}: {e})") from None
    opt["step"] = np.asarray(opt["step"], dtype=np.int64)
    expected, _ = M.init_model(cfg, 0, sdn_weights=_sdn_from_buffers(buffers))
    bad = [k for k in expected if k not in params or params[k].shape != expected[k].shape]
    if bad or set(params) != set(expected):
        first = (bad or sorted(set(params) ^ set(expected)))[0]
        raise FileFormatError(f"{path}: parameters do not match the stored model config "
                              f"(first mismatch: {first})")
    return Checkpoint(cfg, tcfg, params, buffers, opt, epoch, metrics, recipe)


def _sdn_from_buffers(buffers):
    """The SDN weights a model keeps in its buffers (``sdn.w0`` ...), or None."""
    weights = {k[len("sdn."):]: v for k, v in buffers.items() if k.startswith("sdn.")}
    return weights or None


def _batches(n, batch_size, rng):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def evaluate_logits(cfg, params, buffers, x):
    """Eval-mode logits ``(B, n_classes)`` of a batch (the parallel form; float64 inputs are
    rounded to ``cfg.dtype``, :func:`refimpl.model.model_inputs`)."""
    logits, _, _, _ = M.model_fwd(cfg, params, buffers, M.model_inputs(cfg, x), training=False)
    return logits


def evaluate(cfg, params, buffers, x, y, batch_size=256):
    """Eval-mode accuracy, mean loss and per-layer firing rates over a data set (float64
    inputs rounded to ``cfg.dtype``, :func:`refimpl.model.model_inputs`)."""
    x = M.model_inputs(cfg, x)
    correct, loss_sum, rate_sum, n = 0, 0.0, None, len(y)
    for idx in _batches(n, batch_size, None):
        logits, _, _, st = M.model_fwd(cfg, params, buffers, x[idx], training=False)
        loss, _ = cross_entropy_fwd(logits, y[idx])
        loss_sum += loss * len(idx)
        correct += int((logits.argmax(1) == y[idx]).sum())
        r = np.array([np.nan if v is None else v for v in st["rates"]]) * len(idx)
        rate_sum = r if rate_sum is None else rate_sum + r
    rates = [None if np.isnan(v) else float(v / n) for v in rate_sum]
    return {"accuracy": correct / n, "loss": loss_sum / n, "rates": rates}


def mean_rate(rates):
    """The mean of the per-layer firing rates where the model spikes (None: it does not)."""
    spiking = [r for r in rates if r is not None]
    return float(np.mean(spiking)) if spiking else None


def _epoch_metrics(cfg, epoch, train_loss, train_acc, ev, L):
    e = M.energy(cfg, ev["rates"], L)
    rates = ev["rates"]
    return {
        "epoch": epoch, "loss": train_loss, "train_accuracy": train_acc,
        "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
        "firing_rate": rates,
        "sparsity": [None if r is None else 1.0 - r for r in rates],
        "mean_firing_rate": mean_rate(rates),
        "mac": e["mac"], "ac": e["ac"], "energy_pj": e["energy_pj"],
        "energy_ann_pj": e["energy_ann_pj"],
    }


class ModelTask(loop.Task):
    """What training a :mod:`refimpl.model` model shares, classifier or language model
    (:class:`refimpl.loop.Task`): the AdamW of :class:`TrainConfig` with the model's parameter
    groups and warm-up, :func:`refimpl.model.project` after every update, and the run folder
    ``out_dir``: ``checkpoint.h5``, ``metrics.json`` and ``config.json`` after every epoch,
    resumed only with the same configs (``epochs`` included: the schedule depends on the total)
    and the same data.

    A subclass validates its data, passes ``steps_per_epoch``, ``recipe`` (the data recipe the
    checkpoint stores) and ``config_data`` (``config.json``'s ``"data"``), and fills in
    :meth:`check_recipe`, ``batches``, ``forward_backward`` and ``end_epoch``.
    """
    advice = "lower --lr or enable --clip-norm"

    def __init__(self, cfg, tcfg, out_dir, steps_per_epoch, recipe, config_data, resume=False,
                 overwrite=False, sdn_weights=None):
        self.cfg, self.tcfg, self.out_dir = cfg, tcfg, out_dir
        self.resume, self.overwrite, self.sdn_weights = resume, overwrite, sdn_weights
        self.epochs, self.steps_per_epoch, self.recipe = tcfg.epochs, steps_per_epoch, recipe
        total = self.total_steps
        self.adamw = loop.AdamW(tcfg.lr, tcfg.weight_decay, tuple(M.optimizer_rules(tcfg.lr)),
                                warmup_steps=min(int(round(tcfg.warmup_frac * total)), total - 1),
                                clip_norm=tcfg.clip_norm or None)
        self.config = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
                       "data": config_data}

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.h5")

    def check(self):
        if self.resume:
            self._checkpoint()
        elif os.path.exists(self.checkpoint_path) and not self.overwrite:
            raise FileExistsError(f"{self.checkpoint_path} exists; pass --resume to continue it "
                                  f"or --overwrite to start again")

    def initial_state(self):
        if self.resume:
            c = self._checkpoint()
            return loop.State(c.params, c.buffers, c.opt, c.epoch, c.metrics)
        params, buffers = M.init_model(self.cfg, self.tcfg.seed, sdn_weights=self.sdn_weights)
        return loop.State(params, buffers, adamw_init(params))

    def _checkpoint(self):
        """The checkpoint to resume, after checking that it is this run's."""
        ckpt, cfg, tcfg = self.checkpoint_path, self.cfg, self.tcfg
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        c = load_checkpoint(ckpt)
        same_but_epochs = dataclasses.replace(c.tcfg, epochs=tcfg.epochs) == tcfg
        if c.tcfg.epochs != tcfg.epochs and same_but_epochs:
            raise ValueError(f"--resume: {ckpt} is a run of {c.tcfg.epochs} epochs, not "
                             f"{tcfg.epochs} (the learning-rate schedule depends on the total); "
                             f"pass --epochs {c.tcfg.epochs} to finish it, or start a new run")
        if c.cfg != cfg or c.tcfg != tcfg:
            raise ValueError(f"--resume: {ckpt} was written with other settings "
                             f"({c.cfg}, {c.tcfg}); rerun with the same options")
        self.check_recipe(c.data_recipe)
        return c

    def check_recipe(self, stored):
        """Raise ValueError (one line, naming the options) unless the checkpoint's data recipe
        ``stored`` is this run's."""
        raise NotImplementedError

    def project(self, params):
        M.project(params, self.cfg)

    def save(self, state):
        os.makedirs(self.out_dir, exist_ok=True)
        save_checkpoint(self.checkpoint_path, self.cfg, self.tcfg, state.params, state.buffers,
                        state.opt, state.epoch, state.metrics, self.recipe)
        atomic_write_json(os.path.join(self.out_dir, "metrics.json"), state.metrics)
        atomic_write_json(os.path.join(self.out_dir, "config.json"), self.config)


class _Tally(NamedTuple):
    """What an epoch's record needs of one classifier update."""
    samples: int
    correct: float  # correct predictions of the training-mode forward


class ClassifierTask(ModelTask):
    """A classifier on a data set (:mod:`refimpl.tasks`) for :mod:`refimpl.loop`: every epoch
    a permutation of the training set (``default_rng([seed, epoch])``) in batches of
    ``batch_size``; after it, :func:`evaluate` on the test set and the record of
    :func:`_epoch_metrics`. Validates the data against ``cfg`` when made (float64 inputs are
    rounded once to ``cfg.dtype``, :func:`refimpl.model.model_inputs`)."""
    advice = "lower --lr, enable --clip-norm, or rescale the data (inputs of order 1)"

    def __init__(self, cfg, tcfg, data, out_dir, resume=False, sdn_weights=None,
                 overwrite=False):
        data = {**data, "x_train": M.model_inputs(cfg, data["x_train"]),
                "x_test": M.model_inputs(cfg, data["x_test"])}  # float32 variant: rounded once
        M.check_inputs(cfg, data["x_train"], data["y_train"])
        M.check_inputs(cfg, data["x_test"], data["y_test"])
        recipe = data.get("recipe")
        super().__init__(cfg, tcfg, out_dir, -(-len(data["y_train"]) // tcfg.batch_size),
                         recipe, recipe if recipe is not None else data.get("name", ""),
                         resume, overwrite, sdn_weights)
        self.data = data

    def check_recipe(self, stored):
        ckpt, recipe = self.checkpoint_path, self.recipe
        if (stored is None) != (recipe is None):  # both None: data dicts made by hand
            raise ValueError(f"--resume: {ckpt} or the data given does not record how the data "
                             f"was made, so it cannot be checked; start again with --overwrite")
        if stored != recipe:
            raise ValueError(f"--resume: {ckpt} was trained on other data "
                             f"({_describe(stored)}, not {_describe(recipe)}); rerun "
                             f"with the same data options")

    def batches(self, state, epoch):
        rng = np.random.default_rng([self.tcfg.seed, epoch])
        return _batches(len(self.data["y_train"]), self.tcfg.batch_size, rng)

    def forward_backward(self, state, epoch, step, idx):
        y = self.data["y_train"][idx]  # (b,)
        loss, logits, grads, state.buffers, st = M.loss_and_grads(
            self.cfg, state.params, state.buffers, self.data["x_train"][idx], y, training=True,
            rng=np.random.default_rng([self.tcfg.seed, epoch, step]))  # dropout masks
        correct = float((logits.argmax(1) == y).sum())
        return loop.Outcome(loss, grads, mean_rate(st["rates"]), _Tally(len(idx), correct))

    def end_epoch(self, state, epoch, outcomes, seconds):
        loss_sum = correct = 0.0
        for o in outcomes:
            loss_sum += o.loss * o.tally.samples
            correct += o.tally.correct
        d, n = self.data, len(self.data["y_train"])
        ev = evaluate(self.cfg, state.params, state.buffers, d["x_test"], d["y_test"])
        return _epoch_metrics(self.cfg, epoch, loss_sum / n, correct / n, ev,
                              d["x_train"].shape[1])


class TrainingRun:
    """A validated classifier run (from :func:`plan`): ``task`` (a :class:`ClassifierTask`)
    and the :class:`refimpl.loop.State` it starts from (``state.epoch``: epochs already done
    when resuming), with ``steps_per_epoch``, ``total_steps`` (the whole schedule) and
    ``remaining_steps`` to size a progress bar."""

    def __init__(self, task, state):
        self.task, self.state = task, state
        self.steps_per_epoch, self.total_steps = task.steps_per_epoch, task.total_steps
        self.remaining_steps = loop.remaining_steps(task, state)

    @property
    def checkpoint_path(self):
        return self.task.checkpoint_path

    def run(self, progress=None):
        """Train the remaining epochs (:func:`refimpl.loop.run`; the caller holds the folder's
        lock); writes the checkpoint, ``metrics.json`` and ``config.json`` into ``out_dir``
        (atomically, after every epoch). Returns the list of per-epoch metrics (earlier epochs
        of a resumed run included)."""
        return loop.run(self.task, self.state, progress).metrics


def plan(cfg, tcfg, data, out_dir, resume=False, sdn_weights=None, overwrite=False):
    """Validate a training run and load what it starts from; writes nothing.

    ``resume=True`` continues from ``out_dir/checkpoint.h5``: the stored model and training
    configs (``epochs`` included: the learning-rate schedule depends on the total) and the
    stored data recipe must equal the given ones, so the resumed run is the interrupted run,
    bit-exactly. Without ``resume``, an existing checkpoint in
    ``out_dir`` is an error unless ``overwrite``. Returns a :class:`TrainingRun`.
    """
    task = ClassifierTask(cfg, tcfg, data, out_dir, resume, sdn_weights, overwrite)
    task.check()
    return TrainingRun(task, task.initial_state())


def _describe(recipe):
    """A data recipe as the CLI options that rebuild it."""
    if "task" in recipe:
        return (f"--task {recipe['task']} --samples {recipe['samples']} --length "
                f"{recipe['length']} --seed {recipe['seed']}")
    tok = f" --tokens {recipe['tokens']}" if recipe.get("tokens") else ""
    return f"--data {recipe['data']}{tok} (SHA-256 {recipe['sha256'][:12]}...)"


def train(cfg, tcfg, data, out_dir, resume=False, sdn_weights=None, progress=None,
          overwrite=False):
    """Train ``cfg`` on ``data`` (see :mod:`refimpl.tasks`) for ``tcfg.epochs`` epochs: a
    :class:`ClassifierTask` run by :func:`refimpl.loop.train` (checks, then the folder's lock,
    then the loop; see :func:`plan` for ``resume`` and ``overwrite``). Returns the list of
    per-epoch metrics."""
    task = ClassifierTask(cfg, tcfg, data, out_dir, resume, sdn_weights, overwrite)
    return loop.train(task, progress).metrics
