"""The training step does not depend on the thread count (issue 13).

Two subprocesses run one training step (forward, backward, AdamW) of every activation family,
one with every pool at 1 thread and one at 2 (``NUMBA_NUM_THREADS``, ``REFIMPL_FFT_WORKERS``,
``OPENBLAS_NUM_THREADS``; the pools are sized at start-up, hence the subprocesses), at two
lengths: ``L = 40`` (the Toeplitz convolution) and ``L = 96`` (the FFT form). ``H = 64`` puts
the channel-mixing GEMMs above OpenBLAS's threading threshold (``m n k >= 262144``), and the
elementwise passes of :mod:`refimpl.layers` are split over batch rows at every size
(``PARALLEL_MIN_ELEMENTS = 0``), so both thread counts really split work. Loss, every
gradient and every updated parameter must be bit-identical: each reduction runs in a fixed
order and the threaded parts (BLAS blocks over rows and columns, FFT rows, ``prange`` rows,
batch rows of the elementwise passes) write disjoint outputs.

float32: OpenBLAS's threaded ``sgemm`` does not sum in the single-threaded order on every CPU
(measured with NumPy 2.4.6's OpenBLAS 0.3.31 on an AMD EPYC without AVX-512: ``(128, 64) @ (64,
160)`` in float32 differs by one ulp between ``OPENBLAS_NUM_THREADS=1`` and ``2``, ``dgemm`` does
not), and refimpl cannot choose BLAS's partition. So the float32 variant is checked for the pools
refimpl controls (Numba, FFT workers, the elementwise batch split: 1 against 2 threads) with
BLAS at one thread in both runs, and separately for BLAS threads alone within float32 rounding
of the forward (the logits and loss: an AdamW step amplifies a one-ulp gradient near 0 to a
sign flip of the update, so the updated parameters are not comparable there). float64 (the
reference path) must be bit-identical with every pool at 1 and at 2, BLAS included.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from refimpl.activations import ACTIVATIONS

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from refimpl import layers, model as M
    from refimpl.optim import adamw_init, adamw_step, make_groups
    layers.PARALLEL_MIN_ELEMENTS = 0  # split every elementwise pass over the batch rows
    rng = np.random.default_rng(0)
    sdn = {"w0": rng.normal(0, .3, (8, 1, 8)), "w1": np.zeros(8),
           "w2": rng.normal(0, .3, (8, 8, 1)), "w3": np.zeros(8),
           "w4": rng.normal(0, .3, (1, 8, 1)), "w5": np.zeros(1)}
    out = {}
    for act in sys.argv[2].split(","):
        for L in (40, 96):
            cfg = M.ModelConfig(n_classes=10, d_model=64, d_state=8, n_layers=2,
                                activation=act, norm="batch" if act == "lif" else "layer",
                                dtype=sys.argv[3])
            p, buf = M.init_model(cfg, 0, sdn_weights=sdn if act == "sdn" else None)
            x = np.random.default_rng(1).standard_normal((4, L, 1)).astype(sys.argv[3])
            y = np.random.default_rng(2).integers(0, 10, 4).astype(np.int64)
            loss, logits, g, nb, _ = M.loss_and_grads(cfg, p, buf, x, y, training=True)
            adamw_step(p, g, adamw_init(p), make_groups(p, 1e-3, 1e-2, M.optimizer_rules(1e-3)))
            out[f"{act}/{L}/loss"] = np.array(loss)
            out[f"{act}/{L}/logits"] = logits
            out.update({f"{act}/{L}/grad/{k}": v for k, v in g.items()})
            out.update({f"{act}/{L}/param/{k}": v for k, v in p.items()})
            out.update({f"{act}/{L}/buf/{k}": v for k, v in nb.items()})
    np.savez(sys.argv[1], **out)
""")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_step_is_independent_of_the_thread_count(tmp_path, dtype):
    """Every family (lif with BatchNorm), in float64 and in the float32 variant (float32: BLAS
    at one thread in both runs, module docstring)."""
    fams = ",".join(sorted(ACTIVATIONS))
    runs = {1: _run(tmp_path / "1.npz", fams, dtype, 1, 1),
            2: _run(tmp_path / "2.npz", fams, dtype, 2, 2 if dtype == "float64" else 1)}
    for n, p in runs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"threads={n}: {err}"
    with np.load(tmp_path / "1.npz") as a, np.load(tmp_path / "2.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        assert len(a.files) > 100
        assert a["lif/40/logits"].dtype == np.dtype(dtype)
        differ = [k for k in a.files if not np.array_equal(a[k], b[k])]
    assert not differ, f"results depend on the thread count: {differ[:10]}"


def _run(path, fams, dtype, threads, blas_threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), REFIMPL_FFT_WORKERS=str(threads),
               OPENBLAS_NUM_THREADS=str(blas_threads), OMP_NUM_THREADS=str(blas_threads))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(path), fams, dtype], env=env,
                            stderr=subprocess.PIPE, text=True)


def test_float32_forward_with_blas_threads_is_within_rounding(tmp_path):
    """float32 with BLAS at 1 and 2 threads (every other pool at 2): the loss and logits agree
    within float32 rounding of the forward: ``|diff| <= 2^-23 * 64 * max|logits|`` (the
    depth of a 2-layer H = 64 forward; what is measured is one or two ulps)."""
    fams = ",".join(sorted(ACTIVATIONS))
    runs = {n: _run(tmp_path / f"b{n}.npz", fams, "float32", 2, n) for n in (1, 2)}
    for n, p in runs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"blas threads={n}: {err}"
    with np.load(tmp_path / "b1.npz") as a, np.load(tmp_path / "b2.npz") as b:
        keys = [k for k in a.files if k.endswith(("/logits", "/loss"))]
        assert len(keys) == 4 * len(ACTIVATIONS)
        for k in keys:
            bound = 2.0 ** -23 * 64 * float(np.max(np.abs(a[k])))
            assert np.max(np.abs(a[k].astype(np.float64) - b[k])) <= bound, k
