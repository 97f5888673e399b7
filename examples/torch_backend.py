"""A worked example: a PyTorch backend checked against refimpl's golden traces.

This is the recipe a backend author copies. It implements five suites in PyTorch (autograd for
the backward pass, a custom autograd function for the surrogate spike), in float64 by default or
in a lower precision with ``--dtype float32|bfloat16|float16``:

    s4d_kernel   K[h, l] = 2 Re sum_n C dB dA^l       (powers as exp(l log dA): a Vandermonde)
    fftconv      y = causal / bidirectional FFT convolution + D u
    neuron       the iterative LIF family: 4 resets, refractory period, ge/gt, 5 surrogates,
                 grad modes bptt / detach_reset / sltt; stateful cases start from a state
                 (u0, count0) and return the state they end in (u_end, count_end)
    pmbc         the same neuron (the golden computes it by PMBC; this backend runs the
                 recurrence, so it writes no `iterations`: verify with
                 --skip '*/outputs/iterations'). Only with --suite pmbc or --suite all
    glu          z = o[:H] sigmoid(o[H:]), o = W s + b

For every case of ``<golden>/<suite>.h5`` it reads the inputs, params, config attributes and
cotangents, computes outputs and the VJP ``grads`` (autograd of ``sum(output * cotangent)``
over the outputs that have a cotangent), and writes ``<out>/<suite>.h5`` in the candidate
layout::

    /                      attrs: schema = "refimpl-golden-candidate", schema_version = 1, suite
    /cases/<id>/outputs/<name>, /cases/<id>/grads/<name>     the golden's shapes (dtypes below)
    /cases/<id>            attr error = "<message>" when the backend rejects the case

Every case is answered: an ``invalid`` case is rejected (the op raises ``ValueError``: NaN
input or state, out-of-range configuration, a refractory counter beyond ``refractory_steps``,
inconsistent shapes; its message becomes the ``error`` attribute), and a valid case without
cotangents (flag ``no_grads``) gets its outputs and no grads. Stateful neuron cases read the
initial membrane ``u0`` and refractory counter ``count0`` (int64) and write the end state
``u_end`` and ``count_end`` (int64); there is no gradient with respect to the state.

Then ``refimpl golden verify <out>/*.h5`` compares. Run (torch is *not* a refimpl dependency;
install it into its own environment, see examples/README.md; ``make example-check`` does all of
this at the four dtypes)::

    python examples/torch_backend.py --out /tmp/torch_candidates
    refimpl golden verify /tmp/torch_candidates/*.h5
    python examples/torch_backend.py --suite all --dtype bfloat16 --out /tmp/torch_candidates
    refimpl golden verify /tmp/torch_candidates/*.h5 --skip '*/outputs/iterations' \\
        --precision bfloat16

Precision (``--dtype``; the compute model ``refimpl golden verify --precision`` declares):

- **float64**: everything in float64 (complex128).
- **float32**: inputs, parameters, cotangents and the floating configuration values (``tau``,
  ``theta``, ``u_reset``, the surrogate scale) are read as float64 and rounded once to float32;
  every operation runs in float32 (complex64 for the complex parts and the FFTs). Gradients are
  taken with respect to the float32 leaves.
- **bfloat16, float16** (16-bit storage, float32 compute, as GPU kernels run): every input,
  parameter and cotangent is rounded to the 16-bit dtype when read (``.to(torch.bfloat16)`` of
  the float64 array), then upcast to float32; the configuration values are rounded to float32
  (a kernel's scalar arguments); *all* arithmetic runs in float32 (complex64), exactly as at
  float32. Every output and every gradient is rounded to the 16-bit dtype once, at the end (the
  kernel boundary). Gradients are the float32 VJP with respect to the float32 upcast leaves
  (cotangents as read: 16-bit values in float32), rounded to the 16-bit dtype.
- **Stored**: float64 and float32 and float16 outputs and grads are written in their dtype;
  bfloat16 (which HDF5 / NumPy cannot store) is written as float32, an exact widening. Spikes are
  written in the float dtype (0 and 1 are exact), counters as int64. ``--store float64`` widens
  every float dataset to float64 instead (exact too); ``verify --precision`` accepts either.
- A value beyond the 16-bit range rounds to ``inf`` when read (float16: above 65504); the op then
  rejects the case ("x contains non-finite values"), as a backend checking its inputs does.

The golden files are found through ``refimpl.golden.golden_path`` when refimpl is importable
(the installed committed set, no clone needed); otherwise pass ``--golden DIR``. Only ``torch``,
``numpy`` and ``h5py`` are needed for the rest: a backend needs nothing from refimpl to read
golden files.
"""
import argparse
import math
import os
import tempfile

