"""The fused AdamW update (issue 13) against the NumPy form it replaced, kept here verbatim:
the same IEEE operations (``* / + - sqrt``) in the same order, so compared exactly."""
import numpy as np
from hypothesis import given, strategies as st

from refimpl.optim import adamw_init, adamw_step, global_grad_norm, clip_factor


def _old_adamw_step(params, grads, state, groups, lr_scale=1.0, betas=(0.9, 0.999), eps=1e-8,
                    clip_norm=None):
    b1, b2 = betas
    factor = clip_factor(global_grad_norm(grads), clip_norm)
    t = int(state["step"]) + 1
    c1, c2 = 1.0 - b1**t, 1.0 - b2**t
    for group in groups:
        lr_t = lr_scale * float(group["lr"])
        wd = float(group.get("weight_decay", 0.0))
        for name in group["params"]:
            p = params[name]
            g = grads[name] if factor == 1.0 else grads[name] * factor
            m, v = state["exp_avg"][name], state["exp_avg_sq"][name]
            if wd != 0.0:
                p *= 1.0 - lr_t * wd
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            p -= lr_t * (m / c1) / (np.sqrt(v / c2) + eps)
    state["step"] = np.asarray(t, dtype=np.int64)


@given(st.integers(0, 2**32 - 1), st.sampled_from([None, 0.5, 100.0]),
       st.floats(0.0, 2.0), st.integers(1, 4))
def test_fused_adamw_equals_numpy_form(seed, clip, lr_scale, steps):
    rng = np.random.default_rng(seed)
    shapes = {"a.W": (3, 4), "a.b": (4,), "c": (), "d.x": (2, 1, 3)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    groups = [{"params": ["a.W", "d.x"], "lr": 1e-2, "weight_decay": 0.1},
              {"params": ["a.b", "c"], "lr": 3e-3, "weight_decay": 0.0}]
    p_new = {k: v.copy() for k, v in params.items()}
    p_old = {k: v.copy() for k, v in params.items()}
    s_new, s_old = adamw_init(p_new), adamw_init(p_old)
    for _ in range(steps):
        grads = {k: np.asarray(rng.normal(size=s) * 10) for k, s in shapes.items()}
        adamw_step(p_new, grads, s_new, groups, lr_scale=lr_scale, clip_norm=clip)
        _old_adamw_step(p_old, grads, s_old, groups, lr_scale=lr_scale, clip_norm=clip)
    for k in shapes:
        assert np.array_equal(p_new[k], p_old[k]), k
        assert np.array_equal(s_new["exp_avg"][k], s_old["exp_avg"][k]), k
        assert np.array_equal(s_new["exp_avg_sq"][k], s_old["exp_avg_sq"][k]), k
    assert int(s_new["step"]) == int(s_old["step"]) == steps
