"""Spikes under a profile: which flips are acceptable, and what can still be compared after one
(golden/SCHEMA.md, "Spikes under a profile"). The suite's structure comes from the registry
(:class:`~.registry.Suite`: ``flips``, ``spikes``, ``ternary``, ``causal``); nothing here
names a suite.

- ``flips="rows"`` (neuron, pmbc): per row ``(b, c)`` the first differing step ``t0`` is an
  acceptable flip when the reference membrane is within its bound of theta there; the row is
  then compared before ``t0`` only, and its gradients and end state not at all.
- ``flips="elements"`` (sdn): each flip within the bound of ``m + x - theta`` on its own.
- internal spikes (``fwd``'s diag names membranes: block, model_step, lm_step, model_stream,
  gsu): if a membrane comes within its bound of the threshold at step ``t*``, outputs the suite
  declares causal are compared before ``t*``; the others (gradients, end states, outputs of a
  whole sequence) are not compared, and the row says so.
"""
import dataclasses
import hashlib
import math

import numpy as np

from .profiles import representable
from .registry import judging_suite
from .tensors import index_str

#: Flipped-spike indices listed in a row's detail.
LIST_FLIPS = 8


@dataclasses.dataclass
class Flips:
    """What a spike rule decided: ``masks`` (dataset path -> elements still compared; absent
    means all), ``accepted`` flips (index tuples), ``untestable`` (every spike within the bound),
    ``detail`` for the ACCEPTABLE row, ``t_star`` (internal: first step that may flip)."""
    masks: dict = dataclasses.field(default_factory=dict)
    accepted: list = dataclasses.field(default_factory=list)
    untestable: str = ""
    detail: str = ""
    t_star: object = None


def exact_at(case, profile):
    """Whether an ``at_threshold`` neuron case is computed exactly in ``profile``'s arithmetic:
    every input, parameter, configuration value, membrane ``h``, ``u`` and product ``tau u``
    is representable, so each step's exact result is (dyadic cases, tau = 0.5)."""
    if "at_threshold" not in case.flags:
        return False
    c = case.config
    tau = c.get("tau", 0.0)
    u = case.data.get("outputs/u")
    u0 = case.data.get("inputs/u0")  # stateful cases: h_0 = tau u0 + x_0
    vals = [case.data.get("inputs/x"), case.data.get("params/rho"), case.data.get("outputs/h"),
            u, None if u is None else tau * u, u0, None if u0 is None else tau * u0,
            np.array([tau, c.get("theta", 0.0), c.get("u_reset", 0.0)])]
    return all(representable(v, profile) for v in vals if v is not None)


def neuron_rows(ref, cand_s, elem, exact):
    """``flips="rows"``: ``ref`` the reference case (outputs ``s``, ``h``), ``elem`` the bound
    of ``h`` per element, ``exact``: no flip is acceptable (:func:`exact_at`)."""
    ref_s, h = ref.data["outputs/s"], ref.data["outputs/h"]
    margin = np.abs(h - float(ref.config.get("theta", 0.0)))
    within = margin <= elem if not exact else np.zeros(margin.shape, bool)
    out = Flips()
    if ref_s.size and within.all():
        out.untestable = (f"every spike's margin is within the membrane bound (largest margin "
                          f"{float(margin.max()):.3g}): the spikes are not a test here")
    differ = cand_s != ref_s
    if not differ.any():
        return out
    keep = np.ones(ref_s.shape, bool)
    row_ok = np.ones(ref_s.shape[:2], bool)
    for b, ch in zip(*np.nonzero(differ.any(axis=-1))):
        t0 = int(np.argmax(differ[b, ch]))
        if within[b, ch, t0]:
            out.accepted.append((int(b), int(ch), t0))
            keep[b, ch, t0:] = False
            row_ok[b, ch] = False
    if out.accepted:
        for p in ("outputs/s", "outputs/h", "outputs/u"):
            out.masks[p] = keep
        out.masks["grads/x"] = np.broadcast_to(row_ok[:, :, None], ref_s.shape)
        out.masks["outputs/u_end"] = out.masks["outputs/count_end"] = row_ok
        out.masks["grads/rho"] = row_ok.all(axis=0)
        out.detail = _flip_detail(out.accepted, margin, elem, cand_s, ref_s,
                                  "; the rest of each row is not comparable")
    return out


