"""AdamW with parameter groups, a cosine learning-rate schedule with warm-up, gradient clipping.

Parameters, gradients and optimizer state are plain (nested) dicts of float64 NumPy arrays, so
a checkpoint is just :func:`refimpl.h5io.write_tree` of the state and a resumed run is
bit-identical to an uninterrupted one (every operation below is elementwise and in a fixed
order; nothing depends on the thread count).

The update (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
Algorithm 2, in the parametrisation of ``torch.optim.AdamW``). For each parameter ``p`` with
gradient ``g`` (after optional global-norm clipping), step ``t = 1, 2, ...``, group learning
rate ``lr`` and group weight decay ``wd``, and the schedule factor ``eta_t``::

    lr_t = eta_t * lr
    p    = p - lr_t * wd * p                      decoupled weight decay (uses p_{t-1})
    m    = beta1 m + (1 - beta1) g
    v    = beta2 v + (1 - beta2) g^2
    m^   = m / (1 - beta1^t)                       bias correction
    v^   = v / (1 - beta2^t)
    p    = p - lr_t * m^ / (sqrt(v^) + eps)

In the paper's notation ``alpha = lr``, ``eta_t`` is the schedule multiplier and its
``lambda`` equals ``lr * wd``: PyTorch (and the SDN / SpikingSSM training code) scale the
decay by the learning rate, so ``wd = 1e-2`` means ``p *= 1 - lr_t * 1e-2`` per step.
"""
import fnmatch
import math
import numbers

import numpy as np
from numba import njit

from . import config
from . import threads
from ._checks import check_array, check_int, check_real

#: Defaults of ``torch.optim.AdamW`` (except weight_decay, which is per group here).
BETAS = (0.9, 0.999)
EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


def make_groups(params, lr, weight_decay, rules=()):
    """Split parameter names into AdamW groups by glob rules.

    Parameters
    ----------
    params : dict of str -> array or iterable of str
        The parameters (only the names are used).
    lr : float
        Default learning rate, > 0.
    weight_decay : float
        Default decoupled weight decay, >= 0.
    rules : sequence of (pattern, overrides)
        ``pattern`` is an :mod:`fnmatch` glob over names (or a tuple of globs), ``overrides``
        a dict with any of ``"lr"`` and ``"weight_decay"``. The **first** matching rule decides
        a name's group; names matching no rule get the defaults. Example (issue 5: SSM
        parameters with ``lr = min(lr, 1e-3)`` and no decay, no decay on biases and norms)::

            make_groups(params, lr, 1e-2, rules=[
                (("*log_dt", "*log_A_real", "*A_imag", "*B_re", "*B_im"),
                 {"lr": min(lr, 1e-3), "weight_decay": 0.0}),
                (("*bias", "*norm*"), {"weight_decay": 0.0}),
            ])

    Returns
    -------
    list of dict
        ``{"params": [names, sorted], "lr": float, "weight_decay": float}``, one per distinct
        setting, in order: the default group first, then the rules' groups in rule order.
        Groups without names are dropped.
    """
    names = sorted(params)
    lr = check_real("lr", lr, 0.0, lo_open=True)
    weight_decay = check_real("weight_decay", weight_decay, 0.0)
    settings = [(lr, weight_decay)]
    parsed = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], dict)):
            raise ValueError(f"rules[{i}] must be (pattern, overrides dict), got {rule!r}")
        pattern, over = rule
        patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)
        unknown = set(over) - {"lr", "weight_decay"}
        if unknown:
            raise ValueError(f"rules[{i}] overrides unknown setting(s) {sorted(unknown)}; "
                             f"valid are 'lr', 'weight_decay'")
        g_lr = check_real(f"rules[{i}] lr", over.get("lr", lr), 0.0, lo_open=True)
        g_wd = check_real(f"rules[{i}] weight_decay", over.get("weight_decay", weight_decay), 0.0)
        parsed.append((patterns, (g_lr, g_wd)))
        if (g_lr, g_wd) not in settings:
            settings.append((g_lr, g_wd))
    members = {s: [] for s in settings}
    for name in names:
        setting = (lr, weight_decay)
        for patterns, s in parsed:
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                setting = s
                break
        members[setting].append(name)
    return [{"params": members[s], "lr": s[0], "weight_decay": s[1]}
            for s in settings if members[s]]


