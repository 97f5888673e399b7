"""A worked example: a PyTorch backend checked against refimpl's golden traces.

This is the recipe a backend author copies. It implements four suites in PyTorch (float64,
autograd for the backward pass, a custom autograd function for the surrogate spike):

    s4d_kernel   K[h, l] = 2 Re sum_n C dB dA^l       (powers as exp(l log dA): a Vandermonde)
    fftconv      y = causal / bidirectional FFT convolution + D u
    neuron       the iterative LIF family: 4 resets, refractory period, ge/gt, 5 surrogates,
                 grad modes bptt / detach_reset / sltt
    glu          z = o[:H] sigmoid(o[H:]), o = W s + b

For every case of ``<golden>/<suite>.h5`` it reads the inputs, params, config attributes and
cotangents, computes outputs and the VJP ``grads`` (autograd of ``sum(output * cotangent)``),
and writes ``<out>/<suite>.h5`` in the candidate layout::

    /                      attrs: schema = "refimpl-golden-candidate", schema_version = 1, suite
    /cases/<id>/outputs/<name>, /cases/<id>/grads/<name>     float64, the golden's shapes
    /cases/<id>            attr error = "<message>" when the backend rejects the case

Then ``refimpl golden verify <out>/*.h5`` compares. Run (torch is *not* a refimpl dependency;
install it into its own environment)::

    python examples/torch_backend.py --golden golden/v1 --out /tmp/torch_candidates
    refimpl golden verify /tmp/torch_candidates/*.h5

Only ``torch``, ``numpy`` and ``h5py`` are imported: a backend needs nothing from refimpl to
read golden files.
"""
import argparse
import math
import os

import h5py
import numpy as np
import torch

torch.set_default_dtype(torch.float64)


# --------------------------------------------------------------------------------------------
# Reading golden cases, writing a candidate
# --------------------------------------------------------------------------------------------


def _attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_cases(path):
    """Yield ``(id, attrs, inputs, params, cotangents)`` per case (arrays as float64 tensors)."""
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == "refimpl-golden" and int(f.attrs["schema_version"]) == 1
        for cid, g in f["cases"].items():
            attrs = {k: _attr(v) for k, v in g.attrs.items()}

            def group(name):
                if name not in g:
                    return {}
                return {k: torch.from_numpy(np.array(d[()])) for k, d in g[name].items()}

            yield cid, attrs, group("inputs"), group("params"), group("cotangents")


def write_candidate(path, suite, results):
    """``results``: id -> ``{"outputs": {...}, "grads": {...}}`` or ``{"error": message}``."""
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "refimpl-golden-candidate"
        f.attrs["schema_version"] = 1
        f.attrs["suite"] = suite
        f.attrs["backend"] = f"torch {torch.__version__} (examples/torch_backend.py)"
        cases = f.create_group("cases")
        for cid, r in results.items():
            g = cases.create_group(cid)
            if "error" in r:
                g.attrs["error"] = r["error"]
                continue
            for group in ("outputs", "grads"):
                for name, t in r[group].items():
                    g.create_dataset(f"{group}/{name}", data=t.detach().numpy())


def vjp(inputs, outputs, cotangents):
    """Outputs, and grads of ``sum_k <outputs[k], cotangents[k]>`` for every leaf in ``inputs``."""
    loss = sum((outputs[k] * cotangents[k]).sum() for k in cotangents)
    leaves = list(inputs.values())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return {k: (torch.zeros_like(v) if g is None else g)
            for (k, v), g in zip(inputs.items(), grads)}


def check_finite(**tensors):
    for k, t in tensors.items():
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{k} contains non-finite values")


def run_suite(golden_path, suite, compute):
    """Apply ``compute(attrs, inputs, params)`` -> ``(outputs dict, leaves dict)`` to each case."""
    results = {}
    for cid, attrs, inputs, params, cot in read_cases(golden_path):
        leaves = {**inputs, **params}
        for t in leaves.values():
            if t.dtype == torch.float64:
                t.requires_grad_(True)
        try:
            outputs = compute(attrs, inputs, params)
        except ValueError as e:  # the backend rejects the case (invalid inputs or config)
            results[cid] = {"error": str(e)}
            continue
        diff = {k: v for k, v in leaves.items() if v.requires_grad}
        grads = vjp(diff, {k: outputs[k] for k in cot}, cot)
        results[cid] = {"outputs": outputs, "grads": grads}
    return results


