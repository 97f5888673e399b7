"""Benchmark group ``ssm``: the S4D core of issue 2 (DESIGN.md sections 2-3).

Each refimpl figure stands beside a plain NumPy baseline of the same math, written here in
the most direct vectorised form a NumPy user would write (numpy only: no scipy, no Numba):

- kernel: ``powers = exp(dtA[:, :, None] * arange(L))`` then ``2 Re einsum(C dB, powers)``,
  which materialises the ``(H, N2, L)`` complex array refimpl's Vandermonde kernel avoids;
- FFT convolution: ``numpy.fft.rfft/irfft`` with ``n = 2L`` (refimpl uses scipy.fft with a
  5-smooth ``n >= 2L``, which is ``2L`` itself at the benchmark shape);
- recurrence: a Python loop over ``t`` with vectorised ``(B, H, N2)`` complex updates.
"""
import numpy as np

from harness import register
from refimpl.conv import fftconv, fftconv_bwd
from refimpl.recurrence import ssm_recurrence
from refimpl.s4d import s4d_layer_bwd, s4d_layer_fwd
from refimpl.ssm import discretize_params, s4d_init, s4d_kernel

FULL = {"B": 8, "H": 128, "N": 64, "L": 2048}
QUICK = {"B": 2, "H": 4, "N": 8, "L": 64}
KERNEL_TARGET = 10.0  # issue 2: kernel generation >= 10x the NumPy exp/einsum formulation


# --------------------------------------------------------------------------------------------
# Plain NumPy baselines (same math as refimpl, float64 / complex128)
# --------------------------------------------------------------------------------------------


def numpy_s4d_kernel_zoh(log_dt, log_A_real, A_imag, C_re, C_im, L):
    """``K[h, l] = 2 Re sum_n C dB dA^l`` with ZOH and ``B = 1``, materialising all powers."""
    dt = np.exp(log_dt)[:, None]  # (H, 1)
    A = -np.exp(log_A_real) + 1j * A_imag  # (H, N2)
    dtA = dt * A  # (H, N2)
    dB = (np.exp(dtA) - 1.0) / A  # (H, N2)
    C = C_re + 1j * C_im  # (H, N2)
    powers = np.exp(dtA[:, :, None] * np.arange(L))  # (H, N2, L)
    return 2.0 * np.einsum("hn,hnl->hl", C * dB, powers).real  # (H, L)


def numpy_fftconv(u, K, D):
    """``y[t] = sum_{s<=t} K[t-s] u[s] + D u[t]`` by real FFTs of length ``2L``."""
    L = u.shape[-1]
    n = 2 * L
    kf = np.fft.rfft(K, n=n, axis=-1)  # (H, L+1)
    uf = np.fft.rfft(u, n=n, axis=-1)  # (B, H, L+1)
    y = np.fft.irfft(uf * kf, n=n, axis=-1)[..., :L]  # (B, H, L)
    return y + D[:, None] * u


def numpy_fftconv_bwd(u, K, D, dy):
    """``du[s] = sum_{t>=s} dy[t] K[t-s] + D dy[s]``, ``dK[l] = sum_{b,t} dy[t] u[t-l]``,
    ``dD = sum_{b,t} dy u``."""
    L = u.shape[-1]
    n = 2 * L
    kf = np.fft.rfft(K, n=n, axis=-1)  # (H, L+1)
    uf = np.fft.rfft(u, n=n, axis=-1)  # (B, H, L+1)
    dyf = np.fft.rfft(dy, n=n, axis=-1)  # (B, H, L+1)
    du = np.fft.irfft(dyf * np.conj(kf), n=n, axis=-1)[..., :L] + D[:, None] * dy  # (B, H, L)
    dK = np.fft.irfft((dyf * np.conj(uf)).sum(0), n=n, axis=-1)[..., :L]  # (H, L)
    dD = np.einsum("bhl,bhl->h", dy, u)  # (H,)
    return du, dK, dD


