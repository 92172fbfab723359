"""`Accumulator`: checkpoint-major streaming of logits into per-sample scores, resumable on disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import backends
from ._inputs import as_tensor, check_labels, check_logits
from ._state import FIELDS, StreamState
from .scores import Scores

_FORMAT = "ensel.Accumulator"
_VERSION = 1


def _check_count(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what}: expected at least {minimum}, got {value}")
    return value


def _max_count(counts: torch.Tensor) -> int:
    # numpy on CPU: a torch reduction would wake torch's OpenMP workers, which keep spinning
    # while the kernel's own threads run (170 ms instead of 110 ms for 64 updates on 2 cores).
    return int(counts.numpy().max()) if counts.device.type == "cpu" else int(counts.max())


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
    4 N K + 4 N E + 36 N bytes; `save` and `load` carry it across processes.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        labels=None,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        num_members: int | None = None,
    ):
        n = _check_count(num_samples, "num_samples", 0)
        k = _check_count(num_classes, "num_classes", 1)
        capacity = 8 if num_members is None else _check_count(num_members, "num_members", 1)
        device = torch.device(device)
        self._backend = backends.resolve(backend, device)
        if labels is not None:
            labels = check_labels(labels, n, k, device)
        self._state = StreamState.empty(n, k, labels, device, capacity)

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
        """Adds one member's [B, K] logits for rows [start, start + B). On invalid input it raises
        and leaves the state as it was."""
        x = as_tensor(logits)
        check_logits(x, 2)
        s = self._state
        if x.shape[1] != s.num_classes:
            raise ValueError(f"logits: expected {s.num_classes} classes, got shape {tuple(x.shape)}")
        if x.device != s.device:
            raise ValueError(f"logits: on {x.device}, but this accumulator lives on {s.device}")
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start: expected an int, got {type(start).__name__}")
        rows = x.shape[0]
        if not (0 <= start < s.num_samples and start + rows <= s.num_samples):
            raise ValueError(
                f"start={start}: rows [{start}, {start + rows}) are outside [0, {s.num_samples})"
            )
        if rows == 0:
            return
        s.reserve_history(_max_count(s.members[start : start + rows]) + 1)
        self._backend.update(s, x, start)

    def finalize(self) -> Scores:
        """The scores of every sample. Raises if samples have seen different numbers of members."""
        s = self._state
        if s.num_samples == 0:
            raise ValueError("finalize: the accumulator has no samples")
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
        return Scores.from_columns(floats.to(s.device), ints.to(s.device), hi, s.labels is not None)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the state to `path` (a torch zip of tensors, loadable with weights_only=True).
        The file is replaced atomically, so a crash while saving keeps the previous one."""
        s = self._state
        used = int(s.members.max()) if s.num_samples else 0
        payload = {name: t.cpu() for name, t in s.tensors().items()}
        payload["argmax_history"] = payload["argmax_history"][:used].clone()
        payload.update(
            format=_FORMAT,
            version=_VERSION,
            num_samples=s.num_samples,
            num_classes=s.num_classes,
            labels=None if s.labels is None else s.labels.cpu(),
        )
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto") -> Accumulator:
        """An accumulator in the state `save` wrote. Refuses truncated or foreign files."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a readable ensel accumulator state ({type(e).__name__}: {e})") from e
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path}: not an ensel accumulator state (no '{_FORMAT}' header)")
        if payload.get("version") != _VERSION:
            raise ValueError(f"{path}: state format version {payload.get('version')}, this ensel reads {_VERSION}")
        n, k = payload["num_samples"], payload["num_classes"]
        acc = cls(n, k, labels=payload["labels"], device=device, backend=backend)
        expected = {
            "pbar_sum": ((n, k), torch.float32),
            "entropy_sum": ((n,), torch.float32),
            "members": ((n,), torch.int32),
            "correct": ((n,), torch.int32),
            "last_correct": ((n,), torch.int32),
            "forgetting": ((n,), torch.int32),
            "nll_max": ((n,), torch.float32),
            "nll_sum": ((n,), torch.float32),
        }
        for name in FIELDS:
            t = payload.get(name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: state field {name!r} is missing")
            shape, dtype = expected.get(name, ((t.shape[0], n), torch.int32))
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{path}: state field {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        _check_state_values(path, payload, k)
        s = acc._state
        for name in FIELDS:
            setattr(s, name, payload[name].to(s.device).contiguous())
        s.reserve_history(s.capacity + 1)
        return acc
