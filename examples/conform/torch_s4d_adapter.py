"""A PyTorch S4D kernel in the formulation of ``state-spaces/s4`` as a ``refimpl conform``
adapter (issue 24): ops ``s4d_kernel`` and ``fftconv``, forward and VJP (autograd), at float32
(``zoh``, complex64) and float64 (``zoh_f64``, complex128).

Run (in ``.venv-conform``, see ``make conform-matrix``)::

    refimpl conform examples/conform/torch_s4d_adapter.py:zoh_f64 --op s4d_kernel --op fftconv

The formulation (the S4D paper and ``models/s4/s4d.py`` of state-spaces/s4; written here from
the math, not copied). ``S4DKernel`` holds ``log_dt (H,)``, ``log_A_real (H, N/2)``,
``A_imag (H, N/2)`` and a complex ``C (H, N/2)`` (stored as real pairs); its forward is::

    dt  = exp(log_dt)                     A = -exp(log_A_real) + i A_imag
    dtA = A dt                            (zero-order hold)
    C~  = C (exp(dtA) - 1) / A            (C times the ZOH input matrix, B = 1)
    K   = 2 Re( C~ @ exp(dtA * arange(L)) )        (H, L): the powers dA^l as exp(l dtA)

and ``S4D.forward`` convolves with FFTs of length ``n = 2L``::

    y = irfft(rfft(u, n) * rfft(K, n), n)[..., :L] + D u

refimpl's ``s4d_kernel`` is the same kernel (``K[h, l] = 2 Re sum_n C dB dA^l`` with
``dB = (exp(dt A) - 1) / A * B``; the factor 2 for the conjugate modes, the same ``log_dt``,
``log_A_real``, ``A_imag`` parametrisation, ``C = C_re + i C_im``). Conventions that differ and
how the adapter reconciles them:

- ``B``: s4d.py has none (B = 1); refimpl's optional trainable ``B_re, B_im`` enter only through
  ``C dB = (C B) (exp(dtA) - 1) / A``, so the adapter passes ``C B`` as s4d.py's ``C``
  (gradients of ``B`` by autograd through that product).
- ``disc``: s4d.py has zero-order hold only; refimpl also has ``bilinear``. The adapter
  objects fix ``disc = "zoh"`` (``CONFIG``) and reject ``bilinear``.
- Powers: s4d.py takes ``exp(l dtA)`` (one exponential per power), refimpl a running product
  in float64; another rounding of the same numbers.
- Bidirectional ``C (2, H, N/2)``: the kernel of each direction (s4's ``channels`` axis); the
  convolution folds them as s4's bidirectional ``S4D``: ``k = pad(K0, (0, L)) + pad(flip(K1),
  (L, 0))``, i.e. ``y[t] += sum_{s>t} K1[s-t-1] u[s]``: refimpl's ``fftconv`` convention.
- float32: s4 trains in float32 (complex64 kernel); refimpl generates ``K`` in float64 and
  rounds once. The precision profile says whether the float32 kernel is within bounds.
"""
import types

import numpy as np
import torch

LIBRARY = "PyTorch S4D (state-spaces/s4 formulation)"
VERSION = "torch " + torch.__version__.split("+")[0]

KERNEL_PARAMS = ("log_dt", "log_A_real", "A_imag", "C_re", "C_im", "B_re", "B_im")


def _leaves(arrays, names, dtype):
    out = {}
    for k in names:
        if k in arrays and arrays[k] is not None:
            a = np.asarray(arrays[k], dtype=np.float64)
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{k} contains non-finite values")
            out[k] = torch.tensor(a, dtype=dtype, requires_grad=True)
    return out


def kernel(p, L, disc):
    """The s4d.py kernel from real leaves ``p`` (``B_re, B_im`` optional): ``(H, L)`` or
    ``(2, H, L)`` for a bidirectional ``C``."""
    if disc != "zoh":
        raise ValueError(f"s4d.py discretizes by zero-order hold only; disc={disc!r} is not "
                         "expressible")
    L = int(L)
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    if ("B_re" in p) != ("B_im" in p):
        raise ValueError("pass both B_re and B_im or neither")
    dt = torch.exp(p["log_dt"])  # (H,)
    A = torch.complex(-torch.exp(p["log_A_real"]), p["A_imag"])  # (H, N2)
    C = torch.complex(p["C_re"], p["C_im"])  # (H, N2) or (2, H, N2)
    if C.shape[-2:] != A.shape or dt.shape != A.shape[:1]:
        raise ValueError(f"shapes: log_dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
                         f"C {tuple(C.shape)}")
    if "B_re" in p:
        C = C * torch.complex(p["B_re"], p["B_im"])  # s4d.py has B = 1: fold B into C
    dtA = A * dt.unsqueeze(-1)  # (H, N2)
    Ct = C * (torch.exp(dtA) - 1.0) / A  # (..., H, N2)
    powers = torch.exp(dtA.unsqueeze(-1) * torch.arange(L, dtype=dt.dtype))  # (H, N2, L)
    K = 2 * torch.einsum("...hn,hnl->...hl", Ct, powers).real
    if not torch.all(torch.isfinite(K)):
        raise ValueError("the kernel overflows")
    return K


