"""coderstack's tests.

Hypothesis runs without its per-example deadline and its "too slow" health check: both are time
limits, and the tests share a loaded two-core machine with real peers; a property either holds
or it does not, however long an example takes.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("coderstack", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("coderstack")
