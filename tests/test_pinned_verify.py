"""The numbers ``refimpl golden verify`` and ``check`` report, each against an independent
computation (issue 23): the worst index of a mismatch, ``--select``'s number comparison, the
bound of a dataset under a precision profile (golden/SCHEMA.md, "Precision profiles": the
input-rounding term ``1/4 k spread`` included) and the ``UNTESTABLE`` criterion
(``atol_p >= max|ref|``).

The expected values are written from golden/SCHEMA.md (the formula, the status table) and
computed by plain loops; the golden files are read with h5py, not with the verifier. Candidates
are copies of the committed ``glu`` and ``neuron`` files with planted values.

Tolerances: a bound recomputed from the same parts by the same formula agrees to a few ulps
(``rel=1e-15``; 1e-12 where a maximum over a tensor's elements enters); a bound a report shows
is the half-width of a float64 interval around the reference, so to within an ulp of the
reference (:func:`reported_bound`); indices, statuses and counts exactly.
"""
import dataclasses
import math
import shutil

import h5py
import numpy as np
import pytest

from refimpl import golden as G
from refimpl.golden.profiles import PROFILES, bound, compute_profile, round_to
from refimpl.golden.tensors import outside
from refimpl.golden.verify import references

EPS32 = 2.0 ** -23
K32 = EPS32 / 2.0 ** -52  # k = eps_p / eps64 = 2^29 (SCHEMA.md's profile table)


def schema_bound(depth, scale, spread, floor, eps_p):
    """golden/SCHEMA.md: atol_p = max(16 (depth eps_p scale + (1 + 1/4) k spread), k floor),
    rtol_p = 16 eps_p, k = eps_p / 2^-52."""
    k = eps_p / 2.0 ** -52
    return max(16 * (depth * eps_p * scale + (1 + 1 / 4) * k * spread), k * floor), 16 * eps_p


def reported_bound(b, ref):
    """A reported bound is the half-width of the interval ``[ref - b, ref + b]`` as float64
    holds its ends: ``b`` to within about an ulp of ``|ref| + b``."""
    return pytest.approx(b, rel=1e-15, abs=2 * float(np.spacing(abs(ref) + b)))


def _rows(report, case=None):
    return [r for f in report["files"] for r in f["rows"] if case is None or r["case"] == case]


def _gold_copy(tmp_path, suite):
    """A folder holding a copy of the committed ``suite`` file (golden dir and candidate)."""
    gold = tmp_path / "gold"
    gold.mkdir(exist_ok=True)
    path = gold / f"{suite}.h5"
    shutil.copy(G.golden_path(suite), path)
    return gold, path


def worst_by_loop(cand, ref, atol, rtol, mask=None):
    """The element farthest outside ``|c - ref| <= atol + rtol |ref|`` in units of its
    half-width, over ``mask``: ``(index tuple, number outside)``, a plain loop."""
    best, where, n = -math.inf, None, 0
    for i in np.ndindex(ref.shape):
        if mask is not None and not mask[i]:
            continue
        b = atol + rtol * abs(float(ref[i]))
        d = abs(float(cand[i]) - float(ref[i]))
        if d <= b:
            continue
        n += 1
        e = (d - b) / b
        if e > best:
            best, where = e, i
    return where, n


# --------------------------------------------------------------------------------------------
# The worst index
# --------------------------------------------------------------------------------------------


def test_the_masked_comparison_names_the_worst_compared_element():
    """``outside`` over a mask: the element farthest outside its interval among those
    compared, not a masked-out one (however far off), not one inside its interval; the count
    is of the compared elements outside."""
    ref = np.linspace(-1.0, 1.0, 20).reshape(4, 5)  # (4, 5)
    atol, rtol = 1e-3, 1e-2
    mask = np.ones(ref.shape, bool)
    mask[0, 0] = mask[3, 4] = False
    cand = ref.copy()
    cand[0, 0] += 100.0  # masked out: not compared
    cand[3, 4] -= 50.0  # masked out
    cand[2, 3] += 0.5  # the worst compared element
    cand[1, 4] -= 0.05
    cand[0, 2] += 0.011  # just outside
    lo, hi = ref - (atol + rtol * np.abs(ref)), ref + (atol + rtol * np.abs(ref))
    f = outside(cand, ref, lo, hi, mask, "what")
    (i, n) = worst_by_loop(cand, ref, atol, rtol, mask)
    assert i == (2, 3) and n == 3
    assert f.index == "(2, 3)" and f.value == cand[2, 3] and f.reference == ref[2, 3]
    assert f.bound == reported_bound(atol + rtol * abs(ref[2, 3]), ref[2, 3])
    assert f.detail == "3 of 18 what"
    # and without the mask, the farthest element overall
    f = outside(cand, ref, lo, hi, None, "what")
    assert f.index == "(0, 0)" and f.detail == "5 of 20 what"


