"""Golden suites of one block (``block``), one training step of the whole model
(``model_step``), DESIGN.md 8, and a small model run in chunks (``model_stream``), DESIGN.md 10.

The cases are ``refimpl.model`` configurations; every ``ModelConfig`` field is a case attribute
(:func:`_model_attrs`, read back by :func:`_model_config`), with the activation family's neuron
spelled out. Parameters are moved off their initial constants (:func:`_randomise`) so that every
gradient is generic. ``model_step`` records the loss, the logits, the gradient and the
parameters after one AdamW step.
"""
import math

import numpy as np

from .. import layers as Ly
from ..model import (ModelConfig, block_bwd, block_diagnostics, block_fwd, init_model, lm_loss,
                     model_bwd, model_fwd, optimizer_rules, project)
from ..optim import adamw_init, adamw_step, cosine_schedule, make_groups
from .registry import Spec, register
from ..sdn.fused import random_weights as sdn_weights
from .ssm_suites import fft_depth

#: ModelConfig fields stored verbatim as case attributes.
_MODEL_FIELDS = ("activation", "norm", "prenorm", "bidirectional", "disc", "init", "grad_mode",
                 "surrogate", "neuron_impl")


def _model_attrs(cfg):
    """Scalar attributes of a ModelConfig, with the family's neuron spelled out."""
    fam = cfg.family
    a = {k: getattr(cfg, k) for k in _MODEL_FIELDS}
    a.update(d_model=cfg.d_model, d_state=cfg.d_state, n_layers=cfg.n_layers,
             n_classes=cfg.n_classes, d_input=cfg.d_input, vocab=cfg.vocab,
             dropout=float(cfg.dropout), dt_min=float(cfg.dt_min), dt_max=float(cfg.dt_max),
             training=True, mixing=fam.mixing,
             threshold_scaling=bool(fam.threshold), activation_kind=fam.kind)
    if cfg.head != "classifier":  # a classifier's files predate the head: they keep their attrs
        a.update(head=cfg.head, tie_embedding=bool(cfg.tie_embedding))
    ncfg = cfg.neuron_config()
    if ncfg is not None:
        a["surrogate"] = ncfg.surrogate
        for k, v in ncfg.attrs().items():
            a["neuron_" + k] = v
    return a


def _model_config(attrs):
    fields = {k: attrs[k] for k in _MODEL_FIELDS + ("d_model", "d_state", "n_layers", "n_classes",
                                                    "d_input", "vocab", "dropout")}
    # dt_min, dt_max were added to v1 later; files without them were generated with the defaults
    # (only the initialisation reads them)
    fields.update({k: attrs[k] for k in ("dt_min", "dt_max") if k in attrs})
    # head, tie_embedding: stored by language-model cases only (a classifier's defaults)
    fields.update({k: attrs[k] for k in ("head", "tie_embedding") if k in attrs})
    return ModelConfig(**fields)


def _model_buffers(cfg, params_group):
    """Buffers block_fwd / model_fwd read: SDN weights (stored as non-trainable params) and
    BatchNorm running statistics (unused in training mode: placeholders)."""
    buf = {k: v for k, v in params_group.items() if k.startswith("sdn.")}
    for i in range(cfg.n_layers):
        buf[f"layers.{i}.norm.running_mean"] = np.zeros(cfg.d_model)
        buf[f"layers.{i}.norm.running_var"] = np.ones(cfg.d_model)
    return buf


def _randomise(rng, p, cfg):
    """Move parameters off their initial constants so that every gradient is generic, and put the
    spiking thresholds where the membranes reach them. (The GSU's ``b`` starts at zero, GLU's
    is drawn.)"""
    gsu = cfg.family.mixing == "gsu"
    for k in list(p):
        if k.endswith("ln_vth"):
            p[k] = rng.normal(-1.0, 0.2, size=p[k].shape)
        elif k.endswith("norm.gamma"):
            p[k] = 1.0 + 0.1 * rng.normal(size=p[k].shape)
        elif k.endswith(("norm.beta", "mix.c")) or (k.endswith("mix.b") and gsu):
            p[k] = 0.1 * rng.normal(size=p[k].shape)
        elif k.endswith(".rho"):
            p[k] = rng.uniform(0.2, 1.0, size=p[k].shape)
    return p


