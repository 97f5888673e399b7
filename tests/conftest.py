"""Hypothesis profiles: ``dev`` (make test) and ``ci`` (make test-all, derandomized, more examples).

``deadline=None`` everywhere: Numba compiles on the first example of a test.
"""
import os

from hypothesis import HealthCheck, settings

# Under CI (CI=true) the fast profile is derandomized too, so a landing never depends on luck;
# locally it explores new examples on every run.
settings.register_profile("dev", max_examples=25, deadline=None,
                          derandomize=bool(os.environ.get("CI")),
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