import h5py
import numpy as np
import torch

torch.set_default_dtype(torch.float64)

# --dtype -> (storage dtype: what the leaves are rounded to and the outputs rounded to,
#             compute dtype: what every operation runs in)
DTYPES = {"float64": (torch.float64, torch.float64), "float32": (torch.float32, torch.float32),
          "bfloat16": (torch.bfloat16, torch.float32), "float16": (torch.float16, torch.float32)}
# The current precision (set by main / set_dtype).
STORAGE = COMPUTE = torch.float64


def set_dtype(name):
    global STORAGE, COMPUTE
    STORAGE, COMPUTE = DTYPES[name]


def read_float(a):
    """A float64 array as the backend holds it: rounded to STORAGE, computed on in COMPUTE."""
    return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(STORAGE).to(COMPUTE)


def rnd(v):
    """A float configuration value as the kernel takes it: rounded to COMPUTE (a Python float)."""
    return torch.tensor(float(v), dtype=torch.float64).to(COMPUTE).item()


def at_boundary(t):
    """An output or gradient leaving the kernel: rounded to STORAGE (spikes, counters exact)."""
    return t.detach().to(STORAGE) if t.is_floating_point() else t.detach()


# --------------------------------------------------------------------------------------------
# Reading golden cases, writing a candidate
# --------------------------------------------------------------------------------------------


def _attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.dtype.kind in "OSU":
        return [_attr(x) for x in v.tolist()]
    return v


