"""AdamW, parameter groups, cosine schedule with warm-up, clipping, checkpoint/resume."""
import math

import numpy as np
import pytest

from refimpl.h5io import atomic_h5, open_h5, read_tree, write_tree
from refimpl.optim import (adamw_init, adamw_step, check_state, clip_factor, cosine_schedule,
                           global_grad_norm, make_groups)

# Two AdamW steps by hand (Loshchilov & Hutter Alg. 2, torch.optim.AdamW parametrisation),
# p0 = 1, lr = 0.1, wd = 0.01, betas (0.9, 0.999), eps = 1e-8, g1 = 0.5, g2 = -0.25:
#   step 1: p = 1 (1 - 0.1 * 0.01) = 0.999
#           m = 0.1 * 0.5 = 0.05,  v = 0.001 * 0.25 = 0.00025
#           m^ = 0.05 / 0.1 = 0.5,  v^ = 0.00025 / 0.001 = 0.25,  sqrt(v^) = 0.5
#           p = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.89900000199999996000000079...
#   step 2: p = p1 (1 - 0.001)
#           m = 0.9 * 0.05 + 0.1 * (-0.25) = 0.02
#           v = 0.999 * 0.00025 + 0.001 * 0.0625 = 0.00031225
#           m^ = 0.02 / (1 - 0.81) = 0.02 / 0.19,  v^ = 0.00031225 / (1 - 0.998001)
#           p = 0.999 p1 - 0.1 m^ / (sqrt(v^) + 1e-8) = 0.87146729870584616259937640...
P1 = 0.89900000199999996000000079
P2 = 0.87146729870584616259937640


def _scalar_problem(lr=0.1, wd=0.01):
    params = {"w": np.array([1.0])}
    groups = make_groups(params, lr=lr, weight_decay=wd)
    return params, groups, adamw_init(params)


def test_adamw_two_steps_match_the_hand_computation():
    params, groups, state = _scalar_problem()
    info = adamw_step(params, {"w": np.array([0.5])}, state, groups)
    assert info["step"] == 1 and int(state["step"]) == 1
    assert state["exp_avg"]["w"][0] == pytest.approx(0.05, rel=1e-15)
    assert state["exp_avg_sq"]["w"][0] == pytest.approx(0.00025, rel=1e-14)
    assert params["w"][0] == pytest.approx(P1, rel=1e-15, abs=0)
    adamw_step(params, {"w": np.array([-0.25])}, state, groups)
    assert state["exp_avg"]["w"][0] == pytest.approx(0.02, rel=1e-14)
    assert state["exp_avg_sq"]["w"][0] == pytest.approx(0.00031225, rel=1e-14)
    assert params["w"][0] == pytest.approx(P2, rel=1e-15, abs=0)


def test_groups_use_their_own_lr_and_weight_decay():
    # "a" follows the hand example; "b" has lr 0.1 and no decay, so its first step is exactly
    # 1 - 0.1 * 0.5 / (0.5 + 1e-8) (sign-like first Adam step, no shrinkage).
    params = {"a": np.array([1.0]), "b.bias": np.array([1.0])}
    groups = make_groups(params, lr=0.1, weight_decay=0.01,
                         rules=[("*bias", {"weight_decay": 0.0})])
    assert groups == [{"params": ["a"], "lr": 0.1, "weight_decay": 0.01},
                      {"params": ["b.bias"], "lr": 0.1, "weight_decay": 0.0}]
    state = adamw_init(params)
    adamw_step(params, {"a": np.array([0.5]), "b.bias": np.array([0.5])}, state, groups)
    assert params["a"][0] == pytest.approx(P1, rel=1e-15)
    assert params["b.bias"][0] == pytest.approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8), rel=1e-15)


def test_make_groups_issue5_rules_first_match_wins():
    names = ["layers.0.ssm.log_dt", "layers.0.ssm.A_imag", "layers.0.ssm.C_re",
             "layers.0.norm.weight", "layers.0.glu.bias", "layers.0.glu.weight", "decoder.weight"]
    lr = 1e-2
    groups = make_groups(dict.fromkeys(names), lr, 1e-2, rules=[
        (("*log_dt", "*log_A_real", "*A_imag", "*B_re", "*B_im"),
         {"lr": min(lr, 1e-3), "weight_decay": 0.0}),
        (("*bias", "*norm*"), {"weight_decay": 0.0}),
    ])
    by = {(g["lr"], g["weight_decay"]): g["params"] for g in groups}
    assert by[(1e-2, 1e-2)] == ["decoder.weight", "layers.0.glu.weight", "layers.0.ssm.C_re"]
    assert by[(1e-3, 0.0)] == ["layers.0.ssm.A_imag", "layers.0.ssm.log_dt"]
    assert by[(1e-2, 0.0)] == ["layers.0.glu.bias", "layers.0.norm.weight"]