def elements(ref, cand_s, elem):
    """``flips="elements"``: each flip with ``|m + x - theta| <= elem`` on its own."""
    ref_s = ref.data["outputs/s"]
    margin = np.abs(ref.data["outputs/m"] + ref.data["inputs/x"]
                    - float(ref.config.get("theta", 0.0)))
    within = margin <= elem
    out = Flips()
    if ref_s.size and within.all():
        out.untestable = (f"every spike's margin is within the membrane bound (largest margin "
                          f"{float(margin.max()):.3g}): the spikes are not a test here")
    acc = (cand_s != ref_s) & within
    if acc.any():
        out.accepted = [tuple(int(k) for k in i) for i in zip(*np.nonzero(acc))]
        out.masks["outputs/s"] = ~acc
        out.detail = _flip_detail(out.accepted, margin, elem, cand_s, ref_s, "")
    return out


def _flip_detail(flips, margin, elem, cand_s, ref_s, tail):
    f = flips[0]
    shown = ", ".join(index_str(i) for i in flips[:LIST_FLIPS])
    more = f" and {len(flips) - LIST_FLIPS} more" if len(flips) > LIST_FLIPS else ""
    return (f"{len(flips)} spike flip(s) within the membrane bound (margin "
            f"{float(margin[f]):.3g} <= {float(np.broadcast_to(elem, margin.shape)[f]):.3g} at "
            f"{index_str(f)}, candidate {float(cand_s[f]):g}, reference {float(ref_s[f]):g}): "
            f"{shown}{more}{tail}")


def internal(suite, case, membranes, bound, paths, acceptable):
    """Internal spikes: the first step ``t*`` at which some membrane ``(value, threshold)`` of
    ``membranes`` is within ``bound`` of its threshold (membranes are ``(B, H, L)``, time
    last). ``acceptable``: the file marks the case acceptable (then a flip may happen from
    step 0 if no membrane is near: the generator saw one under perturbation). Returns
    :class:`Flips` with masks for ``paths`` (outputs the suite declares causal keep the steps
    before ``t*``, everything else is not compared), or an empty one when nothing may flip."""
    first, near, worst = None, 0, None
    for name, (h, thr) in membranes.items():
        h = np.asarray(h, dtype=np.float64)
        if not h.size:
            continue
        gap = np.abs(h - thr)
        close = gap <= bound
        i = int(np.argmin(gap))
        if worst is None or gap.flat[i] < worst[1]:
            worst = (name, float(gap.flat[i]))
        if close.any():
            near += int(close.sum())
            t = int(np.nonzero(close.reshape(-1, h.shape[-1]).any(axis=0))[0][0])
            first = t if first is None else min(first, t)
    if first is None and not acceptable:
        return Flips()
    t_star = 0 if first is None else first
    causal = judging_suite(suite).causal(case) if judging_suite(suite).causal else {}
    out = Flips(t_star=t_star)
    kept, dropped = [], []
    for p in paths:
        name = p.split("/", 1)[1]
        if p.startswith("outputs/") and name in causal and t_star > 0:
            axis = causal[name]
            shape = np.shape(case.data[p])
            m = np.zeros(shape, bool)
            idx = [slice(None)] * len(shape)
            idx[axis] = slice(0, t_star)
            m[tuple(idx)] = True
            out.masks[p] = m
            kept.append(name)
        else:
            out.masks[p] = np.zeros(np.shape(case.data[p]), bool)
            dropped.append(name)
    why = (f"{near} membrane value(s) within the bound {bound:.3g} of the threshold, the first "
           f"at step {t_star} (closest: {worst[0]}, margin {worst[1]:.3g})" if first is not None
           else "the case is acceptable (a spike flipped when refimpl perturbed its inputs)")
    out.detail = (f"internal spikes may flip: {why}; compared before step {t_star}: "
                  f"{', '.join(kept) or 'nothing'}; not compared: {', '.join(dropped) or '-'}"
                  f" (values are still checked: finite, spikes 0/1)")
    return out


