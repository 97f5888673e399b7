"""refimpl's spiking SSM classifier and language model in PyTorch CPU eager: the peer that
``make bench-peers`` times.

Runs only in the benchmark environment ``.venv-peers`` (torch is never a refimpl dependency).
The model is written as a PyTorch user writes it (the S4D example of state-spaces/s4, the
eager neuron loops of snntorch / spikingjelly), with refimpl's parameter names and layouts so
that it can be loaded with refimpl's parameters and checked against refimpl:

    h = encoder(x)                              Linear(d_input -> H), (B, H, L)
    per layer:
      K = 2 Re sum_n C dB exp(dt A l)           S4D-Lin, ZOH: dB = (exp(dt A) - 1) / A
      y = irfft(rfft(h, 2L) rfft(K, 2L))[:L] + D h
      v = y / exp(ln_vth)                       spiking families with a learnable threshold
      s = activation(v)                         gelu | binary | lif | sdn | refractory
      z = GLU(Conv1x1(s))                       o = W s + b, z = o[:H] sigmoid(o[H:])
      h = LayerNorm(h + z)                      over channels, eps 1e-5 (post-norm)
    logits = decoder(mean_t h);  loss = cross-entropy

The language model (:class:`TorchLM`, refimpl's ``head="lm"`` with an untied decoder) reads
tokens ``x (B, L)``, embeds them (``h = E[x]``, ``F.embedding``, ``(B, H, L)``), runs the same
blocks, decodes every position (``logits[b, t] = W h[b, :, t] + c``, ``F.linear``) and takes
the next-token cross-entropy over positions ``0 .. L-2`` (target ``x[:, t+1]``; position
``L-1`` has no target, so its logits get no gradient).

Families (the settings of :mod:`refimpl.activations`):

- ``gelu``: exact GELU (``torch.nn.functional.gelu``).
- ``binary``: ``Theta(y)`` (``y >= 0``), atan surrogate ``g(z) = (a/2) / (1 + (pi a z / 2)^2)``,
  ``a = 2``, through a ``torch.autograd.Function``; no threshold.
- ``lif``: hard reset, ``tau = 0.125``, ``theta = 1``, ``h_t = tau u_{t-1} + v_t``,
  ``s_t = Theta(h_t - 1)``, ``u_t = h_t (1 - s_t)``; triangle surrogate (``w = 1``); a Python
  loop over time, differentiated through the reset (refimpl's ``grad_mode="bptt"``).
- ``refractory``: ``tau = 0.5``, ``u_t = h_t - (1 + rho) s_t``, ``rho (H,)`` trainable and
  clamped to ``>= 0`` after each optimizer step; loop over time.
- ``sdn``: ``m = SDN(v)`` under ``torch.no_grad()`` (a causal ``conv1d`` over the previous 8
  inputs, ReLU, a 1x1 layer with a residual, ReLU, a 1x1 read-out: the fused published
  network), ``s = Theta(m + v - 1)``, triangle surrogate, no gradient through ``m``.

AdamW (``torch.optim.AdamW``, betas 0.9 / 0.999, eps 1e-8) with refimpl's parameter groups
(:func:`refimpl.model.optimizer_rules` through :func:`refimpl.optim.make_groups`, handed over
as plain name lists so this file needs only torch and numpy).

Use: :class:`TorchModel` (``params`` dict name -> numpy array, ``buffers`` for the SDN weights,
``dtype``) or :class:`TorchLM` (:data:`HEADS`), :meth:`TorchModel.loss` and :func:`make_step`.
``python torch_model.py --check`` compares loss and gradients with refimpl for both heads
(needs refimpl importable) and prints JSON;
``python torch_model.py --worker`` serves the timing protocol of ``benchmarks/peers/run.py``
(JSON lines on stdin/stdout).
"""
import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = ("gelu", "binary", "lif", "sdn", "refractory")
#: Family -> (threshold scaling y / exp(ln_vth), neuron settings).
SETTINGS = {
    "gelu": (False, None),
    "binary": (False, dict(theta=0.0, surrogate="atan", scale=2.0)),
    "lif": (True, dict(tau=0.125, theta=1.0, surrogate="triangle", scale=1.0)),
    "sdn": (True, dict(theta=1.0, surrogate="triangle", scale=1.0)),
    "refractory": (True, dict(tau=0.5, theta=1.0, surrogate="triangle", scale=1.0)),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
LN_EPS = 1e-5
SDN_K = 8
#: When a list, every spike test appends ``(min |z|, spikes, tests)`` (the correctness check).
MARGINS = None
#: Deliberate model errors for the check's negative controls (never set when timing):
#: ``"ln_eps"`` LayerNorm eps 1e-6 instead of 1e-5, ``"detach_reset"`` no gradient through
#: the reset (snntorch's default, not refimpl's bptt); language model: ``"lm_roll"`` the
#: targets shifted with ``torch.roll`` (position ``L-1`` then predicts token 0 and enters the
#: loss), ``"lm_mean_all"`` the loss summed over the ``L-1`` scored positions but divided by
#: all ``B L`` (each an error at one position in ``L``: the subtle off-by-ones of a shift).
VARIANT = ""


def surrogate_grad(name, z, scale):
    """``g(z)``: ``triangle`` ``max(0, 1 - |z|/w) / w``; ``atan`` ``(a/2) / (1 + (pi a z/2)^2)``."""
    if name == "triangle":
        return torch.clamp(1.0 - z.abs() / scale, min=0.0) / scale
    v = (0.5 * math.pi * scale) * z
    return (0.5 * scale) / (1.0 + v * v)


class Spike(torch.autograd.Function):
    """``Theta(z)`` (``z >= 0``) forward, the surrogate ``g(z)`` backward."""

    @staticmethod
    def forward(ctx, z, name, scale):
        ctx.save_for_backward(z)
        ctx.name, ctx.scale = name, scale
        if MARGINS is not None:
            MARGINS.append((float(z.detach().abs().min()), float((z >= 0).sum()), z.numel()))
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, ds):
        (z,) = ctx.saved_tensors
        return ds * surrogate_grad(ctx.name, z, ctx.scale), None, None