def numpy_recurrence(u, dA, dB, C, D):
    """``x_t = dA x_{t-1} + dB u_t``, ``y_t = 2 Re sum_n C x_t + D u_t``, a Python loop over t."""
    Bsz, H, L = u.shape
    x = np.zeros((Bsz,) + dA.shape, dtype=np.complex128)  # (B, H, N2)
    y = np.empty_like(u)  # (B, H, L)
    for t in range(L):
        x *= dA
        x += dB * u[:, :, t, None]
        y[:, :, t] = 2.0 * np.einsum("hn,bhn->bh", C, x).real
    return y + D[:, None] * u


# --------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------


@register("ssm", title="S4D core (issue 2): kernel, FFT convolution, recurrence", order=10,
          description="float64 / complex128, S4D-Lin init, ZOH, causal, `D` skip included; "
                      "B = batch, H = channels, N = real state size (N/2 complex modes), "
                      "L = sequence length. Baselines are plain NumPy (`benchmarks/bench_ssm.py`).")
def ssm(ctx):
    s = QUICK if ctx.quick else FULL
    Bsz, H, N, L = s["B"], s["H"], s["N"], s["L"]
    ctx.params.update(s)
    rng = np.random.default_rng(0)
    p = s4d_init(H, N, init="lin", seed=1)
    u = rng.standard_normal((Bsz, H, L))  # (B, H, L)
    dy = rng.standard_normal((Bsz, H, L))  # (B, H, L)
    kargs = (p["log_dt"], p["log_A_real"], p["A_imag"], p["C_re"], p["C_im"])
    hnl = {"H": H, "N": N, "L": L}

    # (1) kernel generation. The Vandermonde running product carries ~l * eps relative error.
    ctx.compare("S4D kernel generation (zoh)", hnl,
                refimpl=lambda: s4d_kernel(*kargs, L, disc="zoh"),
                baseline=lambda: numpy_s4d_kernel_zoh(*kargs, L),
                baseline_name="NumPy exp(dtA*l) + einsum",
                rtol=1e-10, target_speedup=KERNEL_TARGET)

    # (2) FFT convolution, forward and forward + backward.
    K = s4d_kernel(*kargs, L)  # (H, L)
    D = p["D"]  # (H,)
    ctx.compare("FFT convolution forward", s,
                refimpl=lambda: fftconv(u, K, D),
                baseline=lambda: numpy_fftconv(u, K, D),
                baseline_name="numpy.fft rfft/irfft, n=2L",
                rtol=1e-12)

    def ref_conv_fb():
        y = fftconv(u, K, D)
        return (y,) + tuple(fftconv_bwd(u, K, D, dy))

    def base_conv_fb():
        y = numpy_fftconv(u, K, D)
        return (y,) + numpy_fftconv_bwd(u, K, D, dy)

    ctx.compare("FFT convolution forward + backward", s,
                refimpl=ref_conv_fb, baseline=base_conv_fb,
                baseline_name="numpy.fft rfft/irfft, n=2L", rtol=1e-12)

    # (3) whole-sequence recurrence.
    dA, dB = discretize_params(p["log_dt"], p["log_A_real"], p["A_imag"], disc="zoh")
    C = p["C_re"] + 1j * p["C_im"]  # (H, N2)
    ctx.compare("recurrence (whole sequence)", s,
                refimpl=lambda: ssm_recurrence(u, dA, dB, C, D),
                baseline=lambda: numpy_recurrence(u, dA, dB, C, D),
                baseline_name="NumPy loop over t, (B,H,N2) vectorised",
                rtol=1e-10)

    # (4) S4D layer, absolute figures (no NumPy baseline: its backward would be refimpl's math).
    ctx.absolute("S4D layer forward", s, refimpl=lambda: s4d_layer_fwd(u, p))

    def layer_fb():
        _, cache = s4d_layer_fwd(u, p)
        return s4d_layer_bwd(cache, dy)

    ctx.absolute("S4D layer forward + backward", s, refimpl=layer_fb)
