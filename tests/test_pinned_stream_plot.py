"""The stream's tolerances and the raster's traced channels, each against an independent
computation (issue 23).

- :func:`refimpl.stream.tolerances` (the bounds :func:`refimpl.stream.compare_forms` judges the
  three forms by and reports): recomputed from its docstring, per layer
  ``layer_depth = 2 log2(2L) + 2L + N2 + 4H + 16`` (the FFT's stage count rounded up to an
  integer), membrane bound ``16 eps depth max(1, max|v|)``, the depth carried on times
  ``max(1, norm_gain)``, and the logits' ``16 eps (depth + readout)`` with readout ``L`` (the
  running mean over time, classifier) or ``H`` (the decoder's sums, language model).
- :func:`refimpl.plot.trace_channels` and the membrane traces of
  :func:`refimpl.plot.raster_figure`: the ``k`` most active channels, ties broken by the higher
  peak, then the lower index, by a sort written out.

Tolerances: the bounds are sums and products of the same few terms in another order, 1e-14
relative (no absolute floor: the bounds themselves are ~1e-12); channel indices exactly.
"""
import math

import numpy as np
import pytest

from refimpl import model as M
from refimpl import plot as P
from refimpl.stream import ModelStream, compare_forms, tolerances

EPS = 2.0 ** -52


def tolerances_by_docstring(H, N2, L, head, records):
    depth, membrane = 0.0, []
    for rec in records:
        depth += 2 * math.ceil(math.log2(2 * L)) + 2 * L + N2 + 4 * H + 16
        membrane.append(16 * EPS * depth * max(1.0, max(abs(float(v)) for v in
                                                        np.ravel(rec["v"]))))
        depth *= max(1.0, rec["norm_gain"])
    readout = L if head == "classifier" else H
    return membrane, 16 * EPS * (depth + readout)


@pytest.mark.parametrize("head", ["classifier", "lm"])
@pytest.mark.parametrize("L", [1, 7, 16, 33])
def test_tolerances_are_the_docstring_formula(head, L):
    """Three layers with membranes below and above 1 and norm gains below and above 1; H = 5,
    N2 = 3 and L differ, so any swap of them or of the readout length shows."""
    cfg = (M.ModelConfig(n_classes=3, d_input=2, d_model=5, d_state=6, n_layers=3)
           if head == "classifier" else
           M.ModelConfig.for_lm(11, d_model=5, d_state=6, n_layers=3))
    rng = np.random.default_rng(L)
    records = [{"v": rng.normal(0, s, size=(2, 5, L)), "norm_gain": g}
               for s, g in ((0.1, 0.5), (4.0, 3.0), (2.0, 1.7))]
    got = tolerances(cfg, L, records)
    membrane, logits = tolerances_by_docstring(5, 3, L, head, records)
    assert len(got["membrane"]) == 3
    for a, b in zip(got["membrane"], membrane):
        assert a == pytest.approx(b, rel=1e-14, abs=0)
    assert got["logits"] == pytest.approx(logits, rel=1e-14, abs=0)


@pytest.mark.parametrize("head", ["classifier", "lm"])
def test_compare_forms_reports_the_bounds_of_its_parallel_records(head):
    """What compare_forms reports (and judges by) is the formula on the parallel form's own
    records: the membrane bound per layer and the logits' bound, for a model of two lif
    layers."""
    if head == "classifier":
        cfg = M.ModelConfig(n_classes=3, d_input=2, d_model=6, d_state=4, n_layers=2)
        x = np.random.default_rng(0).normal(0, 3, size=(2, 20, 2))  # (B, L, d)
    else:
        cfg = M.ModelConfig.for_lm(9, d_model=6, d_state=4, n_layers=2)
        x = np.random.default_rng(0).integers(0, 9, size=(2, 20))  # (B, L)
    p, buf = M.init_model(cfg, 0)
    stream = ModelStream(cfg, p, buf)
    r = compare_forms(stream, x, [7, 13])
    _, recs = stream.parallel(x, record=True)
    membrane, logits = tolerances_by_docstring(6, 2, 20, head, recs)
    assert r["bounds"]["membrane"] == pytest.approx(membrane, rel=1e-14, abs=0)
    assert r["logit_bound"] == pytest.approx(logits, rel=1e-14, abs=0)
    assert r["mismatches"] == 0 and r["worst_error"] <= r["logit_bound"]
    assert r["worst_membrane"] <= 1.0


# --------------------------------------------------------------------------------------------
# The raster's traced channels
# --------------------------------------------------------------------------------------------


def chosen_by_sort(events, membrane, k):
    """Channels by (more events, higher peak, lower index), the first k."""
    H = events.shape[0]
    count = [sum(1 for v in events[c] if v != 0) for c in range(H)]
    peak = [max(float(v) for v in membrane[c]) for c in range(H)]
    return sorted(range(H), key=lambda c: (-count[c], -peak[c], c))[:k]


def _designed(H=9, L=12):
    """Events with ties in the count (channels 1, 4, 6 fire 5 times; 2 and 7 fire 3 times with
    equal peaks) and membranes whose peaks order the ties, whose minima order them the other
    way round."""
    counts = [0, 5, 3, 1, 5, 2, 5, 3, 0]
    peaks = [0.3, 1.2, 1.5, 0.9, 2.0, 1.1, 1.6, 1.5, 0.2]
    events = np.zeros((H, L))  # (H, L)
    membrane = np.zeros((H, L))  # (H, L)
    for c in range(H):
        events[c, :counts[c]] = 1.0
        membrane[c] = np.linspace(-peaks[c], peaks[c], L)  # min = -peak
    return events, membrane


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9, 12])
def test_trace_channels_are_the_most_active_by_a_sort(k):
    events, membrane = _designed()
    want = chosen_by_sort(events, membrane, k)
    # the fixture's order: count, then peak, then index
    assert chosen_by_sort(events, membrane, 9)[:6] == [4, 6, 1, 2, 7, 5]
    assert list(P.trace_channels(events, membrane, k)) == want


def test_the_raster_traces_the_most_active_channels():
    """``raster_figure`` draws the membranes of the channels the sort picks (MAX_TRACES of
    them) for a lif model's record with the designed spikes and membranes in layer 0."""
    pytest.importorskip("matplotlib")
    cfg = M.ModelConfig(n_classes=3, d_input=2, d_model=9, d_state=4, n_layers=1,
                        activation="lif")
    p, buf = M.init_model(cfg, 0)
    record, _, _ = P.record_sample(cfg, p, buf, np.zeros((12, 2)))
    events, membrane = _designed()
    rec = dict(record[0])
    rec[cfg.family.events] = events
    rec[cfg.family.plot.trace] = membrane
    fig = P.raster_figure(cfg, [rec])
    traced = [int(a.get_gid().split(".")[2]) for ax in fig.axes for a in ax.get_lines()
              if (a.get_gid() or "").startswith("membrane.0.")]
    assert traced == chosen_by_sort(events, membrane, P.MAX_TRACES) == [4, 6, 1, 2]
