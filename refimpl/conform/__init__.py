"""``refimpl conform``: property-based differential testing of a live backend (issue 24).

Golden files check the cases refimpl chose, at its sizes. ``conform`` checks a backend at its
own shapes and precision: for each op the backend provides, hypothesis draws configurations and
inputs (:mod:`.strategies`: shapes up to the limits given, values near thresholds, tiny and huge
``dt``, stateful starts, invalid inputs the backend must reject), refimpl builds the case
exactly as ``refimpl golden generate`` builds a golden case (reference outputs, cotangents,
gradients, bounds: :func:`refimpl.golden.generate.regenerate`), the backend computes its
candidate and the golden verifier judges it at the precision profile
(:func:`refimpl.golden.verify.compare_case`). A failure is shrunk by hypothesis to a minimal
case and written as a one-case golden file, which ``refimpl golden verify`` reproduces.

The adapter protocol
--------------------
An adapter is a Python object, usually a module, named on the command line as a file
(``path/to/adapter.py``), an importable module (``mypkg.refimpl_adapter``), either followed by
``:NAME`` for an attribute of it (``tests/adapters.py:buggy``; any object with the functions
as attributes). For each op it implements (``refimpl conform --list-ops`` shows their names,
arguments and configuration) it has a function named as the op::

    def neuron(inputs, params, state=None, **config):
        ...
        return {"s": s, "h": h, "u": u}            # + {"u_end": ..., "count_end": ...}

- ``inputs`` and ``params``: dicts of NumPy arrays by the op's names (float64, int64 for
  labels, tokens and refractory counts: the golden files' values; a float32 or 16-bit backend
  rounds them itself, as it would read a golden file). An optional parameter may be absent.
- ``config``: every field of the op's configuration as a keyword (str, int, float, bool).
- ``state`` (ops with a state: ``s4d_layer``, ``neuron``, ``pmbc``, ``sdn_neuron``): None for
  the zero state, else ``{field: array}`` (the op's state fields; complex fields as arrays of
  complex128). A function with a ``state`` parameter returns the end state too, as
  ``<field>_end`` entries beside the outputs (complex ones as ``<field>_end_re`` and
  ``<field>_end_im``: the golden layout). A function without one is checked from the zero
  state only.
- Rejection: raise any exception (``ValueError`` is the convention) for arguments the backend
  refuses; conform expects it for the invalid examples and counts it as a failure otherwise.
- Returned arrays: float64, or the precision's storage dtype (``--precision float32``:
  float32; ``bfloat16``: float32 holding bfloat16 values; ``float16``: float16).

Optional, per op:

- ``<op>_vjp(inputs, params, cotangents, state=None, **config) -> {name: gradient}``: the
  gradients of every differentiable input and parameter for the cotangents of the
  differentiable outputs. Without it only the forward is checked (the report says so).
- ``<op>_step(inputs, params, state, **config)``: the backend's step form, called with inputs
  of one time step (a time axis of length 1) and the state (None at the first step); returns
  the step's outputs and the end state like the forward. conform checks step by step = whole.

Where the forward takes a ``state``, conform also runs it in chunks (boundaries drawn by
hypothesis, each chunk started from the previous one's end state) and checks chunked = whole,
against the same reference, the same way.

Backends that are not Python use the file exchange (``--command``): refimpl writes each
example as a golden-format file without outputs and gradients (``{cases}``), runs the command
and reads the candidate file (``{candidate}``, the golden candidate layout, golden/SCHEMA.md).
"""