def test_verify_names_the_index_of_the_planted_worst_element(tmp_path):
    """A candidate (a copy of the committed glu file) with three bad values in ``grads/W`` of
    case 0000: the MISMATCH row names the worst one's index, value, reference and bound, and
    counts the three; the element at (0, 0) is fine, so a report pointing at the first or the
    best element is caught."""
    gold, path = _gold_copy(tmp_path, "glu")
    with h5py.File(path, "r+") as f:
        d = f["cases/0000/grads/W"]
        ref = d[()]
        atol, rtol = float(d.attrs["atol"]), float(d.attrs["rtol"])
        cand = ref.copy()  # (8, 4)
        cand[5, 2] += 1e-6
        cand[1, 1] -= 1e-9
        cand[7, 3] += 1e-10
        d[...] = cand
    (i, n) = worst_by_loop(cand, ref, atol, rtol)
    assert i == (5, 2) and n == 3
    rows = [r for r in _rows(G.verify([path], golden_dir=G.DEFAULT_DIR), "0000")
            if r["status"] == "MISMATCH"]
    assert [r["tensor"] for r in rows] == ["grads/W"], rows
    r = rows[0]
    assert r["index"] == "(5, 2)"
    assert r["value"] == cand[5, 2] and r["reference"] == ref[5, 2]
    assert r["bound"] == reported_bound(atol + rtol * abs(ref[5, 2]), ref[5, 2])
    assert r["detail"].startswith("3 of 32 ")


def test_check_names_the_index_of_the_worst_stale_input(tmp_path):
    """``refimpl golden check`` of a committed file with two edited parameters: the STALE row
    of ``params/W`` names the element moved furthest (in units of its allowance)."""
    gold, path = _gold_copy(tmp_path, "glu")
    with h5py.File(path, "r+") as f:
        d = f["cases/0002/params/W"]
        w = d[()]  # (8, 4)
        w[6, 1] += 1e-3
        w[0, 3] += 1e-6
        d[...] = w
    rows = [r for r in _rows(G.check(golden_dir=gold, suites=["glu"]), "0002")
            if r["status"] == "STALE" and r["tensor"].startswith("params/W")]
    assert len(rows) == 1, rows
    assert rows[0]["index"] == "(6, 1)", rows


# --------------------------------------------------------------------------------------------
# --select
# --------------------------------------------------------------------------------------------


def _neuron_taus():
    with h5py.File(G.golden_path("neuron"), "r") as f:
        return [float(c.attrs["tau"]) for c in f["cases"].values()]


@pytest.mark.parametrize("value, offset", [(0.9, 1e-4), (0.9, -1e-4), (0.125, 1e-4),
                                           (0.9, 1e-7)])
def test_select_compares_numbers_exactly(tmp_path, value, offset):
    """``--select tau=V`` selects the cases whose tau equals V as a number (``0.90`` is
    ``0.9``), the count a loop over the file's attributes gives; a value that differs by
    1e-4 (or 1e-7) matches no case, and that is an error naming the values tau takes."""
    taus = _neuron_taus()
    want = sum(t == value for t in taus)
    assert want >= 3 and not any(t == value + offset for t in taus)
    path = G.golden_path("neuron")  # a golden file is also a candidate (it passes)
    for text in (f"tau={value}", f"tau={value:.4f}"):
        rep = G.verify([path], select=[text])
        s = rep["files"][0]["summary"]
        assert (s["selected"], s["total"]) == (want, len(taus)), (text, s)
    with pytest.raises(G.SelectError, match="matches no case"):
        G.verify([path], select=[f"tau={value + offset!r}"])


def test_select_compares_the_margin_exactly():
    """``margin`` (a float the generator measures) selects by equality too: the smallest
    positive margin of the committed neuron file, moved by a tenth of itself, selects
    nothing."""
    with h5py.File(G.golden_path("neuron"), "r") as f:
        margins = [float(c.attrs["margin"]) for c in f["cases"].values() if "margin" in c.attrs]
    m = min(v for v in margins if v > 1e-6)
    cases = list(G.read_golden(G.golden_path("neuron")).cases.values())
    match = G.selector([f"margin={m!r}"], cases, "neuron")
    assert sum(map(match, cases)) == sum(v == m for v in margins) >= 1
    for other in (m * 1.1, m + 1e-4):
        match = G.selector([f"margin={other!r}"], cases, "neuron")
        assert not any(map(match, cases)), other


