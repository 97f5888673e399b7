"""Spiking SSM blocks and classifiers with a hand-written whole-model backward (DESIGN.md 7-8).

Block (one layer), input ``x (B, H, L)``::

    z = norm(x) if prenorm else x
    y = s4d(z)                               S4D kernel + FFT convolution + D skip
    y = y / exp(ln_vth)                      learnable threshold (spiking families that use it)
    s = activation(y)                        per the family, see FAMILIES
    s = dropout(s)                           one mask per (batch, channel), shared over time
    z = GLU(s)  or  GSU(y)
    x = x + dropout(z);  x = norm(x) if postnorm

Model: encoder ``Linear(d_input -> H)`` (or a token embedding), ``n_layers`` blocks, mean over
time, ``Linear(H -> n_classes)``, cross-entropy.

Parameters are one flat dict ``name -> float64 array`` with dotted names
(``encoder.W``, ``layers.0.ssm.log_dt``, ``layers.0.mix.W``, ``decoder.b``, ...); non-trained
state (BatchNorm running statistics, the SDN's fixed weights) lives in a second flat dict,
``buffers``. Both are what a checkpoint stores.

Activation families **[choice]** (the papers' settings where they state them):

| family | activation | mixing | neuron |
|---|---|---|---|
| ``gelu`` | exact GELU (non-spiking S4D baseline) | GLU | - |
| ``binary`` | Heaviside ``Theta(y)`` (Binary S4D) | GLU | reset none, tau 0, theta 0, surrogate atan |
| ``binary_gsu`` | none: GSU ternarises ``y`` itself (Binary S4D + GSU) | GSU | - (rate = mean abs Ter(y)) |
| ``lif`` | iterative hard-reset LIF (SpikingSSM) | GLU | hard, tau 0.125, theta 1, triangle, ``y/exp(ln_vth)`` |
| ``sdn`` | SDN neuron (SpikingSSM): SDN prediction constant | GLU | theta 1, triangle, ``y/exp(ln_vth)`` |
| ``refractory`` | reset-refractory (SPikE-SSM), PMBC or iterative | GLU | refractory, tau 0.5, theta 1, rho >= 0 trainable (init 0.5), triangle, ``y/exp(ln_vth)`` |

``rho`` stays in ``[0, inf)`` by projection after each optimizer step (:func:`project`).
"""
import dataclasses

import numpy as np

from . import layers as Ly
from ._checks import check_array, check_int, check_name, check_real
from .s4d import s4d_layer_bwd, s4d_layer_fwd
from .ssm import DISCRETIZATIONS, INITS, s4d_init

SSM_KEYS = ("log_dt", "log_A_real", "A_imag", "C_re", "C_im", "D")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one activation family builds a block."""
    mixing: str  # "glu" | "gsu"
    neuron: dict = None  # NeuronConfig fields, None for non-neuron activations
    threshold: bool = False  # learnable threshold by input scaling
    kind: str = "neuron"  # "gelu" | "neuron" | "sdn" | "none"


FAMILIES = {
    "gelu": Family("glu", kind="gelu"),
    "binary": Family("glu", dict(reset="none", tau=0.0, theta=0.0, surrogate="atan")),
    "binary_gsu": Family("gsu", kind="none"),
    "lif": Family("glu", dict(reset="hard", tau=0.125, theta=1.0, surrogate="triangle"), True),
    "sdn": Family("glu", dict(reset="hard", tau=0.125, theta=1.0, surrogate="triangle"), True,
                  kind="sdn"),
    "refractory": Family("glu", dict(reset="refractory", tau=0.5, theta=1.0, surrogate="triangle"),
                         True),
}
NORMS = ("layer", "batch")
NEURON_IMPLS = ("pmbc", "iterative")
RHO_INIT = 0.5
ENERGY_PJ = {"MAC": 4.6, "AC": 0.9}  # 45 nm figures (SpikingSSM paper)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a spiking SSM classifier (validated on construction)."""
    n_classes: int
    d_input: int = 1
    vocab: int = 0
    d_model: int = 64
    d_state: int = 64
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

    def __post_init__(self):
        check_int("n_classes", self.n_classes, 2)
        check_int("d_input", self.d_input, 1)
        check_int("vocab", self.vocab, 0)
        check_int("d_model", self.d_model, 1)
        check_int("d_state", self.d_state, 2)
        check_int("n_layers", self.n_layers, 1)
        check_name("activation", self.activation, FAMILIES)
        check_name("norm", self.norm, {k: k for k in NORMS})
        check_name("disc", self.disc, DISCRETIZATIONS)
        check_name("init", self.init, INITS)
        check_name("neuron_impl", self.neuron_impl, {k: k for k in NEURON_IMPLS})
        check_real("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (d_state // 2 complex modes), got {self.d_state}")
        self.neuron_config()  # validates grad_mode / surrogate through NeuronConfig

    def neuron_config(self):
        """The NeuronConfig of this model's spiking family, or None."""
        fam = FAMILIES[self.activation]
        if fam.neuron is None:
            return None
        from .neurons import NeuronConfig

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
    fam = FAMILIES[cfg.activation]
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        ssm = s4d_init(H, cfg.d_state, init=cfg.init, seed=rng, dt_min=cfg.dt_min,
                       dt_max=cfg.dt_max, bidirectional=cfg.bidirectional)
        for k in SSM_KEYS:
            p[pre + "ssm." + k] = ssm[k]
        if fam.threshold:
            p[pre + "ln_vth"] = np.zeros(H)  # (H,), threshold exp(0) = 1
        if fam.neuron is not None and fam.neuron["reset"] == "refractory":
            p[pre + "rho"] = np.full(H, RHO_INIT)  # (H,)
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
    if fam.kind == "sdn":
        if sdn_weights is None:
            raise ValueError("activation='sdn' needs sdn_weights (w0..w5); train them with "
                             "'refimpl sdn train' or load the published .npz")
        for k, v in sdn_weights.items():
            buf["sdn." + k] = np.asarray(v, dtype=np.float64)
    return p, buf


