"""Shared test settings.

Hypothesis profiles: ``ci`` (the default; bounded so the whole suite stays within minutes on
2 cores) and ``deep`` (many more examples, for a long local run:
``HYPOTHESIS_PROFILE=deep python -m pytest``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "deep",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
