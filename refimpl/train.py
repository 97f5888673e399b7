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

Checkpoint integrity (issue 23). Every reader (``refimpl evaluate``, ``generate``,
``raster``, :meth:`refimpl.stream.ModelStream.from_checkpoint`, ``--resume``) goes through
:func:`load_checkpoint`, which refuses with one :class:`~refimpl.h5io.FileFormatError` line,
before any value is used:

- a parameter, buffer or AdamW moment that is not float64 (the master weights; nothing is
  cast), naming it and its dtype; one that holds a NaN or an infinity, naming it, the value
  and the first bad index; an optimizer state without a moment of each parameter's shape or
  without an integer ``step >= 0``;
- a file whose contents do not match its digest ("parameters do not match their digest
  (damaged or edited)"), naming the first entry that differs, where its table tells;
- parameters that are not those of the stored model config.

The digest (root attribute ``digest``, ``"sha256:<hex>"``) is the SHA-256 of the lines
``"<entry> <sha256>\\n"`` sorted by entry name, one per part of the checkpoint that a reader
uses: every array of ``params/``, ``buffers/`` and ``optimizer/`` (``exp_avg/<name>``,
``exp_avg_sq/<name>``, ``step``), hashed over ``"<dtype.str>|<shape>|"`` and its bytes in C
order, and the root attributes ``model_config``, ``train_config``, ``metrics``,
``data_recipe`` and ``epoch``, hashed over their canonical JSON (sorted keys, no spaces) as
decoded. It does not cover the provenance attributes (versions, time of writing) or the
storage layout (compression), which readers never use. The root attribute
``digest_entries`` holds the first 16 hex digits of each entry's SHA-256, only to name the
entry that differs. The digest detects damage and edits by hand, not forgery: whoever can
write the file can recompute it. :func:`save_checkpoint` refuses, before writing, what a
reader would refuse. A checkpoint written before digests (no ``digest`` attribute) still
loads, with every other check (its ``Checkpoint.digest`` is None); the next epoch of a
resumed run writes the digest.

Resume of a run (finished or not) first rewrites ``metrics.json`` and ``config.json`` from the
checked checkpoint, atomically and under the lock, when either is missing, truncated or says
something else (:meth:`ModelTask.restore_outputs`): the checkpoint holds the metrics, and
``config.json`` is the configs and data recipe that resume has just checked against it.
"""
import dataclasses
import hashlib
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
    """Atomically write a checkpoint (overwrites ``path``) with its digest (module docstring,
    *Checkpoint integrity*); ``data_recipe`` records how the training data was made (see
    :mod:`refimpl.tasks`). Refuses, with a ValueError naming the array and before anything is
    written, what :func:`load_checkpoint` would refuse: an array that is not float64 or not
    finite, an optimizer state that does not match the parameters."""
    problem = _arrays_problem(params, buffers, opt_state)
    if problem is not None:
        raise ValueError(f"refusing to write checkpoint {path}: {problem}")
    attrs = {"model_config": json.dumps(dataclasses.asdict(cfg)),
             "train_config": json.dumps(dataclasses.asdict(tcfg)),
             "epoch": int(epoch), "metrics": json.dumps(metrics),
             "data_recipe": json.dumps(data_recipe)}
    recorded = {k: (v if k == "epoch" else json.loads(v)) for k, v in attrs.items()}  # as read
    entries = _digest_entries(params, buffers, opt_state, recorded)
    attrs[DIGEST_ATTR] = _digest(entries)
    attrs[DIGEST_TABLE_ATTR] = json.dumps({k: v[:_TABLE_HEX] for k, v in sorted(entries.items())})
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
    digest: str = None  # "sha256:<hex>" (module docstring); None: written before digests


def load_checkpoint(path):
    """Read a checkpoint into a :class:`Checkpoint` after checking it (module docstring,
    *Checkpoint integrity*): every parameter, buffer and optimizer moment float64 and finite,
    the optimizer state shaped like the parameters, the digest (when the file has one), the
    parameters those of the stored model config. Raises :class:`FileFormatError` (one line,
    naming the file and the first wrong array: its dtype, or its first non-finite value and
    index, or the first entry that differs from the digest) on a bad file."""
    f = open_h5(path, CHECKPOINT_SCHEMA, (CHECKPOINT_VERSION,))
    try:
        with f:
            recorded = {k: json.loads(f.attrs[k]) for k in ("model_config", "train_config",
                                                            "metrics")}
            if "data_recipe" in f.attrs:
                recorded["data_recipe"] = json.loads(f.attrs["data_recipe"])
            recorded["epoch"] = int(f.attrs["epoch"])
            cfg = M.ModelConfig(**recorded["model_config"])
            tcfg = TrainConfig(**recorded["train_config"])
            digest = f.attrs.get(DIGEST_ATTR)
            table = f.attrs.get(DIGEST_TABLE_ATTR)
            params = read_tree(f["params"])
            buffers = read_tree(f["buffers"]) if "buffers" in f else {}
            opt = read_tree(f["optimizer"])
    except FileFormatError:
        raise
    except Exception as e:  # missing groups/attrs, bad JSON, invalid config
        raise FileFormatError(f"{path}: incompatible or corrupted checkpoint "
                              f"({type(e).__name__}: {e})") from None
    problem = _arrays_problem(params, buffers, opt)
    if problem is not None:
        raise FileFormatError(f"checkpoint {path}: {problem}; the file is damaged or was not "
                              f"written by refimpl: restore it from a copy or train again")
    if digest is not None or table is not None:  # a table without its digest: deleted
        entries = _digest_entries(params, buffers, opt, recorded)
        if not isinstance(digest, str) or digest != _digest(entries):
            raise FileFormatError(f"checkpoint {path}: parameters do not match their digest "
                                  f"(damaged or edited): {_first_difference(entries, table)}; "
                                  f"restore it from a copy or train again")
    opt["step"] = np.asarray(opt["step"], dtype=np.int64)
    expected, _ = M.init_model(cfg, 0, sdn_weights=_sdn_from_buffers(buffers))
    bad = [k for k in expected if k not in params or params[k].shape != expected[k].shape]
    if bad or set(params) != set(expected):
        first = (bad or sorted(set(params) ^ set(expected)))[0]
        raise FileFormatError(f"{path}: parameters do not match the stored model config "
                              f"(first mismatch: {first})")
    extra = sorted({f"{m}/{k}" for m in ("exp_avg", "exp_avg_sq") for k in opt[m]
                    if k not in params})
    if extra:
        raise FileFormatError(f"{path}: optimizer state {extra[0]} belongs to no parameter")
    return Checkpoint(cfg, tcfg, params, buffers, opt, recorded["epoch"], recorded["metrics"],
                      recorded.get("data_recipe"), digest)


#: The root attributes of a checkpoint: its digest ("sha256:<hex>") and the table that locates
#: a difference (entry name -> the first ``_TABLE_HEX`` hex digits of the entry's SHA-256).
DIGEST_ATTR, DIGEST_TABLE_ATTR = "digest", "digest_entries"
_TABLE_HEX = 16
#: A digest entry's group -> how messages name an array of it.
_KINDS = {"params": "parameter", "buffers": "buffer", "optimizer": "optimizer state"}


def _float_arrays(params, buffers, opt):
    """``(entry name, array)`` of every float array of a checkpoint: parameters, buffers and
    the optimizer's moments (``optimizer/exp_avg/<name>``), in the order they are checked."""
    for group, tree in (("params", params), ("buffers", buffers)):
        for k in sorted(tree):
            yield f"{group}/{k}", tree[k]
    for moment in ("exp_avg", "exp_avg_sq"):
        for k in sorted(opt[moment]):
            yield f"optimizer/{moment}/{k}", opt[moment][k]


def _label(entry):
    """An entry name as messages say it: ``parameter decoder.W``, ``attribute metrics``."""
    group, _, name = entry.partition("/")
    return f"{_KINDS[group]} {name}" if group in _KINDS else f"attribute {entry}"


def _arrays_problem(params, buffers, opt):
    """What is wrong with a checkpoint's arrays, as one phrase naming the first wrong one, or
    None: the optimizer state must have ``step`` (an integer >= 0) and a moment of each
    parameter's shape; every parameter, buffer and moment must be float64 (the master weights;
    never cast) and finite (the first non-finite value and its index are named). Missing or
    extra parameters are left to the digest and the model config (:func:`load_checkpoint`)."""
    for moment in ("exp_avg", "exp_avg_sq"):
        tree = opt.get(moment)
        if not isinstance(tree, dict):
            return f"the optimizer state has no {moment}"
        for k in sorted(params):  # a moment without its parameter: load_checkpoint
            if k not in tree:
                return f"the optimizer state {moment} has no moment of parameter {k}"
            if np.shape(tree[k]) != np.shape(params[k]):
                return (f"optimizer state {moment}/{k} has shape {np.shape(tree[k])}, its "
                        f"parameter {np.shape(params[k])}")
    step = np.asarray(opt.get("step", -1))
    if step.shape != () or step.dtype.kind not in "iu" or step < 0:
        return f"optimizer state step must be an integer >= 0, got {_short(opt.get('step'))}"
    for entry, a in _float_arrays(params, buffers, opt):
        a = np.asarray(a)
        if a.dtype != np.float64:
            return (f"{_label(entry)} has dtype {a.dtype}, expected float64 (refimpl stores "
                    f"float64 master weights and never casts them)")
        finite = np.isfinite(a)
        if not finite.all():
            index = tuple(int(i) for i in np.unravel_index(np.argmin(finite), a.shape))
            return f"{_label(entry)} is not finite: {a[index]} at index {list(index)}"
    return None


def _short(v):
    r = " ".join(repr(v).split())
    return r if len(r) <= 40 else r[:37] + "..."


def _canonical_json(value):
    """The canonical JSON text of a value (sorted keys, no spaces; NaN as ``NaN``)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest_entries(params, buffers, opt, recorded):
    """Entry name -> SHA-256 (hex) of every part a digest covers (module docstring): an array
    ``<group>/<name>`` over ``"<dtype.str>|<shape>|"`` and its bytes in C order, an attribute
    over its canonical JSON (as decoded from the file)."""
    entries = {}
    arrays = [*_float_arrays(params, buffers, opt), ("optimizer/step", opt["step"])]
    for entry, a in arrays:
        a = np.ascontiguousarray(a)
        h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
        entries[entry] = h.hexdigest()
    for k, v in recorded.items():
        entries[k] = hashlib.sha256(_canonical_json(v).encode()).hexdigest()
    return entries


def _digest(entries):
    """A checkpoint's digest: ``"sha256:"`` and the SHA-256 of the lines ``"<entry> <its
    SHA-256>\\n"`` sorted by entry name."""
    lines = "".join(f"{k} {entries[k]}\n" for k in sorted(entries))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def _first_difference(entries, table):
    """Which entry differs from the digest's table, as a phrase (the table locates; the
    digest decides)."""
    try:
        stored = json.loads(table)
    except (TypeError, ValueError):  # absent (None) or damaged
        stored = None
    if not isinstance(stored, dict):
        return "which entry cannot be told (its table of entries is missing or damaged)"
    for entry in sorted(set(entries) | set(stored)):
        if entry not in stored:
            return f"{_label(entry)} is not in the digest (added)"
        if entry not in entries:
            return f"{_label(entry)} is missing"
        if entries[entry][:_TABLE_HEX] != stored[entry]:
            return f"{_label(entry)} differs"
    return "every entry matches its table, so the digest itself was changed or deleted"


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
        self.restored = []  # the files restore_outputs rewrote
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
        """:meth:`start_state`, then (resuming) :meth:`restore_outputs`: the loop calls it
        under the folder's lock."""
        state = self.start_state()
        self.restore_outputs(state)
        return state

    def start_state(self):
        """The state to start from: fresh, or the checked checkpoint to resume (reads only)."""
        if self.resume:
            c = self._checkpoint()
            return loop.State(c.params, c.buffers, c.opt, c.epoch, c.metrics)
        params, buffers = M.init_model(self.cfg, self.tcfg.seed, sdn_weights=self.sdn_weights)
        return loop.State(params, buffers, adamw_init(params))

    def restore_outputs(self, state):
        """Resuming: rewrite ``metrics.json`` and ``config.json`` from the checkpoint's state
        (atomically) when either is missing, unreadable (truncated) or says something else
        (a kill between the checkpoint's rename and theirs); otherwise leave them. Needed for a
        finished run, where no epoch runs to rewrite them. The caller holds the folder's lock.
        Records the names rewritten in ``self.restored``."""
        self.restored = []
        if not self.resume:
            return
        for name, obj in (("metrics.json", state.metrics), ("config.json", self.config)):
            path = os.path.join(self.out_dir, name)
            if not _json_file_holds(path, obj):
                atomic_write_json(path, obj)
                self.restored.append(name)

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
        (atomically, after every epoch; resuming, first restores the last two from the
        checkpoint where damaged: :meth:`ModelTask.restore_outputs`). Returns the list of
        per-epoch metrics (earlier epochs of a resumed run included)."""
        self.task.restore_outputs(self.state)
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
    return TrainingRun(task, task.start_state())


def _json_file_holds(path, obj):
    """Whether the JSON file ``path`` exists, parses and holds ``obj``."""
    try:
        with open(path, encoding="utf-8") as f:
            held = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, truncated, not UTF-8
        return False
    return _canonical_json(held) == _canonical_json(obj)


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
