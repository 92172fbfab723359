"""Out-of-core fused scoring: per-member [N, K] logit files on disk, scored under a memory budget.

The fused kernel (docs/contract.md section 8) reduces an [E, N, K] block sample by sample, so the block
can be cut into chunks of samples and scored chunk by chunk: the scores of a sample depend only on
its own E rows, and the result equals in-memory `ensel.score` bit for bit.

Memory. One chunk of c samples is staged as one contiguous [E, c, K] buffer, filled by `os.preadv`
from each file's rows [s, s + c) (a file's rows are contiguous, so that is E sequential reads).
Reading into reused anonymous buffers, rather than touching a memory map, keeps the file's pages
in the kernel's page cache only: they are never mapped into this process, so they never count in
its resident memory, and the kernel reclaims them as it needs. What this call allocates:

    staging   2 x E x c x K x itemsize   (double buffering: one chunk scored, the next one read)
    per chunk c x (60 + 8) bytes         (the kernel's packed outputs: 9 float32 + 3 int64 fields;
                                          the chunk's labels as int64)
    result    N x 60 bytes               (the packed scores of every sample)

    converted E x c x K x 4 or 8 bytes   (kind="probs" only: the chunk's log p, float32 for float16
                                          and bfloat16 files, float64 for float32 and float64 ones)

and `max_memory` bounds the sum: c is the largest chunk that fits. On CUDA the staging buffers are
pinned host memory and a second pair lives on the device (the same budget bounds each side);
the prefetch thread copies each chunk host-to-device on a side stream, so disk reads, copies and
the kernel all overlap. Not counted: the kernel's per-thread scratch (O(K + tile x (K + E)) on the
CPU) and the `reference` backend, which materializes softmax and is for tests only.

Overlap. A prefetch thread reads chunk j + 1 (and on CUDA copies it to the device) while the main
thread scores chunk j; the file reads and the CPU kernel both release the GIL.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from . import backends
from ._chunks import converts, kernel_dtype, score_chunks
from ._fields import FLOAT_FIELDS, INT_FIELDS
from ._inputs import as_int, check_kind, check_labels
from .api import score
from .scores import Scores

# Bytes per sample of the kernel's packed outputs (float32 and int64 columns).
OUTPUT_BYTES = 4 * len(FLOAT_FIELDS) + 8 * len(INT_FIELDS)
LABEL_BYTES = 8  # a chunk's labels, converted to int64 by ensel.score
STAGING_BUFFERS = 2
DEFAULT_MAX_MEMORY = 1 << 30

# Beside a folder of member files, `rows.npz` (`indices`: int64 [N]) maps each file row to its
# sample (pool index): a scoring pass usually covers only the unselected samples, and indices
# selected from the files must be reported as pool indices (`ensel score --top`).
ROWS_FILE = "rows.npz"

_FILE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class LogitFile:
    """Where one member's row-major [num_samples, num_classes] logits lie in a file."""

    path: str
    offset: int
    num_samples: int
    num_classes: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return self.num_classes * self.itemsize