def test_lr_scale_multiplies_every_group():
    p1, g1, s1 = _scalar_problem(lr=0.05)
    p2, g2, s2 = _scalar_problem(lr=0.1)
    for g in (0.5, -0.25, 0.125):
        adamw_step(p1, {"w": np.array([g])}, s1, g1)
        adamw_step(p2, {"w": np.array([g])}, s2, g2, lr_scale=0.5)
    np.testing.assert_array_equal(p1["w"], p2["w"])


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def test_cosine_without_warmup_is_torch_cosine_annealing():
    T = 10
    got = [cosine_schedule(s, T) for s in range(T)]
    want = [0.5 * (1 + math.cos(math.pi * s / T)) for s in range(T)]
    assert got == pytest.approx(want, rel=1e-15, abs=1e-16)
    assert got[0] == 1.0 and got[5] == pytest.approx(0.5, rel=1e-15)
    assert cosine_schedule(T, T) == 0.0 and cosine_schedule(T + 5, T, min_factor=0.1) == 0.1


def test_cosine_with_warmup_and_floor():
    T, W, f = 12, 4, 0.1
    got = [cosine_schedule(s, T, W, f) for s in range(T)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0], rel=1e-15)
    assert got[4] == 1.0                      # first cosine step: full rate
    assert got[8] == pytest.approx(f + (1 - f) * 0.5, rel=1e-15)  # halfway through the cosine
    assert got[11] == pytest.approx(f + (1 - f) * 0.5 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-15)
    assert all(a >= b for a, b in zip(got[4:], got[5:]))  # monotone after warm-up


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=-1, total_steps=10), "step must be >= 0"),
    (dict(step=0, total_steps=0), "total_steps must be >= 1"),
    (dict(step=0, total_steps=10, warmup_steps=10), r"warmup_steps must be < total_steps \(10\)"),
    (dict(step=0, total_steps=10, min_factor=1.5), r"min_factor must be in \[0.0, 1.0\]"),
])
def test_cosine_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_schedule(**kwargs)


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------


def test_clipping_scales_to_max_norm_and_leaves_grads_alone():
    params = {"a": np.zeros(1), "b": np.zeros(1)}
    grads = {"a": np.array([3.0]), "b": np.array([4.0])}
    assert global_grad_norm(grads) == 5.0
    groups = make_groups(params, 0.1, 0.0)
    state = adamw_init(params)
    info = adamw_step(params, grads, state, groups, clip_norm=1.0)
    assert info["grad_norm"] == 5.0
    assert info["clip_factor"] == pytest.approx(1.0 / (5.0 + 1e-6), rel=1e-15)
    np.testing.assert_array_equal(grads["a"], [3.0])  # caller's gradients untouched
    # first moment = (1 - beta1) * clipped gradient
    assert state["exp_avg"]["a"][0] == pytest.approx(0.1 * 3.0 / (5.0 + 1e-6), rel=1e-14)
    assert state["exp_avg"]["b"][0] == pytest.approx(0.1 * 4.0 / (5.0 + 1e-6), rel=1e-14)
    # below the threshold nothing changes
    assert clip_factor(0.5, 1.0) == 1.0 and clip_factor(5.0, None) == 1.0


# --------------------------------------------------------------------------------------------
# Determinism and checkpoint / resume
# --------------------------------------------------------------------------------------------


def _run(params, state, groups, steps, start, total, seed=0):
    for s in range(start, start + steps):
        rng = np.random.default_rng([seed, s])
        grads = {k: rng.standard_normal(params[k].shape) for k in sorted(params)}
        adamw_step(params, grads, state, groups,
                   lr_scale=cosine_schedule(int(state["step"]), total, warmup_steps=2),
                   clip_norm=2.0)


def _fresh():
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    groups = make_groups(params, 1e-2, 1e-2, rules=[("b", {"weight_decay": 0.0})])
    return params, groups, adamw_init(params)