def _block_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=4, N=4, L=32, uscale=1.0, result="valid", edit=None, **kw):
        rng = rngs()
        cfg = ModelConfig(n_classes=2, d_model=H, d_state=N, n_layers=1, **kw)
        sdn_w = sdn_weights(rng) if cfg.family.needs_sdn_weights else None
        p, _ = init_model(cfg, seed=rng, sdn_weights=sdn_w)
        p = _randomise(rng, {k[len("layers.0."):]: v for k, v in p.items()
                             if k.startswith("layers.0.")}, cfg)
        meta = {}
        if sdn_w is not None:
            for k, v in sdn_w.items():
                p["sdn." + k] = v
                meta["params/sdn." + k] = {"trainable": False}
        u = uscale * rng.normal(size=(B, H, L))
        inputs = {"u": u}
        if edit:
            edit(inputs, p)
        out.append(Spec(comment, list(flags), _model_attrs(cfg), inputs, p, result, meta=meta))

    add("SpikingSSM block: LIF (hard reset, tau 0.125), threshold scaling, GLU, LayerNorm "
        "after the residual", ["default"], activation="lif", L=32 * big)
    add("GELU (non-spiking S4D), prenorm", activation="gelu", prenorm=True, L=32 * big)
    add("Binary S4D: Heaviside (reset none, tau 0, theta 0, atan), GLU", activation="binary")
    add("Binary S4D + GSU: the GSU ternarises the SSM output", activation="binary_gsu")
    add("SDN neuron: m from the fused SDN (weights sdn.w0..w5, not trained) is a constant",
        activation="sdn")
    add("SPikE-SSM reset-refractory neuron (rho trainable), iterative", activation="refractory",
        neuron_impl="iterative")
    add("refractory neuron, BatchNorm (training mode, batch statistics), prenorm",
        activation="refractory", neuron_impl="iterative", norm="batch", prenorm=True)
    add("LIF, BatchNorm after the residual, bilinear, S4D-Inv", activation="lif", norm="batch",
        disc="bilinear", init="inv")
    add("LIF, bidirectional SSM, S4D-Real", activation="lif", bidirectional=True, init="real")
    add("LIF, grad_mode detach_reset, sigmoid surrogate", activation="lif",
        grad_mode="detach_reset", surrogate="sigmoid")
    add("LIF, grad_mode sltt, fast_sigmoid surrogate", activation="lif", grad_mode="sltt",
        surrogate="fast_sigmoid")
    add("refractory neuron, detach_reset, rectangle surrogate", activation="refractory",
        neuron_impl="iterative", grad_mode="detach_reset", surrogate="rectangle")
    add("long sequence, L = 1024", ["long_sequence"], activation="lif", B=1, H=2, L=1024 * big)

    def zero(i, p):
        i["u"][:] = 0.0

    add("all-zero input (LIF): y = norm(GLU(0))", ["all_zero"], activation="lif", edit=zero)
    add("GELU saturation: inputs scaled by 1e3", ["saturation"], activation="gelu",
        uscale=1e3)

    def nan(i, p):
        i["u"][0, 0, 0] = np.nan

    add("NaN input: must be rejected", ["nan_input"], activation="lif", result="invalid", edit=nan)
    return out


def _block_split(case):
    """``(cfg, p with layers.0. names, buffers)`` from a block case."""
    cfg = _model_config(case.config)
    params = case.group("params")
    p = {"layers.0." + k: v for k, v in params.items() if not k.startswith("sdn.")}
    return cfg, p, _model_buffers(cfg, params)


def _block_fwd(case):
    cfg, p, buf = _block_split(case)
    y, cache, _ = block_fwd(cfg, p, buf, 0, case.data["inputs/u"], True, None, new_buf={})
    return {"y": y}, (cfg, p, cache), _model_diag(cfg, [cache])


def _model_diag(cfg, blocks):
    """Spikes and membranes of every block (:func:`refimpl.model.block_diagnostics`), names
    suffixed with the block index (``s0``, ``h0``, ``m+x1``, ``Tx0``, ...)."""
    spikes, membranes = {}, {}
    for i, c in enumerate(blocks):
        d = block_diagnostics(cfg, c)
        spikes.update({f"{k}{i}": v for k, v in d["spikes"].items()})
        membranes.update({f"{k}{i}": v for k, v in d["membranes"].items()})
    return {"spikes": spikes, "membranes": membranes}


def _block_bwd(case, state, cot):
    cfg, p, cache = state
    dx, g = block_bwd(cfg, p, 0, cache, cot["y"])
    return {"u": dx, **{k[len("layers.0."):]: v for k, v in g.items()}}