# --------------------------------------------------------------------------------------------
# s4d_kernel
# --------------------------------------------------------------------------------------------


def cexpm1(w):
    """``exp(w) - 1`` for complex ``w`` without cancellation near 0 (torch has no complex expm1)."""
    x, y = w.real, w.imag
    return torch.complex(torch.expm1(x) * torch.cos(y) - 2.0 * torch.sin(0.5 * y) ** 2,
                         torch.exp(x) * torch.sin(y))


def phi1(w):
    """``(exp(w) - 1) / w`` for complex ``w``, accurate *and with an accurate derivative* near 0.

    The closed form's derivative ``(w e^w - (e^w - 1)) / w^2`` cancels for small ``|w|``
    (``dt A`` is small: dt ~ 1e-3), so autograd of ``cexpm1(w) / w`` loses ``eps / |w|``;
    the Taylor series ``sum_k w^k / (k+1)!`` (24 terms, |w| < 0.5) differentiates accurately.
    """
    small = w.abs() < 0.5
    ws = torch.where(small, w, torch.zeros_like(w))
    series = torch.zeros_like(w)
    for k in range(24, -1, -1):  # Horner over 1 / (k+1)!
        series = series * ws + 1.0 / math.factorial(k + 1)
    wb = torch.where(small, torch.ones_like(w), w)
    return torch.where(small, series, cexpm1(wb) / wb)


def s4d_kernel(log_dt, log_A_real, A_imag, C_re, C_im, L, disc, B_re=None, B_im=None):
    check_finite(log_dt=log_dt, log_A_real=log_A_real, A_imag=A_imag, C_re=C_re, C_im=C_im,
                 B_re=B_re, B_im=B_im)
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    dt = torch.exp(log_dt)[:, None]  # (H, 1)
    A = torch.complex(-torch.exp(log_A_real), A_imag)  # (H, N2)
    B = torch.ones_like(A) if B_re is None else torch.complex(B_re, B_im)
    dtA = dt * A
    if disc == "zoh":
        dB = dt * phi1(dtA) * B  # = (exp(dt A) - 1) / A * B
        log_dA = dtA  # dA^l = exp(l dt A)
    elif disc == "bilinear":
        dA = (1 + 0.5 * dtA) / (1 - 0.5 * dtA)
        dB = dt * B / (1 - 0.5 * dtA)
        log_dA = torch.log(dA)
    else:
        raise ValueError(f"unknown disc {disc!r}")
    C = torch.complex(C_re, C_im)  # (H, N2) or (2, H, N2)
    l = torch.arange(L, dtype=torch.float64)
    V = torch.exp(log_dA[..., None] * l)  # (H, N2, L)
    return 2.0 * torch.einsum("...hn,hnl->...hl", C * dB, V).real  # (H, L) or (2, H, L)


def compute_s4d_kernel(attrs, inputs, params):
    B = {k: params[k] for k in ("B_re", "B_im") if k in params}
    K = s4d_kernel(params["log_dt"], params["log_A_real"], params["A_imag"], params["C_re"],
                   params["C_im"], int(attrs["L"]), attrs["disc"], **B)
    return {"K": K}


# --------------------------------------------------------------------------------------------
# fftconv
# --------------------------------------------------------------------------------------------


def fftconv(u, K, D):
    check_finite(u=u, K=K, D=D)
    Bsz, H, L = u.shape
    if K.shape not in ((H, L), (2, H, L)) or D.shape != (H,):
        raise ValueError(f"K must be (H, L) or (2, H, L) and D (H,), got {tuple(K.shape)}, "
                         f"{tuple(D.shape)} for u {tuple(u.shape)}")
    n = 2 * L
    k = torch.zeros(H, n)
    if K.dim() == 3:  # y[t] += sum_{s>t} K1[s-t-1] u[s]: K1 sits at the end, reversed
        k = torch.cat([K[0], torch.zeros(H, n - 2 * L), torch.flip(K[1], [-1])], dim=-1)
    else:
        k = torch.cat([K, torch.zeros(H, n - L)], dim=-1)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return y + D[:, None] * u


def compute_fftconv(attrs, inputs, params):
    return {"y": fftconv(inputs["u"], params["K"], params["D"])}


# --------------------------------------------------------------------------------------------
# neuron
# --------------------------------------------------------------------------------------------