def s4d_kernel(log_dt, log_A_real, A_imag, C_re, C_im, L):
    """``K[h, l] = 2 Re sum_n C dB exp(l dt A)`` with ZOH ``dB = (exp(dt A) - 1) / A``: (H, L)."""
    dt = torch.exp(log_dt)[:, None]  # (H, 1)
    A = torch.complex(-torch.exp(log_A_real), A_imag)  # (H, N2)
    dtA = dt * A  # (H, N2)
    C = torch.complex(C_re, C_im) * (torch.exp(dtA) - 1.0) / A  # (H, N2)
    l = torch.arange(L, dtype=log_dt.dtype)  # (L,)
    V = torch.exp(dtA[:, :, None] * l)  # (H, N2, L) the Vandermonde matrix
    return 2.0 * torch.einsum("hn,hnl->hl", C, V).real  # (H, L)


def fftconv(u, K, D):
    """Causal convolution by FFT of length 2L plus the skip: ``u (B, H, L)``, ``K (H, L)``."""
    L = u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)
    return y[..., :L] + D[:, None] * u


def lif_loop(v, tau, theta, name, scale, rho=None):
    """The iterative neuron over time, ``v (B, H, L)``: hard reset (``rho`` None) or the
    refractory reset ``u = h - (theta + rho) s``; returns the spikes ``(B, H, L)``."""
    u = torch.zeros_like(v[..., 0])  # (B, H)
    out = []
    for t in range(v.shape[-1]):
        h = tau * u + v[..., t]
        s = Spike.apply(h - theta, name, scale)
        if VARIANT == "detach_reset":
            s = s.detach()
        u = h * (1.0 - s) if rho is None else h - (theta + rho) * s
        out.append(s)
    return torch.stack(out, -1)


def sdn_predict(v, w):
    """The fused SDN's prediction ``m (B, H, L)`` of ``v`` from ``v[t-8 .. t-1]`` (no grad)."""
    Bsz, H, L = v.shape
    x = F.pad(v.reshape(Bsz * H, 1, L), (SDN_K, 0))  # (BH, 1, K + L)
    a1 = F.conv1d(x, w["w0"], w["w1"])[..., :L]  # (BH, C, L): reads x[t-K .. t-1]
    h1 = torch.relu(a1)
    h2 = torch.relu(F.conv1d(h1, w["w2"], w["w3"]) + h1)  # (BH, C, L)
    return F.conv1d(h2, w["w4"], w["w5"]).reshape(Bsz, H, L)  # (B, H, L)


