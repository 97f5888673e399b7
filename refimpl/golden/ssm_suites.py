"""Golden suites of the S4D kernel, the FFT convolution and the S4D layer (DESIGN.md 2-3).

Their tolerance model propagates magnitudes: ``scale`` is the same op on absolute values (the
convolution of ``|K|`` with ``|u|``; every quantity of the kernel's backward with moduli), so
cancellation cannot shrink a bound below the rounding of the terms (SCHEMA.md, Tolerance policy).
"""
import math

import numpy as np

from ..conv import fft_length, fftconv, fftconv_bwd
from ..ssm import (DISCRETIZATIONS, KERNEL_PARAMS, discretize_params, s4d_init, s4d_kernel)
from .registry import Spec, maxabs, register


# ---- S4D kernel ------------------------------------------------------------------------------

def _ssm_params(rng, H, N, init="lin", dt=None, bidirectional=False, trainable_B=False, D=True):
    lo, hi = (1e-3, 1e-1) if dt is None else (dt, dt)
    p = s4d_init(H, N, init=init, seed=rng, dt_min=lo, dt_max=hi, trainable_B=trainable_B,
                 bidirectional=bidirectional)
    if trainable_B:  # move B away from 1 so its gradient is exercised in general position
        p["B_re"] = p["B_re"] + 0.3 * rng.normal(size=p["B_re"].shape)
        p["B_im"] = 0.3 * rng.normal(size=p["B_im"].shape)
    if not D:
        del p["D"]
    return p


def _round_float32(*groups):
    """Round every array of the dicts to float32 in place, kept as float64 (so exact in both)."""
    for g in groups:
        for k, v in g.items():
            g[k] = np.asarray(v, dtype=np.float32).astype(np.float64)


#: ``float32_resolution`` regimes, appended to ``s4d_kernel`` and ``s4d_layer`` (v1): (comment,
#: disc, init, dt, bidirectional, trainable_B); H = 4, N = 4, L = 16 (kernel) / B = 1, L = 8
#: (layer). ``Re(dt A) <= -1``: ``|exp(dt A)| <= 1/e`` and ``|exp(dt A) - 1| >= 1 - 1/e``, so the
#: subtraction does not cancel and an implementation that subtracts instead of using ``expm1``
#: agrees with a careful one to a few float32 ulps; the S4D tolerance model (unchanged) is then
#: within a small factor of the tensors, and at float32 ``atol_32 / max|ref|`` stays below
#: 1e-3 for every output and gradient (SCHEMA.md, Precision profiles). Inputs and parameters
#: are rounded to float32 after drawing (stored as float64, exact in both): input rounding is
#: zero for them (cotangents are drawn as in every case).
F32_REGIMES = (
    ("zoh, S4D-Lin, dt = 5", "zoh", "lin", 5.0, False, False),
    ("zoh, S4D-Lin, dt = 5, trainable B, bidirectional", "zoh", "lin", 5.0, True, True),
    ("bilinear, S4D-Inv, dt = 2, trainable B", "bilinear", "inv", 2.0, False, True),
    ("bilinear, S4D-Real, dt = 1.5, bidirectional", "bilinear", "real", 1.5, True, False),
)
F32_NOTE = ("float32 resolution: inputs and params drawn, then rounded to float32 (stored as "
            "float64, exact in both)")


def _ssm_config(disc, init, L, H, N, trainable_B=False, bidirectional=False):
    return dict(disc=disc, init=init, L=int(L), trainable_B=bool(trainable_B),
                bidirectional=bool(bidirectional), H=int(H), N=int(N))


