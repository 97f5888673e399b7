"""Training the SDN from scratch on the iterative LIF, and scoring it (DESIGN.md section 6).

Inputs ``x ~ N(mean, std^2)`` of length ``L``, targets ``m_t = tau u_{t-1}`` from the iterative
hard-reset LIF (:func:`refimpl.neurons.neuron_fwd`), Huber (or MSE) loss on ``m``, AdamW (lr
1e-2, weight decay 1e-2, :mod:`refimpl.optim`) with a cosine schedule, batches of 64 sequences,
the forward and backward of the training network by hand (:mod:`refimpl.sdn.network`).
Defaults: 1024 sequences of ``L = 1024``, 400 epochs (6400 updates). The loop is
:mod:`refimpl.loop`'s, with the classifier's guards (option checks before writing, a lock on
the training state, divergence with epoch and step, finite parameters after every update,
:class:`refimpl.progress.Step` and :class:`refimpl.progress.EpochEnd` events, an atomic
training state after every epoch, bit-identical resume); :class:`SDNTask` plugs the SDN in.
Quality measure (:func:`evaluate`): spike agreement with the iterative LIF on fresh inputs (the
published checkpoint reaches 99.97 %).
"""
import dataclasses
import json
import os

import numpy as np

from .. import loop
from .._checks import check_int, check_name, check_real
from ..h5io import FileFormatError, atomic_h5, open_h5, read_tree, write_tree
from ..neurons import NeuronConfig, neuron_fwd
from ..optim import adamw_init, check_state
from .fused import sdn_forward
from .network import INITS, fold, init_train_params, train_bwd, train_fwd
from .weights import check_buffers, check_train_params, resolve_weights, save_weights

# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _mse(d, delta=None):
    """``mean(d^2)`` and its derivative with respect to ``d`` (``delta`` is unused)."""
    return float(np.mean(d * d)), (2.0 / d.size) * d


def _huber(d, delta=1.0):
    """``mean(0.5 d^2 if |d| <= delta else delta (|d| - delta / 2))`` (torch HuberLoss)."""
    ad = np.abs(d)
    quad = ad <= delta
    value = np.where(quad, 0.5 * d * d, delta * (ad - 0.5 * delta))
    grad = np.where(quad, d, delta * np.sign(d)) / d.size
    return float(value.mean()), grad


LOSSES = {"mse": _mse, "huber": _huber}


def loss_fwd_bwd(m, target, loss="huber", delta=1.0):
    """Loss (mean over all elements) of prediction ``m`` against ``target`` and ``dloss/dm``.

    ``delta`` is the Huber threshold (ignored by ``mse``).
    """
    fn = check_name("loss", loss, LOSSES)
    return fn(m - target, delta)


# --------------------------------------------------------------------------------------------
# Data, training, evaluation
# --------------------------------------------------------------------------------------------

#: Independent random streams under one user seed: ``default_rng([stream, seed])``.
_STREAM_DATA, _STREAM_INIT, _STREAM_SHUFFLE, _STREAM_EVAL = 0, 1, 2, 3


def _rng(seed, stream):
    seed = check_int("seed", seed, 0)
    return np.random.default_rng([stream, seed])


def lif_decayed_potential(x, tau, theta=1.0, spike_condition="ge"):
    """The iterative hard-reset LIF on rows ``x (R, L)``: ``m = tau u_{t-1}`` and spikes.

    Uses :func:`refimpl.neurons.neuron_fwd` (reset ``hard``, ``u_reset = 0``). Returns
    ``m (R, L)`` and ``s (R, L)``; ``m[:, 0] = 0``.
    """
    cfg = NeuronConfig(reset="hard", tau=tau, theta=theta, spike_condition=spike_condition)
    s, _, u = neuron_fwd(x[None], cfg)  # (1, R, L) each
    m = np.zeros_like(x)  # (R, L)
    m[:, 1:] = tau * u[0, :, :-1]
    return m, s[0]


