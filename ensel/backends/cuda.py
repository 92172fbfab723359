"""The CUDA backend (csrc/cuda): the fused [E, N, K] kernel and the streaming update + finalize,
compiled into ensel._C when nvcc was found at build time. The module does not link libtorch: this
layer hands it raw device pointers, strides, dtype codes, the device index and the caller's
current stream, plus a workspace from torch's caching allocator. Each call waits for its kernels
(the status of the first invalid row is read back), so errors surface at the call that caused them.
"""

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


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels need unit stride over classes, any stride elsewhere.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _labels_address(labels: torch.Tensor | None) -> int:
    return 0 if labels is None else labels.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _outputs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Uninitialized: the kernels write every field that Scores keeps.
    floats = torch.empty(len(FLOAT_FIELDS), n, dtype=torch.float32, device=device)
    ints = torch.empty(len(INT_FIELDS), n, dtype=torch.int64, device=device)
    return floats, ints


class CudaBackend:
    name = "cuda"
    device_types = frozenset({"cuda"})
    verified = False  # not picked by "auto" until the GPU suite has passed on real hardware
    reads_probs = False

    def available(self) -> bool:
        return _C is not None and bool(getattr(_C, "cuda_compiled", False)) and torch.cuda.is_available()

    def why_unavailable(self) -> str:
        if _C is None:
            return f"ensel._C failed to import: {_IMPORT_ERROR}"
        if not getattr(_C, "cuda_compiled", False):
            return "ensel._C was built without CUDA (no nvcc was found at build time)"
        if not torch.cuda.is_available():
            count, error = _C.cuda_device_count()
            detail = f": {error}" if error else ""
            return f"no CUDA device is available to torch{detail}"
        return ""

    def fused(self, logits, labels):
        x = _rows_contiguous(logits)
        E, N, K = x.shape
        device = x.device
        with torch.cuda.device(device):
            index = device.index if device.index is not None else torch.cuda.current_device()
            floats, ints = _outputs(N, device)
            vote_log = vote_log_table(E, device)
            code = DTYPE_CODES[x.dtype]
            workspace = _workspace(_C.fused_cuda_workspace(code, E, N, K, index), device)
            status = _C.fused_cuda(
                x.data_ptr(), code, E, N, K, x.stride(0), x.stride(1), _labels_address(labels),
                floats.data_ptr(), ints.data_ptr(), vote_log.data_ptr(), workspace.data_ptr(), workspace.numel(),
                index, _stream(device),
            )  # fmt: skip
        raise_invalid(*status)
        return floats, ints

    def update(self, state: StreamState, logits: torch.Tensor, start: int) -> None:
        x = _rows_contiguous(logits)
        device = state.device
        with torch.cuda.device(device):
            index = device.index if device.index is not None else torch.cuda.current_device()
            workspace = _workspace(_C.update_cuda_workspace(), device)
            status = _C.update_cuda(
                state.addresses(), state.num_samples, state.num_classes, state.capacity,
                _labels_address(state.labels), x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0),
                start, x.shape[0], workspace.data_ptr(), workspace.numel(), index, _stream(device),
            )  # fmt: skip
        raise_invalid(*status)

    def finalize(self, state: StreamState, num_members: int):
        device = state.device
        with torch.cuda.device(device):
            index = device.index if device.index is not None else torch.cuda.current_device()
            floats, ints = _outputs(state.num_samples, device)
            vote_log = vote_log_table(num_members, device)
            workspace = _workspace(_C.finalize_cuda_workspace(state.num_samples, state.num_classes, index), device)
            _C.finalize_cuda(
                state.addresses(), state.num_samples, state.num_classes, state.capacity,
                _labels_address(state.labels), num_members, floats.data_ptr(), ints.data_ptr(),
                vote_log.data_ptr(), workspace.data_ptr(), workspace.numel(), index, _stream(device),
            )  # fmt: skip
        return floats, ints
