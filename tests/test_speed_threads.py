"""The training step does not depend on the thread count (issues 13, 25).

Two subprocesses run one training step (forward, backward, AdamW) of every activation family,
one with refimpl's pool at 1 thread and one at 2 (``REFIMPL_THREADS``, read at import, hence the
subprocesses), at three lengths: ``L = 40`` (the Toeplitz convolution, the GLU's channel-major
GEMM), ``L = 96`` (the FFT form, one GEMM per batch row) and ``L = 300`` (the long channel-major
GEMM, in fixed column blocks), and the language model (tokens, per-token decoder, tied
embedding). ``H = 64`` puts the GEMMs above OpenBLAS's threading threshold (``m n k >=
262144``), and every pass is split at every size (``PARALLEL_MIN_ELEMENTS`` and
``threads.MIN_ELEMENTS`` = 0, ``GEMM_BLOCK_COLUMNS`` small enough for several blocks), so both
thread counts really split work (``FFT_BLOCK_ROWS`` small enough for one batch row per block).
Loss, every gradient and every updated parameter must be bit-identical: each reduction runs in a
fixed order and the threaded parts (batch rows, channels, column blocks, ``B*H`` neuron rows,
FFT rows) write disjoint outputs.

float32 too: OpenBLAS's own threaded ``sgemm`` does not sum in its single-threaded order on
every CPU (measured with NumPy 2.4.6's OpenBLAS 0.3.31 on an AMD EPYC: ``(128, 64) @ (64, 160)``
in float32 differs by one ulp between ``OPENBLAS_NUM_THREADS=1`` and ``2``), so refimpl holds
BLAS at one thread while it computes (:func:`refimpl.threads.owned`) and splits its GEMMs
itself. The second test gives BLAS 1 and 2 threads outside refimpl (``OPENBLAS_NUM_THREADS``)
and requires bit-identical results as well: the user's BLAS setting no longer reaches them.
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
    from refimpl import conv, layers, model as M, threads
    from refimpl.optim import adamw_init, adamw_step, make_groups
    layers.PARALLEL_MIN_ELEMENTS = 0  # split every elementwise pass over the batch rows
    threads.MIN_ELEMENTS = 0  # and every other pass (GEMMs, channels, PMBC rows)
    layers.GEMM_BLOCK_COLUMNS = 256  # several column blocks of the channel-major GEMMs
    conv.FFT_BLOCK_ROWS = 64  # one batch row per block of the FFT convolution
    rng = np.random.default_rng(0)
    sdn = {"w0": rng.normal(0, .3, (8, 1, 8)), "w1": np.zeros(8),
           "w2": rng.normal(0, .3, (8, 8, 1)), "w3": np.zeros(8),
           "w4": rng.normal(0, .3, (1, 8, 1)), "w5": np.zeros(1)}
    out = {}

    def record(tag, cfg, p, buf, x, y):  # one step: loss, logits, grads, params, buffers
        loss, logits, g, nb, _ = M.loss_and_grads(cfg, p, buf, x, y, training=True)
        adamw_step(p, g, adamw_init(p), make_groups(p, 1e-3, 1e-2, M.optimizer_rules(1e-3)))
        out[f"{tag}/loss"] = np.array(loss)
        out[f"{tag}/logits"] = logits
        for kind, arrays in (("grad", g), ("param", p), ("buf", nb)):
            out.update({f"{tag}/{kind}/{k}": v for k, v in arrays.items()})

    for act in sys.argv[2].split(","):
        for L in (40, 96, 300):
            cfg = M.ModelConfig(n_classes=10, d_model=64, d_state=8, n_layers=2,
                                activation=act, norm="batch" if act == "lif" else "layer",
                                dtype=sys.argv[3])
            p, buf = M.init_model(cfg, 0, sdn_weights=sdn if act == "sdn" else None)
            x = np.random.default_rng(1).standard_normal((4, L, 1)).astype(sys.argv[3])
            y = np.random.default_rng(2).integers(0, 10, 4).astype(np.int64)
            record(f"{act}/{L}", cfg, p, buf, x, y)
        cfg = M.ModelConfig.for_lm(32, d_model=64, d_state=8, n_layers=2, activation=act,
                                   tie_embedding=act == "gelu", dtype=sys.argv[3])
        p, buf = M.init_model(cfg, 0, sdn_weights=sdn if act == "sdn" else None)
        x = np.random.default_rng(3).integers(0, 32, (4, 96)).astype(np.int64)
        record(f"{act}/lm", cfg, p, buf, x, None)
    np.savez(sys.argv[1], **out)
""")


def _compare(tmp_path, runs):
    for n, p in runs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"run {n}: {err}"
    (a_path, b_path) = (tmp_path / f"{n}.npz" for n in runs)
    with np.load(a_path) as a, np.load(b_path) as b:
        assert sorted(a.files) == sorted(b.files)
        assert len(a.files) > 100
        differ = [k for k in a.files if not np.array_equal(a[k], b[k])]
        dtype = a["lif/40/logits"].dtype
    assert not differ, f"results depend on the thread count: {differ[:10]}"
    return dtype


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_step_is_independent_of_the_thread_count(tmp_path, dtype):
    """Every family (lif with BatchNorm) and the language model, float64 and float32."""
    fams = ",".join(sorted(ACTIVATIONS))
    runs = {n: _run(tmp_path / f"{n}.npz", fams, dtype, threads=n) for n in (1, 2)}
    assert _compare(tmp_path, runs) == np.dtype(dtype)


def test_float32_is_independent_of_the_users_blas_threads(tmp_path):
    """float32 with BLAS at 1 and at 2 threads outside refimpl (refimpl's pool at 2 in both):
    bit-identical, BLAS runs on one thread inside refimpl whatever the user set."""
    fams = ",".join(sorted(ACTIVATIONS))
    runs = {f"b{n}": _run(tmp_path / f"b{n}.npz", fams, "float32", threads=2, blas_threads=n)
            for n in (1, 2)}
    assert _compare(tmp_path, runs) == np.float32


def _run(path, fams, dtype, threads, blas_threads=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["REFIMPL_THREADS"] = str(threads)
    if blas_threads is not None:
        env.update(OPENBLAS_NUM_THREADS=str(blas_threads), OMP_NUM_THREADS=str(blas_threads))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(path), fams, dtype], env=env,
                            stderr=subprocess.PIPE, text=True)