# --------------------------------------------------------------------------------------------
# The bound of a profile
# --------------------------------------------------------------------------------------------


METAS = [  # (depth, scale, spread, floor): each term the largest in one of them
    (40, 5.2, 1.7e-15, 0.0),  # depth and spread terms of the same order
    (12, 0.45, 3.3e-13, 0.0),  # spread dominates
    (3, 1.0, 1e-16, 5e-12),  # floor dominates
    (100, 2.0, 0.0, 0.0),  # depth only
]


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("parts", METAS)
def test_the_profile_bound_is_the_schema_formula(name, parts):
    """``bound`` of a dataset's stored parts is SCHEMA.md's formula for the profile's epsilon;
    a 16-bit profile's interval uses its compute format's (float32's) bound."""
    depth, scale, spread, floor = parts
    meta = {"compare": "allclose", "atol": 1.0, "rtol": 1.0, "depth": depth, "scale": scale,
            "spread": spread, **({"floor": floor} if floor else {})}
    prof = PROFILES[name]
    atol, rtol = bound(meta, prof)
    want_atol, want_rtol = schema_bound(depth, scale, spread, floor, prof.eps)
    assert atol == pytest.approx(want_atol, rel=1e-15, abs=0) and rtol == want_rtol
    c_atol, c_rtol = bound(meta, compute_profile(prof))
    want_atol, want_rtol = schema_bound(depth, scale, spread, floor, EPS32)
    assert c_atol == pytest.approx(want_atol, rel=1e-15, abs=0) and c_rtol == want_rtol


def test_the_bound_without_parts_and_at_float64():
    """Files without the parts: ``1.25 k atol``, ``k rtol``; float64: the stored values."""
    meta = {"compare": "allclose", "atol": 3e-14, "rtol": 2e-15}
    assert bound(meta, PROFILES["float32"]) == pytest.approx((1.25 * K32 * 3e-14, K32 * 2e-15),
                                                             rel=1e-15, abs=0)
    full = {**meta, "depth": 40, "scale": 5.2, "spread": 1.7e-15}
    assert bound(full, PROFILES["float64"]) == (3e-14, 2e-15)


def _set_parts(path, cid, tensor, depth, scale, spread):
    with h5py.File(path, "r+") as f:
        d = f[f"cases/{cid}/{tensor}"]
        d.attrs["depth"], d.attrs["scale"], d.attrs["spread"] = depth, scale, spread
        if "floor" in d.attrs:
            del d.attrs["floor"]
        return d[()]


@pytest.mark.parametrize("factor, passes", [(0.9, True), (1.1, False)])
def test_a_float32_verdict_uses_the_whole_bound(tmp_path, factor, passes):
    """At float32 one element of ``grads/b`` (glu 0000) moved by ``factor`` times SCHEMA.md's
    bound ``atol_32 + rtol_32 |ref|`` passes below it and fails above it, and a failure reports
    that bound. The stored parts make the input-rounding term a fifth of the bound (a bound
    without it is 0.84 of the whole: 0.9 of it would fail)."""
    gold, path = _gold_copy(tmp_path, "glu")
    depth, scale = 40, 5.0
    spread = 3.0 * depth * EPS32 * scale / K32  # the spread term is 3x the depth term
    ref = _set_parts(path, "0000", "grads/b", depth, scale, spread)  # (8,)
    atol, rtol = schema_bound(depth, scale, spread, 0.0, EPS32)
    i = 4
    d = atol + rtol * abs(ref[i])
    cand_path = tmp_path / "cand.h5"
    shutil.copy(path, cand_path)
    with h5py.File(cand_path, "r+") as f:
        f["cases/0000/grads/b"][i] = ref[i] + factor * d
    rows = _rows(G.verify([cand_path], golden_dir=gold, precision="float32"), "0000")
    bad = [r for r in rows if r["status"] in G.FAILURES]
    if passes:
        assert not bad and [r["status"] for r in rows] == ["PASS"], rows
    else:
        assert [(r["status"], r["tensor"], r["index"]) for r in bad] == \
            [("MISMATCH", "grads/b", f"({i},)")], rows
        assert bad[0]["bound"] == reported_bound(d, ref[i])


