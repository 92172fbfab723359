"""`Accumulator`: checkpoint-major streaming of logits into per-sample scores, resumable on disk."""

from __future__ import annotations

import contextlib
import os
import pickle
import threading

import torch

from . import backends
from ._inputs import (
    KINDS, InvalidInput, as_int, as_tensor, check_kind, check_labels, check_logits, log_dtype, log_probs_into,
)  # fmt: skip
from ._chunks import converts, update
from ._io import atomic_write
from ._state import FIELDS, StreamState
from .scores import Scores, empty_columns

_FORMAT = "ensel.Accumulator"
_VERSION = 1
_HEADER = ("format", "version", "num_samples", "num_classes", "labels")


def _check_num_classes(value, what: str = "num_classes") -> int:
    k = as_int(value, what)
    if k < 1:
        raise ValueError(f"{what}: expected at least one class, got K = {k}")
    return k


class _SharedExclusiveLock:
    """Many shared holders at once, or one exclusive holder (a readers-writer lock).

    Updates of disjoint rows write disjoint parts of the state, so they run side by side under a
    shared hold; a shared hold waits while another one holds rows it overlaps (two kernels on one
    sample would both append at its member count, one past the history's room); what replaces a tensor of the state (growing the argmax history) or reads all of
    it (finalize, save) holds it exclusively, so no kernel is writing into a buffer while it is
    copied, freed or read. A waiting exclusive holder stops new shared holds, so a stream of
    updates cannot starve a growth. Not reentrant."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._shared: list[tuple[int, int]] = []  # the row ranges [lo, hi) of the shared holders
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextlib.contextmanager
    def shared(self, lo: int, hi: int):
        """Held for rows [lo, hi)."""
        rows = (lo, hi)

        def overlaps() -> bool:
            return any(lo < b and a < hi for a, b in self._shared)

        with self._cond:
            while self._exclusive or self._exclusive_waiting or overlaps():
                self._cond.wait()
            self._shared.append(rows)
        try:
            yield
        finally:
            with self._cond:
                self._shared.remove(rows)
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: the shared holds it held off may go
                self._exclusive_waiting -= 1
                self._cond.notify_all()
                raise
            self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _max_count(counts: torch.Tensor) -> int:
    # numpy on CPU: a torch reduction would wake torch's OpenMP workers, which keep spinning
    # while the kernel's own threads run (170 ms instead of 110 ms for 64 updates on 2 cores).
    return int(counts.numpy().max()) if counts.device.type == "cpu" else int(counts.max())


def _check_header(path, payload) -> tuple[int, int]:
    """(N, K) of a loaded payload whose header holds up, else the ValueError naming the file.
    Nothing is allocated from the header's numbers before this and the field checks pass: a
    tampered count must not make load allocate what the file does not hold."""
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an ensel accumulator state (no '{_FORMAT}' header)")
    if payload.get("version") != _VERSION:
        raise ValueError(f"{path}: state format version {payload.get('version')!r}, this ensel reads {_VERSION}")
    missing = [key for key in _HEADER if key not in payload]
    if missing:
        raise ValueError(f"{path}: corrupted state (header {', '.join(map(repr, missing))} missing)")
    try:
        n = as_int(payload["num_samples"], "num_samples", 0)
        k = _check_num_classes(payload["num_classes"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupted state header ({e})") from None
    labels = payload["labels"]
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise ValueError(f"{path}: corrupted state header (labels is a {type(labels).__name__}, not a tensor or None)")
    return n, k


def _check_fields(path, payload: dict, n: int, k: int) -> None:
    """Every FIELDS tensor present, dense, with the dtype and shape the header implies."""
    expected = {name: ((n,), torch.int32) for name in FIELDS}
    expected.update(
        pbar_sum=((n, k), torch.float32),
        entropy_sum=((n,), torch.float32),
        nll_max=((n,), torch.float32),
        nll_sum=((n,), torch.float32),
    )
    for name in FIELDS:
        t = payload.get(name)
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{path}: state field {name!r} is missing or not a dense tensor")
        # A tensor may be saved as one value stretched over the header's shape (stride 0), or on
        # the meta device (no data at all): every later check or copy would then allocate what
        # the header says. The file must hold every value it claims.
        if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise ValueError(f"{path}: state field {name!r} does not hold its values (a strided, expanded or "
                             "dataless tensor)")
        shape, dtype = expected[name]
        if name == "argmax_history":  # [rows, N]: any number of rows
            ok, want = t.dim() == 2 and t.shape[1] == n, f"{dtype} [rows, {n}]"
        else:
            ok, want = tuple(t.shape) == shape, f"{dtype} {list(shape)}"
        if not ok or t.dtype != dtype:
            raise ValueError(f"{path}: state field {name!r} is {t.dtype} {list(t.shape)}, expected {want}")


def _check_state_values(path, payload: dict, num_classes: int) -> None:
    """Refuse a state whose values the kernels would trust: an argmax outside [0, K) or a member
    count beyond the history would make them read or write out of bounds."""

    def refuse(what: str):
        raise ValueError(f"{path}: corrupted state ({what})")

    members, history = payload["members"].long(), payload["argmax_history"]
    if members.numel() == 0:
        return
    if int(members.min()) < 0 or int(members.max()) > history.shape[0]:
        refuse("member counts outside [0, length of the argmax history]")
    used = torch.arange(history.shape[0])[:, None] < members[None, :]
    votes = history[used]
    if votes.numel() and (int(votes.min()) < 0 or int(votes.max()) >= num_classes):
        refuse(f"an argmax outside [0, {num_classes})")
    correct, forgetting = payload["correct"].long(), payload["forgetting"].long()
    if bool(((correct < 0) | (correct > members)).any()) or bool(((forgetting < 0) | (forgetting > members)).any()):
        refuse("correct or forgetting counts outside [0, members]")
    if not bool(((payload["last_correct"] == 0) | (payload["last_correct"] == 1)).all()):
        refuse("last_correct flags other than 0 and 1")
    for name in ("pbar_sum", "entropy_sum", "nll_sum"):
        t = payload[name]
        if not bool((torch.isfinite(t) & (t >= 0)).all()):
            refuse(f"{name} holds negative or non-finite values")
    if bool(torch.isnan(payload["nll_max"]).any()) or bool(torch.isposinf(payload["nll_max"]).any()):
        refuse("nll_max holds NaN or +inf")


class Accumulator:
    """Scores built one member at a time, in batches of rows, in any order of batches.

    Each `update(logits, start)` adds one member's logits for samples [start, start + len(logits)).
    `finalize()` needs every sample to have seen the same number of members. The state is
    4 N K + 4 N E + 36 N bytes; `save` and `load` carry it across processes. Threads may call
    `update` concurrently on disjoint rows (docs/contract.md section 9).

    `kind` says what every `update` hands in: "logits", "log_probs" or "probs" (docs/contract.md
    section 3). It is fixed for the accumulator's life (saved with its state): one forgotten
    per-call keyword would otherwise score probabilities as logits without a word.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        labels=None,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        num_members: int | None = None,
        *,
        kind: str = "logits",
    ):
        kind = check_kind(kind)
        n = as_int(num_samples, "num_samples", 0)
        k = _check_num_classes(num_classes)
        capacity = 8 if num_members is None else as_int(num_members, "num_members", 1)
        device = torch.device(device)
        backend = backends.resolve(backend, device)
        if labels is not None:
            labels = check_labels(labels, n, k, device)
        self._setup(StreamState.empty(n, k, labels, device, capacity), backend, kind)

    def _setup(self, state: StreamState, backend, kind: str) -> None:
        self._state = state
        self._backend = backend
        self._kind = kind
        self._lock = _SharedExclusiveLock()

    @property
    def kind(self) -> str:
        """What `update` reads: "logits", "log_probs" or "probs"."""
        return self._kind

    @property
    def num_samples(self) -> int:
        return self._state.num_samples

    @property
    def num_classes(self) -> int:
        return self._state.num_classes

    @property
    def device(self) -> torch.device:
        return self._state.device

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def members(self) -> torch.Tensor:
        """How many members each sample has seen (int32 [N]); a copy."""
        return self._state.members.clone()

    def update(self, logits, start: int = 0) -> None:
        """Adds one member's [B, K] logits (or log-probabilities or probabilities: the
        accumulator's `kind`) for rows [start, start + B). On invalid input it raises and leaves
        the state as it was. A batch whose classes are not unit-stride, or of probabilities for a
        backend that does not read them (all but cpu), is copied (converted) once: a copy of the
        batch's size, never of more."""
        x = as_tensor(logits)
        check_logits(x, 2)
        s = self._state
        if x.shape[1] != s.num_classes:
            raise ValueError(f"logits: expected {s.num_classes} classes, got shape {tuple(x.shape)}")
        if x.device != s.device:
            raise ValueError(f"logits: on {x.device}, but this accumulator lives on {s.device}")
        start = as_int(start, "start")
        rows = x.shape[0]
        if not (0 <= start <= s.num_samples and start + rows <= s.num_samples):
            raise ValueError(
                f"start={start}: rows [{start}, {start + rows}) are outside [0, {s.num_samples})"
            )
        if rows == 0:
            return
        given, kind = x, self._kind
        if converts(self._backend, kind):  # validated by the kernel as their log; named from `given`
            x = log_probs_into(torch.empty(x.shape, dtype=log_dtype(x.dtype), device=x.device), x)
            kind = "log_probs"
        try:
            self._update(x, start, rows, kind)
        except InvalidInput as e:
            row = given[e.sample - start] if self._kind == "probs" else None
            raise e.restated(self._kind, row) from None

    def _update(self, x: torch.Tensor, start: int, rows: int, kind: str) -> None:
        with self._lock.shared(start, start + rows):
            s = self._state
            if _max_count(s.members[start : start + rows]) < s.capacity:
                update(self._backend, s, x, start, kind)
                return
        # The history must grow: exclusively, so that no other thread's kernel is writing into
        # the history being copied (and then freed). Room is asked for again: another thread may
        # have grown the history meanwhile, and then it is used as it is.
        with self._lock.exclusive():
            s = self._state
            history = s.history_with_room(_max_count(s.members[start : start + rows]) + 1)
            # Into the grown copy first; installed only if the backend accepted the batch.
            update(self._backend, s.with_history(history), x, start, kind)
            s.argmax_history = history

    def finalize(self) -> Scores:
        """The scores of every sample. Raises if samples have seen different numbers of members.
        With no samples (N = 0) the scores are empty and num_members is 0."""
        with self._lock.exclusive():  # waits for running updates; none starts meanwhile
            s = self._state
            has_labels = s.labels is not None
            if s.num_samples == 0:
                # No sample tells how many members were streamed (updates of [0, K] rows are no-ops).
                return Scores.from_columns(*empty_columns(s.device), 0, has_labels)
            lo, hi = int(s.members.min()), int(s.members.max())
            if lo != hi:
                few = int((s.members == lo).nonzero()[0, 0])
                many = int((s.members == hi).nonzero()[0, 0])
                raise ValueError(
                    f"finalize: samples saw different numbers of members: sample {few} saw {lo}, "
                    f"sample {many} saw {hi}; every sample must see every member"
                )
            if hi == 0:
                raise ValueError("finalize: no member has been added (call update first)")
            floats, ints = self._backend.finalize(s, hi)
            return Scores.from_columns(floats.to(s.device), ints.to(s.device), hi, has_labels)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the state to `path` (a torch zip of tensors, loadable with weights_only=True).
        The file is replaced atomically: a crash or a failed save keeps the previous one and
        leaves no temporary file."""
        # Exclusive for the whole write: on the CPU the payload is the live tensors, not a copy
        # (a copy would double the state's memory), so no update may run until they are written.
        with self._lock.exclusive():
            s = self._state
            used = _max_count(s.members) if s.num_samples else 0
            payload = {name: t.cpu() for name, t in s.tensors().items()}
            payload["argmax_history"] = payload["argmax_history"][:used].clone()
            payload.update(
                format=_FORMAT,
                version=_VERSION,
                num_samples=s.num_samples,
                num_classes=s.num_classes,
                labels=None if s.labels is None else s.labels.cpu(),
                kind=self._kind,
            )
            with atomic_write(path) as tmp:
                torch.save(payload, tmp)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        *,
        kind: str | None = None,
    ) -> Accumulator:
        """An accumulator in the state `save` wrote. Refuses truncated, foreign or corrupted files
        (ValueError naming the file) before allocating anything from what they claim. `kind`:
        what later updates hand in; None (default) keeps the saved accumulator's (a file
        without one, written before kinds existed, holds logits)."""
        if kind is not None:
            kind = check_kind(kind)
        device = torch.device(device)
        resolved = backends.resolve(backend, device)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as e:
            # torch's own message advises loading with weights_only=False: never say that here.
            raise ValueError(f"{path}: not an ensel accumulator state (it holds Python objects other than "
                             "tensors, which are never unpickled)") from e
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"{path}: not a readable ensel accumulator state ({type(e).__name__}: {first})") from e
        n, k = _check_header(path, payload)
        saved_kind = payload.get("kind", "logits")
        if not isinstance(saved_kind, str) or saved_kind not in KINDS:
            raise ValueError(f"{path}: corrupted state header (kind {saved_kind!r} is not one of {', '.join(KINDS)})")
        _check_fields(path, payload, n, k)
        labels = payload["labels"]
        if labels is not None:
            try:
                labels = check_labels(labels, n, k, device)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: corrupted state ({e})") from None
        _check_state_values(path, payload, k)
        fields = {name: payload[name].to(device).contiguous() for name in FIELDS}
        state = StreamState(num_samples=n, num_classes=k, labels=labels, **fields)
        # Room for the next member: the file holds only the used rows of the history.
        state.argmax_history = state.history_with_room(state.capacity + 1)
        acc = cls.__new__(cls)
        acc._setup(state, resolved, saved_kind if kind is None else kind)
        return acc
