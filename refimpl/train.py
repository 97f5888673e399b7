"""CPU training of spiking SSM classifiers: the loop, evaluation, checkpoints, resume.

Determinism: every random choice derives from the seed and the position in the run
(``default_rng([seed, epoch])`` shuffles an epoch, ``default_rng([seed, epoch, step])`` draws
its dropout masks), the optimizer state is plain arrays, and HDF5 stores float64 exactly, so
a run resumed from a checkpoint is bit-identical to the uninterrupted run.

Outputs in ``out_dir``: ``checkpoint.h5`` (schema ``refimpl-checkpoint`` v1, written
atomically after every epoch), ``metrics.json`` and ``config.json`` (atomic too, written with
each checkpoint, so the three always describe the same completed epoch). Both the checkpoint
and ``config.json`` record how the data was made (the data set's ``recipe``: task, samples,
length, seed, or the ``.npz`` path and SHA-256).

A run owns its folder: :func:`lock_output` holds ``out_dir/.lock`` (``fcntl.flock``) for the
run; a second run on the same folder is refused. The kernel releases the lock when a process
dies, so a lock file left by a killed run never blocks a later one.

Divergence: a non-finite loss, gradient or parameter stops the run with :class:`Diverged`
before anything of that epoch is written; the folder keeps the last completed epoch's files
(or nothing, if the first epoch diverged).
The library never prints: pass ``progress`` to receive :mod:`refimpl.progress` events
(:class:`~refimpl.progress.Step` per batch, :class:`~refimpl.progress.EpochEnd` per epoch).

:func:`plan` validates everything and reads a checkpoint to resume (once) before anything is
written; the :class:`TrainingRun` it returns knows how many updates remain, so a caller can
size a progress bar, and :meth:`TrainingRun.run` does the work. :func:`train` is both in one
call.
"""
import contextlib
import dataclasses
import fcntl
import json
import os
from typing import NamedTuple

import numpy as np

from . import model as M
from ._checks import check_int, check_real
from .atomic import atomic_write_json
from .h5io import FileFormatError, atomic_h5, open_h5, read_tree, write_tree
from .layers import cross_entropy_fwd
from .memory import retain_freed_memory
from .optim import adamw_init, adamw_step, cosine_schedule, make_groups
from .progress import EpochEnd, Step

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


class Diverged(ValueError):
    """Training produced a non-finite loss, gradient or parameter (one-line message)."""


