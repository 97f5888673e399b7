"""Golden traces: the contract between refimpl and every other backend (DESIGN.md section 9).

A golden file ``golden/v1/<suite>.h5`` holds chosen cases of one op family: inputs, parameters,
outputs, a fixed random cotangent for each differentiable output, and the VJP for every input and
parameter. A backend under test reads each case, computes outputs and grads, writes a *candidate*
file with the same ``/cases/<id>/outputs`` and ``/cases/<id>/grads`` layout, and
:func:`verify` compares the two case by case. ``golden/SCHEMA.md`` is the human contract.

What lives where:

- :mod:`.schema`: the file format: constants (``SCHEMA``, ``DEFAULT_DIR``, ``FLAGS``,
  ``STATUSES``, ...), :class:`Case`, :class:`GoldenFile`, :func:`read_golden`,
  :func:`read_candidate`, :func:`write_file`;
- :mod:`.registry`: :class:`Spec`, :class:`Suite`, :data:`SUITES` and :func:`register`, through
  which each suite declares its name, math, cases and tolerance model (a suite of a registered
  op, :mod:`refimpl.ops`, is computed by that op; a model suite brings its forward and
  backward); :func:`golden_path` (a file named by path or by suite);
- the suites, one module per op family: :mod:`.ssm_suites` (``s4d_kernel``, ``fftconv``,
  ``s4d_layer``), :mod:`.spiking_suites` (``neuron``, ``pmbc``, ``sdn``), :mod:`.mixing_suites`
  (``glu``, ``gsu``), :mod:`.model_suites` (``block``, ``model_step``, ``lm_step``,
  ``model_stream``); stateful cases (flag
  ``stateful``, DESIGN.md 10) start from a stored state and output the end state, and
  forward-only cases carry the flag ``no_grads`` (:data:`NO_GRADS`, checked by
  :func:`read_golden`);
- :mod:`.generate`: the tolerance policy and the generator (:func:`build_suite`,
  :func:`generate`; float64, atomic writes with provenance, refuses fast-math);
- the verifier, one module per question: :mod:`.tensors` (the one comparison primitive, an
  interval per element, and the values no backend may write), :mod:`.spikes` (which spike
  flips are acceptable and what they make incomparable, from the suite's registered
  structure), :mod:`.verify` (:func:`verify`: a candidate against the golden files, the
  reference at the backend's rounding points for 16-bit formats), :mod:`.check`
  (:func:`check`: refimpl against its own committed files: regressions, and staleness with a
  rounding-tolerant criterion); :mod:`.compare` re-exports their public names;
- :mod:`.profiles`: precision profiles (``PROFILES``: float64, float32, bfloat16, float16;
  the bound of a dataset re-derived for a format's epsilon) and ``--select`` expressions;
- :mod:`.report`: :func:`format_report` and :func:`show` (strings; the library never prints,
  ``cli/golden_commands.py`` does).

Adding a suite: a module with its cases and one :func:`register` call, imported below.
"""
from .registry import SUITES, Spec, Suite, get_suite, golden_path, register, suite_specs
from .schema import (CANDIDATE_SCHEMA, DEFAULT_DIR, FAILURES, FLAGS, GROUPS, NO_GRADS,
                     RESERVED_ATTRS, RESULTS, SCHEMA, SCHEMA_VERSION, SIZES, STATUSES, Case,
                     GoldenFile, flatten, nest, read_candidate, read_file, read_golden,
                     write_file)

# the suites register themselves, in generation order
from . import ssm_suites, spiking_suites, mixing_suites, model_suites  # noqa: E402,F401  isort: skip

from .check import check, recompute, staleness
from .verify import compare_case, compare_tensor, coverage, verify, verify_file
from .generate import (EPS, N_PERTURB, PERTURB, SAFETY, build_case, build_suite, check_fastmath,
                       generate, plan_generate, regenerate, tolerance)
from .profiles import PROFILES, Profile, SelectError, get_profile, parse_select, selector
from .report import format_coverage, format_report, show

__all__ = [
    "CANDIDATE_SCHEMA", "DEFAULT_DIR", "EPS", "FAILURES", "FLAGS", "GROUPS", "NO_GRADS",
    "N_PERTURB", "PERTURB", "PROFILES", "Profile", "RESERVED_ATTRS", "SelectError", "get_profile",
    "parse_select", "selector", "RESULTS", "SAFETY", "SCHEMA", "SCHEMA_VERSION", "SIZES",
    "STATUSES", "SUITES", "Case", "GoldenFile", "Spec", "Suite", "build_case", "build_suite",
    "check", "check_fastmath", "compare_case", "compare_tensor", "coverage", "flatten",
    "format_coverage", "format_report",
    "generate", "get_suite", "plan_generate", "golden_path", "nest", "read_candidate", "read_file",
    "read_golden", "recompute", "regenerate", "register", "show", "staleness", "suite_specs",
    "tolerance", "verify", "verify_file", "write_file",
]