@pytest.mark.parametrize("factor, passes", [(0.9, True), (1.1, False)])
def test_a_float16_verdict_rounds_the_float32_bound(factor, passes):
    """At float16 the interval of an element is ``[round16(ref - d), round16(ref + d)]`` with
    ``d`` SCHEMA.md's float32 bound and ``ref`` refimpl's value at the rounded inputs: a
    perfect float16 backend (every tensor ``round16(ref)``) with one element of ``grads/b``
    written as ``round16(ref + factor d)`` passes for 0.9 and fails for 1.1 (``d`` spans about
    40 float16 steps there, so 0.9 and 1.1 round to values on either side of the end)."""
    gcase = G.read_golden(G.golden_path("glu")).cases["0000"]
    depth, scale = 40, 5.0
    spread = 1e-2 / (1.25 * 16 * K32)  # spread term 1e-2: about 40 float16 steps at |ref| ~ 0.26
    meta = {**gcase.meta, "grads/b": {**gcase.meta["grads/b"], "depth": depth, "scale": scale,
                                      "spread": spread}}
    meta["grads/b"].pop("floor", None)
    gcase = dataclasses.replace(gcase, meta=meta)
    f16 = PROFILES["float16"]
    (ref,) = [r for r in references("glu", gcase, f16) if r.read == "direct"]
    data = {p: round_to(v, f16) for p, v in ref.case.data.items()
            if p.startswith(("outputs/", "grads/"))}
    atol, rtol = schema_bound(depth, scale, spread, 0.0, EPS32)
    i = 1  # |ref| ~ 0.26: float16 spacing 2^-2 2^-10
    r_i = float(ref.case.data["grads/b"][i])
    d = atol + rtol * abs(r_i)
    assert d > 30 * 2.0 ** -12
    data["grads/b"] = data["grads/b"].copy()
    data["grads/b"][i] = round_to(r_i + factor * d, f16)
    ccase = dataclasses.replace(gcase, data=data, meta={}, extra={})
    rows = G.compare_case("glu", gcase, ccase, precision="float16")
    bad = [r for r in rows if r["status"] in G.FAILURES]
    if passes:
        assert not bad and rows[0]["status"] == "PASS", rows
    else:
        assert [(r["status"], r["tensor"], r["index"]) for r in bad] == \
            [("MISMATCH", "grads/b", f"({i},)")], rows


# --------------------------------------------------------------------------------------------
# UNTESTABLE: a bound at least the tensor's magnitude
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, untestable", [(0.6, False), (0.95, False), (1.05, True),
                                               (1.9, True)])
def test_a_tensor_is_untestable_exactly_when_its_bound_reaches_its_magnitude(
        tmp_path, ratio, untestable):
    """At float32, ``grads/b`` of glu 0000 with its parts set so that SCHEMA.md's ``atol_32``
    is ``ratio`` times ``max|ref|`` (a loop over the stored values): UNTESTABLE (with that
    bound, counted) from 1 on, a tested PASS below; the candidate is the golden file itself."""
    gold, path = _gold_copy(tmp_path, "glu")
    with h5py.File(path, "r") as f:
        mag = max(abs(float(v)) for v in f["cases/0000/grads/b"][()])
    spread = ratio * mag / (16 * 1.25 * K32)  # atol_32 = 16 (1 + 1/4) k spread
    _set_parts(path, "0000", "grads/b", 0, 0.0, spread)
    atol, _ = schema_bound(0, 0.0, spread, 0.0, EPS32)
    assert atol == pytest.approx(ratio * mag, rel=1e-12, abs=0)
    rows = _rows(G.verify([path], golden_dir=gold, precision="float32"), "0000")
    assert not [r for r in rows if r["status"] in G.FAILURES], rows
    un = [r for r in rows if r["status"] == "UNTESTABLE" and r["tensor"] == "grads/b"]
    counts = rows[0]["tensors"]
    n = 4  # outputs/z, grads/W, grads/b, grads/s
    if untestable:
        assert len(un) == 1 and un[0]["bound"] == pytest.approx(atol, rel=1e-12, abs=0), rows
        assert counts == {"tested": n - 1, "untestable": 1, "not_compared": 0}
    else:
        assert not un and [r["status"] for r in rows] == ["PASS"], rows
        assert counts == {"tested": n, "untestable": 0, "not_compared": 0}
