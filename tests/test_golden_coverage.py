"""Coverage of the committed golden set at the 16-bit profiles (issue 21).

- ``golden/SCHEMA.md``'s coverage table is the output of ``refimpl golden coverage``;
- at bfloat16 at least 90 % of the tensors of the valid cases are a test (compared against a
  bound below their magnitude), and at float16 too;
- the ``UNTESTABLE`` count per suite is recounted here from SCHEMA.md's formula: the float32
  bound ``atol_32 = max(16 (depth 2^-23 scale + 1.25 2^29 spread), 2^29 floor)`` of each
  allclose dataset against ``max|ref|`` of refimpl's answer at the inputs rounded to the format
  (rounded here, by :func:`test_golden.to16`), and the cases holding a value beyond the
  format's largest finite number (all their tensors).
"""
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from refimpl import golden as G
from refimpl.cli.main import main

from test_golden import to16

SCHEMA = Path(__file__).resolve().parent.parent / "golden" / "SCHEMA.md"
EPS32 = 2.0 ** -23
MAX = {"bfloat16": (2.0 - 2.0 ** -7) * 2.0 ** 127, "float16": 65504.0}


@pytest.fixture(scope="module")
def tables():
    return {p: G.coverage(precision=p) for p in ("bfloat16", "float16")}


def test_schema_table_is_the_commands_output(tables):
    r = CliRunner().invoke(main, ["golden", "coverage"])
    assert r.exit_code == 0, r.output
    table = r.output[r.output.index("| suite |"):]
    assert table == G.format_coverage(tables)
    text = SCHEMA.read_text()
    region = re.search(r"<!-- coverage:begin -->\n(.*?)<!-- coverage:end -->", text, re.S)
    assert region and region.group(1) == table, "regenerate: refimpl golden coverage"


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_at_least_90_percent_of_the_tensors_are_a_test(tables, precision):
    per = tables[precision]
    assert set(per) == set(G.SUITES)
    tested = sum(c["tested"] for c in per.values())
    total = sum(c["tested"] + c["untestable"] + c["not_compared"] for c in per.values())
    # every output and grad of every valid / acceptable case is counted once
    n = sum(sum(p.startswith(("outputs/", "grads/")) for p in c.data)
            for s in G.SUITES for c in G.read_golden(G.DEFAULT_DIR / f"{s}.h5").cases.values()
            if c.result != "invalid")
    assert total == n
    assert tested >= 0.9 * total, f"{tested} of {total} at {precision}"


def _atol32(meta):
    k = EPS32 / 2.0 ** -52
    return max(16 * (meta["depth"] * EPS32 * meta["scale"] + 1.25 * k * meta["spread"]),
               k * meta.get("floor", 0.0))


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_untestable_counts_follow_from_the_formula(tables, precision):
    for suite in G.SUITES:
        gf = G.read_golden(G.DEFAULT_DIR / f"{suite}.h5")
        want = 0
        for c in gf.cases.values():
            if c.result == "invalid":
                continue
            paths = [p for p in c.data if p.startswith(("outputs/", "grads/"))]
            if any(np.asarray(v).dtype.kind == "f" and np.isfinite(v).any()
                   and np.abs(v[np.isfinite(v)]).max() > MAX[precision] for v in c.data.values()):
                want += len(paths)  # the whole case cannot be computed in the format
                continue
            read = {p: (to16(v, precision) if v.dtype.kind == "f" else v)
                    for p, v in c.data.items() if p.startswith(("inputs/", "params/",
                                                                  "cotangents/"))}
            ref = G.recompute(suite, G.Case(id=c.id, op=c.op, flags=c.flags, result=c.result,
                                            config=c.config, data={**c.data, **read}))
            for p in paths:
                m = c.meta.get(p, {})
                if m.get("compare") != "allclose" or "depth" not in m:
                    continue
                if p == "outputs/iterations":
                    continue
                v = np.asarray(ref.data[p])
                a = _atol32(m)
                if a > 0 and a >= (np.abs(v).max() if v.size else 0.0):
                    want += 1
        assert tables[precision][suite]["untestable"] == want, (suite, precision)


def test_a_suite_mostly_not_a_test_says_so_on_one_line():
    """The report's coverage line, and its warning when fewer than half the tensors were a test
    (a synthetic report: no committed suite is that weak at any profile now)."""
    def report(tested, untestable, not_compared):
        return {"files": [{"suite": "glu", "precision": "bfloat16", "passed": True,
                           "candidate": "c.h5", "golden": "g.h5", "rows": [],
                           "summary": {"cases": 1, "cases_failed": 0, "statuses": {},
                                       "tensors": {"tested": tested, "untestable": untestable,
                                                   "not_compared": not_compared}}}]}
    text = G.format_report(report(2, 3, 1))
    assert "tensors at bfloat16: 2 of 6 tested (33.3 %), 3 UNTESTABLE, 1 not compared" in text
    warn = [ln for ln in text.splitlines() if "WARNING" in ln]
    assert warn == ["  WARNING: most tensors of glu are not a test at bfloat16: this verdict "
                    "says little"]
    assert "WARNING" not in G.format_report(report(4, 3, 0))
