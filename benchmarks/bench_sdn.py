"""Benchmark group ``sdn``: the SDN neuron beside the iterative LIF it replaces (issue 4).

Both compute hard-reset LIF spikes (tau = 0.125, theta = 1) for the same ``x (B, H, L)`` in
the same run: the SDN neuron (:func:`refimpl.sdn.sdn_neuron_fwd`, fused 153-parameter CNN,
published weights when ``../shared/external`` is present, else random weights of the same
shapes) and the iterative neuron (:func:`refimpl.neurons.neuron_fwd`). The SDN does about 140
multiply-adds per element where the LIF does two, and both kernels are serial, so on a CPU
the iterative form is the fast one; the SDN exists for GPUs, where a time loop is the slow
part. "speedup" is LIF time / SDN time (below 1: the SDN is slower). The spike agreement of
the two outputs is recorded in the note (the outputs are not the same math, so no
``allclose`` check).
"""
from pathlib import Path

import numpy as np

from harness import register
from refimpl.neurons import NeuronConfig, neuron_fwd
from refimpl.sdn import FUSED_LAYOUT, load_weights, sdn_neuron_fwd

FULL = {"B": 8, "H": 128, "L": 4096}
QUICK = {"B": 2, "H": 4, "L": 256}
PUBLISHED = (Path(__file__).resolve().parents[2] / "shared" / "external"
             / "sdn_spikingssm_tau0125.npz")


def _weights():
    if PUBLISHED.exists():
        return load_weights(PUBLISHED)[0], "published SpikingSSM weights"
    rng = np.random.default_rng(0)
    return ({k: rng.normal(0.0, 0.3, size=shape) for k, (_, shape) in FUSED_LAYOUT.items()},
            "random weights (../shared/external absent)")


@register("sdn", title="SDN neuron vs iterative LIF (issue 4)", order=30,
          description="float64, x ~ N(0, 1), tau = 0.125, theta = 1; B = batch, H = channels, "
                      "L = sequence length. refimpl = SDN neuron forward (fused CNN + "
                      "threshold), baseline = iterative hard-reset LIF forward; speedup = LIF "
                      "time / SDN time.")
def sdn(ctx):
    s = QUICK if ctx.quick else FULL
    ctx.params.update(s)
    x = np.random.default_rng(0).standard_normal((s["B"], s["H"], s["L"]))  # (B, H, L)
    w, source = _weights()
    lif = NeuronConfig(reset="hard", tau=0.125, theta=1.0)
    row = ctx.compare("SDN neuron forward vs iterative LIF forward", s,
                      refimpl=lambda: sdn_neuron_fwd(x, w, lif)[0],
                      baseline=lambda: neuron_fwd(x, lif)[0],
                      baseline_name="iterative LIF (refimpl.neurons.neuron_fwd)",
                      rtol=None)
    s_sdn = sdn_neuron_fwd(x, w, lif)[0]
    s_lif = neuron_fwd(x, lif)[0]
    agreement = float(np.mean(s_sdn == s_lif))
    n = x.size
    row["spike_agreement"] = agreement
    row["ns_per_element"] = {"sdn": row["refimpl"]["median_s"] / n * 1e9,
                             "lif": row["baseline"]["median_s"] / n * 1e9}
    row["note"] = (f"{source}; spike agreement {100 * agreement:.3f} %; SDN "
                   f"{row['ns_per_element']['sdn']:.1f} ns/element, LIF "
                   f"{row['ns_per_element']['lif']:.2f} ns/element")
