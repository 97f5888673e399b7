"""CPU training of spiking SSM classifiers: the loop, evaluation, checkpoints, resume.

Determinism: every random choice derives from the seed and the position in the run
(``default_rng([seed, epoch])`` shuffles an epoch, ``default_rng([seed, epoch, step])`` draws
its dropout masks), the optimizer state is plain arrays, and HDF5 stores float64 exactly, so
a run resumed from a checkpoint is bit-identical to the uninterrupted run.

Outputs in ``out_dir``: ``checkpoint.h5`` (schema ``refimpl-checkpoint`` v1, written
atomically after every epoch), ``metrics.json`` and ``config.json`` (atomic too).
The library never prints: pass ``progress`` to receive :mod:`refimpl.progress` events
(:class:`~refimpl.progress.Step` per batch, :class:`~refimpl.progress.EpochEnd` per epoch).

:func:`plan` validates everything and reads a checkpoint to resume (once) before anything is
written; the :class:`TrainingRun` it returns knows how many updates remain, so a caller can
size a progress bar, and :meth:`TrainingRun.run` does the work. :func:`train` is both in one
call.
"""
import dataclasses
import json
import os
from typing import NamedTuple

import numpy as np

from . import model as M
from ._checks import check_int, check_real
from .atomic import atomic_write_json
from .h5io import FileFormatError, atomic_h5, open_h5, read_tree, write_tree
from .layers import cross_entropy_fwd
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


def save_checkpoint(path, cfg, tcfg, params, buffers, opt_state, epoch, metrics):
    """Atomically write a checkpoint (overwrites ``path``)."""
    attrs = {"model_config": json.dumps(dataclasses.asdict(cfg)),
             "train_config": json.dumps(dataclasses.asdict(tcfg)),
             "epoch": int(epoch), "metrics": json.dumps(metrics)}
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
    return Checkpoint(cfg, tcfg, params, buffers, opt, epoch, metrics)


def _sdn_from_buffers(buffers):
    """The SDN weights a model keeps in its buffers (``sdn.w0`` ...), or None."""
    weights = {k[len("sdn."):]: v for k, v in buffers.items() if k.startswith("sdn.")}
    return weights or None


def _batches(n, batch_size, rng):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def evaluate(cfg, params, buffers, x, y, batch_size=256):
    """Eval-mode accuracy, mean loss and per-layer firing rates over a data set."""
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
        xtr, ytr = data["x_train"], data["y_train"]
        groups = make_groups(params, tcfg.lr, tcfg.weight_decay, M.optimizer_rules(tcfg.lr))
        total = self.total_steps
        warmup = min(int(round(tcfg.warmup_frac * total)), total - 1)
        L = xtr.shape[1]
        os.makedirs(self.out_dir, exist_ok=True)
        atomic_write_json(os.path.join(self.out_dir, "config.json"),
                          {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
                           "data": data.get("name", "")})
        for epoch in range(self.start_epoch, tcfg.epochs):
            rng = np.random.default_rng([tcfg.seed, epoch])
            loss_sum = correct = 0.0
            for step, idx in enumerate(_batches(len(ytr), tcfg.batch_size, rng)):
                drop_rng = np.random.default_rng([tcfg.seed, epoch, step])
                loss, logits, grads, buffers, st = M.loss_and_grads(
                    cfg, params, buffers, xtr[idx], ytr[idx], training=True, rng=drop_rng)
                scale = cosine_schedule(int(opt["step"]), total, warmup)
                adamw_step(params, grads, opt, groups, lr_scale=scale,
                           clip_norm=tcfg.clip_norm or None)
                M.project(params, cfg)
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
            save_checkpoint(self.checkpoint_path, cfg, tcfg, params, buffers, opt, epoch + 1,
                            metrics)
            atomic_write_json(os.path.join(self.out_dir, "metrics.json"), metrics)
            self.buffers = buffers
            if progress is not None:
                progress(EpochEnd(epoch, tcfg.epochs, metrics[-1]["loss"], metrics[-1]))
        return metrics


def plan(cfg, tcfg, data, out_dir, resume=False, sdn_weights=None, overwrite=False):
    """Validate a training run and load what it starts from; writes nothing.

    ``resume=True`` continues from ``out_dir/checkpoint.h5`` (the stored configs must equal
    the given ones; only ``epochs`` may grow). Without ``resume``, an existing checkpoint in
    ``out_dir`` is an error unless ``overwrite``. Returns a :class:`TrainingRun`.
    """
    ckpt = os.path.join(out_dir, "checkpoint.h5")
    M.check_inputs(cfg, data["x_train"], data["y_train"])
    M.check_inputs(cfg, data["x_test"], data["y_test"])
    if not resume and os.path.exists(ckpt) and not overwrite:
        raise FileExistsError(f"{ckpt} exists; pass --resume to continue it or --overwrite to "
                              "start again")
    if resume:
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        c = load_checkpoint(ckpt)
        if c.cfg != cfg or dataclasses.replace(c.tcfg, epochs=tcfg.epochs) != tcfg:
            raise ValueError(f"--resume: {ckpt} was written with other settings "
                             f"({c.cfg}, {c.tcfg}); rerun with the same options")
        return TrainingRun(cfg, tcfg, data, out_dir, c.params, c.buffers, c.opt, c.epoch,
                           c.metrics)
    params, buffers = M.init_model(cfg, tcfg.seed, sdn_weights=sdn_weights)
    return TrainingRun(cfg, tcfg, data, out_dir, params, buffers, adamw_init(params), 0, [])


def train(cfg, tcfg, data, out_dir, resume=False, sdn_weights=None, progress=None,
          overwrite=False):
    """Train ``cfg`` on ``data`` (see :mod:`refimpl.tasks`) for ``tcfg.epochs`` epochs:
    :func:`plan` then :meth:`TrainingRun.run`. Returns the list of per-epoch metrics."""
    return plan(cfg, tcfg, data, out_dir, resume, sdn_weights, overwrite).run(progress)