def conv(u, K, D=None):
    """s4's FFT convolution (``n = 2L``; bidirectional ``K (2, H, L)`` folded as s4 does)."""
    L = u.shape[-1]
    if K.shape[-1] != L:
        raise ValueError(f"K has length {K.shape[-1]}, u has {L}")
    if K.dim() == 3:
        K = (torch.nn.functional.pad(K[0], (0, L))
             + torch.nn.functional.pad(K[1].flip(-1), (L, 0)))
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]
    if D is not None:
        y = y + u * D.unsqueeze(-1)
    return y


def _make(name, precision):
    tdtype, ndtype = {"float32": (torch.float32, np.float32),
                      "float64": (torch.float64, np.float64)}[precision]

    def out(t):
        return t.detach().numpy().astype(ndtype, copy=True)

    def _grads(loss, leaves):
        names = list(leaves)
        gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        return {k: (np.zeros(leaves[k].shape, ndtype) if g is None else out(g))
                for k, g in zip(names, gs)}

    def s4d_kernel(inputs, params, L=16, disc="zoh"):
        p = _leaves(params, KERNEL_PARAMS, tdtype)
        return {"K": out(kernel(p, L, disc))}

    def s4d_kernel_vjp(inputs, params, cotangents, L=16, disc="zoh"):
        p = _leaves(params, KERNEL_PARAMS, tdtype)
        K = kernel(p, L, disc)
        dK = cotangents.get("K")
        if dK is None:
            return {k: np.zeros(v.shape, ndtype) for k, v in p.items()}
        loss = (K * torch.tensor(np.asarray(dK, np.float64), dtype=tdtype)).sum()
        return _grads(loss, p)

    def _conv_args(inputs, params):
        u = _leaves(inputs, ("u",), tdtype)["u"]
        kp = _leaves(params, ("K", "D"), tdtype)
        if u.dim() != 3:
            raise ValueError(f"u must be (B, H, L), got {tuple(u.shape)}")
        return u, kp

    def fftconv(inputs, params, method="fft"):
        u, kp = _conv_args(inputs, params)
        return {"y": out(conv(u, kp["K"], kp.get("D")))}

    def fftconv_vjp(inputs, params, cotangents, method="fft"):
        u, kp = _conv_args(inputs, params)
        y = conv(u, kp["K"], kp.get("D"))
        dy = cotangents.get("y")
        leaves = {"u": u, **kp}
        if dy is None:
            return {k: np.zeros(v.shape, ndtype) for k, v in leaves.items()}
        loss = (y * torch.tensor(np.asarray(dy, np.float64), dtype=tdtype)).sum()
        return _grads(loss, leaves)

    return types.SimpleNamespace(
        NAME=f"torch-s4d:{name}", LIBRARY=LIBRARY, VERSION=VERSION, PRECISION=precision,
        CONFIG={"s4d_kernel": {"disc": "zoh"}},
        MAPPING="S4DKernel (ZOH, B folded into C) + S4D's rfft convolution (n = 2L)",
        LIBRARY_CONFIG="S4DKernel: K = 2 Re(C (exp(dtA) - 1)/A @ exp(dtA arange(L)))",
        s4d_kernel=s4d_kernel, s4d_kernel_vjp=s4d_kernel_vjp, fftconv=fftconv,
        fftconv_vjp=fftconv_vjp)


zoh = _make("zoh", "float32")
zoh_f64 = _make("zoh_f64", "float64")

#: adapter object name -> the refimpl configuration fields it fixes, per op
CONFIGS = {"zoh": zoh.CONFIG, "zoh_f64": zoh_f64.CONFIG}

#: The objects ``make conform-matrix`` runs, in the matrix's order.
ADAPTERS = list(CONFIGS)
