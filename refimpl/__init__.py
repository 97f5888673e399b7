"""refimpl: the CPU reference implementation of spiking state space models.

Modules (one concept each; see DESIGN.md for the math):

- :mod:`refimpl.ssm` - S4D parameters, discretization, the kernel ``K`` and its backward;
- :mod:`refimpl.conv` - causal / bidirectional FFT convolution (and the direct form);
- :mod:`refimpl.recurrence` - step API, whole-sequence recurrence, associative scan;
- :mod:`refimpl.s4d` - the S4D layer (kernel + convolution + D), forward and backward;
- :mod:`refimpl.surrogates` - surrogate gradients with their primitives;
- :mod:`refimpl.neurons` - the LIF family (hard/soft/refractory/none resets), three grad modes;
- :mod:`refimpl.pmbc` - PMBC, exact parallel spiking by boundary compression;
- :mod:`refimpl.sdn` - the Surrogate Dynamic Network (package: weights, fused kernel, SDN
  neuron, training network, training);
- :mod:`refimpl.layers` - GLU, GSU, norms, dropout, pooling, loss;
- :mod:`refimpl.activations` - the activation registry, one entry per family;
- :mod:`refimpl.model` - spiking SSM blocks and classifiers, whole-model backward;
- :mod:`refimpl.optim` - AdamW with parameter groups, cosine schedule;
- :mod:`refimpl.precision` - float64 (the reference) or the named float32 variant of the ops;
- :mod:`refimpl.ops` - the op contract and the op registry (every kernel module registers its ops);
- :mod:`refimpl.loop` - the one training-loop core (classifier, language model, SDN);
- :mod:`refimpl.tasks` / :mod:`refimpl.train` - built-in tasks, the classifier trainer, checkpoints;
- :mod:`refimpl.text` / :mod:`refimpl.lm_train` / :mod:`refimpl.sampling` - text data, the
  language-model trainer, sampling from a model stream;
- :mod:`refimpl.progress` - the progress events of every training loop;
- :mod:`refimpl.golden` - golden traces (package: schema, suite registry, suites, generation,
  comparison, reports; the committed files are the package data ``refimpl.golden.data``);
- :mod:`refimpl.h5io`, :mod:`refimpl.atomic`, :mod:`refimpl.table` - HDF5 files with
  provenance, atomic writes, plain-text tables;
- :mod:`refimpl.reference` - the standalone pure-NumPy statement of the math (the oracle);
- :mod:`refimpl.cli` - the ``refimpl`` command (the repository's ``cli/`` folder).
"""
__version__ = "0.1.0"