class OutputLocked(OSError):
    """Another run holds the output folder's lock."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def lock_output(out_dir):
    """Own ``out_dir`` for the duration of the block: an exclusive ``fcntl.flock`` on
    ``out_dir/.lock`` (non-blocking: raises :class:`OutputLocked` if another process holds it).

    Creates ``out_dir`` if needed; on exit removes the lock file, and ``out_dir`` again if this
    call created it and it is empty (a run that failed early leaves the file system as it was).
    """
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    fd = None
    try:
        for _ in range(10):  # a lock file unlinked by the previous owner: take the new one
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                raise OutputLocked(f"{out_dir} is in use by another run (locked: {path}); wait "
                                   f"for it to finish or choose another --out") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        else:
            raise OutputLocked(f"{out_dir}: could not take the lock {path}; retry")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty


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


def _epoch_metrics(cfg, epoch, train_loss, train_acc, ev, L):
    e = M.energy(cfg, ev["rates"], L)
    rates = ev["rates"]
    spiking = [r for r in rates if r is not None]
    return {
        "epoch": epoch, "loss": train_loss, "train_accuracy": train_acc,
        "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
        "firing_rate": rates,
        "sparsity": [None if r is None else 1.0 - r for r in rates],
        "mean_firing_rate": float(np.mean(spiking)) if spiking else None,
        "mac": e["mac"], "ac": e["ac"], "energy_pj": e["energy_pj"],
        "energy_ann_pj": e["energy_ann_pj"],
    }


class TrainingRun:
    """A validated training run (from :func:`plan`): the state to start from and the schedule.

    Attributes: ``cfg``, ``tcfg``, ``data``, ``out_dir``, ``params``, ``buffers``, ``opt``,
    ``start_epoch`` (epochs already done when resuming), ``metrics`` (theirs),
    ``steps_per_epoch``, ``total_steps`` (the whole schedule) and ``remaining_steps``.
    """

    def __init__(self, cfg, tcfg, data, out_dir, params, buffers, opt, start_epoch, metrics):
        self.cfg, self.tcfg, self.data, self.out_dir = cfg, tcfg, data, out_dir
        self.params, self.buffers, self.opt = params, buffers, opt
        self.start_epoch, self.metrics = start_epoch, metrics
        self.steps_per_epoch = -(-len(data["y_train"]) // tcfg.batch_size)
        self.total_steps = tcfg.epochs * self.steps_per_epoch
        self.remaining_steps = max(tcfg.epochs - start_epoch, 0) * self.steps_per_epoch

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.h5")

    def run(self, progress=None):
        """Train the remaining epochs; writes the checkpoint, ``metrics.json`` and
        ``config.json`` into ``out_dir`` (atomically, after every epoch). Returns the list of
        per-epoch metrics (earlier epochs of a resumed run included)."""
        cfg, tcfg, data = self.cfg, self.tcfg, self.data
        params, buffers, opt, metrics = self.params, self.buffers, self.opt, self.metrics
        retain_freed_memory()  # no page faults for the arrays every step reuses (memory.py)
        xtr, ytr = data["x_train"], data["y_train"]
        groups = make_groups(params, tcfg.lr, tcfg.weight_decay, M.optimizer_rules(tcfg.lr))
        total = self.total_steps
        warmup = min(int(round(tcfg.warmup_frac * total)), total - 1)
        L = xtr.shape[1]
        recipe = data.get("recipe")
        config = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
                  "data": recipe if recipe is not None else data.get("name", "")}
        for epoch in range(self.start_epoch, tcfg.epochs):
            rng = np.random.default_rng([tcfg.seed, epoch])
            loss_sum = correct = 0.0
            for step, idx in enumerate(_batches(len(ytr), tcfg.batch_size, rng)):
                drop_rng = np.random.default_rng([tcfg.seed, epoch, step])
                with np.errstate(all="ignore"):  # overflow is detected below, not warned about
                    try:
                        loss, logits, grads, buffers, st = M.loss_and_grads(
                            cfg, params, buffers, xtr[idx], ytr[idx], training=True,
                            rng=drop_rng)
                    except ValueError as e:  # inputs are validated: a non-finite intermediate
                        what = str(e).split(";")[0]  # "u contains non-finite values (...)"
                        raise self._diverged(epoch, step, f"an intermediate of the forward pass "
                                             f"({what})") from None
                    if not np.isfinite(loss):
                        raise self._diverged(epoch, step, f"the loss ({loss})")
                    bad = next((k for k, g in grads.items() if not np.all(np.isfinite(g))), None)
                    if bad is not None:
                        raise self._diverged(epoch, step, f"the gradient of {bad}")
                    scale = cosine_schedule(int(opt["step"]), total, warmup)
                    adamw_step(params, grads, opt, groups, lr_scale=scale,
                               clip_norm=tcfg.clip_norm or None)
                    M.project(params, cfg)
                bad = next((k for k, v in params.items() if not np.all(np.isfinite(v))), None)
                if bad is not None:
                    raise self._diverged(epoch, step, f"parameter {bad} after the update")
                loss_sum += loss * len(idx)
                correct += float((logits.argmax(1) == ytr[idx]).sum())
                if progress is not None:
                    spiking = [r for r in st["rates"] if r is not None]
                    progress(Step(epoch, tcfg.epochs, step, self.steps_per_epoch,
                                  int(opt["step"]) - 1, total, float(loss),
                                  float(np.mean(spiking)) if spiking else None))
            ev = evaluate(cfg, params, buffers, data["x_test"], data["y_test"])
            metrics.append(_epoch_metrics(cfg, epoch, loss_sum / len(ytr), correct / len(ytr),
                                          ev, L))
            os.makedirs(self.out_dir, exist_ok=True)
            save_checkpoint(self.checkpoint_path, cfg, tcfg, params, buffers, opt, epoch + 1,
                            metrics, recipe)
            atomic_write_json(os.path.join(self.out_dir, "metrics.json"), metrics)
            atomic_write_json(os.path.join(self.out_dir, "config.json"), config)
            self.buffers = buffers
            if progress is not None:
                progress(EpochEnd(epoch, tcfg.epochs, metrics[-1]["loss"], metrics[-1]))
        return metrics

    def _diverged(self, epoch, step, what):
        done = (f"{self.checkpoint_path} holds the last completed epoch" if epoch > 0 else
                "nothing was written")
        return Diverged(f"training diverged at epoch {epoch + 1}, step {step + 1}: {what} is "
                        f"not finite; {done}; lower --lr, enable --clip-norm, or rescale the "
                        f"data (inputs of order 1)")


def plan(cfg, tcfg, data, out_dir, resume=False, sdn_weights=None, overwrite=False):
    """Validate a training run and load what it starts from; writes nothing.

    ``resume=True`` continues from ``out_dir/checkpoint.h5``: the stored model and training
    configs (``epochs`` included: the learning-rate schedule depends on the total) and the
    stored data recipe must equal the given ones, so the resumed run is the interrupted run,
    bit-exactly. Without ``resume``, an existing checkpoint in
    ``out_dir`` is an error unless ``overwrite``. Returns a :class:`TrainingRun`.
    """
    ckpt = os.path.join(out_dir, "checkpoint.h5")
    data = {**data, "x_train": M.model_inputs(cfg, data["x_train"]),
            "x_test": M.model_inputs(cfg, data["x_test"])}  # float32 variant: rounded once
    M.check_inputs(cfg, data["x_train"], data["y_train"])
    M.check_inputs(cfg, data["x_test"], data["y_test"])
    if not resume and os.path.exists(ckpt) and not overwrite:
        raise FileExistsError(f"{ckpt} exists; pass --resume to continue it or --overwrite to "
                              "start again")
    if resume:
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
        recipe = data.get("recipe")
        if (c.data_recipe is None) != (recipe is None):  # both None: data dicts made by hand
            raise ValueError(f"--resume: {ckpt} or the data given does not record how the data "
                             f"was made, so it cannot be checked; start again with --overwrite")
        if c.data_recipe != recipe:
            raise ValueError(f"--resume: {ckpt} was trained on other data "
                             f"({_describe(c.data_recipe)}, not {_describe(recipe)}); rerun "
                             f"with the same data options")
        return TrainingRun(cfg, tcfg, data, out_dir, c.params, c.buffers, c.opt, c.epoch,
                           c.metrics)
    params, buffers = M.init_model(cfg, tcfg.seed, sdn_weights=sdn_weights)
    return TrainingRun(cfg, tcfg, data, out_dir, params, buffers, adamw_init(params), 0, [])


def _describe(recipe):
    """A data recipe as the CLI options that rebuild it."""
    if "task" in recipe:
        return (f"--task {recipe['task']} --samples {recipe['samples']} --length "
                f"{recipe['length']} --seed {recipe['seed']}")
    tok = f" --tokens {recipe['tokens']}" if recipe.get("tokens") else ""
    return f"--data {recipe['data']}{tok} (SHA-256 {recipe['sha256'][:12]}...)"


def train(cfg, tcfg, data, out_dir, resume=False, sdn_weights=None, progress=None,
          overwrite=False):
    """Train ``cfg`` on ``data`` (see :mod:`refimpl.tasks`) for ``tcfg.epochs`` epochs, holding
    the folder's lock: :func:`plan` then :meth:`TrainingRun.run`. Returns the list of per-epoch
    metrics."""
    with lock_output(out_dir):
        return plan(cfg, tcfg, data, out_dir, resume, sdn_weights, overwrite).run(progress)
