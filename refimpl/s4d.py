"""The S4D layer: kernel + convolution + ``D`` skip, forward and backward (DESIGN.md 2-3).

    K = s4d_kernel(params, L)           (H, L) or (2, H, L)
    y = fftconv(u, K) + D u             (B, H, L)

Parameters travel as a dict with the DESIGN.md names: ``log_dt, log_A_real, A_imag, C_re,
C_im, D`` and optionally ``B_re, B_im`` (see :func:`refimpl.ssm.s4d_init`).
"""
from ._checks import check_array, check_name
from .conv import fftconv, fftconv_bwd
from .ssm import DISCRETIZATIONS, KERNEL_PARAMS, s4d_kernel, s4d_kernel_bwd

#: Every parameter of the layer: the kernel's and the skip ``D``.
LAYER_PARAMS = KERNEL_PARAMS + ("D",)
TRAINABLE_B = ("B_re", "B_im")


def _kernel_args(params):
    missing = [k for k in LAYER_PARAMS if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; build it with refimpl.ssm.s4d_init")
    args = [params[k] for k in KERNEL_PARAMS]
    B = {k: params[k] for k in TRAINABLE_B if k in params}
    if len(B) == 1:
        raise ValueError("params must hold both B_re and B_im (trainable B) or neither")
    return args, B


def s4d_layer_fwd(u, params, disc="zoh"):
    """Forward of the S4D layer.

    Parameters
    ----------
    u : float64 (B, H, L)
    params : dict of float64 arrays (see module docstring)
    disc : {"zoh", "bilinear"}, default "zoh"

    Returns
    -------
    y : float64 (B, H, L)
    cache : tuple
        What :func:`s4d_layer_bwd` needs: ``(u, K, params, disc)``.
    """
    check_name("disc", disc, DISCRETIZATIONS)
    u = check_array("u", u, 3)
    args, B = _kernel_args(params)
    K = s4d_kernel(*args, u.shape[-1], disc=disc, **B)  # (H, L) or (2, H, L)
    y = fftconv(u, K, params["D"])  # (B, H, L)
    return y, (u, K, params, disc)


def s4d_layer_bwd(cache, dy):
    """Backward of the S4D layer: returns ``(du, grads)``.

    ``grads`` is a dict with one freshly allocated gradient per entry of ``params``
    (``log_dt, log_A_real, A_imag, C_re, C_im, D`` and ``B_re, B_im`` when present).
    """
    u, K, params, disc = cache
    du, dK, dD = fftconv_bwd(u, K, params["D"], dy)
    args, B = _kernel_args(params)
    g = s4d_kernel_bwd(*args, dK, disc=disc, **B)
    grads = dict(zip(KERNEL_PARAMS + tuple(B), g))
    grads["D"] = dD
    return du, grads