def _block_depth(case):
    Bsz, H, L = case.data["inputs/u"].shape
    N2 = case.config["d_state"] // 2
    d = L + N2 + fft_depth(L) + 4 * H + 16
    return {"*": d, "grads/*": Bsz * L + d}


def _block_causal(case):
    """``y (B, H, L)`` depends on steps ``<= t`` only, unless the kernel is bidirectional or a
    training-mode BatchNorm after the residual mixes every step's statistics (a prenorm
    BatchNorm normalises the block input, upstream of the spikes)."""
    c = case.config
    if c.get("bidirectional") or (c.get("norm") == "batch" and not c.get("prenorm")
                                  and c.get("training", True)):
        return {}
    return {"y": 2}


register(
    name="block",
    math="one block of DESIGN.md section 8",
    specs=_block_specs,
    fwd=_block_fwd,
    bwd=_block_bwd,
    differentiable=("y",),
    causal=_block_causal,
    depth=_block_depth,
)


#: AdamW settings of the model_step suite (torch.optim.AdamW parametrisation).
ADAMW = dict(lr=1e-2, weight_decay=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def _draw_x(rng, cfg, B, L):
    """A model's input: int64 tokens ``(B, L)`` when ``cfg.vocab``, else N(0, 1) features."""
    if cfg.vocab:
        return rng.integers(0, cfg.vocab, size=(B, L)).astype(np.int64)
    return rng.normal(size=(B, L, cfg.d_input))


def _step_case(rng, comment, flags=(), B=3, L=16, clip_norm=0.0, result="valid", edit=None,
               attrs_edit=None, **kw):
    """One training-step case (``model_step``, ``lm_step``): the model ``ModelConfig(**kw)``
    (small defaults), parameters off their initial constants, the inputs (tokens when
    ``cfg.vocab``; labels for a classifier, none for a language model: its targets are its
    input), the AdamW settings. ``edit(inputs, p)`` and ``attrs_edit(attrs)`` make invalid
    cases."""
    kw = {"n_classes": 3, "d_input": 2, "d_model": 4, "d_state": 4, "n_layers": 2, **kw}
    cfg = ModelConfig(**kw)
    sdn_w = sdn_weights(rng) if cfg.family.needs_sdn_weights else None
    p, _ = init_model(cfg, seed=rng, sdn_weights=sdn_w)
    p = _randomise(rng, p, cfg)
    meta = {}
    if sdn_w is not None:
        for k, v in sdn_w.items():
            p["sdn." + k] = v
            meta["params/sdn." + k] = {"trainable": False}
    inputs = {"x": _draw_x(rng, cfg, B, L)}
    if cfg.head != "lm":
        inputs["labels"] = rng.integers(0, cfg.n_classes, size=B).astype(np.int64)
    if edit:
        edit(inputs, p)
    attrs = _model_attrs(cfg)
    attrs.update(ADAMW, lr_scale=cosine_schedule(0, 10, 2), clip_norm=float(clip_norm), step=1)
    if attrs_edit:
        attrs_edit(attrs)
    return Spec(comment, list(flags), attrs, inputs, p, result, meta=meta)


def _model_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), **kw):
        out.append(_step_case(rngs(), comment, flags, **kw))

    add("two LIF blocks (SpikingSSM), LayerNorm, one AdamW step with warm-up factor 0.5",
        ["default"], activation="lif", L=16 * big)
    add("GELU blocks, prenorm", activation="gelu", prenorm=True)
    add("Binary S4D + GSU", activation="binary_gsu")
    add("refractory neurons, BatchNorm (batch statistics), rho projected onto rho >= 0",
        activation="refractory", neuron_impl="iterative", norm="batch")
    add("SDN neurons (sdn.w0..w5 fixed, not updated)", activation="sdn")
    add("token embedding (vocab 5) instead of the linear encoder", activation="lif", vocab=5,
        d_input=1)
    add("global-norm gradient clipping to 0.1 before the step", activation="binary",
        clip_norm=0.1)

    def nan(i, p):
        i["x"][1, 2, 0] = np.nan

    add("NaN input: must be rejected", ["nan_input"], activation="lif", result="invalid", edit=nan)
    return out


