"""Test-wide setup: a hermetic backend choice and a hypothesis profile that suits 2 CPU cores."""

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ensel", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ensel")


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """ENSEL_BACKEND from the caller's shell would silently change what "auto" tests; tests that
    exercise the variable set it themselves."""
    monkeypatch.delenv("ENSEL_BACKEND", raising=False)
