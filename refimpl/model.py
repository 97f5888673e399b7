"""Spiking SSM blocks and classifiers with a hand-written whole-model backward (DESIGN.md 7-8).

Block (one layer), input ``x (B, H, L)``::

    z = norm(x) if prenorm else x
    y = s4d(z)                               S4D kernel + FFT convolution + D skip
    y = y / exp(ln_vth)                      learnable threshold (spiking families that use it)
    s = activation(y)                        per the family (refimpl.activations)
    s = dropout(s)                           one mask per (batch, channel), shared over time
    z = GLU(s)  or  GSU(y)
    x = x + dropout(z);  x = norm(x) if postnorm

Model: encoder ``Linear(d_input -> H)`` (or a token embedding), ``n_layers`` blocks, mean over
time, ``Linear(H -> n_classes)``, cross-entropy.

Language model (``head="lm"``, DESIGN.md section 11): tokens ``x (B, L)``, the embedding, causal
blocks, a per-token decoder ``logits[b, t] = W h[b, :, t] + c`` (``W (V, H)``, or the embedding
``E`` itself with ``tie_embedding``), and the next-token cross-entropy
``mean_{b, t < L-1} CE(logits[b, t], x[b, t+1])`` (:func:`loss_and_grads` with ``labels=None``).

Parameters are one flat dict ``name -> float64 array`` with dotted names
(``encoder.W``, ``layers.0.ssm.log_dt``, ``layers.0.mix.W``, ``decoder.b``, ...); non-trained
state (BatchNorm running statistics, the SDN's fixed weights) lives in a second flat dict,
``buffers``. Both are what a checkpoint stores.

The activation families (``gelu``, ``binary``, ``binary_gsu``, ``lif``, ``sdn``,
``refractory``) are entries of :data:`refimpl.activations.ACTIVATIONS`; their settings and
**[choice]** table are in :mod:`refimpl.activations`. The block asks its family for the
forward, backward, firing rate, diagnostics and frozen constants, and never branches on it.

**float32 variant** (``ModelConfig(dtype="float32")``, ``refimpl train --dtype float32``): a
named speed option, never a reference. Parameters and buffers stay float64 master copies (what
the optimizer updates and the checkpoint stores); :func:`model_fwd` and :func:`model_bwd`
compute with a float32 copy of them (:func:`compute_copy`, round to nearest) under
``refimpl.precision.using("float32")``, take float32 inputs, return float32 logits and
float64 gradients (the float32 values, up-cast exactly) and buffers (BatchNorm statistics
updated in float32, up-cast). The S4D kernel is generated in float64 and rounded once
(:mod:`refimpl.s4d`); PMBC is float64 only, so ``neuron_impl="pmbc"`` runs the iterative
neuron (the form PMBC equals) in float32. Golden files and equivalence checks refuse float32
models; a float32-trained model streams in float64 from its float64 master weights
(:meth:`refimpl.stream.ModelStream.from_model`).
"""
import dataclasses
from collections.abc import Mapping
from typing import NamedTuple, Optional

import numpy as np

from . import threads
from . import layers as Ly
from . import ops as _ops
from . import precision
from ._checks import check_array, check_int, check_name, check_real, intermediates
from .activations import ACTIVATIONS
from .neurons import NeuronConfig, threshold_scale_bwd, threshold_scale_fwd
from .s4d import LAYER_OP, LAYER_PARAMS, S4DConfig, S4DState, s4d_layer_step
from .ssm import DISCRETIZATIONS, INITS, check_dt_range, s4d_init


