"""A worked example: a PyTorch backend checked against refimpl's golden traces.

This is the recipe a backend author copies. It implements four suites in PyTorch (autograd for
the backward pass, a custom autograd function for the surrogate spike), in float64 by default or
in a lower precision with ``--dtype float32|bfloat16|float16``:

    s4d_kernel   K[h, l] = 2 Re sum_n C dB dA^l       (powers as exp(l log dA): a Vandermonde)
    fftconv      y = causal / bidirectional FFT convolution + D u
    neuron       the iterative LIF family: 4 resets, refractory period, ge/gt, 5 surrogates,
                 grad modes bptt / detach_reset / sltt
    glu          z = o[:H] sigmoid(o[H:]), o = W s + b

For every case of ``<golden>/<suite>.h5`` it reads the inputs, params, config attributes and
cotangents, computes outputs and the VJP ``grads`` (autograd of ``sum(output * cotangent)``),
and writes ``<out>/<suite>.h5`` in the candidate layout::

    /                      attrs: schema = "refimpl-golden-candidate", schema_version = 1, suite
    /cases/<id>/outputs/<name>, /cases/<id>/grads/<name>     the golden's shapes (dtypes below)
    /cases/<id>            attr error = "<message>" when the backend rejects the case

Then ``refimpl golden verify <out>/*.h5`` compares. Run (torch is *not* a refimpl dependency;
install it into its own environment, see examples/README.md)::

    python examples/torch_backend.py --out /tmp/torch_candidates
    refimpl golden verify /tmp/torch_candidates/*.h5
    python examples/torch_backend.py --dtype float32 --out /tmp/torch_candidates
    refimpl golden verify /tmp/torch_candidates/*.h5 --precision float32

Precision (``--dtype``; float64 is the default and unchanged):

- Inputs, parameters, cotangents and the floating configuration values (``tau``, ``theta``,
  ``u_reset``, surrogate scale) are read as float64 and rounded once to the dtype: the input
  rounding every real backend does. Gradients are taken with respect to the rounded leaves.
- float64 / float32: every operation in that dtype (complex parts in complex128 / complex64).
- bfloat16 / float16: the elementwise ops, the GLU's matmul and the neuron's recurrence run in the
  16-bit dtype (torch's CPU kernels round every op's result to it; matmul accumulates in float32
  internally, as GPU kernels do). torch has no 16-bit FFT and no 16-bit complex ``exp`` on CPU,
  so ``s4d_kernel`` (all of it: dt, the discretisation, the Vandermonde) and ``fftconv``'s
  convolution upcast the rounded 16-bit leaves to float32 / complex64 and round the result back
  to the 16-bit dtype (fftconv's ``D u`` term and the sum stay 16-bit). This is the usual
  mixed-precision recipe (autocast runs FFTs in float32 too); autograd carries the casts, so the
  gradients are rounded to the 16-bit dtype at the leaves.
- Stored: float64 and float32 and float16 outputs and grads are written in their dtype; bfloat16
  (which HDF5 / NumPy cannot store) is written as float32, an exact widening. ``--store float64``
  widens everything to float64 instead (exact too); ``verify --precision`` accepts either.

The golden files are found through ``refimpl.golden.golden_path`` when refimpl is importable
(the installed committed set, no clone needed); otherwise pass ``--golden DIR``. Only ``torch``,
``numpy`` and ``h5py`` are needed for the rest: a backend needs nothing from refimpl to read
golden files.
"""
import argparse
import math
import os

import h5py
import numpy as np
import torch

torch.set_default_dtype(torch.float64)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}
# The dtype the leaves are rounded to and the ops run in (set by main / set_dtype).
DTYPE = torch.float64


def set_dtype(name):
    global DTYPE
    DTYPE = DTYPES[name]


def work_dtype():
    """Where the complex / FFT parts run: the dtype itself, float32 for the 16-bit types."""
    return DTYPE if DTYPE in COMPLEX else torch.float32


def rnd(v):
    """A float configuration value as the backend holds it: rounded to DTYPE (a Python float)."""
    return torch.tensor(float(v), dtype=torch.float64).to(DTYPE).item()


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
    """Yield ``(id, attrs, inputs, params, cotangents)`` per case.

    Float arrays are read as float64 and rounded to DTYPE (integer arrays stay as they are).
    """
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == "refimpl-golden" and int(f.attrs["schema_version"]) == 1
        for cid, g in f["cases"].items():
            attrs = {k: _attr(v) for k, v in g.attrs.items()}

            def group(name):
                if name not in g:
                    return {}
                out = {}
                for k, d in g[name].items():
                    t = torch.from_numpy(np.array(d[()]))
                    out[k] = t.to(DTYPE) if t.is_floating_point() else t
                return out

            yield cid, attrs, group("inputs"), group("params"), group("cotangents")


def store_dtype(t, store):
    """The dtype ``t`` is written in: its own (bfloat16: float32), or float64 on request."""
    if not t.is_floating_point():
        return t.dtype
    if store == "float64":
        return torch.float64
    return torch.float32 if t.dtype == torch.bfloat16 else t.dtype