_MEMBRANES = {}


def case_key(suite, case):
    """A cache key of a case's inputs and parameters (what its membranes depend on)."""
    digest = hashlib.sha1()
    for p in sorted(case.data):
        if p.startswith(("inputs/", "params/")):
            digest.update(p.encode() + np.ascontiguousarray(case.data[p]).tobytes())
    return suite, case.id, digest.hexdigest()


def membrane_parts(suite_name, case):
    """refimpl's membranes of a case with internal spikes, and per membrane the parts of its
    bound ``(depth, max|h|, spread, floor)``: recomputed from the case's inputs (and
    ``N_PERTURB`` copies perturbed by ``PERTURB``, the measured ``spread``), as the generator
    measures a dataset. Returns ``(membranes, parts)``; cached per case contents."""
    from .generate import N_PERTURB, _perturbed, lookup  # the generator's own recipe
    key = case_key(suite_name, case)
    if key not in _MEMBRANES:
        suite = judging_suite(suite_name)
        case = dataclasses.replace(case, data={p: v for p, v in case.data.items()
                                               if p.startswith(("inputs/", "params/"))})
        _, _, diag = suite.fwd(case)
        mem = diag.get("membranes", {})
        rng = np.random.default_rng([int(case.id), 3])
        spread = {m: 0.0 for m in mem}
        for _ in range(N_PERTURB):
            _, _, d2 = suite.fwd(_perturbed(case, rng))
            for m, (h, _) in mem.items():
                spread[m] = max(spread[m], float(np.max(np.abs(d2["membranes"][m][0] - h)))
                                if np.size(h) else 0.0)
        depth = int(lookup(suite.depth(case), "outputs/*"))
        floors = suite.floors(case) if suite.floors else {}
        parts = [(depth, float(np.max(np.abs(h))) if np.size(h) else 0.0, spread[m],
                  floors.get("membrane/" + m, 0.0)) for m, (h, _) in mem.items()]
        _MEMBRANES[key] = (mem, parts)
    return _MEMBRANES[key]


def membrane_bound(parts, profile):
    """The bound of internal membranes at ``profile``: per membrane ``max(16 (sqrt(depth)
    eps_p max|h| + 1.25 k spread), k floor)``, the largest.

    The rounding term is probabilistic (Higham and Mary, "A new approach to probabilistic
    rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019): with rounding errors that are
    independent and of mean zero, a depth-``n`` evaluation errs by more than ``lambda sqrt(n)
    u`` (relative to the magnitudes it sums) with probability at most ``2 exp(-lambda^2 / 2)``;
    with ``lambda = 16`` and ``u = eps_p / 2`` below ``16 sqrt(n) eps_p``, that is under
    ``1e-55`` per membrane value. The worst case ``n eps_p`` (the tensors' own bounds) needs
    every rounding error of a membrane to push the same way: at depths of 100-1000 it
    declared 5 of 8 ``lm_step`` cases incomparable at bfloat16 although no spike was within
    reach of a float32 evaluation. The conditioning term (``spread``) is measured, not a worst
    case, and stays. Measured: a float32 evaluation in 200 seeded rounding variants flips no
    spike outside this bound (tests/test_golden_half.py)."""
    from .generate import SAFETY
    from .profiles import INPUT_ROUNDING
    k = profile.k
    return max((max(SAFETY * (math.sqrt(d) * profile.eps * sc + (1.0 + INPUT_ROUNDING) * k * sp),
                    k * fl) for d, sc, sp, fl in parts), default=0.0)
