"""16-bit verdicts that are tests (issue 21, "What must be shown" 1).

``tests/half_backend.py`` emulates a 16-bit backend: inputs, parameters and cotangents read
rounded to bfloat16 / float16, float32 compute, outputs and gradients rounded to the format at
the op's boundary (the compute model ``verify(..., precision="bfloat16" | "float16")``
declares). Shown here, through :func:`refimpl.golden.verify`:

- the rounding helpers are round-to-nearest-even (bfloat16 from float32 bits, float16 by
  NumPy's cast), and a candidate holds only values of its format;
- the correct backend passes both profiles with no failing row on every suite it implements
  (``s4d_kernel``, ``fftconv``, ``s4d_layer``, ``neuron`` with its stateful cases, ``pmbc``,
  ``glu``, ``gsu``, ``sdn``, ``block``, ``model_stream``), and so do its legitimate variants:
  direct convolution instead of the FFT, another summation order, chunked instead of whole
  sequences (in the suites where they compute differently);
- every planted bug of ``float32_backend.BUGS`` fails at bfloat16 and at float16, with a
  failing row on the tensor the bug affects;
- false alarms: random rounding variants of the correct backend (seeded summation order,
  1-ulp perturbations of inexact intermediates, FFT or direct convolution, whole or chunked)
  give no failing row: ``N_FAST`` (20) seeds on the cheap suites, each at one format, in
  ``make test``; ``N_SLOW`` (200) seeds on every suite at both formats in ``make test-all``.

Counts of PASS / ACCEPTABLE / UNTESTABLE rows are printed (``pytest -s``).
"""
import time

import numpy as np
import pytest

from refimpl.golden import FAILURES, verify

import float32_backend as fb
import half_backend as hb

#: the backend computes PMBC's spikes iteratively and writes no iteration counts
SKIP = ("*/outputs/iterations",)
FORMATS = hb.FORMATS
N_FAST, N_SLOW = 20, 200

#: the suites in which each variant computes something else than the FFT backend (elsewhere
#: its candidate is the same file: checked by test_variants_change_only_their_suites)
VARIANT_SUITES = {
    "direct": ("fftconv", "s4d_layer", "block", "model_stream"),
    "chunked": ("s4d_layer", "neuron", "pmbc", "block"),
    # the neuron has no reduction but drho's over B = 2 (a sum of two is commutative)
    "order": tuple(s for s in hb.SUITES if s not in ("neuron", "pmbc")),
}
#: jitter (1-ulp perturbations) is tested inside the seeded ``rounding`` variants below

#: the seed of the seeded variants in the fast tests
SEED0 = 0


@pytest.fixture(scope="module")
def cand(tmp_path_factory):
    """``cand(suite, fmt, bug=None, variant=None, seed=None)`` -> candidate path (memoised)."""
    root = tmp_path_factory.mktemp("halfcand")
    made = {}

    def make(suite, fmt, bug=None, variant=None, seed=None):
        key = (suite, fmt, bug, variant, seed)
        if key not in made:
            name = "-".join(str(k) for k in key if k is not None)
            made[key] = hb.write_candidate(suite, root / f"{name}.h5", fmt, bug, variant, seed)
        return made[key]
    return make


def run(path, fmt):
    return verify([path], skip=SKIP, precision=fmt)["files"][0]


def failing(rep):
    return [r for r in rep["rows"] if r["status"] in FAILURES]


def fmt_rows(rows, limit=12):
    out = [f"  {r['case']} {r['status']} {r['tensor']} {r['index']} value={r['value']} "
           f"ref={r['reference']} bound={r['bound']} {r['detail']}" for r in rows[:limit]]
    if len(rows) > limit:
        out.append(f"  ... {len(rows) - limit} more")
    return "\n".join(out)


def counts(rep):
    st = rep["summary"]["statuses"]
    return {k: st.get(k, 0) for k in ("PASS", "ACCEPTABLE", "UNTESTABLE", "REJECTED")}


# ---- the storage format --------------------------------------------------------------------

