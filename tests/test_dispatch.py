"""What "auto" picks (docs/contract.md section 10): the first verified backend of the device in
registration order; on CUDA tensors, triton while no GPU backend has passed the GPU suite."""

import pytest
import torch

import ensel
from ensel import backends


def test_registration_order():
    assert backends.names() == ["cuda", "triton", "cpu", "reference"]


def test_auto_on_cpu_takes_the_compiled_kernel_not_the_interpreter():
    # Under the interpreter the triton backend takes CPU tensors too, but it is not verified.
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"
    assert ensel.Accumulator(3, 4).backend == "cpu"


def test_auto_on_cuda_takes_triton_until_a_gpu_backend_is_verified():
    cuda = torch.device("cuda")
    verified = [
        b for b in map(backends.get, backends.names())
        if "cuda" in b.device_types and b.verified and b.available() and b.name != "reference"
    ]  # fmt: skip
    triton = backends.get("triton")
    if verified:
        want = verified[0].name
    elif triton.available() and "cuda" in triton.device_types:
        want = "triton"  # here: the interpreter makes it available without a GPU
    else:
        want = "reference"
    assert backends.resolve("auto", cuda).name == want
    if not verified and triton.available():
        assert want == "triton"


def test_env_variable_replaces_auto_only(monkeypatch):
    monkeypatch.setenv("ENSEL_BACKEND", "reference")
    assert backends.resolve("auto", torch.device("cpu")).name == "reference"
    assert backends.resolve("cpu", torch.device("cpu")).name == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU exists")
def test_cuda_backend_without_a_gpu_says_why():
    backend = backends.get("cuda")
    assert not backend.available()
    with pytest.raises(RuntimeError, match="backend='cuda' is not available") as info:
        backends.resolve("cuda", torch.device("cuda"))
    assert backend.why_unavailable() in str(info.value) and backend.why_unavailable()
