"""Hypothesis profiles: ``dev`` (make test) and ``ci`` (make test-all, derandomized, more examples).

``deadline=None`` everywhere: Numba compiles on the first example of a test.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