def test_bfloat16_rounding_is_nearest_even():
    one = 1.0
    cases = [  # (value, bfloat16 value): 8 significant bits, ties to the even neighbour
        (one + 2 ** -8, one),  # tie: to 1.0 (even)
        (one + 3 * 2 ** -8, one + 2 ** -6),  # tie: to the even 1 + 2^-6
        (one + 2 ** -8 + 2 ** -20, one + 2 ** -7),  # above the tie: up
        (-(one + 2 ** -8 + 2 ** -20), -(one + 2 ** -7)),
        (one + 2 ** -9, one), (3.0, 3.0), (0.0, 0.0), (-0.0, -0.0),
        (3.3895313892515355e38, 3.3895313892515355e38),  # the largest bfloat16
        (3.4e38, np.inf),  # beyond the last midpoint: overflow
        (1e-40, 9.183549615799121e-41),  # subnormal: 0x0001 * 2^-133 ... rounded
        (np.inf, np.inf), (-np.inf, -np.inf),
    ]
    got = hb.round_bf16(np.array([c[0] for c in cases]))
    want = np.array([c[1] for c in cases], dtype=np.float32)
    assert np.array_equal(got, want), (got, want)
    assert np.signbit(got[7])
    assert np.isnan(hb.round_bf16(np.array([np.nan]))).all()
    # every result has 16 zero low bits, and is the nearer of its two bfloat16 neighbours
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3
    r = hb.round_bf16(x)
    assert not (r.view(np.uint32) & 0xFFFF).any()
    lo = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # towards 0
    hi = ((x.view(np.uint32) & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    assert ((r == lo) | (r == hi)).all()
    d_lo, d_hi = (np.abs(v.astype(np.float64) - x) for v in (lo, hi))
    even = np.where(r == lo, lo, hi).view(np.uint32) & np.uint32(0x10000) == 0
    assert (np.where(r == lo, d_lo < d_hi, d_hi < d_lo) | ((d_lo == d_hi) & even)).all()


def test_float16_rounding_is_nearest_even():
    vals = np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0, 65519.0, 65520.0, 2 ** -25,
                     2 ** -24 * 1.5])
    want = np.array([1.0, 1 + 2 ** -9, 65504.0, 65504.0, np.inf, 0.0, 2 ** -23],
                    dtype=np.float32)
    assert np.array_equal(hb.round_f16(vals), want), hb.round_f16(vals)


@pytest.mark.parametrize("fmt", FORMATS)
def test_candidate_holds_values_of_the_format(cand, fmt):
    """The emulation rounds: every float written is a fixed point of the format's rounding
    (and float16 candidates are float16 datasets, bfloat16 ones float32)."""
    import h5py
    for suite in ("s4d_layer", "neuron", "block"):
        with h5py.File(cand(suite, fmt), "r") as f:
            n = 0

            def visit(name, obj):
                nonlocal n
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
                    v = obj[()]
                    assert obj.dtype == hb.WRITE_DTYPE[fmt], (name, obj.dtype)
                    ok = np.isnan(v) | (hb.round_to(v, fmt) == v)
                    assert ok.all(), f"{suite} {name}: {v[~ok][:4]} not {fmt} values"
                    n += 1
            f.visititems(visit)
            assert n > 0


# ---- the correct backend and its variants ----------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("suite", hb.SUITES)
def test_correct_backend_passes(cand, suite, fmt):
    rep = run(cand(suite, fmt), fmt)
    bad = failing(rep)
    c = counts(rep)
    assert not bad, f"{suite} at {fmt}: {rep['summary']['statuses']}\n{fmt_rows(bad)}"
    assert rep["passed"]
    assert c["PASS"] > 0, c
    print(f"{suite} {fmt} fft: {c}")


def _variant_params():
    for variant, suites in VARIANT_SUITES.items():
        for suite in suites:
            for fmt in FORMATS:
                yield pytest.param(variant, suite, fmt, id=f"{variant}-{suite}-{fmt}")


@pytest.mark.parametrize("variant,suite,fmt", list(_variant_params()))
def test_variant_passes(cand, variant, suite, fmt):
    seed = SEED0 if variant in hb.SEEDED else None
    rep = run(cand(suite, fmt, variant=variant, seed=seed), fmt)
    bad = failing(rep)
    assert not bad, (f"{suite} at {fmt}, variant {variant} seed {seed}: "
                     f"{rep['summary']['statuses']}\n{fmt_rows(bad)}")
    print(f"{suite} {fmt} {variant}: {counts(rep)}")


