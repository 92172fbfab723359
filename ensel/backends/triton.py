"""The Triton backend (kernels/, shipped as ensel.kernels): the fused and streaming kernels of
docs/contract.md section 8 on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1), which is how the test suite runs them without a GPU.

The kernels module is imported inside the methods: `triton.jit` decides between compiling and
interpreting when it decorates, so the module must not be imported before TRITON_INTERPRET is set.
Kernels launch on the caller's current CUDA stream, on the input's device. Autotuning choices are
logged on the "ensel" logger at DEBUG level (see kernels/launch.py).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .._inputs import raise_invalid
from .._state import StreamState
from .._votes import vote_log_table
from .cpu import _rows_contiguous

@functools.cache
def _import_error() -> str:
    """Why triton cannot be imported ("" when it can). Asked only when a backend is chosen for a
    CUDA tensor (or under the interpreter): `import ensel` never imports triton, which takes
    about a second and is not needed on CPU tensors."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # triton ships with torch's Linux wheels only
        return str(e)
    return ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch():
    from ..kernels import launch

    return launch


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class TritonBackend:
    name = "triton"
    verified = False  # never run through the suite on a GPU yet: "auto" does not pick it
    reads_probs = False

    @property
    def device_types(self) -> frozenset[str]:
        return frozenset({"cuda", "cpu"}) if _interpreting() else frozenset({"cuda"})

    def available(self) -> bool:
        return (_interpreting() or torch.cuda.is_available()) and not _import_error()

    def why_unavailable(self) -> str:
        if _import_error():
            return f"triton failed to import: {_import_error()}"
        if not (_interpreting() or torch.cuda.is_available()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
        return ""

    def fused(self, logits, labels):
        x = _rows_contiguous(logits)
        with _on_device(x):
            floats, ints, failure = _launch().fused_scores(x, labels, vote_log_table(x.shape[0], x.device))
        raise_invalid(*failure)
        return floats, ints

    def update(self, state: StreamState, logits: torch.Tensor, start: int) -> None:
        x = _rows_contiguous(logits)
        with _on_device(x):
            failure = _launch().stream_update(state, x, start)
        raise_invalid(*failure)

    def finalize(self, state: StreamState, num_members: int):
        with _on_device(state.pbar_sum):
            return _launch().stream_finalize(state, num_members, vote_log_table(num_members, state.pbar_sum.device))