class TorchModel:
    """The classifier with refimpl's parameters (``name -> tensor`` leaves in ``self.p``)."""

    def __init__(self, family, n_layers, params, buffers=None, dtype="float64"):
        if family not in SETTINGS:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        self.family, self.n_layers = family, n_layers
        self.dtype = DTYPES[dtype]
        self.p = {k: torch.tensor(np.asarray(v), dtype=self.dtype, requires_grad=True)
                  for k, v in params.items()}
        self.sdn = {k[4:]: torch.tensor(np.asarray(v), dtype=self.dtype)
                    for k, v in (buffers or {}).items() if k.startswith("sdn.")}
        if family == "sdn" and len(self.sdn) != 6:
            raise ValueError("family 'sdn' needs buffers sdn.w0 .. sdn.w5 (refimpl init_model)")

    def activation(self, v, pre):
        threshold, nrn = SETTINGS[self.family]
        if self.family == "gelu":
            return F.gelu(v)
        if self.family == "binary":
            return Spike.apply(v - nrn["theta"], nrn["surrogate"], nrn["scale"])
        if self.family == "sdn":
            with torch.no_grad():
                m = sdn_predict(v, self.sdn)
            return Spike.apply(m + v - nrn["theta"], nrn["surrogate"], nrn["scale"])
        rho = self.p[pre + "rho"] if self.family == "refractory" else None
        return lif_loop(v, nrn["tau"], nrn["theta"], nrn["surrogate"], nrn["scale"], rho)

    def block(self, x, i):
        p, pre = self.p, f"layers.{i}."
        K = s4d_kernel(*(p[pre + "ssm." + k] for k in ("log_dt", "log_A_real", "A_imag",
                                                        "C_re", "C_im")), x.shape[-1])
        y = fftconv(x, K, p[pre + "ssm.D"])  # (B, H, L)
        if SETTINGS[self.family][0]:
            y = y / torch.exp(p[pre + "ln_vth"])[:, None]
        s = self.activation(y, pre)
        z = F.glu(F.conv1d(s, p[pre + "mix.W"][:, :, None], p[pre + "mix.b"]), dim=1)
        x = (x + z).transpose(1, 2)  # (B, L, H)
        x = F.layer_norm(x, x.shape[-1:], p[pre + "norm.gamma"], p[pre + "norm.beta"],
                         1e-6 if VARIANT == "ln_eps" else LN_EPS)
        return x.transpose(1, 2)  # (B, H, L)

    def logits(self, x):
        """``x (B, L, d_input)`` tensor -> ``(B, n_classes)``."""
        p = self.p
        h = (x @ p["encoder.W"].T + p["encoder.b"]).transpose(1, 2)  # (B, H, L)
        for i in range(self.n_layers):
            h = self.block(h, i)
        return h.mean(-1) @ p["decoder.W"].T + p["decoder.b"]

    def loss(self, x, labels):
        return F.cross_entropy(self.logits(x), labels)

    def batch(self, x, labels):
        """The arguments of :meth:`loss` as tensors: inputs in the model's dtype, labels."""
        return torch.tensor(x, dtype=self.dtype), torch.tensor(labels, dtype=torch.int64)

    def optimizer(self, groups):
        """AdamW over ``groups`` (refimpl.optim.make_groups' lists of names)."""
        names = [n for g in groups for n in g["params"]]
        if sorted(names) != sorted(self.p):
            raise ValueError("groups must name every parameter exactly once")
        return torch.optim.AdamW([{"params": [self.p[n] for n in g["params"]], "lr": g["lr"],
                                   "weight_decay": g["weight_decay"]} for g in groups],
                                 betas=(0.9, 0.999), eps=1e-8)

    def project(self):
        """``rho >= 0`` after an optimizer step (refimpl.model.project)."""
        with torch.no_grad():
            for k, t in self.p.items():
                if k.endswith(".rho"):
                    t.clamp_(min=0.0)


