"""The C++ CPU backend (csrc/cpu): threaded over samples, exp vectorized, any float dtype read in
place. Threads: torch.get_num_threads(), so it is compared with PyTorch at equal thread counts.

The kernels are compiled for several instruction-set levels (csrc/cpu/isa.h): "baseline" (the
build's default target), "avx2" (x86-64-v3) and "avx512" (x86-64-v4). The best level the
processor reports is used, unless the environment variable ENSEL_CPU_ISA names another
(read at the first CPU kernel call) or `use_isa` picks one."""

from __future__ import annotations

import os

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


ISA_LEVELS = ("baseline", "avx2", "avx512")  # lowest first


def isa_levels() -> list[str]:
    """The levels this processor and this build run, lowest first (empty if ensel._C is missing)."""
    return list(_C.cpu_isas()) if _C is not None else []


def isa() -> str:
    """The level the CPU kernels use now."""
    _apply_isa_from_env()
    return _C.cpu_isa() if _C is not None else ""


def use_isa(level: str) -> str:
    """Switches the CPU kernels to `level` (one of isa_levels()) for this process; returns the
    level that was in use. Every level computes the contract's scores: discrete ones
    bit-identically, continuous ones within its tolerance."""
    if _C is None:
        raise RuntimeError(f"the cpu backend is not available ({_IMPORT_ERROR})")
    _apply_isa_from_env()  # so that a later first call does not undo this one
    previous = _C.cpu_isa()
    if not isinstance(level, str) or not _C.set_cpu_isa(level):
        raise ValueError(_isa_error(level))
    return previous


def _isa_error(level) -> str:
    if level in ISA_LEVELS:
        return f"CPU instruction set {level!r} is not supported by this processor; it runs {', '.join(isa_levels())}"
    return f"CPU instruction set {level!r}: unknown; choose one of {', '.join(isa_levels())}"


_env_applied = False


def _apply_isa_from_env() -> None:
    global _env_applied
    if _env_applied or _C is None:
        return
    level = os.environ.get("ENSEL_CPU_ISA", "").strip()
    if level and level != "auto" and not _C.set_cpu_isa(level):
        raise ValueError(f"ENSEL_CPU_ISA: {_isa_error(level)}")
    _env_applied = True


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
    reads_probs = True  # ProbInput (csrc/include/ensel/row.h): a log in registers, no converted copy

    def available(self) -> bool:
        return _C is not None

    def why_unavailable(self) -> str:
        return f"ensel._C failed to import: {_IMPORT_ERROR}" if _C is None else ""

    def fused(self, logits, labels, probs: bool = False):
        _apply_isa_from_env()
        x = _rows_contiguous(logits)
        E, N, K = x.shape
        floats, ints = _outputs(N)
        vote_log = vote_log_table(E)
        status = _C.fused_cpu(
            x.data_ptr(), DTYPE_CODES[x.dtype], probs, E, N, K, x.stride(0), x.stride(1),
            _labels_address(labels), floats.data_ptr(), ints.data_ptr(), vote_log.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        raise_invalid(*status)
        return floats, ints

    def update(self, state: StreamState, logits: torch.Tensor, start: int, probs: bool = False) -> None:
        _apply_isa_from_env()
        x = _rows_contiguous(logits)
        status = _C.update_cpu(
            state.addresses(), state.num_samples, state.num_classes, state.capacity,
            _labels_address(state.labels), x.data_ptr(), DTYPE_CODES[x.dtype], probs, x.stride(0),
            start, x.shape[0], torch.get_num_threads(),
        )  # fmt: skip
        raise_invalid(*status)

    def finalize(self, state: StreamState, num_members: int):
        _apply_isa_from_env()
        floats, ints = _outputs(state.num_samples)
        vote_log = vote_log_table(num_members)
        _C.finalize_cpu(
            state.addresses(), state.num_samples, state.num_classes, state.capacity,
            _labels_address(state.labels), num_members, floats.data_ptr(), ints.data_ptr(),
            vote_log.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return floats, ints
