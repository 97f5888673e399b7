"""Benchmark group ``training``: one training step (forward + backward + AdamW update).

The grid of issue 13, 2 layers each: B = 64, H = 64, N = 64, L = 40 (MNIST-1D size);
B = 32, H = 128, N = 64, L = 1024 (issue 5's shape); B = 8, H = 128, N = 64, L = 4096. At each
point every family is timed; the spiking families beside the non-spiking ``gelu`` S4D
baseline of the same size in the same run (speedup = gelu time / family time, so < 1 means
the family's step is slower than the baseline's).
"""
import os

import numpy as np

from harness import register
from refimpl import model as M
from refimpl.memory import retain_freed_memory
from refimpl.optim import adamw_init, adamw_step, make_groups

GRID = [{"B": 64, "H": 64, "N": 64, "L": 40, "layers": 2},
        {"B": 32, "H": 128, "N": 64, "L": 1024, "layers": 2},
        {"B": 8, "H": 128, "N": 64, "L": 4096, "layers": 2}]
QUICK = {"B": 4, "H": 8, "N": 4, "L": 32, "layers": 1}
FAMILIES = ("binary", "lif", "sdn", "refractory")
SHARED_SDN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "external",
                          "sdn_spikingssm_tau0125.npz")


def sdn_weights():
    """The published SDN weights when the shared copy exists, else random valid ones (timing
    needs valid shapes only); every benchmark that times the ``sdn`` family uses this."""
    if os.path.exists(SHARED_SDN):
        with np.load(SHARED_SDN) as f:
            return {k: f[k].astype(np.float64) for k in f.files}
    rng = np.random.default_rng(0)  # timing only needs valid shapes
    return {"w0": rng.normal(0, .3, (8, 1, 8)), "w1": np.zeros(8),
            "w2": rng.normal(0, .3, (8, 8, 1)), "w3": np.zeros(8),
            "w4": rng.normal(0, .3, (1, 8, 1)), "w5": np.zeros(1)}


def make_step(activation, s, dtype="float64"):
    retain_freed_memory()  # as refimpl.train runs its steps (refimpl/memory.py)
    cfg = M.ModelConfig(n_classes=10, d_input=1, d_model=s["H"], d_state=s["N"],
                        n_layers=s["layers"], activation=activation, dtype=dtype)
    w = sdn_weights() if cfg.family.needs_sdn_weights else None
    p, buf = M.init_model(cfg, 0, sdn_weights=w)
    rng = np.random.default_rng(0)
    x = M.model_inputs(cfg, rng.standard_normal((s["B"], s["L"], 1)))  # (B, L, 1)
    y = rng.integers(0, 10, s["B"]).astype(np.int64)
    opt = adamw_init(p)
    groups = make_groups(p, 1e-3, 1e-2, M.optimizer_rules(1e-3))
    state = {"p": p, "buf": buf}

    def step():
        loss, _, g, state["buf"], _ = M.loss_and_grads(cfg, state["p"], state["buf"], x, y,
                                                       training=True)
        adamw_step(state["p"], g, opt, groups)
        return loss

    return step


@register("training", title="Training step (issues 5, 13): forward + backward + AdamW",
          order=40,
          description="float64 reference path (fastmath off, results independent of the thread "
                      "count); input (B, L, 1), 10 classes, LayerNorm post-norm, GLU mixing. "
                      "Grid of issue 13; baseline: the non-spiking `gelu` model of the same "
                      "size; the float32 variant (`--dtype float32`) against the float64 step "
                      "of the same family. PyTorch side by side: the `peers` figures "
                      "(`make bench-peers`).")
def training(ctx):
    grid = [QUICK] if ctx.quick else GRID
    ctx.params.update(grid=grid)
    for s in grid:
        base = make_step("gelu", s)
        ctx.absolute("gelu (S4D baseline) step", s, refimpl=base)
        steps = {"gelu": base}
        for act in FAMILIES:
            steps[act] = make_step(act, s)
            ctx.compare(f"{act} step vs gelu step", s, refimpl=steps[act],
                        baseline=base, baseline_name="gelu step", rtol=None,
                        note="different models: a cost ratio, not a check")
        for act, step64 in steps.items():
            ctx.compare(f"{act} float32 step vs float64", s, refimpl=make_step(act, s, "float32"),
                        baseline=step64, baseline_name="float64 step", rtol=None,
                        note="the named float32 variant (ModelConfig dtype): a speed ratio")