class TorchLM(TorchModel):
    """The language model with refimpl's parameters (``embedding.E`` ``(V, H)``, the blocks,
    ``decoder.W`` ``(V, H)``, ``decoder.b``): refimpl's ``head="lm"``, decoder untied."""

    def logits(self, tokens):
        """``tokens (B, L)`` int64 -> ``(B, L, V)``, position ``t`` predicting token ``t + 1``."""
        p = self.p
        h = F.embedding(tokens, p["embedding.E"]).transpose(1, 2)  # (B, H, L)
        for i in range(self.n_layers):
            h = self.block(h, i)
        return F.linear(h.transpose(1, 2), p["decoder.W"], p["decoder.b"])  # (B, L, V)

    def loss(self, tokens):
        """Mean next-token cross-entropy over positions ``0 .. L-2`` (nats)."""
        logits = self.logits(tokens)  # (B, L, V)
        if VARIANT == "lm_roll":
            return F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        if VARIANT == "lm_mean_all":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                                   reduction="sum") / tokens.numel()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    def batch(self, x, labels=None):
        """The argument of :meth:`loss`: the tokens (the targets are the tokens shifted)."""
        if labels is not None:
            raise ValueError("a language model's targets are its tokens shifted by one; "
                             "pass labels=None")
        return (torch.tensor(x, dtype=torch.int64),)


#: ``head`` (refimpl's ``ModelConfig.head``) -> the model class.
HEADS = {"classifier": TorchModel, "lm": TorchLM}


def make_step(model, groups, x, labels=None):
    """One training step (forward, backward, AdamW, projection) as a closure returning the loss
    (``labels`` None for a language model)."""
    opt = model.optimizer(groups)
    batch = model.batch(x, labels)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(*batch)
        loss.backward()
        opt.step()
        model.project()
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------------------------
# Correctness: the same loss and gradients as refimpl (float64)
# --------------------------------------------------------------------------------------------

#: Relative tolerance of the check, on the loss and on every gradient (max |diff| / max |ref|
#: per parameter). Why 1e-9: both sides run the same real-number computation in float64 with
#: different kernels and orders (numpy/scipy FFT vs torch's, refimpl's Vandermonde vs an exp
#: table, tensordot vs conv1d). The deepest chain is kernel -> FFT convolution (length 2L: about
#: log2(2L) <= 12 rounded butterfly levels, each a few ulps of the signal scale) -> 2 layers of
#: norm and GLU -> backward, the same again: a few hundred rounded operations in sequence,
#: amplified by one cancellation, ``exp(dt A) - 1`` in the ZOH ``dB`` computed as written here
#: (the S4D example code), which loses ``eps / |dt A|`` relative, <= 2.2e-16 / (1e-3 * 0.5) =
#: 4.4e-13 with dt >= 1e-3 and |A| >= 0.5. 1e3 x that bound is still 1e-9 scale; a real model
#: difference (a wrong constant, a missing term, the reset path dropped) gives 1e-3 or more.
#: Spiking families additionally need no spike decided within that error of its threshold:
#: the check reports the smallest margin |h - theta| it saw.
RTOL = 1e-9
#: Negative controls: deliberately wrong models the check must reject (family, VARIANT), of
#: the classifier and of the language model.
CONTROLS = (("gelu", "ln_eps"), ("lif", "detach_reset"))
LM_CONTROLS = (("gelu", "lm_roll"), ("lif", "lm_mean_all"))
#: Shapes of the check, per head: small enough that its cost is compilation (the LM's V is
#: the byte vocabulary of the timed model; L is short so that one position in L, what an LM
#: control gets wrong, weighs 3 %).
CHECK_SHAPES = {"classifier": dict(B=4, H=16, N=8, L=64),
                "lm": dict(B=3, H=16, N=8, L=32, V=256)}


