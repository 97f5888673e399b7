"""refimpl: the CPU reference implementation of spiking state space models.

Modules (one concept each; see DESIGN.md for the math):

- :mod:`refimpl.ssm` - S4D parameters, discretization, the kernel ``K`` and its backward;
- :mod:`refimpl.conv` - causal / bidirectional FFT convolution (and the direct form);
- :mod:`refimpl.recurrence` - step API, whole-sequence recurrence, associative scan;
- :mod:`refimpl.s4d` - the S4D layer (kernel + convolution + D), forward and backward;
- :mod:`refimpl.reference` - the standalone pure-NumPy statement of the math (the oracle).
"""
__version__ = "0.1.0"