def read_cases(path):
    """Yield ``(id, attrs, inputs, params, cotangents)`` per case.

    Float arrays are read as float64 and rounded as :func:`read_float` says; integer arrays
    (refractory counters) stay int64. A case without cotangents (invalid, or flag
    ``no_grads``) yields an empty dict for them.
    """
    with h5py.File(path, "r") as f:
        schema, version = _attr(f.attrs.get("schema")), _attr(f.attrs.get("schema_version"))
        if schema != "refimpl-golden" or version != 1:
            raise SystemExit(f"{path}: schema {schema!r} version {version!r}; this example "
                             f"reads refimpl-golden version 1")
        for cid, g in f["cases"].items():
            attrs = {k: _attr(v) for k, v in g.attrs.items()}

            def group(name):
                if name not in g:
                    return {}
                out = {}
                for k, d in g[name].items():
                    a = np.array(d[()])
                    out[k] = read_float(a) if a.dtype.kind == "f" else torch.from_numpy(a)
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
    """``results``: id -> ``{"outputs": {...}, "grads": {...}}`` or ``{"error": message}``.

    Written to a temporary file in the same folder and renamed into place: an interrupted run
    never leaves a half-written candidate.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = "refimpl-golden-candidate"
            f.attrs["schema_version"] = 1
            f.attrs["suite"] = suite
            f.attrs["backend"] = (f"torch {torch.__version__} (examples/torch_backend.py, "
                                  f"storage {str(STORAGE).replace('torch.', '')}, compute "
                                  f"{str(COMPUTE).replace('torch.', '')})")
            cases = f.create_group("cases")
            for cid, r in results.items():
                g = cases.create_group(cid)
                if "error" in r:
                    g.attrs["error"] = r["error"]
                    continue
                for group in ("outputs", "grads"):
                    for name, t in r[group].items():
                        t = t.to(store_dtype(t, store))
                        g.create_dataset(f"{group}/{name}", data=t.numpy())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def vjp(leaves, outputs, cotangents):
    """Grads of ``sum_k <outputs[k], cotangents[k]>`` for every tensor in ``leaves``."""
    loss = sum((outputs[k] * cotangents[k]).sum() for k in cotangents)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: (torch.zeros_like(v) if g is None else g)
            for (k, v), g in zip(leaves.items(), grads)}


def check_finite(**tensors):
    for k, t in tensors.items():
        if t is not None and not torch.isfinite(t).all():
            i = tuple(int(j) for j in torch.nonzero(~torch.isfinite(t))[0])
            raise ValueError(f"{k} contains non-finite values ({k}{list(i)} = {t[i].item()})")


def run_suite(golden_path, suite):
    """Every case of ``golden_path``: ``compute(attrs, inputs, params)`` -> outputs, then the VJP.

    The leaves that get a gradient are the float inputs and params but the suite's state
    inputs (``NO_GRAD``); a case without cotangents gets outputs only.
    """
    compute = SUITES[suite]
    results = {}
    for cid, attrs, inputs, params, cot in read_cases(golden_path):
        leaves = {k: v for k, v in {**inputs, **params}.items()
                  if v.is_floating_point() and k not in NO_GRAD.get(suite, ())}
        for t in leaves.values():
            t.requires_grad_(bool(cot))
        try:
            outputs = compute(attrs, inputs, params)
        except ValueError as e:  # the backend rejects the case (invalid inputs or config)
            results[cid] = {"error": str(e)}
            continue
        missing = sorted(set(cot) - set(outputs))
        if missing:
            raise SystemExit(f"{golden_path} case {cid}: cotangents for outputs {missing} that "
                             f"this backend does not compute")
        grads = vjp(leaves, outputs, cot) if cot else {}
        results[cid] = {"outputs": {k: at_boundary(v) for k, v in outputs.items()},
                        "grads": {k: at_boundary(v) for k, v in grads.items()}}
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
    l = torch.arange(L, dtype=log_dt.dtype)
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
    if K.dim() == 3:  # y[t] += sum_{s>t} K1[s-t-1] u[s]: K1 sits at the end, reversed
        k = torch.cat([K[0], K.new_zeros(H, n - 2 * L), torch.flip(K[1], [-1])], dim=-1)
    else:
        k = torch.cat([K, K.new_zeros(H, n - L)], dim=-1)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return y + D[:, None] * u


def compute_fftconv(attrs, inputs, params):
    return {"y": fftconv(inputs["u"], params["K"], params["D"])}


# --------------------------------------------------------------------------------------------
# neuron (and pmbc: the same neuron)
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


def neuron(x, cfg, rho=None, u0=None, count0=None):
    """Spikes, membranes ``h``, ``u`` (B, H, L) and the end state ``(u_end, count_end)``.

    ``u0`` (B, H) is the membrane ``u_{-1}`` (default 0), ``count0`` (B, H) int64 the refractory
    counter at step 0 (default 0: steps ``0 .. count0 - 1`` cannot fire).
    """
    reset, tau, theta = cfg["reset"], rnd(cfg["tau"]), rnd(cfg["theta"])
    u_reset, scale = rnd(cfg["u_reset"]), rnd(cfg["surrogate_scale"])
    R = int(cfg["refractory_steps"])
    check_finite(x=x, rho=rho, u0=u0)
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    if reset != "none" and theta <= 0:
        raise ValueError(f"theta must be > 0 with reset {reset!r}, got {theta}")
    if rho is not None and (rho < 0).any():
        raise ValueError(f"rho must be >= 0, got min {rho.min().item()}")
    if x.dim() != 3:
        raise ValueError(f"x must be (B, H, L), got {tuple(x.shape)}")
    Bsz, H, L = x.shape
    if u0 is None:
        u0 = x.new_zeros(Bsz, H)
    if count0 is None:
        count0 = torch.zeros(Bsz, H, dtype=torch.int64)
    if u0.shape != (Bsz, H) or count0.shape != (Bsz, H):
        raise ValueError(f"u0 and count0 must be ({Bsz}, {H}), got {tuple(u0.shape)}, "
                         f"{tuple(count0.shape)}")
    if ((count0 < 0) | (count0 > R)).any():
        i = tuple(int(j) for j in torch.nonzero((count0 < 0) | (count0 > R))[0])
        raise ValueError(f"count0{list(i)} = {int(count0[i])} is outside [0, refractory_steps "
                         f"= {R}]")
    strict = cfg["spike_condition"] == "gt"
    mode = cfg["grad_mode"]
    u_prev = u0
    cnt = count0.clone()
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
        # a spike sets the counter to R (steps t+1 .. t+R blocked); otherwise it counts down
        cnt = torch.where(s.detach() > 0, torch.full_like(cnt, R), torch.clamp(cnt - 1, min=0))
        S.append(s), Hs.append(h), Us.append(u)
        u_prev = u
    return torch.stack(S, -1), torch.stack(Hs, -1), torch.stack(Us, -1), u_prev, cnt


def compute_neuron(attrs, inputs, params):
    s, h, u, u_end, count_end = neuron(inputs["x"], attrs, params.get("rho"),
                                       inputs.get("u0"), inputs.get("count0"))
    out = {"s": s, "h": h, "u": u}
    if "u0" in inputs or "count0" in inputs:  # a stateful case: the end state is an output
        out.update(u_end=u_end, count_end=count_end)
    return out


# --------------------------------------------------------------------------------------------
# glu
# --------------------------------------------------------------------------------------------


def compute_glu(attrs, inputs, params):
    s, W, b = inputs["s"], params["W"], params["b"]
    H = s.shape[1]
    o = torch.einsum("oi,bil->bol", W, s) + b[:, None]
    return {"z": o[:, :H] * torch.sigmoid(o[:, H:])}


SUITES = {"s4d_kernel": compute_s4d_kernel, "fftconv": compute_fftconv, "neuron": compute_neuron,
          "pmbc": compute_neuron, "glu": compute_glu}
# What runs without --suite: pmbc is opt-in (--suite pmbc, or --suite all), since verifying it
# needs --skip '*/outputs/iterations'.
DEFAULT_SUITES = ("s4d_kernel", "fftconv", "neuron", "glu")
# Inputs that are state, not differentiated (the golden has no gradient for them).
NO_GRAD = {"neuron": ("u0",), "pmbc": ("u0",)}
# What `refimpl golden verify` needs besides the candidates (pmbc's PMBC iteration counts).
VERIFY_SKIP = {"pmbc": "*/outputs/iterations"}


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
                    help="precision: float64, float32, or 16-bit storage with float32 compute "
                         "(bfloat16, float16); default float64")
    ap.add_argument("--store", choices=["native", "float64"], default="native",
                    help="dtype written: the storage dtype (bfloat16 as float32), or float64")
    ap.add_argument("--out", required=True, help="folder for the candidate <suite>.h5 files")
    ap.add_argument("--suite", action="append", choices=list(SUITES) + ["all"],
                    help=f"this suite (repeatable; 'all': every one); default: "
                         f"{', '.join(DEFAULT_SUITES)}")
    args = ap.parse_args(argv)
    set_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    written = []
    suites = args.suite or list(DEFAULT_SUITES)
    suites = list(SUITES) if "all" in suites else list(dict.fromkeys(suites))
    for suite in suites:
        results = run_suite(find_golden(suite, args.golden), suite)
        path = os.path.join(args.out, f"{suite}.h5")
        write_candidate(path, suite, results, args.store)
        written.append(path)
        rejected = sum("error" in r for r in results.values())
        print(f"{path}: {len(results)} cases ({len(results) - rejected} computed, "
              f"{rejected} rejected), --dtype {args.dtype}", flush=True)
    options = [f"--skip '{VERIFY_SKIP[s]}'" for s in suites if s in VERIFY_SKIP]
    if args.dtype != "float64":
        options.append(f"--precision {args.dtype}")
    print("now run: refimpl golden verify " + " ".join(written + options))
    return written


if __name__ == "__main__":
    main()