def _differing(fmt, variant, seed, suites=hb.SUITES):
    """``{suite: number of elements}`` where the variant's candidate differs from the FFT
    backend's at ``fmt``."""
    out = {}
    for suite in suites:
        a = hb.compute_suite(suite, fmt)
        b = hb.compute_suite(suite, fmt, variant=variant, seed=seed)
        n = 0
        for cid in a:
            if isinstance(a[cid], str):
                assert a[cid] == b[cid]
                continue
            for ta, tb in zip(a[cid], b[cid]):
                assert ta.keys() == tb.keys()
                n += sum(int((~((ta[k] == tb[k]) | (np.isnan(ta[k]) & np.isnan(tb[k])))).sum())
                         for k in ta)
        if n:
            out[suite] = n
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANT_SUITES) + ["jitter"])
def test_variants_change_only_their_suites(variant):
    """A variant computes differently in its suites (float32 results, before any 16-bit
    rounding: the test of the variant is no repetition of the FFT backend's) and identically
    elsewhere (so the suites left out of test_variant_passes are covered). At 16 bits most
    of the difference disappears in the final rounding; the elements that still differ are
    counted (-s)."""
    seed = SEED0 if variant in hb.SEEDED else None
    suites = VARIANT_SUITES.get(variant, hb.SUITES)
    differs = _differing("float32", variant, seed)
    assert set(differs) <= set(suites), sorted(differs)
    # the neuron chunked is the same recursion, bit for bit: its test checks the state passing
    expect = set(suites) - ({"neuron", "pmbc"} if variant == "chunked" else set())
    assert expect <= set(differs), f"{variant} changes nothing in {sorted(expect - set(differs))}"
    for fmt in FORMATS:
        print(f"{variant} at {fmt}: elements differing from the FFT backend "
              f"{_differing(fmt, variant, seed, suites)}")


# ---- planted bugs ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bug", sorted(fb.BUGS))
def test_planted_bug_fails_with_its_tensor(cand, bug, fmt):
    suite, tensor = fb.BUGS[bug]
    rep = run(cand(suite, fmt, bug), fmt)
    bad = failing(rep)
    assert not rep["passed"] and bad, f"{bug} not caught at {fmt}: {rep['summary']['statuses']}"
    tensors = {r["tensor"] for r in bad}
    assert tensor in tensors, f"{bug} at {fmt}: failing rows on {sorted(tensors)}, not {tensor}"
    hit = [r for r in bad if r["tensor"] == tensor]
    print(f"{bug} {fmt}: {len(hit)} failing rows on {tensor}, e.g.\n{fmt_rows(hit, 1)}")


#: bugs that change one tensor only: the failing rows must name it and nothing else
EXCLUSIVE = ("grad_x1001", "glu_output_x1001", "missing_conj", "no_D_in_backward",
             "count_end_not_decremented")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bug", EXCLUSIVE)
def test_single_tensor_bug_blames_that_tensor_only(cand, bug, fmt):
    suite, tensor = fb.BUGS[bug]
    bad = failing(run(cand(suite, fmt, bug), fmt))
    others = [r for r in bad if r["tensor"] != tensor]
    assert bad and not others, f"{bug} at {fmt} blames other tensors:\n{fmt_rows(others)}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_dataset_blames_that_dataset_only(cand, fmt):
    """The correct pmbc candidate without ``iterations`` (verified without the skip): every
    failing row is that MISSING dataset. (A case where reading the inputs directly and via
    float32 round differently has two references; the verdict must not fall back to the one
    the candidate does not match because the case fails for another reason.)"""
    rep = verify([cand("pmbc", fmt)], precision=fmt)["files"][0]
    bad = failing(rep)
    others = [r for r in bad if (r["status"], r["tensor"]) != ("MISSING", "outputs/iterations")]
    assert bad and not others, f"pmbc at {fmt}:\n{fmt_rows(others)}"


