"""Input conversion and validation shared by every backend.

Arrays arrive as torch tensors, numpy arrays or any DLPack producer (CuPy, JAX), zero-copy.
Validation that needs to look at values (NaN, +inf, all -inf rows) happens in the kernels; the
helpers here turn their status codes into the contract's ValueError.
"""

from __future__ import annotations

import operator
import warnings

import numpy as np
import torch

# Codes shared with csrc/include/ensel/common.h (DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# Status codes shared with csrc/include/ensel/common.h (Status).
_STATUS_TEXT = {1: "NaN logit", 2: "+inf logit", 3: "row of all -inf logits"}

# What the values of an input are (docs/contract.md section 3): `kind=` of `ensel.score`,
# `Accumulator` and `score_files`.
KINDS = ("logits", "log_probs", "probs")

# The kernels' statuses, said of log-probabilities (the same values as logits to every kernel).
_LOG_PROBS_TEXT = {1: "NaN log-probability", 2: "+inf log-probability", 3: "row of all -inf log-probabilities"}


def as_int(value, what: str, minimum: int | None = None) -> int:
    """An integer argument as a Python int (docs/contract.md section 6): any integral type --
    int, numpy integers, 0-d integer tensors, anything with `__index__` -- but not bool, which
    is an int to Python and almost always a slip (`top(True, ...)`). Floats are refused even
    when whole (3.0): a count computed in floating point is a count that can be off by one."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{what}: expected an integer, got a bool ({value!r})")
    if isinstance(value, torch.Tensor) and value.dim() != 0:  # a 1-element tensor has __index__ too
        raise TypeError(f"{what}: expected an integer, got a {value.dim()}-D tensor")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: expected an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and result < minimum:
        raise ValueError(f"{what}: expected an integer >= {minimum}, got {result}")
    return result


def as_tensor(x, what: str = "logits") -> torch.Tensor:
    """A torch view of a tensor, numpy array or DLPack producer, without copying."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            # Read-only arrays (memory-mapped files) are fine: ensel never writes its inputs.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    raise TypeError(
        f"{what}: expected a torch.Tensor, a numpy array or a DLPack array, got {type(x).__name__}"
    )


