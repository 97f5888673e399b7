"""The argument checks of the layer ops (refimpl/layers.py): each bad argument is refused with a
one-line ValueError/TypeError naming it, and its valid neighbour (the same call, that one
argument fixed) passes.

Found by ``refimpl conform``'s invalid examples (issue 24): before these checks LayerNorm read
``gamma``/``beta`` and GLU ``b`` past their end in the Numba kernels (no bounds checks), a label
``-1`` meant the last class, a rank-2 input passed GELU, linear and dropout, ``L = 0`` pooled to
NaN. Each case here is also an invalid kind of :data:`refimpl.conform.strategies.INVALID`.
"""
import re

import numpy as np
import pytest

from refimpl import layers as Ly
from refimpl import precision

B, H, L, C = 2, 4, 3, 5


def _x(shape=(B, H, L), seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def _edit(base, **changes):
    """``base``'s (inputs, params, cfg) with entries replaced: ``inputs__x=...``,
    ``params__b=...``, ``cfg=...``."""
    inputs, params, cfg = dict(base[0]), dict(base[1]), base[2]
    for key, value in changes.items():
        if key == "cfg":
            cfg = value
        else:
            group, name = key.split("__")
            (inputs if group == "inputs" else params)[name] = value
    return inputs, params, cfg


def _args(op_name):
    """Valid arguments of each op (small)."""
    x = _x()
    return {
        "linear": ({"x": x}, {"W": _x((6, H), 1), "b": _x((6,), 2)}, None),
        "gelu": ({"x": x}, {}, None),
        "glu": ({"s": x}, {"W": _x((2 * H, H), 1), "b": _x((2 * H,), 2)}, None),
        "gsu": ({"x": x}, {"W": _x((H, H), 1), "b": _x((H,), 2), "c": _x((H,), 3)}, None),
        "layernorm": ({"x": x}, {"gamma": _x((H,), 1), "beta": _x((H,), 2)},
                      Ly.LayerNormConfig()),
        "batchnorm": ({"x": x, "running_mean": _x((H,), 3), "running_var": np.full(H, 0.5)},
                      {"gamma": _x((H,), 1), "beta": _x((H,), 2)}, Ly.BatchNormConfig()),
        "meanpool": ({"x": x}, {}, None),
        "cross_entropy": ({"logits": _x((B, C)), "labels": np.array([0, C - 1])}, {}, None),
        "dropout": ({"x": x, "mask": Ly.dropout_mask(np.random.default_rng(4), x.shape, 0.5)},
                    {}, None),
    }[op_name]


#: (op, what, the bad edit, the valid neighbour's edit, error type, the message's start).
CASES = [
    # layernorm: the kernel indexes gamma[h], beta[h] for h < H without bounds checks
    ("layernorm", "gamma of H + 1", dict(params__gamma=np.ones(H + 1)),
     dict(params__gamma=np.ones(H)), ValueError, r"gamma must have shape \(H,\) = \(4,\), "
                                                 r"got \(5,\)"),
    ("layernorm", "beta of H - 1", dict(params__beta=np.zeros(H - 1)),
     dict(params__beta=np.zeros(H)), ValueError, r"beta must have shape \(H,\) = \(4,\), "
                                                 r"got \(3,\)"),
    ("layernorm", "eps < 0", dict(cfg=Ly.LayerNormConfig(eps=-1e-5)),
     dict(cfg=Ly.LayerNormConfig(eps=1e-5)), ValueError, r"eps must be in \(0\.0, inf\], "
                                                         r"got -1e-05"),
    ("layernorm", "eps = 0", dict(cfg=Ly.LayerNormConfig(eps=0.0)),
     dict(cfg=Ly.LayerNormConfig(eps=1e-12)), ValueError, r"eps must be in \(0\.0, inf\]"),
    ("layernorm", "eps NaN", dict(cfg=Ly.LayerNormConfig(eps=float("nan"))),
     dict(cfg=Ly.LayerNormConfig(eps=0.5)), ValueError, r"eps must be finite"),
    ("layernorm", "x of rank 2", dict(inputs__x=_x((B, H))),
     dict(inputs__x=_x((B, H, 1))), ValueError, r"x must have rank 3, got shape \(2, 4\)"),
    # glu: the gate kernel reads b[H + h] for h < H
    ("glu", "b of 2H + 1", dict(params__b=np.zeros(2 * H + 1)),
     dict(params__b=np.zeros(2 * H)), ValueError, r"b must have shape \(2H,\) = \(8,\), "
                                                  r"got \(9,\)"),
    ("glu", "b of 2H - 1", dict(params__b=np.zeros(2 * H - 1)),
     dict(params__b=np.zeros(2 * H)), ValueError, r"b must have shape \(2H,\) = \(8,\), "
                                                  r"got \(7,\)"),
    ("glu", "W of (2H, H + 1)", dict(params__W=np.zeros((2 * H, H + 1))),
     dict(params__W=np.zeros((2 * H, H))), ValueError, r"W must have shape \(2H, H\) = "
                                                       r"\(8, 4\), got \(8, 5\)"),
    ("glu", "s of rank 2", dict(inputs__s=_x((B, H))),
     dict(inputs__s=_x((B, H, 1))), ValueError, r"s must have rank 3"),
    # rank-2 inputs and the parameters' shapes of linear, gelu, gsu
    ("gelu", "x of rank 2", dict(inputs__x=_x((H, L))),
     dict(inputs__x=_x((1, H, L))), ValueError, r"x must have rank 3, got shape \(4, 3\)"),
    ("linear", "x of rank 2", dict(inputs__x=_x((B, H))),
     dict(inputs__x=_x((B, H, 1))), ValueError, r"x must have rank 3"),
    ("linear", "W of (Hout, Hin + 1)", dict(params__W=np.zeros((6, H + 1))),
     dict(params__W=np.zeros((6, H))), ValueError, r"W must have shape \(Hout, Hin\) = "
                                                   r"\(\*, 4\), got \(6, 5\)"),
    ("linear", "b of Hout + 1", dict(params__b=np.zeros(7)),
     dict(params__b=np.zeros(6)), ValueError, r"b must have shape \(Hout,\) = \(6,\), "
                                              r"got \(7,\)"),
    ("linear", "b of Hout = 1 + 1 (broadcast silently before)",
     dict(params__W=np.zeros((1, H)), params__b=np.zeros(2)),
     dict(params__W=np.zeros((1, H)), params__b=np.zeros(1)), ValueError,
     r"b must have shape \(Hout,\) = \(1,\), got \(2,\)"),
    ("gsu", "x of rank 2", dict(inputs__x=_x((B, H))),
     dict(inputs__x=_x((B, H, 1))), ValueError, r"x must have rank 3"),
    ("gsu", "c of H + 1", dict(params__c=np.zeros(H + 1)),
     dict(params__c=np.zeros(H)), ValueError, r"c must have shape \(H,\) = \(4,\)"),
    ("gsu", "Tx of another shape", dict(inputs__Tx=np.zeros((B, H, L + 1))),
     dict(inputs__Tx=np.zeros((B, H, L))), ValueError, r"Tx must have shape \(B, H, L\)"),
    # dropout: one mask value per (batch row, channel), shared over time
    ("dropout", "x of rank 2", dict(inputs__x=_x((B, H)), inputs__mask=None),
     dict(inputs__x=_x((B, H, 1)), inputs__mask=None), ValueError, r"x must have rank 3"),
    ("dropout", "a mask per step (B, H, L)", dict(inputs__mask=np.ones((B, H, L))),
     dict(inputs__mask=np.ones((B, H, 1))), ValueError,
     r"mask must have shape \(B, H, 1\) = \(2, 4, 1\), got \(2, 4, 3\)"),
    ("dropout", "a mask of rank 2", dict(inputs__mask=np.ones((B, H))),
     dict(inputs__mask=np.ones((B, H, 1))), ValueError, r"mask must have rank 3"),
    # cross-entropy: a label indexes the logits' row
    ("cross_entropy", "label = C", dict(inputs__labels=np.array([0, C])),
     dict(inputs__labels=np.array([0, C - 1])), ValueError,
     r"labels must lie in \[0, 5\) \(C = logits.shape\[1\]\), got range \[0, 5\]"),
    ("cross_entropy", "label = -1", dict(inputs__labels=np.array([-1, 0])),
     dict(inputs__labels=np.array([0, 0])), ValueError, r"labels must lie in \[0, 5\)"),
    ("cross_entropy", "fewer labels than rows", dict(inputs__labels=np.array([0])),
     dict(inputs__labels=np.array([0, 0])), ValueError,
     r"labels must have shape \(2,\) \(one per row of logits\), got \(1,\)"),
    ("cross_entropy", "more labels than rows", dict(inputs__labels=np.array([0, 1, 2])),
     dict(inputs__labels=np.array([0, 1])), ValueError, r"labels must have shape \(2,\)"),
    ("cross_entropy", "logits of rank 3", dict(inputs__logits=_x((B, C, 1))),
     dict(inputs__logits=_x((B, C))), ValueError, r"logits must have rank 2"),
    ("cross_entropy", "float labels", dict(inputs__labels=np.array([0.0, 1.0])),
     dict(inputs__labels=np.array([0, 1], dtype=np.int32)), TypeError,
     r"labels must be an integer numpy.ndarray"),
    # batchnorm
    ("batchnorm", "momentum 1.5", dict(cfg=Ly.BatchNormConfig(momentum=1.5)),
     dict(cfg=Ly.BatchNormConfig(momentum=1.0)), ValueError,
     r"momentum must be in \[0\.0, 1\.0\], got 1\.5"),
    ("batchnorm", "momentum < 0", dict(cfg=Ly.BatchNormConfig(momentum=-0.1)),
     dict(cfg=Ly.BatchNormConfig(momentum=0.0)), ValueError, r"momentum must be in"),
    ("batchnorm", "eps < 0", dict(cfg=Ly.BatchNormConfig(eps=-1e-5)),
     dict(cfg=Ly.BatchNormConfig(eps=1e-5)), ValueError, r"eps must be in \(0\.0, inf\]"),
    ("batchnorm", "running_var < 0 in eval mode",
     dict(inputs__running_var=np.array([0.5, -1.0, 0.5, 0.5]),
          cfg=Ly.BatchNormConfig(training=False)),
     dict(inputs__running_var=np.array([0.5, 0.0, 0.5, 0.5]),
          cfg=Ly.BatchNormConfig(training=False)), ValueError,
     r"running_var must be >= 0 \(a variance\), got -1\.0 at channel 1"),
    ("batchnorm", "running_var < 0 in training mode",
     dict(inputs__running_var=np.array([0.5, -1.0, 0.5, 0.5])),
     dict(inputs__running_var=np.array([0.5, 0.0, 0.5, 0.5])), ValueError,
     r"running_var must be >= 0"),
    ("batchnorm", "gamma of H + 1 with H = 1 (broadcast silently before)",
     dict(inputs__x=_x((B, 1, L)), inputs__running_mean=np.zeros(1),
          inputs__running_var=np.ones(1), params__gamma=np.ones(2), params__beta=np.zeros(1)),
     dict(inputs__x=_x((B, 1, L)), inputs__running_mean=np.zeros(1),
          inputs__running_var=np.ones(1), params__gamma=np.ones(1), params__beta=np.zeros(1)),
     ValueError, r"gamma must have shape \(H,\) = \(1,\), got \(2,\)"),
    ("batchnorm", "running_mean of H - 1", dict(inputs__running_mean=np.zeros(H - 1)),
     dict(inputs__running_mean=np.zeros(H)), ValueError, r"running_mean must have shape"),
    ("batchnorm", "x of rank 2", dict(inputs__x=_x((B, H))),
     dict(inputs__x=_x((B, H, 1))), ValueError, r"x must have rank 3"),
    # meanpool
    ("meanpool", "L = 0", dict(inputs__x=np.zeros((B, H, 0))),
     dict(inputs__x=np.zeros((B, H, 1))), ValueError,
     r"x must have at least one time step \(L >= 1\), got shape \(2, 4, 0\)"),
    ("meanpool", "x of rank 2", dict(inputs__x=_x((B, H))),
     dict(inputs__x=_x((B, H, 1))), ValueError, r"x must have rank 3"),
]


@pytest.mark.parametrize("op_name, what, bad, good, error, match", CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_argument_is_refused_and_its_neighbour_passes(op_name, what, bad, good, error,
                                                          match):
    op = getattr(Ly, op_name.upper() + "_OP")
    base = _args(op_name)
    inputs, params, cfg = _edit(base, **good)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    res = op.fwd(inputs, params, cfg)
    assert all(np.all(np.isfinite(v)) for v in res.outputs.values()), what
    op.vjp(res.cache, {k: np.ones_like(v) for k, v in res.outputs.items()
                       if k in op.differentiable})
    inputs, params, cfg = _edit(base, **bad)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    with pytest.raises(error, match="^" + match) as e:
        op.fwd(inputs, params, cfg)
    assert "\n" not in str(e.value)


def test_past_the_end_read_is_refused():
    """The regression: ``beta`` one short of ``H`` as a view of a longer buffer. Before the
    check the kernel used the element past the view's end (12345 here; with the view's end at
    a protected page, a segmentation fault)."""
    x, gamma = _x(), np.ones(H)
    buf = np.array([0.0] * (H - 1) + [12345.0])
    with pytest.raises(ValueError, match="beta must have shape"):
        Ly.layernorm_fwd(x, gamma, buf[:H - 1])
    with pytest.raises(ValueError, match="gamma must have shape"):
        Ly.layernorm_fwd(x, buf[:H - 1], np.zeros(H))
    with pytest.raises(ValueError, match="b must have shape"):
        Ly.glu_fwd(x, _x((2 * H, H)), np.concatenate([np.zeros(2 * H - 1), [1e300]])[:-1])
    y, (xh, _, _) = Ly.layernorm_fwd(x, gamma, buf[:H] * 0.0)
    np.testing.assert_array_equal(y, xh)


@pytest.mark.parametrize("what", ["gelu", "glu", "layernorm", "gsu"])
def test_cotangent_of_another_shape_is_refused(what):
    """The backward kernels read the cotangent elementwise without bounds checks: a shorter
    one would be read past its end."""
    x = _x()
    fwd, bwd, name = {
        "gelu": (lambda: Ly.gelu_fwd(x), Ly.gelu_bwd, "dy"),
        "glu": (lambda: Ly.glu_fwd(x, _x((2 * H, H), 1), _x((2 * H,), 2)), Ly.glu_bwd, "dz"),
        "layernorm": (lambda: Ly.layernorm_fwd(x, np.ones(H), np.zeros(H)), Ly.layernorm_bwd,
                      "dy"),
        "gsu": (lambda: Ly.gsu_fwd(x, _x((H, H), 1), _x((H,), 2), _x((H,), 3)), Ly.gsu_bwd,
                "dz"),
    }[what]
    out, cache = fwd()
    bwd(cache, np.ones_like(out))
    with pytest.raises(ValueError, match=re.escape(f"{name} must have shape (B, H, L) = "
                                                   f"(2, 4, 3), got (2, 4, 2)")):
        bwd(cache, np.ones((B, H, L - 1)))


def test_gelu_fwd_itself_stays_elementwise():
    """Only the op requires (B, H, L): gelu_fwd is elementwise, any rank (the activations and
    the tests call it so)."""
    y, _ = Ly.gelu_fwd(np.array([0.0, 1.0, -1.0]))
    assert y.shape == (3,)


def test_batchnorm_fwd_keeps_its_channel_axis():
    """The parameters' shapes follow ``channel_axis`` (the SDN's channel-major (C, B, T))."""
    x = _x((3, B, L))  # (C, B, T)
    y, _, _ = Ly.batchnorm_fwd(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), True,
                               channel_axis=0)
    assert y.shape == x.shape
    with pytest.raises(ValueError, match=r"gamma must have shape \(H,\) = \(3,\)"):
        Ly.batchnorm_fwd(x, np.ones(B), np.zeros(3), np.zeros(3), np.ones(3), True,
                         channel_axis=0)


def test_checks_follow_the_active_precision():
    """Under ``precision.using("float32")`` the float32 neighbour passes, a float64 array is
    the usual TypeError, and the shape checks are the same."""
    x = _x().astype(np.float32)
    g, b = np.ones(H, np.float32), np.zeros(H, np.float32)
    with precision.using("float32"):
        y = Ly.LAYERNORM_OP.fwd({"x": x}, {"gamma": g, "beta": b}).outputs["y"]
        assert y.dtype == np.float32
        with pytest.raises(TypeError, match="gamma must have dtype float32"):
            Ly.LAYERNORM_OP.fwd({"x": x}, {"gamma": np.ones(H), "beta": b})
        with pytest.raises(ValueError, match="beta must have shape"):
            Ly.LAYERNORM_OP.fwd({"x": x}, {"gamma": g, "beta": b[:-1]})
        loss = Ly.CROSS_ENTROPY_OP.fwd({"logits": _x((B, C)).astype(np.float32),
                                        "labels": np.array([0, C - 1])}, {}).outputs["loss"]
        assert loss.dtype == np.float32
    with pytest.raises(TypeError, match="x must have dtype float64"):
        Ly.LAYERNORM_OP.fwd({"x": x}, {"gamma": np.ones(H), "beta": np.zeros(H)})


def test_cross_entropy_fwd_checks_labels_for_every_caller():
    """cross_entropy_fwd itself (the trainer's and the stream's evaluation call it directly)
    refuses a label out of range; it does not check dtypes (float32 logits of a float32 model
    are evaluated outside ``precision.using``)."""
    logits = _x((B, C)).astype(np.float32)
    loss, _ = Ly.cross_entropy_fwd(logits, np.array([0, 4]))
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        Ly.cross_entropy_fwd(logits, np.array([0, -1]))
