"""SDN: the Surrogate Dynamic Network of SpikingSSM (DESIGN.md section 6).

A tiny causal CNN predicts the decayed potential ``m_t = tau u_{t-1}`` of a hard-reset LIF
neuron from the last eight inputs, so that spikes ``s_t = Theta(m_t + x_t - theta)`` are
computed for every ``t`` at once instead of one step after another (Shen et al., SpikingSSMs,
arXiv 2408.14909, section "Surrogate Dynamic Network").

**Fused form** (inference, 153 parameters; the published ``.npz`` layout ``w0 .. w5``)::

    h1[c, t] = relu(b1[c] + sum_{k=0..7} W1[c, k] x[t-8+k])      (x[j] = 0 for j < 0)
    h2[c, t] = relu(b2[c] + sum_j W2[c, j] h1[j, t] + h1[c, t])
    m[t]     = b3 + sum_c w3[c] h2[c, t]
    s[t]     = Theta(m[t] + x[t] - theta)

It sees ``x[t-8 .. t-1]``, never ``x[t]``: ``m_t`` is strictly causal. **Training form**: 193
parameters (encoder, depthwise convolution, two BatchNorms, PyTorch layer names), folded into
the fused form after training.

Modules, one concern each:

- :mod:`~refimpl.sdn.weights`: the sizes ``C = 8`` channels, ``K = 8`` taps; the fused,
  training and buffer layouts; their checks; ``.npz``/HDF5 weights files.
- :mod:`~refimpl.sdn.fused`: :func:`sdn_forward` (the fast Numba kernel) and
  :func:`fused_fwd` / :func:`fused_bwd` (the same network in NumPy, differentiable in ``x``
  and ``w0 .. w5``).
- :mod:`~refimpl.sdn.neuron`: the SDN neuron for models, :func:`sdn_neuron_fwd` /
  :func:`sdn_neuron_bwd` (``m`` a constant, surrogate backward); its state
  :class:`SDNState` (the window of the last ``K`` inputs) for chunks and
  :func:`sdn_neuron_step`.
- :mod:`~refimpl.sdn.network`: the training network, :func:`train_fwd` / :func:`train_bwd`
  on :mod:`refimpl.layers` BatchNorm, :func:`init_train_params`, :func:`fold`.
- :mod:`~refimpl.sdn.training`: losses, LIF training data, :func:`train_sdn`,
  :func:`evaluate`. **[choice]** The depthwise taps start as the LIF's impulse response
  (``init="lif"``): from PyTorch's default initialisation the same recipe stalls near 99.7 %
  spike agreement for thousands of updates, from the ``lif`` start it passes 99.9 %.

Shapes: ``R`` rows of length ``L`` (any ``(B, H, L)`` is flattened to ``R = B * H`` rows).
"""
from .fused import (FusedCache, causal_windows, causal_windows_adjoint, fused_bwd, fused_fwd,
                    sdn_forward)
from .network import INITS, TrainCache, fold, init_train_params, train_bwd, train_fwd
from .neuron import (SDNState, check_sdn_state, sdn_neuron_bwd, sdn_neuron_fwd,
                     sdn_neuron_step, sdn_zero_state)
from .training import (LOSSES, SDNTrainConfig, SDNTrainResult, evaluate,
                       lif_decayed_potential, loss_fwd_bwd, make_dataset, train_sdn)
from .weights import (BN_EPS, BUFFER_LAYOUT, FUSED_LAYOUT, SCHEMA, SCHEMA_VERSION,
                      TRAIN_LAYOUT, C, FusedMatrices, K, check_buffers, check_train_params,
                      check_weights, load_training_state, load_weights, resolve_weights,
                      save_weights, unpack)

__all__ = [
    "BN_EPS", "BUFFER_LAYOUT", "C", "FUSED_LAYOUT", "INITS", "K", "LOSSES", "SCHEMA",
    "SCHEMA_VERSION", "TRAIN_LAYOUT", "FusedCache", "FusedMatrices", "SDNState",
    "SDNTrainConfig", "SDNTrainResult", "TrainCache", "causal_windows",
    "causal_windows_adjoint", "check_buffers", "check_sdn_state", "check_train_params",
    "check_weights", "evaluate", "fold", "fused_bwd", "fused_fwd", "init_train_params",
    "lif_decayed_potential", "load_training_state", "load_weights", "loss_fwd_bwd",
    "make_dataset", "resolve_weights", "save_weights", "sdn_forward", "sdn_neuron_bwd",
    "sdn_neuron_fwd", "sdn_neuron_step", "sdn_zero_state", "train_bwd", "train_fwd",
    "train_sdn", "unpack",
]