def write_candidate(path, suite, results, store="native"):
    """``results``: id -> ``{"outputs": {...}, "grads": {...}}`` or ``{"error": message}``."""
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "refimpl-golden-candidate"
        f.attrs["schema_version"] = 1
        f.attrs["suite"] = suite
        f.attrs["backend"] = (f"torch {torch.__version__} (examples/torch_backend.py, "
                              f"dtype {str(DTYPE).replace('torch.', '')})")
        cases = f.create_group("cases")
        for cid, r in results.items():
            g = cases.create_group(cid)
            if "error" in r:
                g.attrs["error"] = r["error"]
                continue
            for group in ("outputs", "grads"):
                for name, t in r[group].items():
                    t = t.detach().to(store_dtype(t, store))
                    g.create_dataset(f"{group}/{name}", data=t.numpy())


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
            if t.is_floating_point():
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
    out_dtype, wd = log_dt.dtype, work_dtype()  # 16-bit: computed in float32, K rounded back
    log_dt, log_A_real, A_imag, C_re, C_im = (t.to(wd) for t in
                                              (log_dt, log_A_real, A_imag, C_re, C_im))
    if B_re is not None:
        B_re, B_im = B_re.to(wd), B_im.to(wd)
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
    l = torch.arange(L, dtype=wd)
    V = torch.exp(log_dA[..., None] * l)  # (H, N2, L)
    K = 2.0 * torch.einsum("...hn,hnl->...hl", C * dB, V).real  # (H, L) or (2, H, L)
    return K.to(out_dtype)


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
    wd = work_dtype()  # the FFT's dtype (float32 for the 16-bit types: no 16-bit FFT on CPU)
    uw, K = u.to(wd), K.to(wd)
    if K.dim() == 3:  # y[t] += sum_{s>t} K1[s-t-1] u[s]: K1 sits at the end, reversed
        k = torch.cat([K[0], K.new_zeros(H, n - 2 * L), torch.flip(K[1], [-1])], dim=-1)
    else:
        k = torch.cat([K, K.new_zeros(H, n - L)], dim=-1)
    y = torch.fft.irfft(torch.fft.rfft(uw, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return y.to(u.dtype) + D[:, None] * u


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
        return (z.abs() < 0.5 * scale).to(z.dtype) / scale
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
        return (fire & allowed).to(h.dtype)

    @staticmethod
    def backward(ctx, ds):
        h, allowed = ctx.saved_tensors
        return ds * allowed.to(ds.dtype) * surrogate_grad(ctx.name, h - ctx.theta, ctx.scale), \
            None, None, None, None, None


def neuron(x, cfg, rho=None):
    reset, tau, theta = cfg["reset"], rnd(cfg["tau"]), rnd(cfg["theta"])
    u_reset, scale = rnd(cfg["u_reset"]), rnd(cfg["surrogate_scale"])
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
    u_prev = x.new_zeros(Bsz, H)
    cnt = torch.zeros(Bsz, H, dtype=torch.int64)
    S, Hs, Us = [], [], []
    for t in range(L):
        m = tau * (u_prev.detach() if mode == "sltt" else u_prev)
        h = m + x[..., t]
        allowed = cnt == 0
        s = Spike.apply(h, theta, allowed, strict, cfg["surrogate"], scale)
        sr = s.detach() if mode == "detach_reset" else s
        if reset == "hard":
            u = h * (1.0 - sr) + u_reset * sr
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


def find_golden(suite, golden_dir=None):
    """``<golden_dir>/<suite>.h5``; without a folder, refimpl's installed file for ``suite``."""
    if golden_dir is not None:
        return os.path.join(golden_dir, f"{suite}.h5")
    try:
        from refimpl.golden import golden_path
    except ImportError:
        golden_path = None
    if golden_path is not None:
        return str(golden_path(suite))
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "v1")
    if os.path.exists(os.path.join(here, f"{suite}.h5")):
        return os.path.join(here, f"{suite}.h5")
    raise SystemExit("refimpl is not importable and there is no checkout's golden/v1: "
                     "pass --golden DIR")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--golden", default=None,
                    help="folder of the golden <suite>.h5 files (default: refimpl's installed "
                         "set through refimpl.golden.golden_path, else the checkout's golden/v1)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float64",
                    help="precision of the leaves and the computation (default float64)")
    ap.add_argument("--store", choices=["native", "float64"], default="native",
                    help="dtype written: the computation's (bfloat16 as float32), or float64")
    ap.add_argument("--out", required=True, help="folder for the candidate <suite>.h5 files")
    ap.add_argument("--suite", action="append", choices=sorted(SUITES),
                    help="only this suite (repeatable); default: all four")
    args = ap.parse_args(argv)
    set_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for suite in args.suite or list(SUITES):
        results = run_suite(find_golden(suite, args.golden), suite, SUITES[suite])
        path = os.path.join(args.out, f"{suite}.h5")
        write_candidate(path, suite, results, args.store)
        written.append(path)
        print(f"{path}: {len(results)} cases")
    precision = "" if args.dtype == "float64" else f" --precision {args.dtype}"
    print("now run: refimpl golden verify " + " ".join(written) + precision)
    return written


if __name__ == "__main__":
    main()
