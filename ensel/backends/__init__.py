"""The backend registry.

A backend computes the fused scores of an [E, N, K] block and updates/finalizes a StreamState.
`resolve("auto", device)` picks the first registered backend (registration order is the order of
speed) that runs on the device, is available, and has passed the test suite on real hardware of
its kind (`verified`). Until some GPU backend has passed the GPU suite (`bench/gpu.sh`) on a real
card, "auto" on CUDA tensors takes "triton": its kernels pass the contract suite under Triton's
interpreter in every CI run, while the CUDA kernels have then only been compiled, never run. An
explicitly named backend that cannot run raises. The environment variable ENSEL_BACKEND replaces
"auto".
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from .._state import StreamState


class Backend(Protocol):
    name: str
    device_types: frozenset[str]
    verified: bool  # eligible for "auto"
    # Whether fused/update read probabilities as they are (`probs=True`); for the others the
    # callers convert them to log-probabilities (ensel/_chunks.py).
    reads_probs: bool

    def available(self) -> bool: ...

    def fused(self, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (floats [9, N] float32, ints [3, N] int64) scores of valid-shaped [E, N, K] logits
        (probabilities with `probs=True`, where `reads_probs`); raises the contract's ValueError on
        invalid values."""

    def update(self, state: StreamState, logits: torch.Tensor, start: int) -> None:
        """Adds one member's [B, K] rows at [start, start + B), all or nothing (`probs=True` as
        for fused)."""

    def finalize(self, state: StreamState, num_members: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed scores of a state in which every sample has seen num_members members."""


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Adds a backend; registration order is the order of preference for "auto"."""
    _REGISTRY[backend.name] = backend
    return backend


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r}: unknown; choose 'auto' or one of {names()}")
    return _REGISTRY[name]


# What "auto" takes on a device where no fast backend is verified yet (see the module docstring).
_UNVERIFIED_DEFAULT = {"cuda": "triton"}


def _auto(device: torch.device) -> Backend:
    for backend in _REGISTRY.values():
        usable = device.type in backend.device_types and backend.available()
        if usable and backend.verified and backend.name != "reference":
            return backend
    fallback = _REGISTRY.get(_UNVERIFIED_DEFAULT.get(device.type, ""))
    if fallback is not None and device.type in fallback.device_types and fallback.available():
        return fallback
    return _REGISTRY["reference"]


def resolve(name: str | None, device: torch.device) -> Backend:
    name = name or "auto"
    if name == "auto":
        name = os.environ.get("ENSEL_BACKEND", "auto") or "auto"
    if name == "auto":
        return _auto(device)
    backend = get(name)
    if device.type not in backend.device_types:
        raise ValueError(f"backend={name!r} runs on {sorted(backend.device_types)} tensors, not {device.type}")
    if not backend.available():
        raise RuntimeError(f"backend={name!r} is not available in this installation ({backend.why_unavailable()})")
    return backend


from . import cpu, cuda, reference, triton  # noqa: E402

# Registration order is the order "auto" prefers among verified backends of a device: the CUDA
# kernels were designed for the targets where Triton's layouts are expected to fall short
# (K = 10, K = 32000); the GPU report decides once both have run on a card.
register(cuda.CudaBackend())
register(triton.TritonBackend())
register(cpu.CpuBackend())
register(reference.ReferenceBackend())