def _torch_dtype(dtype, where: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
        if name == "bfloat16" or str(dtype) == "bfloat16":
            name = "bfloat16"
    if name not in _FILE_DTYPES:
        raise ValueError(f"{where}: dtype {dtype} is not a logits dtype; expected one of {', '.join(_FILE_DTYPES)}")
    return _FILE_DTYPES[name]


def as_paths(paths, what: str = "paths") -> list[str]:
    """One path (str, bytes or os.PathLike: one member) or a sequence of paths, as strings. A
    string is one path, never iterated as a sequence of one-letter paths."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    elif not isinstance(paths, Iterable):
        raise TypeError(f"{what}: expected a path or a sequence of paths, got {type(paths).__name__}")
    out = []
    for i, p in enumerate(paths):
        try:
            out.append(os.fsdecode(p))
        except TypeError:
            raise TypeError(f"{what}[{i}]: expected a path (str or os.PathLike), got {type(p).__name__}") from None
    return out


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def npy_layout(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a .npy file of real numbers, from its header
    alone: nothing is unpickled, mapped or read beyond the header. Anything else is a ValueError
    that says what is wrong with the file (never numpy's advice to load it unsafely)."""
    try:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
            except ValueError:
                raise ValueError(f"{path}: not a .npy file (it does not start with the .npy magic string)") from None
            read = _NPY_HEADER_READERS.get(version)
            if read is None:  # 3.0 exists only for structured dtypes with unicode field names
                raise ValueError(f"{path}: .npy format version {version[0]}.{version[1]}; logits files are 1.0 or 2.0")
            try:
                shape, fortran_order, dtype = read(f)
            except (ValueError, TypeError, SyntaxError) as e:
                raise ValueError(f"{path}: not a .npy file (unreadable header: {e})") from None
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except OSError as e:
        raise ValueError(f"{path}: not readable ({e})") from e
    if dtype.hasobject:
        raise ValueError(f"{path}: not a .npy file of numbers (it holds Python objects)")
    if dtype.kind not in "biuf":
        raise ValueError(f"{path}: not a .npy file of real numbers (it holds {dtype})")
    need = offset + math.prod(shape) * dtype.itemsize
    if size < need:
        raise ValueError(f"{path}: truncated .npy file: {size} bytes, its header describes {need}")
    return tuple(shape), bool(fortran_order), dtype, offset


def _raw_shape(shape) -> tuple[int, int]:
    try:
        entries = tuple(shape)
    except TypeError:
        raise TypeError(f"shape={shape!r}: expected (N, K)") from None
    if len(entries) != 2:
        raise ValueError(f"shape={entries}: expected (N, K)")
    n = as_int(entries[0], "shape[0] (N)", 0)
    k = as_int(entries[1], "shape[1] (K)")
    if k < 1:
        raise ValueError(f"shape={entries}: expected at least one class, got K = {k}")
    return n, k


def describe_files(paths, shape=None, dtype=None, offset: int = 0) -> list[LogitFile]:
    """Check per-member logit files and say where their data lies.

    `paths`: one path or a sequence of them. Without `shape`, each path is a `.npy` file (C order,
    native byte order). With `shape=(N, K)` and `dtype`, each is a raw row-major file of exactly
    `offset + N * K * itemsize` bytes. All files must agree in shape and dtype. N = 0 is valid.
    """
    paths = as_paths(paths)
    if not paths:
        raise ValueError("no logit files given")
    if (shape is None) != (dtype is None):
        raise ValueError("raw logit files need both shape=(N, K) and dtype=; .npy files need neither")
    if shape is not None:
        raw_n, raw_k = _raw_shape(shape)
        offset = as_int(offset, "offset", 0)
    files = []
    for p in paths:
        if shape is None:
            dims, fortran_order, np_dtype, data_offset = npy_layout(p)
            if len(dims) != 2:
                raise ValueError(f"{p}: expected [N, K] logits of one member, got shape {dims}")
            n, k = dims
            if k == 0:
                raise ValueError(f"{p}: holds no classes (shape {dims}: K = 0)")
            if fortran_order and n > 1 and k > 1:
                raise ValueError(f"{p}: Fortran-ordered .npy; expected row-major [N, K] logits")
            if not np_dtype.isnative:
                raise ValueError(f"{p}: non-native byte order {np_dtype.str}; expected native float16/float32/float64")
            f = LogitFile(p, data_offset, n, k, _torch_dtype(np_dtype, p))
        else:
            f = LogitFile(p, offset, raw_n, raw_k, _torch_dtype(dtype, p))
            try:
                size = os.path.getsize(p)
            except OSError as e:
                raise ValueError(f"{p}: not readable ({e})") from e
            expected = f.offset + f.num_samples * f.row_bytes
            if size != expected:
                raise ValueError(
                    f"{p}: {size} bytes, but offset {f.offset} + [{f.num_samples}, {f.num_classes}] "
                    f"{str(f.dtype).removeprefix('torch.')} needs exactly {expected}"
                )
        if files:
            first = files[0]
            if (f.num_samples, f.num_classes) != (first.num_samples, first.num_classes):
                raise ValueError(
                    f"{p}: shape [{f.num_samples}, {f.num_classes}] differs from {first.path}'s "
                    f"[{first.num_samples}, {first.num_classes}]"
                )
            if f.dtype != first.dtype:
                raise ValueError(f"{p}: dtype {f.dtype} differs from {first.path}'s {first.dtype}")
        files.append(f)
    return files


def bytes_per_chunk_sample(num_members: int, row_bytes: int, converted_row_bytes: int = 0) -> int:
    """Working memory per sample of a chunk: double-buffered staging, kernel outputs, labels, and
    for probabilities the converted rows (`converted_row_bytes` each: K x 4 or 8)."""
    staged = STAGING_BUFFERS * num_members * row_bytes
    return staged + num_members * converted_row_bytes + OUTPUT_BYTES + LABEL_BYTES


def plan_chunk(
    num_members: int, num_samples: int, row_bytes: int, max_memory: int, converted_row_bytes: int = 0
) -> int:
    """The largest chunk of samples whose working memory, with the N-sample result, fits."""
    max_memory = as_int(max_memory, "max_memory", 0)
    result = num_samples * OUTPUT_BYTES
    per_sample = bytes_per_chunk_sample(num_members, row_bytes, converted_row_bytes)
    chunk = (max_memory - result) // per_sample
    if chunk < 1:
        raise ValueError(
            f"max_memory={max_memory} bytes is too small: the scores of {num_samples} samples take "
            f"{result} bytes and one sample of {num_members} members takes {per_sample} more "
            f"({STAGING_BUFFERS} staging buffers x {num_members} x {row_bytes} bytes, plus outputs"
            f"{f' and {num_members} x {converted_row_bytes} bytes of converted rows' if converted_row_bytes else ''}); "
            f"at least {result + per_sample} bytes are needed"
        )
    return min(chunk, num_samples)


def _read_rows(fd: int, into: memoryview, offset: int, where: str) -> None:
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{where}: file ended early (truncated while being read?)")
        done += got


def score_files(
    paths,
    labels=None,
    *,
    max_memory: int | None = None,
    chunk_samples: int | None = None,
    shape=None,
    dtype=None,
    offset: int = 0,
    device="cpu",
    backend: str = "auto",
    kind: str = "logits",
) -> Scores:
    """Fused scores of per-member logit files (in the given member order), out of core.

    `paths`: one path (str or os.PathLike: one member) or a sequence of paths. Files of 0 rows
    give empty scores.
    Chunks of samples are read from all E files and scored by the fused kernel on the
    [E, chunk, K] block (any backend, any device; `ensel._chunks.score_chunks` assembles the
    columns, as for `ensel.score`'s chunked inputs), with the next chunk read (and on CUDA copied to the device)
    by a prefetch thread meanwhile. `max_memory` (bytes, default 1 GiB) bounds what this call
    allocates (see the module docstring); `chunk_samples` caps the chunk further. The result
    equals `ensel.score` of the whole block, bit for bit. `kind`: what the files hold, "logits",
    "log_probs" or "probs" (as `ensel.score`; for a backend that does not read probabilities they
    are converted chunk by chunk, and the converted chunk counts in `max_memory`).
    """
    kind = check_kind(kind)
    files = describe_files(paths, shape, dtype, offset)
    E = len(files)
    N, K = files[0].num_samples, files[0].num_classes
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if on_cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    resolved = backends.resolve(backend, device)  # before any buffer is allocated or file read
    converted = 0  # bytes of one converted row: probabilities the backend does not read only
    if converts(resolved, kind):
        converted = K * torch.empty((), dtype=kernel_dtype(files[0].dtype, kind, resolved)).element_size()
    chunk = plan_chunk(E, N, files[0].row_bytes, budget, converted)
    if chunk_samples is not None:
        chunk = min(chunk, as_int(chunk_samples, "chunk_samples", 1))
    if labels is not None:  # all of them before any chunk is read: a bad last label fails at once
        labels = check_labels(labels, N, K, device)
    if N == 0:
        # Nothing to read: the empty block goes through ensel.score like any chunk would (the
        # labels' checks included) and gives the empty scores of E members.
        return score(torch.empty(E, 0, K, dtype=files[0].dtype, device=device), labels, backend=backend, kind=kind)
    # The chunks' samples are file rows: the first invalid row is reported at its file row.
    return score_chunks(
        _Pipeline(files, chunk, device).chunks(), num_members=E, num_samples=N, labels=labels,
        backend=resolved, device=device, kind=kind, dtype=files[0].dtype,
    )  # fmt: skip


class _Pipeline:
    """Double-buffered chunks: a reader thread fills slot A while the caller scores slot B."""

    def __init__(self, files: list[LogitFile], chunk: int, device: torch.device):
        self.files, self.chunk, self.device = files, chunk, device
        self.E, self.N, self.K = len(files), files[0].num_samples, files[0].num_classes
        self.dtype = files[0].dtype
        self.on_cuda = device.type == "cuda"
        size = self.E * chunk * self.K
        self.host = [torch.empty(size, dtype=self.dtype, pin_memory=self.on_cuda) for _ in range(STAGING_BUFFERS)]
        self.dev = [torch.empty(size, dtype=self.dtype, device=device) for _ in range(STAGING_BUFFERS)] if self.on_cuda else self.host

    def chunks(self):
        """Yields (start, count, [E, count, K] block on the device) in order; the block is valid
        until the next iteration."""
        E, K, N = self.E, self.K, self.N
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for slot in range(STAGING_BUFFERS):
            free.put((slot, None))
        side = torch.cuda.Stream(self.device) if self.on_cuda else None
        stop = threading.Event()
        fds = []

        def reader():
            try:
                if self.on_cuda:
                    torch.cuda.set_device(self.device)
                for start in range(0, N, self.chunk):
                    slot, done = free.get()
                    if stop.is_set():
                        return
                    if done is not None:
                        done.synchronize()  # the device finished with this slot (copy and kernel)
                    count = min(self.chunk, N - start)
                    raw = memoryview(self.host[slot][: E * count * K].view(torch.uint8).numpy())
                    part = count * K * files_itemsize
                    for e, (f, fd) in enumerate(zip(self.files, fds)):
                        _read_rows(fd, raw[e * part : (e + 1) * part], f.offset + start * f.row_bytes, f.path)
                    copied = None
                    if self.on_cuda:
                        with torch.cuda.stream(side):
                            self.dev[slot][: E * count * K].copy_(self.host[slot][: E * count * K], non_blocking=True)
                            copied = torch.cuda.Event()
                            copied.record(side)
                    ready.put((start, count, slot, copied, None))
            except BaseException as exc:  # handed to the caller, raised there
                ready.put((None, None, None, None, exc))

        files_itemsize = self.files[0].itemsize
        try:
            for f in self.files:
                fd = os.open(f.path, os.O_RDONLY)
                fds.append(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"{f.path}: not readable ({e})") from e
        thread = threading.Thread(target=reader, name="ensel-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(0, N, self.chunk):
                start, count, slot, copied, exc = ready.get()
                if exc is not None:
                    raise exc
                if copied is not None:
                    torch.cuda.current_stream(self.device).wait_event(copied)
                yield start, count, self.dev[slot][: E * count * K].view(E, count, K)
                done = None
                if self.on_cuda:
                    done = torch.cuda.Event()
                    done.record(torch.cuda.current_stream(self.device))
                free.put((slot, done))
        finally:
            stop.set()
            free.put((None, None))  # wakes a reader waiting for a slot
            thread.join()
            if side is not None:
                # Left early (an error, or the caller stopped): a copy into a device buffer may
                # still be queued, and the buffers must not be freed (and reused) under it.
                side.synchronize()
            for fd in fds:
                os.close(fd)