def _check_groups(groups, params):
    """Every parameter in exactly one group with valid lr / weight_decay."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError(f"groups must be a non-empty list of dicts, got {groups!r}")
    seen = {}
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g or "lr" not in g:
            raise ValueError(f"groups[{i}] must be a dict with 'params', 'lr' "
                             f"(and optionally 'weight_decay'), got {g!r}")
        check_real(f"groups[{i}]['lr']", g["lr"], 0.0)
        check_real(f"groups[{i}]['weight_decay']", g.get("weight_decay", 0.0), 0.0)
        for name in g["params"]:
            if name in seen:
                raise ValueError(f"parameter {name!r} is in groups[{seen[name]}] and groups[{i}]")
            if name not in params:
                raise ValueError(f"groups[{i}] names {name!r}, which is not a parameter")
            seen[name] = i
    missing = sorted(set(params) - set(seen))
    if missing:
        raise ValueError(f"parameter(s) {missing} are in no group")


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def cosine_schedule(step, total_steps, warmup_steps=0, min_factor=0.0):
    """Learning-rate factor ``eta`` of the update with 0-based index ``step``.

    Linear warm-up, then cosine decay::

        eta = (step + 1) / W                                         step < W
        eta = f + (1 - f) (1 + cos(pi (step - W) / (T - W))) / 2      W <= step < T

    with ``T = total_steps``, ``W = warmup_steps``, ``f = min_factor``. Without warm-up this is
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T, eta_min=f lr)`` stepped once per
    update: the first update uses the full rate, the last ``f + (1-f)(1 + cos(pi (T-1)/T))/2``.
    Steps ``>= T`` keep the final factor ``f``.

    Parameters
    ----------
    step : int, >= 0
    total_steps : int, >= 1
    warmup_steps : int, default 0, in ``[0, total_steps)``
    min_factor : float, default 0.0, in ``[0, 1]``

    Returns
    -------
    float
    """
    step = check_int("step", step, 0)
    total = check_int("total_steps", total_steps, 1)
    warm = check_int("warmup_steps", warmup_steps, 0)
    if warm >= total:
        raise ValueError(f"warmup_steps must be < total_steps ({total}), got {warm}")
    f = check_real("min_factor", min_factor, 0.0, 1.0)
    if step < warm:
        return (step + 1) / warm
    if step >= total:
        return f
    progress = (step - warm) / (total - warm)
    return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------


@threads.owned()
def global_grad_norm(grads):
    """``sqrt(sum_p ||g_p||^2)`` over all gradients, summed in sorted-name order."""
    total = 0.0
    for name in sorted(grads):
        g = grads[name]
        total += float(np.dot(g.ravel(), g.ravel()))
    return math.sqrt(total)


def clip_factor(norm, max_norm):
    """``min(1, max_norm / (norm + 1e-6))``: the factor of ``torch.nn.utils.clip_grad_norm_``."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


# --------------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------------


def adamw_init(params):
    """Fresh AdamW state for ``params``.

    Returns
    -------
    dict
        ``{"step": int64 0-d array (updates done), "exp_avg": {name: zeros like p},
        "exp_avg_sq": {name: zeros like p}}``: plain arrays, checkpointable with
        :func:`refimpl.h5io.write_tree` and restored bit-exactly by ``read_tree``.
    """
    _check_params(params)
    return {
        "step": np.zeros((), dtype=np.int64),
        "exp_avg": {k: np.zeros_like(v) for k, v in params.items()},
        "exp_avg_sq": {k: np.zeros_like(v) for k, v in params.items()},
    }


def _check_params(params, what="params"):
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{what} must be a non-empty dict of float64 arrays")
    for k, v in params.items():
        if not isinstance(k, str):
            raise TypeError(f"{what} keys must be str, got {k!r}")
        check_array(f"{what}[{k!r}]", v)


def check_state(state, params):
    """Validate an AdamW state (e.g. read back from a checkpoint) against ``params``.

    Raises ValueError naming the first missing or mismatched entry.
    """
    if not isinstance(state, dict):
        raise ValueError(f"optimizer state must be a dict, got {type(state).__name__}")
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in state:
            raise ValueError(f"optimizer state has no {key!r} entry")
    step = np.asarray(state["step"])
    if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
        raise ValueError(f"optimizer state 'step' must be a non-negative integer scalar, "
                         f"got {state['step']!r}")
    for key in ("exp_avg", "exp_avg_sq"):
        moments = state[key]
        if not isinstance(moments, dict) or set(moments) != set(params):
            got = sorted(moments) if isinstance(moments, dict) else type(moments).__name__
            raise ValueError(f"optimizer state {key!r} must have one entry per parameter "
                             f"{sorted(params)}, got {got}")
        for name, p in params.items():
            a = moments[name]
            check_array(f"optimizer state {key}[{name!r}]", a)
            if a.shape != p.shape:
                raise ValueError(f"optimizer state {key}[{name!r}] has shape {a.shape}, "
                                 f"parameter {name!r} has {p.shape}")
            if not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"optimizer state {key}[{name!r}] must be a writeable "
                                 f"C-contiguous array")