def project(params, cfg):
    """Keep constrained parameters feasible after an optimizer step (in place): ``rho >= 0``."""
    for i in range(cfg.n_layers):
        rho = params.get(f"layers.{i}.rho")
        if rho is not None:
            np.maximum(rho, 0.0, out=rho)


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


def _norm_fwd(cfg, p, buf, pre, x, training, new_buf):
    g, b = p[pre + "norm.gamma"], p[pre + "norm.beta"]
    if cfg.norm == "layer":
        return Ly.layernorm_fwd(x, g, b)
    y, cache, (m, v) = Ly.batchnorm_fwd(x, g, b, buf[pre + "norm.running_mean"],
                                        buf[pre + "norm.running_var"], training)
    new_buf[pre + "norm.running_mean"], new_buf[pre + "norm.running_var"] = m, v
    return y, cache


def _norm_bwd(cfg, cache, d):
    return (Ly.layernorm_bwd if cfg.norm == "layer" else Ly.batchnorm_bwd)(cache, d)


def _sdn_weights(buf):
    return {k[4:]: v for k, v in buf.items() if k.startswith("sdn.")}


def _activation_fwd(cfg, p, buf, pre, y, smooth, frozen):
    """Returns ``(s, cache, rate_source)``; ``frozen`` may hold SDN predictions to reuse."""
    fam = FAMILIES[cfg.activation]
    if fam.kind == "gelu":
        s, c = Ly.gelu_fwd(y)
        return s, c
    if fam.kind == "none":
        return None, None
    ncfg = cfg.neuron_config()
    if fam.kind == "sdn":
        from .sdn import sdn_forward
        from .surrogates import get_surrogate

        m = frozen.get(pre + "m") if frozen else None
        if m is None:
            m, _ = sdn_forward(y, _sdn_weights(buf), theta=ncfg.theta)  # (B, H, L), a constant
        z = m + y - ncfg.theta
        s = get_surrogate(ncfg.surrogate).primitive(z, ncfg.surrogate_scale) if smooth else \
            (z >= 0).astype(np.float64)
        return s, ("sdn", {"x": y, "m": m, "cfg": ncfg})
    from .neurons import neuron_fwd

    rho = p.get(pre + "rho")
    if ncfg.reset == "refractory" and cfg.neuron_impl == "pmbc" and not smooth:
        from .pmbc import pmbc_fwd

        s, h, u, _ = pmbc_fwd(y, ncfg, rho=rho)
    else:
        s, h, u = neuron_fwd(y, ncfg, rho=rho, smooth=smooth)
    return s, ("neuron", (y, s, h, u, ncfg, rho, smooth))