def _model_fwd(case):
    """Loss, logits, gradient and one AdamW step of a ``model_step`` or ``lm_step`` case."""
    c = case.config
    cfg = _model_config(c)
    params = case.group("params")
    buf = _model_buffers(cfg, params)
    p = {k: v for k, v in params.items() if not k.startswith("sdn.")}
    x = case.data["inputs/x"]
    if cfg.head == "lm" and (x.ndim != 2 or x.shape[1] < 2):
        raise ValueError(f"x must be int64 tokens (B, L) with L >= 2 for next-token "
                         f"prediction, got shape {x.shape}")
    logits, cache, _, _ = model_fwd(cfg, p, buf, x, training=True)
    if cfg.head == "lm":
        loss, dlogits = lm_loss(logits, x)
    else:
        loss, ce = Ly.cross_entropy_fwd(logits, case.data["inputs/labels"])
        (dlogits,) = Ly.cross_entropy_bwd(ce)
    grads = model_bwd(cfg, p, cache, dlogits)
    new = {k: np.array(v, dtype=np.float64, copy=True) for k, v in p.items()}
    groups = make_groups(new, c["lr"], c["weight_decay"], optimizer_rules(c["lr"]))
    state = adamw_init(new)
    adamw_step(new, grads, state, groups, lr_scale=c["lr_scale"], betas=(c["beta1"], c["beta2"]),
               eps=c["eps"], clip_norm=c["clip_norm"] or None)
    project(new, cfg)
    outputs = {"loss": np.asarray(loss), "logits": logits,
               **{"params/" + k: v for k, v in new.items()}}
    return outputs, grads, _model_diag(cfg, cache.blocks)


def _model_bwd(case, grads, cot):
    return {k: v * float(cot["loss"]) for k, v in grads.items()}


def _model_cotangents(outputs, rng):
    return {"loss": np.asarray(1.0)}


def _model_depth(case):
    """Per layer as ``block``; the mean pool over time (classifier) or the per-token decoder
    (language model) adds ``L``; the loss of a language model is a mean over ``B (L - 1)``
    tokens and every gradient a sum over ``B L`` positions."""
    c = case.config
    x = case.data["inputs/x"]
    Bsz, L = x.shape[0], x.shape[1]
    d = c["n_layers"] * (L + c["d_state"] // 2 + fft_depth(L) + 4 * c["d_model"] + 16)
    depth = {"*": d + L, "grads/*": Bsz * L + d + L}
    if c.get("head") == "lm":
        depth["outputs/loss"] = Bsz * L + d + L
    return depth


def _model_meta(case):
    """Per-parameter AdamW group settings (lr before the schedule factor, weight_decay)."""
    c = case.config
    p = {k: v for k, v in case.group("params").items() if not k.startswith("sdn.")}
    meta = {}
    for g in make_groups(p, c["lr"], c["weight_decay"], optimizer_rules(c["lr"])):
        for name in g["params"]:
            meta["params/" + name] = {"trainable": True, "lr": float(g["lr"]),
                                      "weight_decay": float(g["weight_decay"])}
    return meta


#: What the training-step suites (``model_step``, ``lm_step``) share: one step of a whole model.
_STEP = dict(fwd=_model_fwd, bwd=_model_bwd, differentiable=("loss",),
             cotangents=_model_cotangents, depth=_model_depth, meta=_model_meta)

register(name="model_step", math="cross-entropy loss, its gradient, one AdamW step",
         specs=_model_specs, **_STEP)


# ---- lm_step: one training step of a language model (DESIGN.md 11) ---------------------------

def _lm_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), vocab=7, **kw):
        out.append(_step_case(rngs(), comment, flags, head="lm", vocab=vocab, n_classes=vocab,
                              d_input=1, **kw))

    add("two LIF blocks (SpikingSSM), LayerNorm, vocabulary 7, untied decoder, one AdamW step "
        "with warm-up factor 0.5", ["default"], activation="lif", L=16 * big)
    add("GELU blocks, prenorm, decoder tied to the embedding (E used twice: the gradient is the "
        "sum)", activation="gelu", prenorm=True, tie_embedding=True)
    add("Binary S4D (Heaviside), tied decoder, global-norm gradient clipping to 0.1",
        activation="binary", tie_embedding=True, clip_norm=0.1)
    add("Binary S4D + GSU", activation="binary_gsu")
    add("refractory neurons (SPikE-SSM) by PMBC, BatchNorm (batch statistics over B and L), "
        "rho projected onto rho >= 0", activation="refractory", norm="batch")
    add("SDN neurons (sdn.w0..w5 fixed, not updated), vocabulary 256 (bytes), B = 2, L = 8",
        activation="sdn", vocab=256, B=2, L=8)
    add("LIF, two-token sequences (one target per row), B = 4", ["short_sequence"],
        activation="lif", B=4, L=2)
    add("LIF, context 256, B = 1", ["long_sequence"], activation="lif", B=1, L=256 * big)

    def beyond(i, p):
        i["x"][1, 3] = 7

    add("a token outside the vocabulary (7 with vocabulary 7): must be rejected",
        ["invalid_input"], activation="lif", result="invalid", edit=beyond)
    add("one token per row: no next token to predict, must be rejected", ["invalid_input"],
        activation="lif", L=1, result="invalid")

    def bidirectional(a):
        a["bidirectional"] = True

    add("a bidirectional language model sees the tokens it predicts: must be rejected",
        ["invalid_config"], activation="lif", result="invalid", attrs_edit=bidirectional)
    return out