def surrogate_grad(name, z, scale):
    """g(z) of DESIGN.md's table (the scale is w, a or k)."""
    if name == "triangle":
        return torch.clamp(1.0 - z.abs() / scale, min=0.0) / scale
    if name == "rectangle":
        return (z.abs() < 0.5 * scale).double() / scale
    if name == "sigmoid":
        e = torch.exp(-(scale * z).abs())
        return scale * e / (1.0 + e) ** 2
    if name == "atan":
        return (scale / 2.0) / (1.0 + (math.pi * scale * z / 2.0) ** 2)
    if name == "fast_sigmoid":
        return 1.0 / (1.0 + scale * z.abs()) ** 2
    raise ValueError(f"unknown surrogate {name!r}")


class Spike(torch.autograd.Function):
    """Forward: Theta(h - theta) (ge or gt) where allowed; backward: allowed g(h - theta)."""

    @staticmethod
    def forward(ctx, h, theta, allowed, strict, name, scale):
        ctx.save_for_backward(h, allowed)
        ctx.theta, ctx.name, ctx.scale = theta, name, scale
        fire = h > theta if strict else h >= theta
        return (fire & allowed).double()

    @staticmethod
    def backward(ctx, ds):
        h, allowed = ctx.saved_tensors
        return ds * allowed.double() * surrogate_grad(ctx.name, h - ctx.theta, ctx.scale), \
            None, None, None, None, None


def neuron(x, cfg, rho=None):
    reset, tau, theta = cfg["reset"], cfg["tau"], cfg["theta"]
    check_finite(x=x, rho=rho)
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    if reset != "none" and theta <= 0:
        raise ValueError(f"theta must be > 0 with reset {reset!r}, got {theta}")
    if rho is not None and (rho < 0).any():
        raise ValueError("rho must be >= 0")
    Bsz, H, L = x.shape
    R = int(cfg["refractory_steps"])
    strict = cfg["spike_condition"] == "gt"
    mode = cfg["grad_mode"]
    u_prev = torch.zeros(Bsz, H)
    cnt = torch.zeros(Bsz, H, dtype=torch.int64)
    S, Hs, Us = [], [], []
    for t in range(L):
        m = tau * (u_prev.detach() if mode == "sltt" else u_prev)
        h = m + x[..., t]
        allowed = cnt == 0
        s = Spike.apply(h, theta, allowed, strict, cfg["surrogate"], cfg["surrogate_scale"])
        sr = s.detach() if mode == "detach_reset" else s
        if reset == "hard":
            u = h * (1.0 - sr) + cfg["u_reset"] * sr
        elif reset == "soft":
            u = h - theta * sr
        elif reset == "refractory":
            u = h - (theta + rho) * sr
        else:
            u = h
        if R > 0:
            cnt = torch.where(s.detach() > 0, torch.full_like(cnt, R), torch.clamp(cnt - 1, min=0))
        S.append(s), Hs.append(h), Us.append(u)
        u_prev = u
    return torch.stack(S, -1), torch.stack(Hs, -1), torch.stack(Us, -1)


def compute_neuron(attrs, inputs, params):
    s, h, u = neuron(inputs["x"], attrs, params.get("rho"))
    return {"s": s, "h": h, "u": u}


# --------------------------------------------------------------------------------------------
# glu
# --------------------------------------------------------------------------------------------


def compute_glu(attrs, inputs, params):
    s, W, b = inputs["s"], params["W"], params["b"]
    H = s.shape[1]
    o = torch.einsum("oi,bil->bol", W, s) + b[:, None]
    return {"z": o[:, :H] * torch.sigmoid(o[:, H:])}


SUITES = {"s4d_kernel": compute_s4d_kernel, "fftconv": compute_fftconv, "neuron": compute_neuron,
          "glu": compute_glu}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--golden", default=os.path.join(here, "..", "golden", "v1"),
                    help="folder of the golden <suite>.h5 files (default: the repository's)")
    ap.add_argument("--out", required=True, help="folder for the candidate <suite>.h5 files")
    ap.add_argument("--suite", action="append", choices=sorted(SUITES),
                    help="only this suite (repeatable); default: all four")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for suite in args.suite or list(SUITES):
        results = run_suite(os.path.join(args.golden, f"{suite}.h5"), suite, SUITES[suite])
        path = os.path.join(args.out, f"{suite}.h5")
        write_candidate(path, suite, results)
        written.append(path)
        print(f"{path}: {len(results)} cases")
    print("now run: refimpl golden verify " + " ".join(written))
    return written


if __name__ == "__main__":
    main()