def _activation_bwd(cfg, cache, ds):
    """Returns ``(dy, drho)``."""
    fam = FAMILIES[cfg.activation]
    if fam.kind == "gelu":
        return Ly.gelu_bwd(cache, ds)[0], None
    tag, c = cache
    if tag == "sdn":
        from .surrogates import get_surrogate

        ncfg = c["cfg"]  # ds/dx = g(m + x - theta), m constant (DESIGN.md 6)
        return ds * get_surrogate(ncfg.surrogate).grad(c["m"] + c["x"] - ncfg.theta,
                                                     ncfg.surrogate_scale), None
    from .neurons import neuron_bwd

    y, s, h, u, ncfg, rho, smooth = c
    return neuron_bwd(y, s, h, u, ncfg, ds, rho=rho, smooth=smooth)


def block_fwd(cfg, p, buf, i, x, training, rng, smooth=False, frozen=None, new_buf=None):
    """One block; returns ``(x_out, cache, stats)`` with ``stats = {"rate": firing rate}``."""
    pre = f"layers.{i}."
    fam = FAMILIES[cfg.activation]
    c = {}
    z = x
    if cfg.prenorm:
        z, c["norm"] = _norm_fwd(cfg, p, buf, pre, x, training, new_buf)
    ssm = {k: p[pre + "ssm." + k] for k in SSM_KEYS}
    y, c["ssm"] = s4d_layer_fwd(z, ssm, cfg.disc)  # (B, H, L)
    if fam.threshold:
        scale = np.exp(-p[pre + "ln_vth"])[:, None]  # (H, 1)
        y = y * scale
        c["scale"] = (y, scale)
    s, c["act"] = _activation_fwd(cfg, p, buf, pre, y, smooth, frozen)
    drop = training and cfg.dropout > 0
    if fam.mixing == "glu":
        c["mask_s"] = Ly.dropout_mask(rng, s.shape, cfg.dropout) if drop else None
        s_d, _ = Ly.dropout_fwd(s, c["mask_s"])
        out, c["mix"] = Ly.glu_fwd(s_d, p[pre + "mix.W"], p[pre + "mix.b"])
    else:
        fz = frozen or {}
        out, c["mix"] = Ly.gsu_fwd(y, p[pre + "mix.W"], p[pre + "mix.b"], p[pre + "mix.c"],
                                   fz.get(pre + "Tx"), fz.get(pre + "TW"))
    c["mask_z"] = Ly.dropout_mask(rng, out.shape, cfg.dropout) if drop else None
    out, _ = Ly.dropout_fwd(out, c["mask_z"])
    x_out = x + out
    if not cfg.prenorm:
        x_out, c["norm"] = _norm_fwd(cfg, p, buf, pre, x_out, training, new_buf)
    if fam.kind == "gelu":
        rate = None
    elif fam.kind == "none":
        rate = float(np.abs(c["mix"][0]).mean())  # GSU's ternary activations Ter(y)
    else:
        rate = float(s.mean())
    return x_out, c, {"rate": rate}


def block_bwd(cfg, p, i, c, dx_out):
    """Backward of :func:`block_fwd`: returns ``(dx, grads)`` for this block's parameters."""
    pre = f"layers.{i}."
    fam = FAMILIES[cfg.activation]
    g = {}
    d = dx_out
    if not cfg.prenorm:
        d, g[pre + "norm.gamma"], g[pre + "norm.beta"] = _norm_bwd(cfg, c["norm"], d)
    dx = d.copy()  # residual path
    (dout,) = Ly.dropout_bwd(c["mask_z"], d)
    if fam.mixing == "glu":
        ds_d, g[pre + "mix.W"], g[pre + "mix.b"] = Ly.glu_bwd(c["mix"], dout)
        (ds,) = Ly.dropout_bwd(c["mask_s"], ds_d)
        dy, drho = _activation_bwd(cfg, c["act"], ds)
        if drho is not None:
            g[pre + "rho"] = drho
    else:
        dy, g[pre + "mix.W"], g[pre + "mix.b"], g[pre + "mix.c"] = Ly.gsu_bwd(c["mix"], dout)
    if fam.threshold:
        y_scaled, scale = c["scale"]
        g[pre + "ln_vth"] = -(dy * y_scaled).sum(axis=(0, 2))  # d/dln_vth of y exp(-ln_vth)
        dy = dy * scale
    dz, gs = s4d_layer_bwd(c["ssm"], dy)
    for k, v in gs.items():
        g[pre + "ssm." + k] = v
    if cfg.prenorm:
        dz, g[pre + "norm.gamma"], g[pre + "norm.beta"] = _norm_bwd(cfg, c["norm"], dz)
    return dx + dz, g