register(name="lm_step",
         math="next-token cross-entropy of a causal language model (mean over positions "
              "0 .. L-2), its gradient, one AdamW step",
         specs=_lm_specs, **_STEP)


# ---- model_stream: a small model run in chunks (DESIGN.md 10) ---------------------------------

#: Layers of a model_stream case (every case has 2), and the spike outputs they may record.
_STREAM_LAYERS = 2
_STREAM_SPIKES = tuple(f"layers.{i}.{k}" for i in range(_STREAM_LAYERS) for k in ("s", "Tx"))


def _stream_specs(rngs, size):
    """The cases (the same for both sizes: the suite is about state, not length)."""
    del size
    out = []

    def add(comment, chunks, flags=(), B=2, L=32, result="valid", edit=None, stats=False, **kw):
        rng = rngs()
        kw = {"n_classes": 3, "d_input": 2, "d_model": 4, "d_state": 4,
              "n_layers": _STREAM_LAYERS, **kw}
        cfg = ModelConfig(**kw)
        sdn_w = sdn_weights(rng) if cfg.family.needs_sdn_weights else None
        p, buf = init_model(cfg, seed=rng, sdn_weights=sdn_w)
        p = _randomise(rng, p, cfg)
        meta = {}
        for k, v in buf.items():  # buffers are stored as non-trainable params (as model_step)
            if k.startswith("sdn."):
                p[k] = v
            elif stats and k.endswith("running_mean"):  # non-trivial eval BatchNorm statistics
                p[k] = rng.normal(0.0, 0.5, size=v.shape)
            elif stats and k.endswith("running_var"):
                p[k] = rng.uniform(0.3, 3.0, size=v.shape)
            else:
                p[k] = v
            meta["params/" + k] = {"trainable": False}
        inputs = {"x": _draw_x(rng, cfg, B, L)}
        if edit:
            edit(inputs, p)
        attrs = _model_attrs(cfg)
        attrs.update(training=False, chunks=np.asarray(chunks, dtype=np.int64))
        out.append(Spec(comment, ["stateful", "no_grads", *flags], attrs, inputs, p, result,
                        meta=meta))

    add("LIF (SpikingSSM), LayerNorm after the residual, chunks 5 + 1 + 10 + 16", [5, 1, 10, 16],
        ["default"], activation="lif", d_model=8, d_state=8)
    add("GELU (non-spiking S4D), prenorm LayerNorm, chunks 7 + 9 + 16", [7, 9, 16],
        activation="gelu", prenorm=True)
    add("Binary S4D (Heaviside), bilinear, S4D-Inv, chunks 16 + 16", [16, 16],
        activation="binary", disc="bilinear", init="inv")
    add("Binary S4D + GSU (the GSU ternarises each token: stateless), chunks 3 + 29", [3, 29],
        activation="binary_gsu")
    add("Binary S4D + GSU, short (B = 1, L = 8, chunks 3 + 5): few tokens, so the margin to "
        "the ternarisation threshold exceeds the float32 bound and the spikes are compared at "
        "float32 too", [3, 5], activation="binary_gsu", B=1, L=8)
    add("refractory neurons (SPikE-SSM, PMBC), eval BatchNorm with non-trivial running "
        "statistics, prenorm, chunks 10 + 10 + 12", [10, 10, 12], activation="refractory",
        norm="batch", prenorm=True, stats=True)
    add("SDN neurons (window of 8 past inputs carried across chunks), eval BatchNorm after the "
        "residual with non-trivial running statistics, chunks 4 + 5 + 23", [4, 5, 23],
        activation="sdn", norm="batch", stats=True)
    add("refractory neurons, iterative kernel, S4D-Real, one step at a time (chunks of 1)",
        [1] * 12, ["short_sequence"], activation="refractory", neuron_impl="iterative",
        init="real", L=12)
    add("LIF, token embedding (vocab 5), L = 48 in chunks 17 + 31", [17, 31],
        activation="lif", vocab=5, d_input=1, L=48)
    add("a bidirectional model cannot stream: must be rejected", [16, 16], ["invalid_config"],
        result="invalid", activation="lif", bidirectional=True)
    add("chunk lengths that do not sum to L: must be rejected", [16, 8], ["invalid_config"],
        result="invalid", activation="lif")

    def nan(i, p):
        i["x"][1, 2, 0] = np.nan

    add("NaN input: must be rejected", [32], ["nan_input"], result="invalid", activation="lif",
        edit=nan)
    return out