def make_dataset(samples, length, tau, theta=1.0, mean=0.0, std=1.0, seed=0,
                 spike_condition="ge", stream=_STREAM_DATA):
    """Training or test data: Gaussian inputs and the iterative LIF's decayed potential.

    Parameters
    ----------
    samples : int, >= 1
        Number of sequences.
    length : int, >= 1
        ``L``.
    tau : float in [0, 1)
    theta : float > 0, default 1.0
    mean, std : float, default 0, 1
        ``x ~ N(mean, std^2)``, ``std >= 0``.
    seed : int >= 0

    Returns
    -------
    x, m, s : float64 (samples, length)
        Inputs, targets ``m_t = tau u_{t-1}`` and the LIF's spikes.
    """
    samples = check_int("samples", samples, 1)
    length = check_int("length", length, 1)
    tau = check_real("tau", tau, 0.0, 1.0, hi_open=True)
    theta = check_real("theta", theta, 0.0, lo_open=True)
    mean = check_real("mean", mean)
    std = check_real("std", std, 0.0)
    x = mean + std * _rng(seed, stream).standard_normal((samples, length))  # (S, L)
    m, s = lif_decayed_potential(x, tau, theta, spike_condition)  # (S, L) each
    return x, m, s


@dataclasses.dataclass(frozen=True)
class SDNTrainConfig:
    """Settings of :func:`train_sdn` (defaults: the ``refimpl sdn train`` defaults); validated
    on construction, like every config class of refimpl.

    ``tau, theta, mean, std, length, samples``: the LIF and the training data;
    ``epochs, batch_size, lr, weight_decay, warmup_steps, min_lr_factor, loss, huber_delta,
    bn_momentum``: the optimisation (AdamW on every parameter, cosine schedule stepped per
    batch; Huber with ``delta = 1`` is half the MSE for errors below 1, which all errors
    here are); ``init``: see :func:`init_train_params`; ``eval_samples``: fresh sequences
    for the final spike agreement; ``seed``: data, initialisation, shuffling and evaluation
    use independent streams of it.
    """

    tau: float = 0.125
    theta: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    length: int = 1024
    samples: int = 1024
    epochs: int = 400
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    loss: str = "huber"
    huber_delta: float = 1.0
    init: str = "lif"
    bn_momentum: float = 0.1
    eval_samples: int = 200
    seed: int = 0

    def __post_init__(self):
        check_real("tau", self.tau, 0.0, 1.0, hi_open=True)
        check_real("theta", self.theta, 0.0, lo_open=True)
        check_real("mean", self.mean)
        check_real("std", self.std, 0.0)
        for name in ("length", "samples", "epochs", "batch_size", "eval_samples"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        check_real("lr", self.lr, 0.0, lo_open=True)
        check_real("weight_decay", self.weight_decay, 0.0)
        check_real("min_lr_factor", self.min_lr_factor, 0.0, 1.0)
        check_real("bn_momentum", self.bn_momentum, 0.0, 1.0)
        check_name("loss", self.loss, LOSSES)
        check_real("huber_delta", self.huber_delta, 0.0, lo_open=True)
        check_name("init", self.init, INITS)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps must be < the number of updates "
                             f"({self.total_steps}), got {self.warmup_steps}")

    @property
    def steps_per_epoch(self):
        return -(-self.samples // self.batch_size)

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    def as_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SDNTrainResult:
    """What :func:`train_sdn` returns."""

    weights: dict  # fused w0 .. w5
    params: dict  # the 193 training parameters
    buffers: dict  # BatchNorm running statistics
    config: SDNTrainConfig
    history: dict  # per-epoch arrays: "loss" (mean training loss)
    metrics: dict  # evaluate() on fresh inputs
    seconds: float  # wall time of the training loop (evaluation excluded)

    def save(self, path, overwrite=False):
        """Write everything to an HDF5 weights file (:func:`save_weights`)."""
        save_weights(path, self.weights, self.params, self.buffers,
                     train_config=dict(self.config.as_dict(), train_seconds=self.seconds),
                     metrics=self.metrics, history=self.history, overwrite=overwrite)


#: Schema of the training-state file (``OUT.partial.h5``): deliberately not ``refimpl-sdn``,
#: so that :func:`refimpl.sdn.load_weights` (and ``refimpl sdn eval``) refuse it.
STATE_SCHEMA = "refimpl-sdn-partial"
STATE_VERSION = 1


def partial_path(out):
    """The training-state file of a run writing ``out``: ``OUT.partial.h5`` beside it."""
    return os.fspath(out) + ".partial.h5"


def save_train_state(path, cfg, params, buffers, opt_state, shuffle, epoch_loss, epochs_done,
                     seconds):
    """Atomically write everything :func:`train_sdn` needs to continue after ``epochs_done``
    epochs (overwrites ``path``): parameters, BatchNorm buffers, AdamW state, the shuffle
    generator's state, the loss history and the configuration (JSON, compared on resume)."""
    attrs = {"train_config": json.dumps(cfg.as_dict()), "epochs_done": int(epochs_done),
             "shuffle_state": json.dumps(shuffle.bit_generator.state),
             "train_seconds": float(seconds)}
    with atomic_h5(path, STATE_SCHEMA, STATE_VERSION, overwrite=True, attrs=attrs) as f:
        write_tree(f.create_group("params"), params)
        write_tree(f.create_group("buffers"), buffers)
        write_tree(f.create_group("optimizer"), opt_state)
        f.create_dataset("loss", data=np.asarray(epoch_loss[:epochs_done], dtype=np.float64))


def load_train_state(path, cfg):
    """Read a state written by :func:`save_train_state` for a run of ``cfg``.

    Returns ``(params, buffers, opt_state, shuffle, epoch_loss, epochs_done, seconds)``.
    Raises FileFormatError for a bad file and ValueError (one line) when the file was
    written with other settings than ``cfg``.
    """
    path = os.fspath(path)
    f = open_h5(path, STATE_SCHEMA, (STATE_VERSION,))
    try:
        with f:
            stored = json.loads(f.attrs["train_config"])
            done = int(f.attrs["epochs_done"])
            rng_state = json.loads(f.attrs["shuffle_state"])
            seconds = float(f.attrs["train_seconds"])
            params = read_tree(f["params"])
            buffers = read_tree(f["buffers"])
            opt = read_tree(f["optimizer"])
            loss = np.asarray(f["loss"][()], dtype=np.float64)
    except Exception as e:  # missing groups/attrs, bad JSON
        raise FileFormatError(f"{path}: incompatible or corrupted SDN training state "
                              f"({type(e).__name__}: {e})") from None
    want = cfg.as_dict()
    diff = [k for k in want if stored.get(k) != want[k]] + sorted(set(stored) - set(want))
    if diff:
        k = diff[0]
        raise ValueError(f"--resume: {path} was written with other settings ({k} = "
                         f"{stored.get(k)!r} there, {want.get(k)!r} now); rerun with the same "
                         f"options, or pass --overwrite instead of --resume to start again")
    try:
        params = check_train_params(params)
        buffers = check_buffers(buffers)
        opt["step"] = np.asarray(opt["step"], dtype=np.int64)
        check_state(opt, params)
        shuffle = np.random.default_rng()
        shuffle.bit_generator.state = rng_state
        if not 0 <= done <= cfg.epochs or loss.shape != (done,):
            raise ValueError(f"{done} epochs done, {loss.shape} losses")
    except (ValueError, TypeError, KeyError) as e:
        raise FileFormatError(f"{path}: inconsistent SDN training state ({e})") from None
    return params, buffers, opt, shuffle, loss, done, seconds


class SDNTask(loop.Task):
    """The SDN's training for :mod:`refimpl.loop` (see :func:`train_sdn`): a shuffle of the
    training sequences per epoch from a generator whose state the training state keeps, the
    training network's forward and backward with the loss on ``m``, the epoch's mean loss as
    its record, and the training state file ``state_path`` (None: nothing is written) locked
    by ``.<its name>.lock`` beside it."""

    def __init__(self, cfg, state_path=None, resume=False, overwrite=False):
        if resume and state_path is None:
            raise ValueError("resume=True needs state_path")
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.epochs, self.steps_per_epoch = cfg.epochs, cfg.steps_per_epoch
        self.adamw = loop.AdamW(cfg.lr, cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                min_lr_factor=cfg.min_lr_factor)
        if state_path is not None:
            self.checkpoint_path = os.fspath(state_path)
            self.out_dir = os.path.dirname(os.path.abspath(self.checkpoint_path))
            self.lock_name = f".{os.path.basename(self.checkpoint_path)}.lock"
        self.x, self.target, _ = make_dataset(cfg.samples, cfg.length, cfg.tau, cfg.theta,
                                              cfg.mean, cfg.std, cfg.seed)  # (S, L) each

    def check(self):
        path = self.checkpoint_path
        if self.resume:
            self.initial_state()  # raises unless the state file is this run's
        elif path is not None and os.path.exists(path) and not self.overwrite:
            raise FileExistsError(f"{path} holds an interrupted run; pass resume=True "
                                  f"(--resume) to continue it or overwrite=True (--overwrite) "
                                  f"to start again")

    def initial_state(self):
        cfg = self.cfg
        if self.resume:
            if not os.path.exists(self.checkpoint_path):
                raise FileNotFoundError(f"--resume: no training state at {self.checkpoint_path}")
            params, buffers, opt, shuffle, loss, done, seconds = load_train_state(
                self.checkpoint_path, cfg)
            return loop.State(params, buffers, opt, done, [{"loss": float(v)} for v in loss],
                              shuffle, seconds)
        params, buffers = init_train_params(_rng(cfg.seed, _STREAM_INIT), cfg.init, cfg.tau)
        return loop.State(params, buffers, adamw_init(params),
                          rng=_rng(cfg.seed, _STREAM_SHUFFLE))

    def batches(self, state, epoch):
        b = self.cfg.batch_size
        order = state.rng.permutation(self.cfg.samples)  # (S,)
        return [order[i * b:(i + 1) * b] for i in range(self.steps_per_epoch)]

    def forward_backward(self, state, epoch, step, idx):
        cfg = self.cfg
        m, cache, state.buffers = train_fwd(self.x[idx], state.params, state.buffers, True,
                                            cfg.bn_momentum)  # (b, L)
        loss, dm = loss_fwd_bwd(m, self.target[idx], cfg.loss, cfg.huber_delta)
        _, grads = train_bwd(cache, dm)
        return loop.Outcome(loss, grads)

    def end_epoch(self, state, epoch, outcomes, seconds):
        return {"loss": float(np.mean([o.loss for o in outcomes]))}

    def save(self, state):
        if self.checkpoint_path is not None:
            save_train_state(self.checkpoint_path, self.cfg, state.params, state.buffers,
                             state.opt, state.rng, _losses(state), state.epoch, state.seconds)


def _losses(state):
    """The per-epoch mean training losses of ``state`` ``(epochs done,)``."""
    return np.array([r["loss"] for r in state.metrics], dtype=np.float64)


def train_sdn(cfg=None, progress=None, state_path=None, resume=False, overwrite=False,
              **overrides):
    """Train the SDN from scratch on the iterative LIF, then fold and evaluate it.

    Parameters
    ----------
    cfg : SDNTrainConfig or None
        Settings; ``overrides`` replace single fields (``train_sdn(epochs=5)``).
    progress : callable or None
        Called with a :class:`refimpl.progress.Step` after every update and a
        :class:`refimpl.progress.EpochEnd` (the epoch's mean loss; metrics ``{"loss": it}``)
        after every epoch. The library draws nothing.
    state_path : path or None
        When given, the whole training state is written there atomically after every epoch
        (:func:`save_train_state`; ``refimpl sdn train`` uses ``OUT.partial.h5``), and the run
        holds the lock ``.<name>.lock`` beside it (:func:`refimpl.loop.lock_output`): a second
        run on the same state file is refused. The file is left in place; the caller removes it
        once the final weights are written.
    resume : bool, default False
        Continue from ``state_path`` (which must have been written with the same ``cfg``,
        else ValueError). The result is bit-identical to an uninterrupted run: parameters,
        buffers, AdamW moments and the shuffle generator's state are restored exactly.
    overwrite : bool, default False
        Start again even if ``state_path`` exists (else FileExistsError, before anything is
        written).

    Returns
    -------
    SDNTrainResult

    Notes
    -----
    The recipe of DESIGN.md section 6: training data ``x ~ N(mean, std^2)`` of length ``L``
    with targets ``m_t = tau u_{t-1}`` from the iterative hard-reset LIF; AdamW (lr 1e-2,
    weight decay 1e-2 on every parameter, as ``torch.optim.AdamW(model.parameters())``) with a
    cosine schedule stepped per batch; batches of 64 sequences reshuffled every epoch;
    training-mode BatchNorm with running statistics. The result is folded with the running
    statistics and scored by :func:`evaluate` on ``eval_samples`` fresh sequences. A forward
    pass that fails on a non-finite value, or a non-finite loss, gradient or parameter, stops
    the run with :class:`refimpl.loop.Diverged` naming the epoch and the step.
    """
    cfg = dataclasses.replace(cfg or SDNTrainConfig(), **overrides)
    state = loop.train(SDNTask(cfg, state_path, resume, overwrite), progress)
    weights = fold(state.params, state.buffers)
    metrics = evaluate(weights, tau=cfg.tau, theta=cfg.theta, mean=cfg.mean, std=cfg.std,
                       length=cfg.length, samples=cfg.eval_samples, seed=cfg.seed)
    return SDNTrainResult(weights, state.params, state.buffers, cfg, {"loss": _losses(state)},
                          metrics, state.seconds)


def evaluate(weights, tau=0.125, theta=1.0, mean=0.0, std=1.0, length=1024, samples=200,
             seed=0, spike_condition="ge"):
    """Score an SDN against the iterative hard-reset LIF on fresh inputs.

    Parameters
    ----------
    weights : dict or path
        Fused weights or a weights file.
    tau, theta, mean, std, length, samples, seed, spike_condition
        The LIF and the inputs ``x ~ N(mean, std^2)`` of shape ``(samples, length)``, drawn
        from a stream of ``seed`` that training never uses.

    Returns
    -------
    dict
        ``agreement`` (fraction of steps where SDN and LIF spikes agree), ``mismatches``
        (count), ``steps`` (``samples * length``), ``membrane_mse`` (mean squared error of the
        predicted ``m`` against ``tau u_{t-1}``), ``rate_lif`` and ``rate_sdn`` (firing rates).
    """
    W = resolve_weights(weights)
    x, m_lif, s_lif = make_dataset(samples, length, tau, theta, mean, std, seed,
                                   spike_condition, stream=_STREAM_EVAL)  # (S, L) each
    m_sdn, s_sdn = sdn_forward(x, W, theta=theta, spike_condition=spike_condition)
    mismatches = int(np.count_nonzero(s_sdn != s_lif))
    return {
        "agreement": 1.0 - mismatches / x.size,
        "mismatches": mismatches,
        "steps": int(x.size),
        "membrane_mse": float(np.mean((m_sdn - m_lif) ** 2)),
        "rate_lif": float(s_lif.mean()),
        "rate_sdn": float(s_sdn.mean()),
    }