NORMS = ("layer", "batch")
NEURON_IMPLS = ("pmbc", "iterative")
HEADS = ("classifier", "lm")
ENERGY_PJ = {"MAC": 4.6, "AC": 0.9}  # 45 nm figures (SpikingSSM paper)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a spiking SSM classifier (validated on construction)."""
    n_classes: int
    d_input: int = 1
    vocab: int = 0
    d_model: int = 32
    d_state: int = 16
    n_layers: int = 2
    activation: str = "lif"
    norm: str = "layer"
    prenorm: bool = False
    bidirectional: bool = False
    disc: str = "zoh"
    init: str = "lin"
    dropout: float = 0.0
    grad_mode: str = "bptt"
    surrogate: str = ""  # "" = the family's default
    neuron_impl: str = "pmbc"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: str = "float64"  # "float32": the named float32 training variant (module docstring)
    head: str = "classifier"  # "lm": next-token prediction at every position (module docstring)
    tie_embedding: bool = False  # lm only: the decoder's W is the embedding E

    def __post_init__(self):
        check_int("n_classes", self.n_classes, 2)
        check_int("d_input", self.d_input, 1)
        check_int("vocab", self.vocab, 0)
        check_int("d_model", self.d_model, 1)
        check_int("d_state", self.d_state, 2)
        check_int("n_layers", self.n_layers, 1)
        # the family and its NeuronConfig are resolved (and validated) once, here: blocks,
        # streams and golden suites read cfg.family and cfg.neuron_config()
        object.__setattr__(self, "_family", check_name("activation", self.activation,
                                                       ACTIVATIONS))
        check_name("norm", self.norm, {k: k for k in NORMS})
        check_name("disc", self.disc, DISCRETIZATIONS)
        check_name("init", self.init, INITS)
        check_name("neuron_impl", self.neuron_impl, {k: k for k in NEURON_IMPLS})
        precision.check_precision(self.dtype)
        check_name("head", self.head, {k: k for k in HEADS})
        if self.head == "lm":
            if self.vocab < 2:
                raise ValueError(f"head='lm' predicts tokens: it needs vocab >= 2, got "
                                 f"vocab={self.vocab}")
            if self.n_classes != self.vocab:
                raise ValueError(f"head='lm' predicts the next token: n_classes must equal "
                                 f"vocab ({self.vocab}), got n_classes={self.n_classes}; "
                                 f"build the config with ModelConfig.for_lm")
            if self.bidirectional:
                raise ValueError("a language model must be causal: its prediction at t may "
                                 "read tokens up to t only; drop bidirectional (--causal)")
        elif self.tie_embedding:
            raise ValueError("tie_embedding applies to head='lm' only (a classifier's decoder "
                             "maps to classes, not tokens)")
        check_real("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_dt_range(self.dt_min, self.dt_max)  # s4d_init's range, refused here already
        if self.d_state % 2:
            raise ValueError("d_state must be even (d_state // 2 complex modes), "
                             f"got {self.d_state}")
        # validates grad_mode / surrogate through NeuronConfig
        object.__setattr__(self, "_neuron", self._make_neuron_config())

    @classmethod
    def for_data(cls, data, **options):
        """The config for a data set (:mod:`refimpl.tasks` layout): ``n_classes``, ``vocab`` and
        ``d_input`` (features per step: 1 for ``(N, L)`` or token inputs, ``C`` for
        ``(N, L, C)``) come from ``data``; ``options`` set the other fields."""
        x = data["x_train"]
        d_input = 1 if data["vocab"] or x.ndim == 2 else x.shape[2]
        return cls(n_classes=data["n_classes"], vocab=data["vocab"], d_input=d_input, **options)

    @classmethod
    def for_lm(cls, vocab, **options):
        """A language model's config over a vocabulary of ``vocab`` tokens (``head="lm"``,
        ``n_classes = vocab``); ``options`` set the other fields."""
        return cls(n_classes=vocab, vocab=vocab, head="lm", **options)

    @property
    def family(self):
        """The activation family, the :data:`refimpl.activations.ACTIVATIONS` entry of
        ``activation`` (resolved on construction): what the model asks instead of comparing
        names."""
        return self._family

    def neuron_config(self):
        """The NeuronConfig of this model's spiking family, or None (built on construction)."""
        return self._neuron

    def _make_neuron_config(self):
        fam = self._family
        if fam.neuron is None:
            return None
        fields = dict(fam.neuron, grad_mode=self.grad_mode)
        if self.surrogate:
            fields["surrogate"] = self.surrogate
        return NeuronConfig(**fields)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def _uniform(rng, fan_in, shape):
    bound = 1.0 / np.sqrt(fan_in)  # torch nn.Linear default
    return rng.uniform(-bound, bound, size=shape)


def init_model(cfg, seed=0, sdn_weights=None):
    """Draw parameters and buffers for ``cfg``; deterministic for a seed.

    ``sdn_weights`` (dict with ``w0 .. w5`` as in :mod:`refimpl.sdn`) is required for the
    ``sdn`` family and stored in the buffers (fixed, not trained).
    """
    rng = np.random.default_rng(seed)
    H = cfg.d_model
    p, buf = {}, {}
    if cfg.vocab:
        p["embedding.E"] = rng.normal(size=(cfg.vocab, H))  # (V, H)
    else:
        p["encoder.W"] = _uniform(rng, cfg.d_input, (H, cfg.d_input))  # (H, d_input)
        p["encoder.b"] = _uniform(rng, cfg.d_input, (H,))
    fam = cfg.family
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        ssm = s4d_init(H, cfg.d_state, init=cfg.init, seed=rng, dt_min=cfg.dt_min,
                       dt_max=cfg.dt_max, bidirectional=cfg.bidirectional)
        for k in LAYER_PARAMS:
            p[pre + "ssm." + k] = ssm[k]
        if fam.threshold:
            p[pre + "ln_vth"] = np.zeros(H)  # (H,), threshold exp(0) = 1
        for k, v in fam.init_params(H).items():
            p[pre + k] = v
        if fam.mixing == "glu":
            p[pre + "mix.W"] = _uniform(rng, H, (2 * H, H))  # (2H, H)
            p[pre + "mix.b"] = _uniform(rng, H, (2 * H,))
        else:
            p[pre + "mix.W"] = _uniform(rng, H, (H, H))  # (H, H)
            p[pre + "mix.b"] = np.zeros(H)
            p[pre + "mix.c"] = np.zeros(H)
        p[pre + "norm.gamma"] = np.ones(H)
        p[pre + "norm.beta"] = np.zeros(H)
        if cfg.norm == "batch":
            buf[pre + "norm.running_mean"] = np.zeros(H)
            buf[pre + "norm.running_var"] = np.ones(H)
    p["decoder.W"] = _uniform(rng, H, (cfg.n_classes, H))  # (C, H)
    p["decoder.b"] = _uniform(rng, H, (cfg.n_classes,))
    if cfg.tie_embedding:
        del p["decoder.W"]  # the embedding is the decoder (drawn anyway: the same bias)
    buf.update(fam.init_buffers(sdn_weights))
    return p, buf


def project(params, cfg):
    """Keep constrained parameters feasible after an optimizer step (in place), as each layer's
    activation family defines it (``rho >= 0`` for ``refractory``)."""
    fam = cfg.family
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        layer = {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}
        fam.project(layer)


def optimizer_rules(lr):
    """AdamW group rules (DESIGN.md 8): SSM dynamics ``lr = min(lr, 1e-3)`` without decay; no
    decay on biases, norms, D, thresholds and rho."""
    return [
        (("*.ssm.log_dt", "*.ssm.log_A_real", "*.ssm.A_imag", "*.ssm.B_re", "*.ssm.B_im"),
         {"lr": min(lr, 1e-3), "weight_decay": 0.0}),
        (("*.b", "*.c", "*.norm.*", "*.ssm.D", "*.ln_vth", "*.rho"), {"weight_decay": 0.0}),
    ]


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------


#: norm name -> the op (:mod:`refimpl.ops`) of the block's norm.
NORM_OPS = {"layer": Ly.LAYERNORM_OP, "batch": Ly.BATCHNORM_OP}


def _norm_fwd(cfg, p, buf, pre, x, training, new_buf):
    """The block's norm through its op: ``(y, cache)``; BatchNorm's new running statistics
    go into ``new_buf``."""
    params = {"gamma": p[pre + "norm.gamma"], "beta": p[pre + "norm.beta"]}
    if cfg.norm == "layer":
        res = Ly.LAYERNORM_OP.fwd({"x": x}, params)
        return res.outputs["y"], res.cache
    stats = {k: buf[pre + "norm." + k] for k in ("running_mean", "running_var")}
    res = Ly.BATCHNORM_OP.fwd({"x": x, **stats}, params, Ly.BatchNormConfig(training=training))
    new_buf.update({pre + "norm." + k: res.outputs[k] for k in stats})
    return res.outputs["y"], res.cache


def _norm_bwd(cfg, cache, d):
    g = NORM_OPS[cfg.norm].vjp(cache, {"y": d})
    return g["x"], g["gamma"], g["beta"]


class BlockCache(NamedTuple):
    """What :func:`block_bwd` needs from :func:`block_fwd`."""
    norm: object  # the norm's cache
    ssm: object  # the S4D layer's cache
    y: np.ndarray  # (B, H, L) S4D output before threshold scaling
    ln_vth: Optional[np.ndarray]  # (H,) or None without a learnable threshold
    act: object  # the activation family's cache (refimpl.activations)
    mask_s: Optional[np.ndarray]  # dropout mask on s (None: no dropout)
    mix: object  # the GLU or GSU op's cache
    mask_z: Optional[np.ndarray]  # dropout mask on the mixing output
    mixed: np.ndarray  # (B, H, L) the mixing output before dropout (a post-norm's input - x)


class ModelCache(NamedTuple):
    """What :func:`model_bwd` needs from :func:`model_fwd`."""
    embed: object  # encoder or embedding cache
    blocks: list  # BlockCache per layer
    pool: object  # mean-pool cache (the shape); None for head="lm"
    pooled: np.ndarray  # (B, H) the decoder's input; head="lm": (B, H, L) the last block's out


def block_fwd(cfg, p, buf, i, x, training, rng, smooth=False, frozen=None, new_buf=None):
    """One block; returns ``(x_out, cache, stats)`` with ``stats = {"rate": firing rate}``.

    ``x (B, H, L)``; ``training`` turns dropout on and BatchNorm to batch statistics (their
    running statistics go into ``new_buf``); ``smooth`` and ``frozen`` as in :func:`model_fwd`.
    """
    pre = f"layers.{i}."
    fam = cfg.family
    z, norm_c = x, None
    if cfg.prenorm:
        z, norm_c = _norm_fwd(cfg, p, buf, pre, x, training, new_buf)
    ssm = {k: p[pre + "ssm." + k] for k in LAYER_PARAMS}
    res = LAYER_OP.fwd({"u": z}, ssm, S4DConfig(cfg.disc), end_state=False)
    y, ssm_c = res.outputs["y"], res.cache  # (B, H, L)
    ln_vth = p[pre + "ln_vth"] if fam.threshold else None
    v = y if ln_vth is None else threshold_scale_fwd(y, ln_vth)  # (B, H, L)
    s, act_c = fam.forward(v, cfg, p, buf, pre, smooth, frozen)
    x_out, (mask_s, mix_c, mask_z, post_c, mixed) = _block_out(cfg, p, buf, pre, x, s, v,
                                                               training, rng, frozen, new_buf)
    norm_c = post_c if not cfg.prenorm else norm_c
    cache = BlockCache(norm_c, ssm_c, y, ln_vth, act_c, mask_s, mix_c, mask_z, mixed)
    return x_out, cache, {"rate": fam.rate(s, act_c, mix_c)}


def _block_out(cfg, p, buf, pre, x, s, v, training, rng, frozen=None, new_buf=None):
    """The block after its activation: mixing (GLU of ``s`` or GSU of ``v``), dropout, residual
    and post-norm. Returns ``(x_out, (mask_s, mix_cache, mask_z, postnorm_cache, mixed))``,
    ``mixed`` the mixing output before dropout."""
    fam = cfg.family
    drop = training and cfg.dropout > 0
    mask_s = None
    if fam.mixing == "glu":
        mask_s = Ly.dropout_mask(rng, s.shape, cfg.dropout) if drop else None
        s_d, _ = Ly.dropout_fwd(s, mask_s)
        res = Ly.GLU_OP.fwd({"s": s_d}, {"W": p[pre + "mix.W"], "b": p[pre + "mix.b"]})
    else:
        fz = frozen or {}
        res = Ly.GSU_OP.fwd({"x": v, **{k: fz[pre + k] for k in ("Tx", "TW") if pre + k in fz}},
                            {k: p[pre + "mix." + k] for k in ("W", "b", "c")})
    mixed, mix_c = res.outputs["z"], res.cache
    mask_z = Ly.dropout_mask(rng, mixed.shape, cfg.dropout) if drop else None
    out, _ = Ly.dropout_fwd(mixed, mask_z)
    x_out, post_c = x + out, None
    if not cfg.prenorm:
        x_out, post_c = _norm_fwd(cfg, p, buf, pre, x_out, training, new_buf)
    return x_out, (mask_s, mix_c, mask_z, post_c, mixed)


def block_stream(cfg, p, buf, i, x, state, step=None):
    """One block in eval mode from a state (DESIGN.md section 10): ``(x_out, new_state, record)``.

    ``x (B, H, T)`` a chunk of any length; ``state`` this layer's entries ``{suffix: array}``
    (``ssm.x`` and the activation family's, :meth:`refimpl.activations.Activation.state_spec`).
    ``step=None`` runs the chunk in the parallel form (FFT convolution with the exact end state,
    PMBC or the neuron kernel, the SDN on its window); ``step`` given, ``T`` must be 1 and the
    S4D layer runs its recurrence with the precomputed coefficients ``step = (dA, dB, C, D)``
    (:func:`refimpl.s4d.s4d_step_coeffs`), the form a chip runs. ``record`` holds what the
    layer computed: ``y`` (S4D output), ``v`` (after threshold scaling) and the family's
    diagnostics (spikes and the membranes that decided them).
    """
    pre = f"layers.{i}."
    fam = cfg.family
    z = x
    if cfg.prenorm:
        z, _ = _norm_fwd(cfg, p, buf, pre, x, False, {})
    if step is None:
        ssm = {k: p[pre + "ssm." + k] for k in LAYER_PARAMS}
        res = LAYER_OP.fwd({"u": z}, ssm, S4DConfig(cfg.disc), S4DState(state["ssm.x"]))
        y, x_ssm = res.outputs["y"], res.state.x
    else:
        y_t, x_ssm = s4d_layer_step(z[:, :, 0], step, state["ssm.x"])
        y = y_t[:, :, None]  # (B, H, 1)
    ln_vth = p[pre + "ln_vth"] if fam.threshold else None
    v = y if ln_vth is None else threshold_scale_fwd(y, ln_vth)  # (B, H, T)
    act_state = {k: v_ for k, v_ in state.items() if k != "ssm.x"}
    s, new_act, diag = fam.stream(v, cfg, p, buf, pre, act_state, step=step is not None)
    x_out, (_, mix_c, _, _, _) = _block_out(cfg, p, buf, pre, x, s, v, False, None, new_buf={})
    if fam.mixing == "gsu":
        diag = fam.diagnostics(None, mix_c)
    return x_out, {"ssm.x": x_ssm, **new_act}, stream_record(y, v, diag, x_out)


def stream_record(y, v, diag, out):
    """A block's record (:data:`RECORD_NAMES`) from its S4D output ``y``, the activation's
    input ``v``, the family's diagnostics and the block output ``out``: the arrays that run
    over time ``(B, H, T)`` (the GSU's constant ``Ter(W)`` is left out)."""
    rec = {"y": y, "v": v, **diag["spikes"],
           **{k: val for k, (val, _) in diag["membranes"].items()},
           **diag.get("internals", {}), "out": out}
    return {k: a for k, a in rec.items() if a.ndim == 3}


class _RecordNames(Mapping):
    """Family name -> :attr:`~refimpl.activations.Activation.record_names`: a read-only view of
    the registry (a family registered later appears by itself), not a table of its own."""

    def __getitem__(self, name):
        return ACTIVATIONS[name].record_names

    def __iter__(self):
        return iter(ACTIVATIONS)

    def __len__(self):
        return len(ACTIVATIONS)

    def __repr__(self):
        return f"RECORD_NAMES({dict(self)!r})"


#: What a layer's record holds (``(B, H, L)`` arrays, by family; each family states its own in
#: :attr:`refimpl.activations.Activation.record_names`): every layer ``y`` (the S4D output),
#: ``v`` (the activation's input: ``y / exp(ln_vth)`` with threshold scaling, else ``y``),
#: ``out`` (the block's output); neurons (binary, lif, refractory) ``s`` (spikes), ``h``
#: (membrane before the spike test and reset), ``u`` (after the reset); sdn ``s``, ``m`` (the
#: SDN's predicted membrane) and ``m+x`` (what the spike test compares with the threshold);
#: binary_gsu ``Tx`` (the GSU's ternarisation of ``v``, -1/0/1).
RECORD_NAMES = _RecordNames()


def layer_record(cfg, cache, out):
    """The record of one block of :func:`model_fwd` (:data:`RECORD_NAMES`), copied from what
    the forward computed (its cache ``cache`` and output ``out``), not recomputed."""
    fam = cfg.family
    v = cache.y if cache.ln_vth is None else cache.act.y  # the neuron's own input
    rec = stream_record(cache.y, v, fam.diagnostics(cache.act, cache.mix), out)
    return {k: np.array(a, copy=True) for k, a in rec.items()}


def spike_threshold(cfg):
    """The threshold the recorded membrane (``h``, or ``m+x`` for sdn) is compared with, or
    None (gelu: no spikes; binary_gsu: the GSU's threshold is per token,
    ``TERNARY_RATIO max |v|``): :attr:`refimpl.activations.Activation.theta`."""
    return cfg.family.theta


def block_bwd(cfg, p, i, c, dx_out):
    """Backward of :func:`block_fwd`: returns ``(dx, grads)`` for this block's parameters."""
    pre = f"layers.{i}."
    fam = cfg.family
    g = {}
    d = dx_out
    if not cfg.prenorm:
        d, g[pre + "norm.gamma"], g[pre + "norm.beta"] = _norm_bwd(cfg, c.norm, d)
    dx = d  # residual path (read only below: no copy)
    (dout,) = Ly.dropout_bwd(c.mask_z, d)
    if fam.mixing == "glu":
        gm = Ly.GLU_OP.vjp(c.mix, {"z": dout})
        (ds,) = Ly.dropout_bwd(c.mask_s, gm.pop("s"))
        dv, ga = fam.backward(c.act, ds)
        g.update({pre + k: v for k, v in ga.items()})
    else:
        gm = Ly.GSU_OP.vjp(c.mix, {"z": dout})
        dv = gm.pop("x")
    g.update({pre + "mix." + k: v for k, v in gm.items()})
    if c.ln_vth is None:
        dy = dv
    else:
        dy, g[pre + "ln_vth"] = threshold_scale_bwd(c.y, c.ln_vth, dv)
    gs = LAYER_OP.vjp(c.ssm, {"y": dy})
    dz = gs.pop("u")
    for k, v in gs.items():
        g[pre + "ssm." + k] = v
    if cfg.prenorm:
        dz, g[pre + "norm.gamma"], g[pre + "norm.beta"] = _norm_bwd(cfg, c.norm, dz)
    return dx + dz, g


def block_diagnostics(cfg, cache):
    """What decided the spikes of one block (from :func:`block_fwd`'s cache): ``{"spikes":
    {name: array}, "membranes": {name: (value, threshold)}}``, as the block's activation family
    defines them (``s`` and ``h`` for neurons, ``s`` and ``m+x`` for the SDN neuron, ``Tx`` and
    ``TW`` for the GSU; empty for GELU)."""
    return cfg.family.diagnostics(cache.act, cache.mix)


def compute_copy(cfg, arrays):
    """The arrays the model computes with: the float64 masters themselves for
    ``cfg.dtype == "float64"``, else a copy with every float array rounded to ``cfg.dtype``."""
    if cfg.dtype == "float64":
        return arrays
    dtype = precision.PRECISIONS[cfg.dtype]
    return {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in arrays.items()}


def _to_master(arrays):
    """Float arrays up-cast to float64 (exact), others as they are; float64 ones not copied."""
    return {k: (v.astype(np.float64, copy=False) if v is not None and v.dtype.kind == "f"
                else v) for k, v in arrays.items()}


def _check_finite_arrays(*dicts):
    """Every float array of the parameter and buffer dicts finite (ValueError naming it): the
    model's forward checks them once on the way in, not in every op (:func:`intermediates`)."""
    for arrays in dicts:
        for name, a in arrays.items():
            if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                check_array(name, a, dtype=a.dtype)


def model_inputs(cfg, x):
    """``x`` as ``cfg`` computes with it: float64 inputs rounded to ``cfg.dtype`` (the float32
    variant's one explicit cast of the data; float64 models get ``x`` itself), anything else
    (tokens, wrong dtypes for :func:`check_inputs` to name) unchanged."""
    if cfg.dtype == "float64" or not isinstance(x, np.ndarray) or x.dtype != np.float64:
        return x
    return x.astype(precision.PRECISIONS[cfg.dtype])


def check_inputs(cfg, x, labels=None):
    """Validate a batch: ``(B, L, d_input)`` / ``(B, L)`` of ``cfg.dtype`` or int64 tokens
    ``(B, L)``."""
    if cfg.vocab:
        if not isinstance(x, np.ndarray) or x.dtype != np.int64:
            raise TypeError(f"x must be int64 tokens (B, L) for a vocab model, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2:
            raise ValueError(f"x must have shape (B, L) of tokens, got {x.shape}")
    else:
        with precision.using(cfg.dtype):
            x = check_array("x", x, (2, 3))
        if x.ndim == 2:
            x = x[:, :, None]
        if x.shape[2] != cfg.d_input:
            raise ValueError(f"x must have {cfg.d_input} features per step (d_input), "
                             f"got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one time step, got shape {x.shape}")
    if cfg.head == "lm" and labels is not None:
        raise ValueError("a language model's targets are its input shifted by one token; "
                         "pass labels=None")
    if labels is not None:
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64:
            raise TypeError("labels must be an int64 array (B,); pass labels.astype(np.int64)")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= cfg.n_classes):
            raise ValueError(f"labels must lie in [0, {cfg.n_classes}), got range "
                             f"[{labels.min()}, {labels.max()}]")
    return x


def embed_fwd(cfg, p, x):
    """The model's input layer on checked inputs (:func:`check_inputs`): the token embedding
    or the linear encoder, ``(B, H, L)``; returns ``(h, cache)``."""
    if cfg.vocab:
        return Ly.embedding_fwd(x, p["embedding.E"])  # (B, H, L)
    return Ly.linear_fwd(np.ascontiguousarray(x.transpose(0, 2, 1)), p["encoder.W"],
                         p["encoder.b"])  # (B, H, L)


@threads.owned()
def model_fwd(cfg, p, buf, x, training=False, rng=None, smooth=False, frozen=None,
              record=False):
    """Forward to logits.

    Parameters
    ----------
    p, buf : dict of float64 arrays
        Parameters and buffers (the master copies; see the module docstring for float32).
    x : ``cfg.dtype`` (B, L, d_input) or (B, L), or int64 tokens (B, L) when ``cfg.vocab``
    training : bool
        Dropout on, BatchNorm with batch statistics (and updated running statistics).
    rng : numpy.random.Generator
        Dropout masks (required when training with dropout > 0).
    smooth : bool
        Spiking neurons use the surrogate primitive instead of the Heaviside (gradient checks).
    frozen : dict or None
        Values the backward treats as constants, held fixed for gradient checks: SDN
        predictions ``layers.i.m`` and GSU quantisations ``layers.i.Tx``, ``layers.i.TW``
        (see :func:`frozen_constants`).
    record : bool
        Also return, per layer, what the forward computed as named arrays (``stats["record"]``:
        a list of dicts, :data:`RECORD_NAMES`): copies of the arrays the forward used.

    Returns
    -------
    logits : ``cfg.dtype`` (B, n_classes); head="lm": (B, L, V), position ``t`` predicting
        token ``t + 1``
    cache : what :func:`model_bwd` needs
    new_buf : float64 buffers after the step (BatchNorm running statistics)
    stats : ``{"rates": [per-layer firing rate or None], "features": (B, H, L) the last
        block's output, before pooling}``, with ``record`` also ``"record": [per-layer dict]``
    """
    x = check_inputs(cfg, x)
    if training and cfg.dropout > 0 and rng is None:
        raise ValueError("training with dropout needs rng (a numpy Generator)")
    updates = {}  # buffers the blocks update (BatchNorm running statistics)
    _check_finite_arrays(p, buf)
    with precision.using(cfg.dtype), intermediates():
        p, buf_c = compute_copy(cfg, p), compute_copy(cfg, buf)
        h, embed_c = embed_fwd(cfg, p, x)  # (B, H, L)
        blocks, rates, records = [], [], []
        for i in range(cfg.n_layers):
            h, bc, st = block_fwd(cfg, p, buf_c, i, h, training, rng, smooth, frozen, updates)
            blocks.append(bc)
            rates.append(st["rate"])
            if record:
                records.append(layer_record(cfg, bc, h))
        if cfg.head == "lm":
            pooled, pool_c = h, None  # every position is decoded
            logits = lm_decode(cfg, p, h)  # (B, L, V)
        else:
            pooled, pool_c = Ly.meanpool_fwd(h)  # (B, H)
            logits = pooled @ p["decoder.W"].T + p["decoder.b"]  # (B, C)
    stats = {"rates": rates, "features": h}
    if record:
        stats["record"] = records
    new_buf = {**buf, **_to_master(updates)}
    return logits, ModelCache(embed_c, blocks, pool_c, pooled), new_buf, stats


def _decoder_W(cfg, p):
    """The decoder's ``(V, H)`` matrix: ``decoder.W``, or the embedding when tied."""
    return p["embedding.E"] if cfg.tie_embedding else p["decoder.W"]


class DecoderCache(NamedTuple):
    """What the LM decoder's VJP reads."""
    h: np.ndarray  # (B, H, L) the last block's output
    W: np.ndarray  # (V, H)


def _decoder_op(inputs, params, cfg=None, state=None):
    h, W, b = inputs["h"], params["W"], params["b"]
    for name, a, ndim in (("h", h, 3), ("W", W, 2), ("b", b, 1)):
        check_array(name, a, ndim, finite=False)  # the precision's dtype, the rank
    if W.shape[1] != h.shape[1]:
        raise ValueError(f"W must have shape (V, H) = (*, {h.shape[1]}), got {W.shape}")
    if b.shape != W.shape[:1]:
        raise ValueError(f"b must have shape (V,) = ({W.shape[0]},), got {b.shape}")
    logits = _decoder_logits(W, b, h)  # (B, L, V)
    return _ops.Result({"logits": logits}, DecoderCache(h, W), None)


def _decoder_logits(W, b, h):
    """``logits[b] = h[b]^T W^T + c``: one ``(L, H) @ (H, V)`` GEMM per batch row written
    straight into ``(B, L, V)`` (BLAS reads both transposed views as they are: no copies), the
    rows on :func:`refimpl.layers._over_batch`'s threads."""
    Bsz, H, L = h.shape
    logits = np.empty((Bsz, L, W.shape[0]), dtype=h.dtype)  # (B, L, V)
    hT, WT = h.transpose(0, 2, 1), W.T  # (B, L, H), (H, V) views

    def rows(b0, b1):
        np.matmul(hT[b0:b1], WT, out=logits[b0:b1])
        logits[b0:b1] += b
    Ly._over_batch(rows, Bsz, logits.size * H // 8)
    return logits


def _decoder_op_vjp(cache, cotangents):
    h, W = cache.h, cache.W
    Bsz, H, L = h.shape
    dlogits = cotangents.get("logits")
    if dlogits is None:
        dlogits = np.zeros((Bsz, L, W.shape[0]), h.dtype)
    dlogits = np.ascontiguousarray(dlogits)  # (B, L, V)
    V = W.shape[0]
    dh = np.empty_like(h)  # (B, H, L)
    part = np.empty((Bsz, V, H), dtype=h.dtype)  # (B, V, H) one dW GEMM per row
    dT, hT = dlogits.transpose(0, 2, 1), h.transpose(0, 2, 1)  # (B, V, L), (B, L, H) views

    def rows(b0, b1):
        np.matmul(W.T, dT[b0:b1], out=dh[b0:b1])  # (H, V) @ (V, L)
        np.matmul(dT[b0:b1], hT[b0:b1], out=part[b0:b1])  # (V, L) @ (L, H)
    Ly._over_batch(rows, Bsz, dlogits.size * H // 4)
    return {"h": dh, "W": threads.sum_in_order(part),  # (V, H), added in row order
            "b": dlogits.sum(axis=(0, 1))}


def _decoder_examples(rng):
    return [_ops.Example({"h": rng.normal(size=(2, 3, L))},
                         {"W": rng.normal(size=(5, 3)), "b": rng.normal(size=5)})
            for L in (4, Ly.BATCHED_MAX_L + 1)]


#: The language model's per-token decoder (DESIGN.md section 11).
DECODER_OP = _ops.defop(
    name="lm_decoder", math="logits[b, t] = W h[b, :, t] + c",
    inputs=("h",), params=("W", "b"), outputs=("logits",), fwd=_decoder_op,
    vjp=_decoder_op_vjp, examples=_decoder_examples,
    # H + 1 terms per logit; dh sums V, dW and db sum B L (the chanmix sums of layers.linear)
    depth=lambda inputs, params, cfg: {"*": inputs["h"].shape[1] + 1,
                                       "dh": params["W"].shape[0],
                                       "dW": inputs["h"].shape[0] * inputs["h"].shape[2],
                                       "db": inputs["h"].shape[0] * inputs["h"].shape[2]},
)


def lm_decode(cfg, p, h):
    """``logits[b, t] = W h[b, :, t] + c``: h (B, H, L) -> (B, L, V)."""
    return lm_decoder(cfg, p, h).outputs["logits"]


def lm_decoder(cfg, p, h):
    """The decoder op's :class:`~refimpl.ops.Result` for the model's parameters (``W`` the
    embedding when tied)."""
    return DECODER_OP.fwd({"h": h}, {"W": _decoder_W(cfg, p), "b": p["decoder.b"]})


def _lm_decode_bwd(cfg, p, h, dlogits, g):
    """Backward of :func:`lm_decode`: writes the decoder's gradients into ``g`` (``W``'s under
    ``decoder.W``, or ``decoder.E_tied`` to be added to the embedding's), returns ``dh``."""
    d = DECODER_OP.vjp(DecoderCache(h, _decoder_W(cfg, p)), {"logits": dlogits})
    g["decoder.E_tied" if cfg.tie_embedding else "decoder.W"] = d["W"]  # (V, H)
    g["decoder.b"] = d["b"]  # (V,)
    return d["h"]  # (B, H, L)


def frozen_constants(cfg, p, buf, x, training=True, rng=None):
    """The quantities the backward treats as constants (SDN's m, GSU's Ter(y) and Ter(W)),
    recorded at ``p`` so that a finite-difference check can hold them fixed."""
    _, cache, _, _ = model_fwd(cfg, p, buf, x, training, rng, smooth=True)
    fam = cfg.family
    out = {}
    for i, c in enumerate(cache.blocks):
        out.update({f"layers.{i}.{k}": v for k, v in fam.frozen(c.act, c.mix).items()})
    return out


@threads.owned()
def model_bwd(cfg, p, cache, dlogits):
    """Gradients of every parameter given ``dlogits (B, C)`` of ``cfg.dtype``: a dict like
    ``p``, float64 (under float32: the float32 gradients, up-cast exactly)."""
    with precision.using(cfg.dtype):
        dlogits = check_array("dlogits", dlogits, 3 if cfg.head == "lm" else 2)
    with precision.using(cfg.dtype), intermediates():
        if cfg.head == "lm":
            pc = compute_copy(cfg, {k: p[k] for k in ("embedding.E", "decoder.W", "decoder.b")
                                    if k in p})
            g = {}
            dh = _lm_decode_bwd(cfg, pc, cache.pooled, dlogits, g)  # (B, H, L)
        else:
            W = compute_copy(cfg, {"W": p["decoder.W"]})["W"]  # (C, H)
            g = {"decoder.W": dlogits.T @ cache.pooled, "decoder.b": dlogits.sum(0)}
            (dh,) = Ly.meanpool_bwd(cache.pool, dlogits @ W)  # (B, H, L)
        for i in reversed(range(cfg.n_layers)):
            dh, gb = block_bwd(cfg, p, i, cache.blocks[i], dh)
            g.update(gb)
        if cfg.vocab:
            _, g["embedding.E"] = Ly.embedding_bwd(cache.embed, dh)
            if cfg.tie_embedding:
                g["embedding.E"] += g.pop("decoder.E_tied")  # E is used twice: the sum
        else:
            _, g["encoder.W"], g["encoder.b"] = Ly.linear_bwd(cache.embed, dh)
    return _to_master(g)


def loss_and_grads(cfg, p, buf, x, labels, training=True, rng=None, smooth=False, frozen=None):
    """Cross-entropy loss, logits, gradients, new buffers and stats for one batch.

    head="lm": ``labels`` must be None; the loss is the mean next-token cross-entropy over
    positions ``0 .. L-2`` (the last position's prediction has no target: zero gradient)."""
    x = check_inputs(cfg, x, labels)
    if cfg.head == "lm" and x.shape[1] < 2:
        raise ValueError(f"x must have at least two tokens per sequence for next-token "
                         f"prediction, got shape {x.shape}")
    logits, cache, new_buf, stats = model_fwd(cfg, p, buf, x, training, rng, smooth, frozen)
    with precision.using(cfg.dtype):
        if cfg.head == "lm":
            loss, dlogits = lm_loss(logits, x)
        else:
            loss, ce = Ly.cross_entropy_fwd(logits, labels)
            (dlogits,) = Ly.cross_entropy_bwd(ce)
    return loss, logits, model_bwd(cfg, p, cache, dlogits), new_buf, stats


def lm_loss(logits, tokens):
    """Next-token cross-entropy and its gradient: ``(loss, dlogits (B, L, V))``.

    ``loss = mean_{b, t < L-1} CE(logits[b, t], tokens[b, t+1])`` (nats; bits per token =
    loss / ln 2); ``dlogits[:, L-1] = 0`` (no target after the last token). One fused pass
    (:func:`refimpl.layers.next_token_cross_entropy`)."""
    with precision.using(str(logits.dtype) if logits.dtype == np.float32 else "float64"):
        return Ly.next_token_cross_entropy(logits, tokens)


def energy(cfg, rates, L):
    """SpikingSSM energy estimate per sample: only the feature-mixing layers count.

    ``#MAC = L H 2H`` per layer; spiking layers do ``#AC = rate #MAC`` accumulates instead.
    Returns a dict with MAC/AC counts and energies in pJ (``E_MAC = 4.6``, ``E_AC = 0.9``).
    """
    H = cfg.d_model
    mac = L * H * 2 * H
    n_mac = n_ac = 0.0
    for r in rates:
        if r is None:
            n_mac += mac
        else:
            n_ac += r * mac
    return {"mac": n_mac, "ac": n_ac,
            "energy_pj": n_mac * ENERGY_PJ["MAC"] + n_ac * ENERGY_PJ["AC"],
            "energy_ann_pj": cfg.n_layers * mac * ENERGY_PJ["MAC"]}