def _stream_model(case):
    """``(ModelStream, x, chunk lengths)`` of a model_stream case."""
    from ..stream import ModelStream  # the stream imports the model: keep the import local
    cfg = _model_config(case.config)
    params = case.group("params")
    buf = {k: v for k, v in params.items() if k.startswith("sdn.") or ".running_" in k}
    p = {k: v for k, v in params.items() if k not in buf}
    return ModelStream(cfg, p, buf), case.data["inputs/x"], [int(c) for c in
                                                             case.config["chunks"]]


def _stream_fwd(case):
    stream, x, chunks = _stream_model(case)
    if sum(chunks) != x.shape[1] or min(chunks) < 1:
        raise ValueError(f"chunks must be lengths >= 1 summing to L = {x.shape[1]}, got {chunks}")
    state, t, logits, recs = None, 0, [], []
    for n in chunks:
        lg, state, rec = stream.forward(x[:, t:t + n], state, record=True)
        logits.append(lg)
        recs.append(rec)
        t += n
    out = {"logits": np.concatenate(logits, axis=1)}  # (B, L, C)
    spikes, membranes = {}, {}
    fam = stream.family
    for i in range(stream.cfg.n_layers):
        rec = {k: np.concatenate([r[i][k] for r in recs], axis=2) for k in recs[0][i]}
        pre = f"layers.{i}."
        if fam.events is not None:  # the family's events and what decided them
            spikes[pre + fam.events] = rec[fam.events]
            membranes.update({pre + k: m for k, m in fam.membranes(rec).items()})
    out.update(spikes)
    for k, v in state.arrays.items():
        if np.iscomplexobj(v):
            out[f"state/{k}_re"], out[f"state/{k}_im"] = v.real.copy(), v.imag.copy()
        else:
            out[f"state/{k}"] = v
    return out, None, {"spikes": spikes, "membranes": membranes}


def _stream_bwd(case, state, cot):
    raise NotImplementedError("model_stream cases are forward only (flag no_grads)")


def _stream_causal(case):
    """The logits ``(B, L, C)`` and every layer's spikes ``(B, H, L)``: a causal model in eval
    mode, so step ``t`` depends on steps ``<= t`` only. (The end state depends on every step.)"""
    return {"logits": 1, **{name: 2 for name in _STREAM_SPIKES}}


def _stream_depth(case):
    """Per layer the FFT (``2 log2(2L)`` stages) or ``L`` recurrence steps and the end state's
    ``L``-term sums (``2 L``), the ``N2``-mode sum, mixing and norm (``4 H``) and a few
    elementwise operations (16), as :func:`refimpl.stream.tolerances`; the running mean over
    time adds ``L``."""
    c = case.config
    L = case.data["inputs/x"].shape[1]
    layer = 2 * int(math.ceil(math.log2(2 * L))) + 2 * L + c["d_state"] // 2 + 4 * c["d_model"] + 16
    return {"*": c["n_layers"] * layer + L}


register(
    name="model_stream",
    math="a causal model (eval mode) run chunk by chunk, each chunk from the state the previous "
         "one ended in: logits after every step, spikes of every layer, the end state",
    specs=_stream_specs,
    fwd=_stream_fwd,
    bwd=_stream_bwd,
    differentiable=(),
    spikes=_STREAM_SPIKES,
    ternary=tuple(n for n in _STREAM_SPIKES if n.endswith(".Tx")),
    causal=_stream_causal,
    depth=_stream_depth,
)