def check_inputs(cfg, x, labels=None):
    """Validate a batch: float64 ``(B, L, d_input)`` / ``(B, L)`` or int64 tokens ``(B, L)``."""
    if cfg.vocab:
        if not isinstance(x, np.ndarray) or x.dtype != np.int64:
            raise TypeError(f"x must be int64 tokens (B, L) for a vocab model, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2:
            raise ValueError(f"x must have shape (B, L) of tokens, got {x.shape}")
    else:
        x = check_array("x", x, (2, 3))
        if x.ndim == 2:
            x = x[:, :, None]
        if x.shape[2] != cfg.d_input:
            raise ValueError(f"x must have {cfg.d_input} features per step (d_input), got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one time step, got shape {x.shape}")
    if labels is not None:
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64:
            raise TypeError("labels must be an int64 array (B,); pass labels.astype(np.int64)")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= cfg.n_classes):
            raise ValueError(f"labels must lie in [0, {cfg.n_classes}), got range "
                             f"[{labels.min()}, {labels.max()}]")
    return x


def model_fwd(cfg, p, buf, x, training=False, rng=None, smooth=False, frozen=None):
    """Forward to logits.

    Parameters
    ----------
    x : float64 (B, L, d_input) or (B, L), or int64 tokens (B, L) when ``cfg.vocab``
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

    Returns
    -------
    logits : float64 (B, n_classes)
    cache : what :func:`model_bwd` needs
    new_buf : buffers after the step (BatchNorm running statistics)
    stats : ``{"rates": [per-layer firing rate or None]}``
    """
    x = check_inputs(cfg, x)
    if training and cfg.dropout > 0 and rng is None:
        raise ValueError("training with dropout needs rng (a numpy Generator)")
    new_buf = dict(buf)
    c = {}
    if cfg.vocab:
        h, c["embed"] = Ly.embedding_fwd(x, p["embedding.E"])
    else:
        h, c["embed"] = Ly.linear_fwd(np.ascontiguousarray(x.transpose(0, 2, 1)),
                                      p["encoder.W"], p["encoder.b"])  # (B, H, L)
    c["blocks"], rates = [], []
    for i in range(cfg.n_layers):
        h, bc, st = block_fwd(cfg, p, buf, i, h, training, rng, smooth, frozen, new_buf)
        c["blocks"].append(bc)
        rates.append(st["rate"])
    pooled, c["pool"] = Ly.meanpool_fwd(h)  # (B, H)
    logits = pooled @ p["decoder.W"].T + p["decoder.b"]  # (B, C)
    c["pooled"] = pooled
    return logits, c, new_buf, {"rates": rates}


def frozen_constants(cfg, p, buf, x, training=True, rng=None):
    """The quantities the backward treats as constants (SDN's m, GSU's Ter(y) and Ter(W)),
    recorded at ``p`` so that a finite-difference check can hold them fixed."""
    _, cache, _, _ = model_fwd(cfg, p, buf, x, training, rng, smooth=True)
    out = {}
    for i, c in enumerate(cache["blocks"]):
        if FAMILIES[cfg.activation].kind == "sdn":
            out[f"layers.{i}.m"] = c["act"][1]["m"]
        if FAMILIES[cfg.activation].mixing == "gsu":
            out[f"layers.{i}.Tx"], out[f"layers.{i}.TW"] = c["mix"][0], c["mix"][1]
    return out


def model_bwd(cfg, p, cache, dlogits):
    """Gradients of every parameter given ``dlogits (B, C)``: a dict like ``p``."""
    g = {"decoder.W": dlogits.T @ cache["pooled"], "decoder.b": dlogits.sum(0)}
    (dh,) = Ly.meanpool_bwd(cache["pool"], dlogits @ p["decoder.W"])  # (B, H, L)
    for i in reversed(range(cfg.n_layers)):
        dh, gb = block_bwd(cfg, p, i, cache["blocks"][i], dh)
        g.update(gb)
    if cfg.vocab:
        _, g["embedding.E"] = Ly.embedding_bwd(cache["embed"], dh)
    else:
        _, g["encoder.W"], g["encoder.b"] = Ly.linear_bwd(cache["embed"], dh)
    return g


def loss_and_grads(cfg, p, buf, x, labels, training=True, rng=None, smooth=False, frozen=None):
    """Cross-entropy loss, logits, gradients, new buffers and stats for one batch."""
    x = check_inputs(cfg, x, labels)
    logits, cache, new_buf, stats = model_fwd(cfg, p, buf, x, training, rng, smooth, frozen)
    loss, ce = Ly.cross_entropy_fwd(logits, labels)
    (dlogits,) = Ly.cross_entropy_bwd(ce)
    return loss, logits, model_bwd(cfg, p, cache, dlogits), new_buf, stats


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