def test_same_inputs_same_numbers():
    (p1, g1, s1), (p2, g2, s2) = _fresh(), _fresh()
    _run(p1, s1, g1, 10, 0, 10)
    _run(p2, s2, g2, 10, 0, 10)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])


def test_resume_from_hdf5_checkpoint_is_bit_exact(tmp_path):
    p_full, groups, s_full = _fresh()
    _run(p_full, s_full, groups, 10, 0, 10)

    p, groups, s = _fresh()
    _run(p, s, groups, 4, 0, 10)
    path = tmp_path / "ckpt.h5"
    with atomic_h5(path, "test-ckpt", 1) as f:
        write_tree(f.create_group("params"), p)
        write_tree(f.create_group("optimizer"), s)
    del p, s
    with open_h5(path, "test-ckpt") as f:
        p = read_tree(f["params"])
        s = read_tree(f["optimizer"])
    check_state(s, p)
    _run(p, s, groups, 6, 4, 10)
    assert int(s["step"]) == 10
    for k in p_full:
        np.testing.assert_array_equal(p[k], p_full[k])
        np.testing.assert_array_equal(s["exp_avg"][k], s_full["exp_avg"][k])
        np.testing.assert_array_equal(s["exp_avg_sq"][k], s_full["exp_avg_sq"][k])


# --------------------------------------------------------------------------------------------
# Validation: one test per rule
# --------------------------------------------------------------------------------------------


def test_param_in_no_group():
    params, _, state = _scalar_problem()
    params["extra"] = np.zeros(2)
    state = adamw_init(params)
    with pytest.raises(ValueError, match=r"parameter\(s\) \['extra'\] are in no group"):
        adamw_step(params, {k: np.zeros_like(v) for k, v in params.items()}, state,
                   [{"params": ["w"], "lr": 0.1}])


def test_param_in_two_groups():
    params, _, state = _scalar_problem()
    with pytest.raises(ValueError, match=r"'w' is in groups\[0\] and groups\[1\]"):
        adamw_step(params, {"w": np.ones(1)}, state,
                   [{"params": ["w"], "lr": 0.1}, {"params": ["w"], "lr": 0.2}])


def test_grads_keys_must_match():
    params, groups, state = _scalar_problem()
    with pytest.raises(ValueError, match=r"grads must have the keys of params; missing \['w'\]"):
        adamw_step(params, {"v": np.ones(1)}, state, groups)


def test_grad_shape_must_match():
    params, groups, state = _scalar_problem()
    with pytest.raises(ValueError,
                       match=r"grads\['w'\] has shape \(2,\), parameter 'w' has \(1,\)"):
        adamw_step(params, {"w": np.ones(2)}, state, groups)


def test_grad_dtype_must_be_float64():
    params, groups, state = _scalar_problem()
    with pytest.raises(TypeError, match=r"grads\['w'\] must have dtype float64, got float32"):
        adamw_step(params, {"w": np.ones(1, np.float32)}, state, groups)


def test_non_finite_gradient_is_refused():
    params, groups, state = _scalar_problem()
    with pytest.raises(ValueError, match=r"grads\['w'\] contains non-finite values"):
        adamw_step(params, {"w": np.array([np.nan])}, state, groups)
    assert params["w"][0] == 1.0 and int(state["step"]) == 0  # nothing was changed


def test_state_of_other_params_is_refused():
    params, groups, _ = _scalar_problem()
    state = adamw_init({"w": np.zeros(3)})
    with pytest.raises(ValueError,
                       match=r"exp_avg\['w'\] has shape \(3,\), parameter 'w' has \(1,\)"):
        adamw_step(params, {"w": np.ones(1)}, state, groups)


def test_state_missing_entry():
    params, groups, state = _scalar_problem()
    del state["exp_avg_sq"]
    with pytest.raises(ValueError, match="optimizer state has no 'exp_avg_sq' entry"):
        check_state(state, params)


def test_make_groups_unknown_override():
    with pytest.raises(ValueError,
                       match=r"rules\[0\] overrides unknown setting\(s\) \['momentum'\]"):
        make_groups({"w": 0}, 0.1, 0.0, rules=[("w", {"momentum": 0.9})])


def test_make_groups_lr_must_be_positive():
    with pytest.raises(ValueError, match=r"lr must be in \(0.0, inf\], got 0"):
        make_groups({"w": 0}, 0, 0.0)
