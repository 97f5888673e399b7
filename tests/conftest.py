"""Hypothesis profiles: ``dev`` (make test) and ``ci`` (make test-all, derandomized, more examples).

``deadline=None`` everywhere: Numba compiles on the first example of a test.

SIMD robustness (issue 11, item 1). NumPy's transcendental ufuncs (exp, log, arctan, tanh, ...)
have SIMD implementations chosen at run time (AVX-512 on some CPUs, AVX2 or scalar libm on
others) that may differ from each other, and from the libm that Numba's ``math.*`` calls, by
an ulp in a few % of values. So a test may compare exactly only what runs the same code on
both sides, or only ``+ - * /`` and comparisons (IEEE exact); NumPy-vs-Numba transcendental
results get a tolerance of a few ulps. Two ways to check the suite against this:

- ``NUMBA_CPU_NAME=generic NPY_DISABLE_CPU_FEATURES="AVX512_ICL X86_V4"`` (another SIMD width
  for both libraries; on an AVX-512 machine this is the AVX2 path of NumPy and generic x86-64
  code from LLVM);
- ``REFIMPL_TEST_ULP_JITTER=1``: the NumPy transcendental ufuncs used by
  :mod:`refimpl.reference` and by the test modules themselves are wrapped to move about one
  value in eight by one ulp (up or down), as a different SIMD implementation would. Any test
  that demands bit equality between NumPy's and Numba's transcendental functions then fails
  on every machine, not only on some.

The report header shows NumPy's SIMD features and whether Numba uses SVML (the exact
Numba-vs-Numba comparisons assume it does not; SVML needs the optional ``icc_rt`` package).
"""
import os
import sys
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Under CI (CI=true) the fast profile is derandomized too, so a landing never depends on luck;
# locally it explores new examples on every run.
settings.register_profile("dev", max_examples=25, deadline=None,
                          derandomize=bool(os.environ.get("CI")),
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

JITTERED = ("exp", "expm1", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "arctan",
            "arcsin", "arccos", "arctan2", "sinh", "cosh", "tanh", "power", "cbrt")


def _jittered(ufunc):
    """``ufunc`` whose float64 results move by one ulp where the result's low bits say so."""
    def f(*args, **kw):
        out = ufunc(*args, **kw)
        a = np.asarray(out)
        if a.dtype.kind not in "fc" or a.size == 0:
            return out
        parts = [a.real, a.imag] if a.dtype.kind == "c" else [a]
        res = []
        for p in parts:
            p = np.array(p, dtype=np.float64)  # (...)
            bits = p.view(np.uint64) >> np.uint64(2)  # pseudo-random, deterministic selector
            sel = bits % np.uint64(16)
            up, down = (sel == 0) & np.isfinite(p), (sel == 1) & np.isfinite(p)
            p = np.where(up, np.nextafter(p, np.inf), np.where(down, np.nextafter(p, -np.inf), p))
            res.append(p)
        r = res[0] + 1j * res[1] if a.dtype.kind == "c" else res[0]
        return r if isinstance(out, np.ndarray) else r[()]
    return f


def _jitter_numpy():
    shim = types.ModuleType("numpy_ulp_jitter")
    shim.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    for name in JITTERED:
        setattr(shim, name, _jittered(getattr(np, name)))
    return shim


if os.environ.get("REFIMPL_TEST_ULP_JITTER"):
    import refimpl.reference

    NP_JITTER = _jitter_numpy()
    refimpl.reference.np = NP_JITTER

    @pytest.fixture(autouse=True)
    def _jitter_test_module_numpy(request, monkeypatch):
        mod = sys.modules.get(request.module.__name__)
        if mod is not None and getattr(mod, "np", None) is np:
            monkeypatch.setattr(mod, "np", NP_JITTER)


def pytest_report_header(config):
    import numba
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # pragma: no cover (NumPy < 2)
        feats = {}
    on = [k for k in ("AVX2", "AVX512F", "AVX512_SKX") if feats.get(k)]
    return (f"SIMD: NumPy uses {on or 'no AVX'}; NPY_DISABLE_CPU_FEATURES="
            f"{os.environ.get('NPY_DISABLE_CPU_FEATURES', '')!r}; Numba CPU "
            f"{os.environ.get('NUMBA_CPU_NAME', 'host')}, SVML {numba.config.USING_SVML}; "
            f"ulp jitter {'on' if os.environ.get('REFIMPL_TEST_ULP_JITTER') else 'off'}")