@njit(**config.NJIT_OPTS)
def _adamw_update(p, g, m, v, factor, decay, b1, b2, lr_t, c1, c2, eps):
    """One parameter's update in one pass, elementwise (1-d views).

    Equivalent to ``g = g * factor`` (when ``factor != 1``); ``p *= decay`` (when
    ``decay != 1``); ``m *= b1; m += (1 - b1) g; v *= b2; v += (1 - b2) (g g);
    p -= lr_t (m / c1) / (sqrt(v / c2) + eps)``: the same operations in the same order, so
    bit-identical to the NumPy form. Preconditions: C-contiguous float64 1-d arrays of one
    length; ``p, m, v`` updated in place.
    """
    for i in range(p.size):
        gi = g[i] * factor if factor != 1.0 else g[i]
        pi = p[i] * decay if decay != 1.0 else p[i]
        mi = m[i] * b1
        mi += (1.0 - b1) * gi
        vi = v[i] * b2
        vi += (1.0 - b2) * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = pi - lr_t * (mi / c1) / (np.sqrt(vi / c2) + eps)


@threads.owned()
def adamw_step(params, grads, state, groups, lr_scale=1.0, betas=BETAS, eps=EPS,
               clip_norm=None):
    """One AdamW update, **in place** on ``params`` and ``state`` (``grads`` are not modified).

    Parameters
    ----------
    params : dict of str -> float64 array
        Updated in place (each array must be writeable and C-contiguous).
    grads : dict of str -> float64 array
        Same keys and shapes as ``params``, finite.
    state : dict
        From :func:`adamw_init` (or a checkpoint); updated in place.
    groups : list of dict
        From :func:`make_groups`: ``{"params": names, "lr": float, "weight_decay": float}``;
        each parameter in exactly one group.
    lr_scale : float, default 1.0
        Schedule factor ``eta_t`` multiplying every group's ``lr`` (e.g.
        ``cosine_schedule(int(state["step"]), total)``).
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    clip_norm : float or None, default None
        Clip the global gradient norm (over all parameters) to this value first, as
        ``torch.nn.utils.clip_grad_norm_``.

    Returns
    -------
    dict
        ``{"step": t (after the update), "grad_norm": norm before clipping,
        "clip_factor": factor applied to the gradients}``.

    Notes
    -----
    See the module docstring for the update. Per parameter, in this order:
    ``p *= 1 - lr_t wd``; ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr_t (m / c1) / (sqrt(v / c2) + eps)`` with ``c_i = 1 - b_i^t``.
    """
    _check_params(params)
    _check_params(grads, "grads")
    if set(grads) != set(params):
        raise ValueError(f"grads must have the keys of params; "
                         f"missing {sorted(set(params) - set(grads))}, "
                         f"extra {sorted(set(grads) - set(params))}")
    for name, p in params.items():
        if grads[name].shape != p.shape:
            raise ValueError(f"grads[{name!r}] has shape {grads[name].shape}, "
                             f"parameter {name!r} has {p.shape}")
        if not p.flags.c_contiguous or not p.flags.writeable:
            raise ValueError(f"params[{name!r}] must be a writeable C-contiguous array "
                             f"(it is updated in place)")
    check_state(state, params)
    _check_groups(groups, params)
    lr_scale = check_real("lr_scale", lr_scale, 0.0)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = check_real("beta1", betas[0], 0.0, 1.0, hi_open=True)
    b2 = check_real("beta2", betas[1], 0.0, 1.0, hi_open=True)
    eps = check_real("eps", eps, 0.0)
    if clip_norm is not None:
        if not isinstance(clip_norm, numbers.Real):
            raise TypeError(f"clip_norm must be a real number or None, got {clip_norm!r}")
        clip_norm = check_real("clip_norm", clip_norm, 0.0, lo_open=True)

    norm = global_grad_norm(grads)
    factor = clip_factor(norm, clip_norm)
    t = int(state["step"]) + 1
    c1 = 1.0 - b1**t
    c2 = 1.0 - b2**t
    for group in groups:
        lr_t = lr_scale * float(group["lr"])
        wd = float(group.get("weight_decay", 0.0))
        decay = 1.0 - lr_t * wd if wd != 0.0 else 1.0
        for name in group["params"]:
            # p *= decay; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
            # p -= lr_t (m / c1) / (sqrt(v / c2) + eps), fused (see _adamw_update)
            _adamw_update(params[name].reshape(-1), np.ascontiguousarray(grads[name]).reshape(-1),
                          state["exp_avg"][name].reshape(-1), state["exp_avg_sq"][name].reshape(-1),
                          factor, decay, b1, b2, lr_t, c1, c2, eps)
    state["step"] = np.asarray(t, dtype=np.int64)
    return {"step": t, "grad_norm": norm, "clip_factor": factor}
