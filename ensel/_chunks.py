"""Fused scoring in bounded chunks of samples, and the assembly of their Scores columns.

The fused kernel reduces an [E, N, K] block sample by sample (docs/contract.md section 8), so the
block can be cut into chunks of samples, each scored on its own: the result equals the whole
block's, bit for bit. Two callers cut blocks this way, through `score_chunks`:

- `ensel.score` of an input the kernels cannot read in place -- probabilities (`kind="probs"`)
  for a backend that does not read them (`reads_probs`; converted to log-probabilities), or a
  class stride other than 1 (a permuted view of an [N, K, E] or [K, N, E] buffer) -- so that
  what it allocates beyond the input is one chunk, not a converted or contiguous copy of the
  whole tensor;
- `ensel.score_files`, whose chunks are staged from files under a memory budget.

Each chunk is handed to the kernel as it is when it can be (unit class stride, and logits or
probabilities the backend reads), otherwise it is first written into one reused dense
buffer: copied, or for probabilities converted to log p there. The first invalid row is the contract's minimum (member, sample) over the
whole block (section 4, member-major), not the first chunk's: once a chunk has one at member m,
later chunks (later samples) can only hold a lower one among their first m members, so only those
are checked, and nothing at all once m = 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ._fields import FLOAT_FIELDS, INT_FIELDS
from ._inputs import InvalidInput, log_dtype, log_probs_into
from .scores import Scores

# The largest chunk `ensel.score` copies (or converts) at once: 32 MiB of the kernel's
# input (float32, or float64 for the log of float32/float64 probabilities), of every member of the
# chunk's samples; one sample at least, whatever its E x K. Large enough that the kernel runs on
# millions of values per call (the per-call overhead stays under 1%, and a GPU grid is full),
# small beside the inputs it exists for (hundreds of MB to GB) and beside the 1 GiB default
# budget of score_files.
CHUNK_BYTES = 32 << 20


def converts(backend, kind: str) -> bool:
    """Whether inputs of `kind` reach `backend`'s kernels as log-probabilities converted here:
    probabilities, for a backend that does not read them itself."""
    return kind == "probs" and not backend.reads_probs


def kernel_dtype(dtype: torch.dtype, kind: str, backend) -> torch.dtype:
    """The dtype `backend`'s kernels read an input of `dtype` and `kind` in."""
    return log_dtype(dtype) if converts(backend, kind) else dtype


def needs_chunks(x: torch.Tensor, kind: str, backend) -> bool:
    """Whether an [E, N, K] input goes through bounded chunks rather than straight to `backend`'s
    kernel: probabilities it does not read (converted), or classes that are not unit-stride
    (copied)."""
    return converts(backend, kind) or (x.shape[-1] > 1 and x.stride(-1) != 1)


def fused(backend, x: torch.Tensor, labels: torch.Tensor | None, kind: str):
    """`backend.fused` of a block the kernel reads as it is: logits, log-probabilities, or
    probabilities where the backend reads them."""
    if kind == "probs" and backend.reads_probs:
        return backend.fused(x, labels, probs=True)
    return backend.fused(x, labels)


def update(backend, state, x: torch.Tensor, start: int, kind: str) -> None:
    """`backend.update` of [B, K] rows the kernel reads as they are (as `fused`)."""
    if kind == "probs" and backend.reads_probs:
        backend.update(state, x, start, probs=True)
    else:
        backend.update(state, x, start)


def chunk_samples(num_members: int, num_classes: int, dtype: torch.dtype, limit: int | None = None) -> int:
    """Samples per chunk: the most whose E x K values of `dtype` fit in `limit` bytes (default
    CHUNK_BYTES), at least 1."""
    limit = CHUNK_BYTES if limit is None else limit
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, limit // max(1, num_members * num_classes * itemsize))


def view_chunks(x: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, count, x[:, start : start + count]) for consecutive chunks of samples: views of
    the caller's tensor, never copies."""
    N = x.shape[1]
    for start in range(0, N, chunk):
        count = min(chunk, N - start)
        yield start, count, x[:, start : start + count]


class _Staging:
    """One dense buffer, reused by every chunk that must be copied or converted."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device, self.buffer = dtype, device, None

    def take_like(self, block: torch.Tensor) -> torch.Tensor:
        """An [E, n, K] view of the buffer shaped as `block`, unit class stride, with members and
        samples laid out in the order of the block's own strides: the copy then reads the input
        in memory order (an [N, K, E] buffer's chunk into sample-major [n, E, K] copies 4.5x
        faster than into [E, n, K], measured with torch on 2 threads)."""
        E, n, K = block.shape
        numel = E * n * K
        if self.buffer is None or self.buffer.numel() < numel:
            self.buffer = None  # freed before its successor is allocated
            self.buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
        if block.stride(1) > block.stride(0):  # samples outermost in the input
            return self.buffer[:numel].view(n, E, K).transpose(0, 1)
        return self.buffer[:numel].view(E, n, K)


def _kernel_input(block: torch.Tensor, kind: str, backend, staging: _Staging) -> torch.Tensor:
    if converts(backend, kind):
        return log_probs_into(staging.take_like(block), block)
    if block.shape[-1] > 1 and block.stride(-1) != 1:
        return staging.take_like(block).copy_(block)
    return block


def score_chunks(
    chunks: Iterable[tuple[int, int, torch.Tensor]],
    *,
    num_members: int,
    num_samples: int,
    labels: torch.Tensor | None,
    backend,
    device: torch.device,
    kind: str = "logits",
    dtype: torch.dtype,
) -> Scores:
    """Scores of an [E, N, K] block given as consecutive chunks (start, count, [E, count, K] block
    of samples [start, start + count)), each scored by `backend.fused`, their packed columns
    assembled into [N] fields on `device`. `labels`: the validated int64 [N] labels or None.
    Blocks of `kind="probs"` (of `dtype`) are converted to log p unless the backend reads them,
    blocks whose classes are not unit-stride copied, into one reused buffer; a block may be reused by the producer once the
    next one is asked for. Invalid rows raise the contract's ValueError (InvalidInput) at the
    block's (member, sample), said of `kind`, after every chunk that could hold a lower one."""
    E, N = num_members, num_samples
    floats = torch.empty(len(FLOAT_FIELDS), N, dtype=torch.float32, device=device)
    ints = torch.empty(len(INT_FIELDS), N, dtype=torch.int64, device=device)
    staging = _Staging(kernel_dtype(dtype, kind, backend), device)
    first: InvalidInput | None = None
    iterator = iter(chunks)
    try:
        for start, count, block in iterator:
            if first is not None:
                if first.member == 0:
                    break  # no later sample can come before it
                block = block[: first.member]  # only a lower member can
            part = None if labels is None else labels[start : start + count]
            try:
                f, i = fused(backend, _kernel_input(block, kind, backend, staging), part, kind)
            except InvalidInput as e:
                row = block[e.member, e.sample] if kind == "probs" else None
                first = e.restated(kind, row, offset=start)
                continue
            if first is None:
                floats[:, start : start + count].copy_(f)
                ints[:, start : start + count].copy_(i)
    finally:
        # A producer left early (an error, or nothing lower to find) releases its buffers,
        # threads and files now, not when the traceback that holds this frame is collected.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if first is not None:
        raise first
    return Scores.from_columns(floats, ints, E, labels is not None)