def _kernel_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), disc="zoh", init="lin", H=2, N=8, L=32, dt=None, bi=False, tb=False,
            result="valid", edit=None):
        rng = rngs()
        p = _ssm_params(rng, H, N, init, dt, bi, tb, D=False)
        cfg = _ssm_config(disc, init, L, H, N, tb, bi)
        if edit:
            edit(p, cfg)
        out.append(Spec(comment, list(flags), cfg, {}, p, result))

    for init in ("lin", "inv", "real"):
        for disc in ("zoh", "bilinear"):
            add(f"init {init}, disc {disc}", ["default"] if (init, disc) == ("lin", "zoh") else [],
                disc, init, L=32 * big)
    add("trainable B (B_re, B_im moved off 1), zoh", disc="zoh", tb=True, L=32 * big)
    add("trainable B, bilinear, S4D-Inv", disc="bilinear", init="inv", tb=True, L=32 * big)
    add("bidirectional: C (2, H, N2), K (2, H, L); both directions share A, dt", bi=True,
        L=32 * big)
    add("bidirectional, bilinear, S4D-Real, trainable B", disc="bilinear", init="real", bi=True,
        tb=True, L=32 * big)
    add("dt = 1e-6 (zoh): exp(dt A) - 1 cancels unless computed as expm1", ["extreme_dt"], dt=1e-6)
    add("dt = 1e-6 (bilinear)", ["extreme_dt"], disc="bilinear", init="inv", dt=1e-6)
    add("dt = 5 with S4D-Inv: |dt A_imag| up to ~90 rad, fast oscillation and decay",
        ["extreme_dt"], init="inv", dt=5.0)
    add("dt = 5, bilinear, S4D-Real: dA near -1 for large |dt A|", ["extreme_dt"],
        disc="bilinear", init="real", dt=5.0)
    add("long kernel: running powers dA^l over 4096 steps", ["long_sequence"], H=1, N=4,
        L=4096 * big, dt=1e-3)
    add("L = 1: K[h, 0] = 2 Re sum_n C dB", ["short_sequence"], L=1)
    add("one complex mode (N = 2), odd L", N=2, L=7)

    def nan(p, cfg):
        p["log_dt"][1] = np.nan

    add("NaN in log_dt: must be rejected", ["nan_input"], result="invalid", edit=nan)

    def l0(p, cfg):
        cfg["L"] = 0

    add("L = 0: must be rejected", ["invalid_config"], result="invalid", edit=l0)

    def f32(p, cfg):
        _round_float32(p)

    for comment, disc, init, dt, bi, tb in F32_REGIMES:
        add(f"{F32_NOTE}; {comment}", ["float32_resolution"], disc, init, H=4, N=4, L=16, dt=dt,
            bi=bi, tb=tb, edit=f32)
    return out


def _kernel_abs_scales(p, disc, L, dK_abs, tight):
    """Magnitudes of the terms of the kernel and its backward (per output / grad name).

    Every quantity of :func:`refimpl.ssm.s4d_kernel_bwd` is propagated with absolute values
    (``Q0 -> sum_l |dK_l| |dA|^l``, ``Q1 -> sum_l l |dK_l| |dA|^(l-1)``, products of moduli), so
    cancellation cannot shrink the bound below the rounding of the terms. Unless ``tight``, the
    ZOH terms also carry the magnitudes of DESIGN.md's formula as written,
    ``dB = (exp(dt A) - 1) / A B`` (``(|exp(dt A)| + 1) / |A|``): an implementation that
    subtracts instead of using ``expm1`` loses ``eps / |dt A|`` relative and is accepted at
    ordinary ``dt``; the ``extreme_dt`` cases are ``tight`` and catch it.
    """
    dt = np.exp(p["log_dt"])[:, None]  # (H, 1)
    A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]  # (H, N2)
    B = p["B_re"] + 1j * p["B_im"] if "B_re" in p else np.ones_like(A)
    dA, dB, part = DISCRETIZATIONS[disc](dt, A, B, partials=True)
    a = {k: np.abs(v) for k, v in part.items()}
    mdB = np.abs(dB)
    if disc == "zoh" and not tight:
        E, aA, aB = np.abs(dA), np.abs(A), np.abs(B)
        mdB = np.maximum(mdB, (E + 1.0) / aA * aB)
        a["dB_dA"] = np.maximum(a["dB_dA"], (dt * E / aA + (E + 1.0) / aA**2) * aB)
        a["dB_dB"] = np.maximum(a["dB_dB"], (E + 1.0) / aA)
    C = np.abs(p["C_re"] + 1j * p["C_im"])  # (H, N2) or (2, H, N2)
    z = np.broadcast_to(np.abs(dA), C.shape)
    mW = C * mdB
    out = {"outputs/K": 2.0 * float(mW.sum(-1).max())}
    if dK_abs is None:
        return out
    dK = np.abs(dK_abs).reshape(C.shape[:-1] + (1, -1))  # (..., H, 1, L)
    l = np.arange(dK.shape[-1])
    zl = z[..., None] ** l  # (..., H, N2, L)
    P0 = (dK * zl).sum(-1)  # (..., H, N2)
    P1 = (dK * l * np.concatenate([np.zeros_like(zl[..., :1]), zl[..., :-1]], -1)).sum(-1)
    g_W = 2.0 * P0
    g_z = 2.0 * mW * P1
    g_dB = C * g_W
    if C.ndim == 3:
        g_z, g_dB = g_z.sum(0), g_dB.sum(0)
    g_A = a["dA_dA"] * g_z + a["dB_dA"] * g_dB  # (H, N2)
    g_dt = (a["dA_ddt"] * g_z + a["dB_ddt"] * g_dB).sum(1)  # (H,)
    out.update({
        "grads/log_dt": float((dt[:, 0] * g_dt).max()),
        "grads/log_A_real": float((np.exp(p["log_A_real"]) * g_A).max()),
        "grads/A_imag": float(g_A.max()),
        "grads/C_re": float((mdB * g_W).max()),
        "grads/C_im": float((mdB * g_W).max()),
    })
    if "B_re" in p:
        out["grads/B_re"] = out["grads/B_im"] = float((a["dB_dB"] * g_dB).max())
    return out


