"""Test-wide setup: the device the suite runs on, Triton's interpreter where there is no GPU, a
hermetic backend choice, and a hypothesis profile that suits 2 CPU cores.

ENSEL_TEST_DEVICE=cuda (set by bench/gpu.sh) runs the whole contract suite on the GPU backends:
see tests/device_shim.py."""

import os

import torch

# triton.jit reads this when a kernel module is imported (ensel imports its kernels lazily), so
# it must be set before any test imports them. Without a GPU, the Triton kernels run on CPU
# tensors in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import device_shim  # noqa: E402

settings.register_profile(
    "ensel", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ensel")


def pytest_configure(config):
    device_shim.install_cpu_isa_names()
    device_shim.install_if_requested()


def pytest_report_header(config):
    return f"ensel test device: {device_shim.DEVICE}; backends under test: {', '.join(device_shim.backends_under_test())}"


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """ENSEL_BACKEND from the caller's shell would silently change what "auto" tests; tests that
    exercise the variable set it themselves."""
    monkeypatch.delenv("ENSEL_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _cpu_isa_of_backend(request):
    """A test parametrized with backend="cpu@avx2" runs with the CPU kernels at that level."""
    callspec = getattr(request.node, "callspec", None)
    level = device_shim.cpu_isa_of(callspec.params.get("backend")) if callspec is not None else None
    if level is None:
        yield
        return
    from ensel.backends import cpu

    previous = cpu.use_isa(level)
    try:
        yield
    finally:
        cpu.use_isa(previous)