def check_logits(logits: torch.Tensor, ndim: int, what: str = "logits") -> None:
    if logits.dim() != ndim:
        shape = "[E, N, K] (members, samples, classes)" if ndim == 3 else "[N, K] (samples, classes)"
        raise ValueError(f"{what}: expected a {ndim}-D tensor {shape}, got shape {tuple(logits.shape)}")
    if logits.dtype not in DTYPE_CODES:
        raise TypeError(
            f"{what}: expected a floating dtype (float32, float16, bfloat16 or float64), got {logits.dtype}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"{what}: there must be at least one class (K = 0)")


def check_labels(labels, num_samples: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Labels as a contiguous int64 tensor on `device`; never the caller's own storage."""
    labels = as_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != num_samples:
        raise ValueError(f"labels: expected shape [{num_samples}] (one per sample), got {tuple(labels.shape)}")
    given = labels
    labels = labels.to(device=device, dtype=torch.int64, copy=True).contiguous()
    # uint64 values from 2^63 wrap to negatives in int64: still caught as out of range here, but
    # the message reports the caller's own value, read from the original tensor.
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        n = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels: label {given[n].item()} of sample {n} is outside [0, {num_classes})")
    return labels


class InvalidInput(ValueError):
    """The contract's ValueError for an invalid row (docs/contract.md section 4), carrying the
    kernel's `status` and the row's `member` and `sample`, so that the chunked paths can move
    it to the caller's sample index and say it of the input's kind."""

    def __init__(self, status: int, member: int, sample: int, what: str | None = None):
        if what is None:
            what = _STATUS_TEXT.get(status, f"invalid logits (status {status})")
        super().__init__(f"invalid input: {what} at member {member}, sample {sample}")
        self.status, self.member, self.sample, self.what = status, member, sample, what

    def restated(self, kind: str, row: torch.Tensor | None = None, offset: int = 0) -> InvalidInput:
        """The same offence said of an input of `kind`, at sample `sample + offset`. For "probs",
        `row` is the offending row as the caller gave it (probabilities, before their log): the
        kernels saw its log, where a negative value and a NaN are both NaN."""
        what = self.what
        if kind == "log_probs":
            what = _LOG_PROBS_TEXT.get(self.status, what)
        elif kind == "probs" and row is not None:
            what = probs_problem(row)
        return InvalidInput(self.status, self.member, self.sample + offset, what)


def raise_invalid(status: int, member: int, sample: int) -> None:
    """Raise the contract's ValueError for a kernel's (status, member, sample), if any."""
    if status == 0:
        return
    raise InvalidInput(status, member, sample)


def check_kind(kind) -> str:
    """`kind=` as one of KINDS: a TypeError for a non-string, a ValueError for another name."""
    if not isinstance(kind, str):
        raise TypeError(f"kind: expected one of {', '.join(map(repr, KINDS))}, got {type(kind).__name__} {kind!r}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(map(repr, KINDS))}")
    return kind


def log_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype probabilities of `dtype` are converted to log-probabilities in: one wide enough
    that distinct probabilities keep distinct logs (so each member's argmax is the argmax of the
    probabilities as given): float16 and bfloat16 -> float32, float32 and float64 -> float64.
    (Two float64 probabilities a few ulps apart can round to one log: the only ties it adds.)"""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def log_probs_into(out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """`out` (dense, of `log_dtype`) = log of `probs`, read in place from any strides:
    log 0 = -inf (probability 0); a negative or NaN probability gives NaN and +inf gives +inf,
    which the kernels refuse as invalid rows (`probs_problem` names them)."""
    out.copy_(probs)
    return out.log_()


def probs_problem(row: torch.Tensor) -> str:
    """What is wrong with an invalid row of probabilities: its first offending value in class
    order (NaN, negative -- -inf included -- or +inf), else that every value is 0."""
    x = row if row.dtype == torch.float64 else row.float()
    bad = torch.isnan(x) | (x < 0) | torch.isposinf(x)
    if not bool(bad.any()):
        return "row of probabilities summing to 0"
    value = float(x[int(bad.to(torch.int8).argmax())])
    if value != value:
        return "NaN probability"
    return "+inf probability" if value > 0 else "negative probability"


def row_status(rows: torch.Tensor) -> torch.Tensor:
    """The contract's status of each row of a [R, K] tensor (int64 [R]): 0 valid, 1 NaN, 2 +inf
    (whichever comes first in the row), 3 all -inf. The torch formulation, for backends
    without a kernel of their own and for the reference."""
    x = rows if rows.dtype == torch.float64 else rows.float()
    k = x.shape[1]
    nan, pos_inf = torch.isnan(x), torch.isposinf(x)
    # argmax of a boolean row is its first True (torch.argmax returns the first maximum).
    first_nan = torch.where(nan.any(1), nan.to(torch.int8).argmax(1), k)
    first_pos_inf = torch.where(pos_inf.any(1), pos_inf.to(torch.int8).argmax(1), k)
    status = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    status[first_nan < first_pos_inf] = 1
    status[first_pos_inf < first_nan] = 2
    status[(status == 0) & torch.isneginf(x).all(1)] = 3
    return status


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device `device` names ("auto": CUDA when available). A ValueError for a name torch
    does not know or a CUDA device this machine lacks: callers resolve it before they write
    anything, so that a typo fails at once instead of after the first stage's files."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: not a torch device ({e})") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s)")
    elif resolved.type != "cpu":  # mps, xpu, meta, ...: no backend of ensel's runs there
        raise ValueError(f"device={device!r}: ensel runs on cpu or cuda devices")
    return resolved