def _kernel_scales(case, outputs, grads, cot):
    tight = "extreme_dt" in case.flags
    s = _kernel_abs_scales(case.group("params"), case.config["disc"], case.config["L"], cot["K"],
                           tight)
    return {k: max(v, maxabs(outputs[k[8:]]) if k.startswith("outputs/") else maxabs(grads[k[6:]]))
            for k, v in s.items()}


register(
    name="s4d_kernel",
    math="K[h, l] = 2 Re sum_n C dB dA^l",
    specs=_kernel_specs,
    scales=_kernel_scales,
)


# ---- FFT convolution -------------------------------------------------------------------------


def _decaying_kernel(rng, shape, L):
    l = np.arange(L)
    rate = rng.uniform(0.02, 0.3, size=shape[:-1] + (1,))
    return rng.normal(size=shape) * np.exp(-rate * l)


def _fftconv_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=2, L=32, bi=False, result="valid", edit=None):
        rng = rngs()
        u = rng.normal(size=(B, H, L))
        K = _decaying_kernel(rng, (2, H, L) if bi else (H, L), L)
        D = rng.normal(size=H)
        inputs, params = {"u": u}, {"K": K, "D": D}
        if edit:
            edit(inputs, params)
        out.append(Spec(comment, list(flags), {"bidirectional": bool(bi)}, inputs, params, result))

    add("causal convolution with D skip", ["default"], L=32 * big)
    add("bidirectional: K (2, H, L), anticausal half K1[s - t - 1]", bi=True, L=32 * big)
    add("L = 1", ["short_sequence"], L=1)
    add("odd L = 7, bidirectional", bi=True, L=7)
    add("L = 1000: FFT length 2000 (5-smooth, not a power of two)", ["non_power_of_two"], B=1,
        L=1000)
    add("long sequence, L = 4096", ["long_sequence"], B=1, H=1, L=4096 * big)

    def zero_u(i, p):
        i["u"][:] = 0.0

    add("all-zero input: y = 0 and dK = 0, dD = 0", ["all_zero"], edit=zero_u)

    def white(i, p):
        p["K"] = np.random.default_rng(7).normal(size=p["K"].shape)

    add("non-decaying white-noise kernel (no cancellation shortcut)", edit=white)

    def nan(i, p):
        i["u"][0, 1, 3] = np.nan

    add("NaN in u: must be rejected", ["nan_input"], result="invalid", edit=nan)

    def bad(i, p):
        p["K"] = np.concatenate([p["K"], p["K"][:, :1]], axis=1)

    add("K longer than u (H, L + 1): must be rejected", ["bad_shape"], result="invalid", edit=bad)
    return out


def fft_depth(L):
    """Rounding depth of a forward and an inverse FFT of length ``fft_length(L)``."""
    return 2 * int(math.ceil(math.log2(fft_length(L))))


def _abs_scales(case, K, cot):
    """Scales of a convolution's outputs and grads: the same op on absolute values."""
    u, D = np.abs(case.data["inputs/u"]), np.abs(case.data["params/D"])
    K = np.abs(K)
    y = fftconv(u, K, D)
    du, dK, dD = fftconv_bwd(u, K, D, np.abs(cot["y"]))
    return {"outputs/y": maxabs(y), "grads/u": maxabs(du), "grads/K": maxabs(dK),
            "grads/D": maxabs(dD)}


def _fftconv_scales(case, outputs, grads, cot):
    return _abs_scales(case, case.data["params/K"], cot)


register(
    name="fftconv",
    math="y[t] = sum_{s<=t} K0[t-s] u[s] (+ sum_{s>t} K1[s-t-1] u[s]) + D u[t]",
    specs=_fftconv_specs,
    scales=_fftconv_scales,
)


# ---- S4D layer -------------------------------------------------------------------------------


