"""Runs the contract suite, written with CPU tensors, on the GPU backends.

With ENSEL_TEST_DEVICE=cuda (bench/gpu.sh sets it), `install_if_requested` wraps `ensel.score`
and `ensel.Accumulator` so that a call naming a GPU-only backend ("cuda", "triton") first copies
its logits to the GPU, keeping their strides, and copies the Scores back: every assertion of the
suite then holds the real GPU kernels to the same float64 reference, unchanged. Nothing is
faked: only tensors move. Calls naming CPU backends are left alone.

Without the variable (CI, `make test`) nothing is wrapped and the suite runs the backends that
take CPU tensors, except Triton under its interpreter, which is far too slow for the full suite
and has its own small-grid tests in test_triton.py.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

import ensel
from ensel._inputs import as_tensor

DEVICE = torch.device(os.environ.get("ENSEL_TEST_DEVICE", "cpu"))


# "cpu@avx2": the cpu backend with its kernels at another instruction-set level than the best
# (csrc/cpu/isa.h). Each level this machine runs gets the whole suite: conftest.py switches the
# level for a test whose `backend` parameter names one, and install_cpu_isa_names maps the name
# to "cpu" in ensel.score and ensel.Accumulator.
ISA_SEPARATOR = "@"


def cpu_isa_variants() -> list[str]:
    from ensel.backends import cpu

    if not cpu.isa_levels():
        return []
    best = cpu.isa_levels()[-1]
    return [f"cpu{ISA_SEPARATOR}{level}" for level in cpu.isa_levels() if level != best]


def backends_under_test() -> list[str]:
    chosen = []
    for name in ensel.backends.names():
        backend = ensel.backends.get(name)
        if DEVICE.type not in backend.device_types or not backend.available():
            continue
        if DEVICE.type == "cpu" and name == "triton":
            continue  # the interpreter: tests/test_triton.py
        if DEVICE.type != "cpu" and name == "reference":
            continue  # the oracle itself, already run on CPU
        chosen.append(name)
        if name == "cpu":
            chosen += cpu_isa_variants()
    return chosen


def cpu_isa_of(backend) -> str | None:
    """The level a "cpu@level" backend name asks for, else None."""
    if isinstance(backend, str) and backend.startswith("cpu" + ISA_SEPARATOR):
        return backend.split(ISA_SEPARATOR, 1)[1]
    return None


def install_cpu_isa_names() -> None:
    real_score, real_score_files, RealAccumulator = ensel.score, ensel.score_files, ensel.Accumulator

    def score(logits, labels=None, *, backend="auto", **options):
        return real_score(logits, labels, backend="cpu" if cpu_isa_of(backend) else backend, **options)

    def score_files(paths, labels=None, *, backend="auto", **options):
        return real_score_files(paths, labels, backend="cpu" if cpu_isa_of(backend) else backend, **options)

    class Accumulator(RealAccumulator):
        """Takes "cpu@level" for "cpu" and reports the name it was given back."""

        def __init__(
            self, num_samples, num_classes, labels=None, device="cpu", backend="auto", num_members=None, **options
        ):
            self._asked_backend = backend
            backend = "cpu" if cpu_isa_of(backend) else backend
            super().__init__(num_samples, num_classes, labels, device, backend, num_members, **options)

        @property
        def backend(self):
            asked = getattr(self, "_asked_backend", None)
            return asked if cpu_isa_of(asked) else super().backend

        @classmethod
        def load(cls, path, device="cpu", backend="auto", **options):
            loaded = RealAccumulator.load(path, device, "cpu" if cpu_isa_of(backend) else backend, **options)
            loaded.__class__ = cls
            loaded._asked_backend = backend
            return loaded

    Accumulator.__name__ = Accumulator.__qualname__ = "Accumulator"
    ensel.score, ensel.score_files, ensel.Accumulator = score, score_files, Accumulator


def _moves_to_device(backend: str | None) -> bool:
    if DEVICE.type == "cpu" or backend in (None, "auto"):
        return False
    try:
        return "cpu" not in ensel.backends.get(backend).device_types
    except ValueError:
        return False  # an unknown name: let ensel raise its own error


def _on_device(x):
    """x on DEVICE with the same strides and storage offset (strided views stay strided);
    anything that is not an array is handed on untouched so that ensel's own checks see it."""
    if isinstance(x, np.ndarray) or hasattr(x, "__dlpack__"):
        try:
            x = as_tensor(x)
        except TypeError:
            return x
    if not isinstance(x, torch.Tensor) or x.device == DEVICE:
        return x
    storage = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), 0, (x.untyped_storage().nbytes() // x.element_size(),), (1,))
    return storage.to(DEVICE).as_strided(x.shape, x.stride(), x.storage_offset())


def _to_cpu(scores: ensel.Scores) -> ensel.Scores:
    moved = {f.name: getattr(scores, f.name) for f in dataclasses.fields(scores)}
    moved = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    return dataclasses.replace(scores, **moved)


def install_if_requested() -> None:
    if DEVICE.type == "cpu":
        return
    real_score, RealAccumulator = ensel.score, ensel.Accumulator

    def score(logits, labels=None, *, backend="auto", **options):  # options: kind=
        if not _moves_to_device(backend):
            return real_score(logits, labels, backend=backend, **options)
        if isinstance(logits, (torch.Tensor, np.ndarray)) or hasattr(logits, "__dlpack__"):
            logits = _on_device(logits)
        elif hasattr(logits, "__iter__"):
            logits = map(_on_device, logits)
        return _to_cpu(real_score(logits, labels, backend=backend, **options))

    class Accumulator(RealAccumulator):
        def __init__(
            self, num_samples, num_classes, labels=None, device="cpu", backend="auto", num_members=None, **options
        ):
            if _moves_to_device(backend):
                device = DEVICE
            super().__init__(num_samples, num_classes, labels, device, backend, num_members, **options)

        @property
        def members(self):
            return super().members.cpu()

        def update(self, logits, start=0):
            if self.device.type != "cpu":
                logits = _on_device(logits)
            return super().update(logits, start)

        def finalize(self):
            scores = super().finalize()
            return _to_cpu(scores) if self.device.type != "cpu" else scores

    Accumulator.__name__ = Accumulator.__qualname__ = "Accumulator"
    ensel.score, ensel.Accumulator = score, Accumulator