def test_at_least_15_bugs_of_distinct_kinds():
    kinds = {  # bug -> kind (issue 21: structural, discrete, scale, stateful)
        "glu_gate_wrong_half": "structural", "fft_circular": "structural",
        "anticausal_not_reversed": "structural", "missing_conj": "structural",
        "no_D_in_backward": "structural", "sdn_sees_x_t": "structural",
        "gsu_ternary_global": "structural", "gsu_bc_swapped": "structural",
        "ge_for_gt": "discrete", "refractory_counter_off_by_one": "discrete",
        "refractory_theta": "discrete", "kernel_power_off_by_one": "discrete",
        "detach_reset_as_bptt": "discrete",
        "soft_reset_1001": "scale", "surrogate_scale_x2": "scale", "glu_output_x1001": "scale",
        "grad_x1001": "scale", "layernorm_unbiased": "scale",
        "state_u0_ignored": "stateful", "state_count0_ignored": "stateful",
        "count_end_not_decremented": "stateful", "ssm_state_ignored": "stateful",
        "ssm_end_state_power_off_by_one": "stateful", "stream_state_reset_per_chunk": "stateful",
        "stream_ssm_end_state_off_by_one": "stateful",
    }
    assert set(kinds) == set(fb.BUGS)
    assert len(fb.BUGS) >= 15 and set(kinds.values()) == {"structural", "discrete", "scale",
                                                            "stateful"}


# ---- false alarms ------------------------------------------------------------------------------

#: the suites of the fast false-alarm run: the cheap ones. A rounding variant moves the most
#: 16-bit values in the block (measured over 6 seeds, bfloat16 / float16: block 736 / 1921,
#: neuron 158 / 218, pmbc 138 / 169, glu 69 / 122, fftconv 14 / 61, sdn 5 / 53, s4d_layer 10 /
#: 38, s4d_kernel 3 / 6, gsu 7 / 3, model_stream 1 / 8), which costs 0.5 s a seed: the slow run
#: takes every suite
FAST_SUITES = ("fftconv", "glu", "sdn")


def _false_alarms(tmp, seeds, suites, formats=lambda seed: FORMATS):
    """Failing rows and status counts of the ``rounding`` variants ``seeds`` at their
    ``formats(seed)``, and the number of elements in which they differ from the FFT backend's
    candidates (what the run exercised: most float32 differences vanish in the 16-bit
    rounding). Each variant's candidates are written to ``tmp`` and dropped (file and memo)
    once verified."""
    bad, stats, moved = [], {}, dict.fromkeys(FORMATS, 0)
    for seed in seeds:
        for fmt in formats(seed):
            stats.setdefault(("seeds", fmt), {"n": 0})["n"] += 1
            moved[fmt] += sum(_differing(fmt, "rounding", seed, suites).values())
            for suite in suites:
                path = hb.write_candidate(suite, tmp / f"{suite}-{fmt}-{seed}.h5", fmt,
                                          variant="rounding", seed=seed)
                rep = run(path, fmt)
                path.unlink()
                bad += [dict(r, seed=seed, fmt=fmt) for r in failing(rep)]
                c = counts(rep)
                st = stats.setdefault((suite, fmt), dict.fromkeys(c, 0))
                for k, v in c.items():
                    st[k] += v
        hb.forget(variant="rounding", seed=seed)
    return bad, stats, moved


def _report(bad, stats, moved):
    for (suite, fmt), c in sorted(stats.items()):
        if suite != "seeds":
            print(f"{suite} {fmt} over {stats['seeds', fmt]['n']} rounding variants: {c}")
    print(f"elements differing from the FFT backend's candidates: {moved}")
    return "\n".join(f"seed {r['seed']} {r['fmt']} {r.get('suite')} {r['case']}"
                     for r in bad[:12]) + "\n" + fmt_rows(bad)


def test_no_false_alarm_fast(tmp_path):
    t = time.perf_counter()
    # seed i judged at one format, alternately (the slow run judges every seed at both)
    bad, stats, moved = _false_alarms(tmp_path, range(N_FAST), FAST_SUITES,
                                      lambda seed: (FORMATS[seed % 2],))
    assert not bad, _report(bad, stats, moved)
    _report(bad, stats, moved)
    assert sum(moved.values()) > 0  # the variants did round differently somewhere
    print(f"fast false-alarm run: {time.perf_counter() - t:.1f} s")


@pytest.mark.slow
def test_no_false_alarm_200_rounding_variants(tmp_path):
    t = time.perf_counter()
    bad, stats, moved = _false_alarms(tmp_path, range(N_SLOW), hb.SUITES)
    assert not bad, _report(bad, stats, moved)
    _report(bad, stats, moved)
    print(f"slow false-alarm run: {time.perf_counter() - t:.1f} s")