def _bench_sdn_weights():
    """The SDN weights every benchmark uses (benchmarks/bench_training.py: published or random)."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench_training import sdn_weights
    return sdn_weights()


def refimpl_reference(family, head="classifier", shape=None, n_layers=2, seed=0,
                      sdn_weights=None):
    """refimpl's side of the check: ``(params, buffers, x, labels, loss, grads)`` (float64) at
    ``shape`` (``B, H, N, L``, and ``V`` for the LM; default :data:`CHECK_SHAPES`); the LM's
    ``x`` is tokens drawn uniformly, its ``labels`` None."""
    from refimpl import model as M

    s = shape or CHECK_SHAPES[head]
    size = dict(d_model=s["H"], d_state=s["N"], n_layers=n_layers, activation=family)
    cfg = (M.ModelConfig.for_lm(s["V"], **size) if head == "lm"
           else M.ModelConfig(n_classes=10, d_input=1, **size))
    if family == "sdn" and sdn_weights is None:
        sdn_weights = _bench_sdn_weights()
    p, buf = M.init_model(cfg, seed, sdn_weights=sdn_weights if family == "sdn" else None)
    rng = np.random.default_rng(seed)
    if head == "lm":
        x, labels = rng.integers(0, s["V"], (s["B"], s["L"])), None  # (B, L) int64 tokens
    else:
        x = rng.standard_normal((s["B"], s["L"], 1))  # (B, L, 1)
        labels = rng.integers(0, 10, s["B"]).astype(np.int64)
    loss, _, g, _, _ = M.loss_and_grads(cfg, p, buf, x, labels, training=True)
    return p, buf, x, labels, loss, g


def compare(family, n_layers, p, buf, x, labels, loss_r, g_r, variant="", head="classifier"):
    """Loss and gradient errors of this model (float64, loaded with ``p``, ``buf``) against
    refimpl's ``loss_r`` and gradients ``g_r`` on the batch ``x, labels`` (labels None for
    ``head="lm"``).

    ``variant`` runs a deliberately wrong model (:data:`VARIANT`): the check must fail then.
    """
    global MARGINS, VARIANT
    tm = HEADS[head](family, n_layers, p, buf, "float64")
    MARGINS, VARIANT = [], variant
    try:
        loss_t = tm.loss(*tm.batch(x, labels))
        loss_t.backward()
        margin = min(m[0] for m in MARGINS) if MARGINS else None
        rate = (sum(m[1] for m in MARGINS) / sum(m[2] for m in MARGINS)) if MARGINS else None
    finally:
        MARGINS, VARIANT = None, ""
    loss_t = float(loss_t.detach())
    grads = {}
    for k, ref in g_r.items():
        got = tm.p[k].grad if k in tm.p else None
        got = np.zeros_like(ref) if got is None else got.numpy()
        scale = float(np.abs(ref).max())
        grads[k] = float(np.abs(got - ref).max()) / (scale if scale > 0 else 1.0)
    worst = max(grads, key=grads.get)
    loss_err = abs(loss_t - loss_r) / abs(loss_r)
    B, L = x.shape[:2]
    H, N2 = p["layers.0.ssm.C_re"].shape
    shape = dict(B=B, H=H, N=2 * N2, L=L, layers=n_layers)
    if head == "lm":
        shape["V"] = p["embedding.E"].shape[0]
    return {"family": family, "head": head, "variant": variant, "shape": shape,
            "loss_refimpl": float(loss_r), "loss_torch": loss_t, "loss_rel_err": loss_err,
            "grad_rel_err_max": grads[worst], "grad_worst": worst,
            "min_spike_margin": margin, "spike_rate": rate,
            "missing": sorted(set(g_r) ^ set(tm.p)), "rtol": RTOL,
            "ok": loss_err <= RTOL and grads[worst] <= RTOL and set(g_r) == set(tm.p)}


def check_against_refimpl(family, head="classifier", shape=None, n_layers=2, seed=0,
                          sdn_weights=None, variant=""):
    """:func:`compare` with :func:`refimpl_reference` (needs refimpl importable)."""
    p, buf, x, labels, loss, g = refimpl_reference(family, head, shape, n_layers, seed,
                                                   sdn_weights)
    return compare(family, n_layers, p, buf, x, labels, loss, g, variant, head)


# --------------------------------------------------------------------------------------------
# Worker: the timing protocol of benchmarks/peers/run.py
# --------------------------------------------------------------------------------------------


def serve(inp=sys.stdin, out=sys.stdout):
    """JSON lines: ``{"cmd": "setup", "key", "npz", "family", "n_layers", "dtype", "groups",
    "head"}`` builds a model (``head`` :data:`HEADS`, default ``"classifier"``) and its step
    from an ``.npz`` (``p.<name>``, ``buf.<name>``, ``x``, and ``labels`` unless a language
    model); ``{"cmd": "step", "key"}`` runs one step and answers ``{"seconds", "loss"}``;
    ``{"cmd": "drop", "key"}`` frees it; ``{"cmd": "compare", "npz", "family", "n_layers",
    "variant", "head"}`` runs :func:`compare` (the npz also holds ``loss`` and ``g.<name>``);
    ``{"cmd": "info"}`` answers versions and threads."""
    steps = {}
    for line in inp:
        req = json.loads(line)
        cmd = req["cmd"]
        head = req.get("head", "classifier")
        try:
            if cmd == "info":
                ans = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "interop_threads": torch.get_num_interop_threads()}
            elif cmd == "setup":
                p, buf, x, labels, _, _ = _read_npz(req["npz"])
                tm = HEADS[head](req["family"], req["n_layers"], p, buf, req["dtype"])
                steps[req["key"]] = make_step(tm, req["groups"], x, labels)
                ans = {}
            elif cmd == "compare":  # npz as setup, plus loss and g.<name> (refimpl's)
                p, buf, x, labels, loss, g = _read_npz(req["npz"])
                ans = compare(req["family"], req["n_layers"], p, buf, x, labels, loss, g,
                              req.get("variant", ""), head)
            elif cmd == "step":
                t0 = time.perf_counter()
                loss = steps[req["key"]]()
                ans = {"seconds": time.perf_counter() - t0, "loss": loss}
            elif cmd == "drop":
                steps.pop(req["key"], None)
                ans = {}
            else:
                raise ValueError(f"unknown cmd {cmd!r}")
        except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
            ans = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(ans) + "\n")
        out.flush()


def _read_npz(path):
    """``(params, buffers, x, labels, loss, grads)`` of a worker request's ``.npz``; ``labels``
    None when absent (a language model), ``loss`` None and ``grads`` empty for a setup."""
    with np.load(path) as f:
        p = {k[2:]: f[k] for k in f.files if k.startswith("p.")}
        buf = {k[4:]: f[k] for k in f.files if k.startswith("buf.")}
        g = {k[2:]: f[k] for k in f.files if k.startswith("g.")}
        labels = f["labels"] if "labels" in f.files else None
        loss = float(f["loss"]) if "loss" in f.files else None
        return p, buf, f["x"], labels, loss, g


def _shape(ap, arg, default):
    """``"4,16,8,64"`` -> ``{"B": 4, "H": 16, ...}`` in the keys of ``default``; None ->
    ``default``."""
    if arg is None:
        return default
    vals = arg.split(",")
    if len(vals) != len(default) or not all(v.strip().isdigit() for v in vals):
        ap.error(f"a check shape is {','.join(default)} (integers), got {arg!r}")
    return dict(zip(default, (int(v) for v in vals)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare loss and gradients with refimpl (float64), print JSON lines; "
                         "exit 1 on a mismatch")
    ap.add_argument("--family", action="append", choices=FAMILIES)
    ap.add_argument("--head", action="append", choices=sorted(HEADS),
                    help="check this head only (repeatable; default both)")
    ap.add_argument("--shape", default=None,
                    help="B,H,N,L of the classifier's check (default 4,16,8,64)")
    ap.add_argument("--lm-shape", default=None,
                    help="B,H,N,L,V of the language model's check (default 3,16,8,32,256)")
    ap.add_argument("--variant", default="",
                    choices=["", "ln_eps", "detach_reset", "lm_roll", "lm_mean_all"],
                    help="check a deliberately wrong model (a negative control: must fail)")
    ap.add_argument("--controls", action="store_true",
                    help="with --check: also run the negative controls (CONTROLS, "
                         "LM_CONTROLS), which must fail the check; exit 1 when one passes")
    ap.add_argument("--worker", action="store_true", help="serve run.py's timing protocol")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        serve()
        return 0
    if args.check:
        shapes = {"classifier": _shape(ap, args.shape, CHECK_SHAPES["classifier"]),
                  "lm": _shape(ap, args.lm_shape, CHECK_SHAPES["lm"])}
        controls = {"classifier": CONTROLS, "lm": LM_CONTROLS}
        ok = True
        for head in args.head or HEADS:
            for fam in args.family or FAMILIES:
                r = check_against_refimpl(fam, head, shapes[head], variant=args.variant)
                ok &= r["ok"]
                print(json.dumps(r), flush=True)
            for fam, variant in controls[head] if args.controls else ():
                r = check_against_refimpl(fam, head, shapes[head], variant=variant)
                ok &= not r["ok"]
                print(json.dumps({**r, "control": True}), flush=True)
        return 0 if ok else 1
    ap.error("give --check or --worker")


if __name__ == "__main__":
    sys.exit(main())
