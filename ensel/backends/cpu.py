"""The C++ CPU backend (csrc/cpu): threaded over samples, exp vectorized, any float dtype read in
place. Threads: torch.get_num_threads(), so it is compared with PyTorch at equal thread counts."""

from __future__ import annotations

import torch

from .._fields import FLOAT_FIELDS, INT_FIELDS
from .._inputs import DTYPE_CODES, raise_invalid
from .._state import StreamState
from .._votes import vote_log_table

try:
    from .. import _C
except ImportError as e:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR = str(e)


def _outputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Uninitialized: the kernels write every field that Scores keeps. (A torch fill here would
    # also leave torch's OpenMP workers spinning against the kernel's threads on small machines.)
    floats = torch.empty(len(FLOAT_FIELDS), n, dtype=torch.float32)
    ints = torch.empty(len(INT_FIELDS), n, dtype=torch.int64)
    return floats, ints


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels need unit stride over classes, any stride elsewhere.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _labels_address(labels: torch.Tensor | None) -> int:
    return 0 if labels is None else labels.data_ptr()


class CpuBackend:
    name = "cpu"
    device_types = frozenset({"cpu"})
    verified = True

    def available(self) -> bool:
        return _C is not None

    def why_unavailable(self) -> str:
        return f"ensel._C failed to import: {_IMPORT_ERROR}" if _C is None else ""

    def fused(self, logits, labels):
        x = _rows_contiguous(logits)
        E, N, K = x.shape
        floats, ints = _outputs(N)
        vote_log = vote_log_table(E)
        status = _C.fused_cpu(
            x.data_ptr(), DTYPE_CODES[x.dtype], E, N, K, x.stride(0), x.stride(1),
            _labels_address(labels), floats.data_ptr(), ints.data_ptr(), vote_log.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        raise_invalid(*status)
        return floats, ints

    def update(self, state: StreamState, logits: torch.Tensor, start: int) -> None:
        x = _rows_contiguous(logits)
        status = _C.update_cpu(
            state.addresses(), state.num_samples, state.num_classes, state.capacity,
            _labels_address(state.labels), x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0),
            start, x.shape[0], torch.get_num_threads(),
        )  # fmt: skip
        raise_invalid(*status)

    def finalize(self, state: StreamState, num_members: int):
        floats, ints = _outputs(state.num_samples)
        vote_log = vote_log_table(num_members)
        _C.finalize_cpu(
            state.addresses(), state.num_samples, state.num_classes, state.capacity,
            _labels_address(state.labels), num_members, floats.data_ptr(), ints.data_ptr(),
            vote_log.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return floats, ints