def _layer_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), disc="zoh", init="lin", B=2, H=2, N=8, L=32, dt=None, bi=False,
            tb=False, result="valid", edit=None, state=None):
        rng = rngs()
        p = _ssm_params(rng, H, N, init, dt, bi, tb, D=True)
        u = rng.normal(size=(B, H, L))
        cfg = _ssm_config(disc, init, L, H, N, tb, bi)
        inputs = {"u": u}
        if state is not None:  # stateful cases (appended): x0 = scale * N(0, 1) complex modes
            inputs["x0_re"] = state * rng.normal(size=(B, H, N // 2))
            inputs["x0_im"] = state * rng.normal(size=(B, H, N // 2))
        if edit:
            edit(inputs, p)
        out.append(Spec(comment, list(flags), cfg, inputs, p, result))

    for init in ("lin", "inv", "real"):
        for disc in ("zoh", "bilinear"):
            add(f"init {init}, disc {disc}", ["default"] if (init, disc) == ("lin", "zoh") else [],
                disc, init, L=32 * big)
    add("trainable B", tb=True, L=32 * big)
    add("bidirectional", bi=True, L=32 * big)
    add("bidirectional, bilinear, trainable B", disc="bilinear", init="inv", bi=True, tb=True)
    add("long sequence L = 2048", ["long_sequence"], B=1, H=1, N=4, L=2048 * big)
    add("dt = 1e-6: tiny dB, the D skip dominates", ["extreme_dt"], dt=1e-6)
    add("L = 1", ["short_sequence"], L=1)

    def zero(i, p):
        i["u"][:] = 0.0

    add("all-zero input", ["all_zero"], edit=zero)

    def nan(i, p):
        p["C_re"][0, 0] = np.nan

    add("NaN in C_re: must be rejected", ["nan_input"], result="invalid", edit=nan)

    def f32(i, p):
        _round_float32(i, p)

    for comment, disc, init, dt, bi, tb in F32_REGIMES:
        add(f"{F32_NOTE}; {comment}", ["float32_resolution"], disc, init, B=1, H=4, N=4, L=8,
            dt=dt, bi=bi, tb=tb, edit=f32)
    _layer_stateful_specs(add)
    return out


#: Flags of the stateful S4D layer cases: no cotangents or grads (``no_grads``): refimpl has no
#: backward from a nonzero state (``s4d_layer_bwd`` raises NotImplementedError), and a
#: streaming kernel is an inference kernel.
LAYER_STATE_FLAGS = ["stateful", "no_grads"]


def _layer_stateful_specs(add):
    """Stateful cases (DESIGN.md 10; appended to schema v1, the cases above are unchanged):
    ``inputs/x0_re, x0_im (B, H, N2)`` -> ``outputs/y`` and the end state ``outputs/x_re,
    x_im``. Causal only; ``T = L = 1`` is one step of the recurrence (the form a chip runs)."""
    f = LAYER_STATE_FLAGS
    add("stateful: one step (L = 1) from a state, zoh, S4D-Lin: y_0 = 2 Re sum C dA x0 + "
        "(C dB + D) u_0, x = dA x0 + dB u_0", f + ["short_sequence"], L=1, state=1.0)
    add("stateful: one step (L = 1), bilinear, S4D-Inv, trainable B", f + ["short_sequence"],
        disc="bilinear", init="inv", tb=True, L=1, state=1.0)
    add("stateful: one step (L = 1), zoh, S4D-Real, B = 3", f + ["short_sequence"], init="real",
        B=3, L=1, state=0.5)
    add("stateful: L = 8 chunk from a state, zoh, S4D-Lin", f, L=8, state=1.0)
    add("stateful: L = 32 chunk, bilinear, S4D-Real, trainable B", f, disc="bilinear",
        init="real", tb=True, L=32, state=2.0)
    add("stateful: L = 32 chunk, zoh, S4D-Inv, N = 4", f, init="inv", N=4, L=32, state=1.0)
    add("stateful: long chunk L = 512, dt = 1e-3 (slow modes near dA = 1: the state decays "
        "little; a recurrence accumulates L rounded steps)", f + ["long_sequence"], B=1, H=1,
        N=4, L=512, dt=1e-3, state=1.0)

    def zero_u(i, p):
        i["u"][:] = 0.0

    add("stateful: all-zero input: y is the free response of the state, x = dA^L x0",
        f + ["all_zero"], L=16, state=1.0, edit=zero_u)
    add("stateful: a bidirectional layer has no streaming state: must be rejected",
        f + ["invalid_config"], bi=True, L=8, state=1.0, result="invalid")

    def nan_state(i, p):
        i["x0_im"][0, 1, 0] = np.nan

    add("stateful: NaN in the initial state x0_im: must be rejected", f + ["nan_input"], L=8,
        state=1.0, result="invalid", edit=nan_state)


def _layer_state(case):
    """The initial modes ``x0`` complex128 (B, H, N2) of a stateful case (None otherwise)."""
    if "inputs/x0_re" not in case.data:
        return None
    return case.data["inputs/x0_re"] + 1j * case.data["inputs/x0_im"]  # (B, H, N2)


def _layer_depth(case):
    Bsz, H, L = case.data["inputs/u"].shape
    N2 = case.data["params/log_A_real"].shape[1]
    f = fft_depth(L)
    if _layer_state(case) is not None:
        # y: the convolution plus the state term's N2-term Vandermonde sum; the end state: an
        # L-term sum of u against the powers (or L dependent recurrence steps) plus dA^L x0
        return {"*": L + 2 * N2 + f, "outputs/x_re": L + 1, "outputs/x_im": L + 1}
    return {"*": L + N2 + f, "grads/*": Bsz * L + L + N2 + f}


def _layer_state_scales(case, outputs):
    """Scales of a stateful case: every term with moduli. ``y``: ``|K| * |u| + |D| |u|`` (the
    kernel's own magnitude as for the stateless cases) ``+ 2 sum_n |C| |dA|^(t+1) |x0|``; the
    end state: ``sum_s |dA|^(T-1-s) |dB| |u_s| + |dA|^T |x0|``."""
    p = case.group("params")
    disc, L = case.config["disc"], case.config["L"]
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    u = np.abs(case.data["inputs/u"])  # (B, H, L)
    Kmag = _kernel_abs_scales(p, disc, L, None, "extreme_dt" in case.flags)["outputs/K"]
    K = s4d_kernel(*[p[k] for k in KERNEL_PARAMS], L, disc=disc, **B)  # (H, L)
    ratio = max(1.0, Kmag / max(maxabs(K), 1e-300))
    conv = fftconv(u, np.abs(K), np.abs(p["D"])) * ratio  # (B, H, L)
    dA, dB = discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"], B.get("B_re"),
                               B.get("B_im"), disc)
    z = np.abs(dA)  # (H, N2)
    x0 = np.abs(_layer_state(case))  # (B, H, N2)
    C = np.abs(p["C_re"] + 1j * p["C_im"])  # (H, N2)
    t = np.arange(L)
    zt = z[:, :, None] ** (t + 1)  # (H, N2, L)
    state_term = 2.0 * np.einsum("hn,hnl,bhn->bhl", C, zt, x0)  # (B, H, L)
    powers = z[:, :, None] ** (L - 1 - t)  # (H, N2, L)
    x_mag = np.abs(dB)[None] * np.einsum("bhl,hnl->bhn", u, powers) + z[None] ** L * x0
    xs = max(maxabs(x_mag), maxabs(outputs["x_re"]), maxabs(outputs["x_im"]))
    return {"outputs/y": max(maxabs(conv + state_term), maxabs(outputs["y"])),
            "outputs/x_re": xs, "outputs/x_im": xs}


def _layer_scales(case, outputs, grads, cot):
    if _layer_state(case) is not None:
        return _layer_state_scales(case, outputs)
    p = case.group("params")
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    K = s4d_kernel(*[p[k] for k in KERNEL_PARAMS], case.config["L"], disc=case.config["disc"], **B)
    s = _abs_scales(case, K, cot)
    _, dK_abs, _ = fftconv_bwd(np.abs(case.data["inputs/u"]), np.abs(K), np.abs(p["D"]),
                               np.abs(cot["y"]))
    k = _kernel_abs_scales(p, case.config["disc"], case.config["L"], dK_abs,
                           "extreme_dt" in case.flags)
    k.pop("outputs/K")
    # the kernel's own magnitude enters y through the convolution of |u| with |K|
    Kmag = _kernel_abs_scales(p, case.config["disc"], case.config["L"], None,
                              "extreme_dt" in case.flags)["outputs/K"]
    ratio = max(1.0, Kmag / max(maxabs(K), 1e-300))
    out = {"outputs/y": s["outputs/y"] * ratio, "grads/u": s["grads/u"] * ratio,
           "grads/D": s["grads/D"], **k}
    return {key: max(v, maxabs(outputs[key[8:]]) if key.startswith("outputs/")
                     else maxabs(grads[key[6:]])) for key, v in out.items()}


register(
    name="s4d_layer",
    state_out="{}",  # the end modes as outputs/x_re, x_im (v1)
    math="y = fftconv(u, s4d_kernel(params, L), D)",
    specs=_layer_specs,
    depth=_layer_depth,
    scales=_layer_scales,
)
