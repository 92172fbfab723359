"""The run directory of an experiment (or a transfer): who uses it, what it was made for, and
what it already holds.

- `lock`: one run at a time. Two runs in one directory would write the same files (an accumulator
  state renamed away under the other's feet, subsets chosen twice), so a run holds an exclusive
  `fcntl.flock` on `.lock` for as long as it works there; a second run is refused at once, told
  the holder's process id and host. The kernel drops the lock when its holder dies, however it
  dies, so a lock file left by a killed run is simply taken over. flock is local to one machine
  (and unreliable on some network file systems): it guards against a second run on the same host.
- `RunDir.claim`: config.json records what the directory computes; another configuration is
  refused, one that only differs in where it runs (device, workers) resumes it.
- `RunDir.exists` / `RunDir.subset`: under torchrun rank 0 alone writes the shared files and
  decides what exists, so that every rank takes the same path through the collectives.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from ..distributed import Context
from .training import atomic_json

LOCK_FILE = ".lock"

# Where it runs is not what it computes: a run started on a CPU may resume on a GPU.
_WHERE_IT_RUNS = frozenset({"device", "workers"})

# Options added after run directories were first written, with the value that gives what such a
# directory computed: an old run resumes when asked for that, and refuses anything else.
_BEFORE_THEY_EXISTED = {"acquisition": "top", "temperature": 1.0, "ties": "index", "pool_size": None}


@contextlib.contextmanager
def lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds the directory `path` (made if missing) for this process, or raises ValueError naming
    the process that holds it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    file = path / LOCK_FILE
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ValueError(f"{path} is in use by {holder} (it holds {file}); wait for it, stop it, "
                             "or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        # A finished holder unlinks the file before it unlocks; whoever opened that file meanwhile
        # now holds a lock nobody else will look at (a third run may hold the new file): retry.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(file).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        # In place, not through atomic_write: a rename would put an unlocked inode at the name.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        file.unlink(missing_ok=True)  # while still locked: see the retry above
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """Who holds the lock on `fd`'s file, from the pid and host it wrote there (it writes them
    just after locking: wait a moment for a holder that has only just started)."""
    for _ in range(20):
        words = os.pread(fd, 256, 0).decode(errors="replace").split()
        if len(words) >= 2:
            return f"process {words[0]} on {words[1]}"
        time.sleep(0.05)
    return "another process"


class RunDir:
    """The run directory `path` as seen by rank `ctx.rank` of a run (a single process by default)."""

    def __init__(self, path: str | os.PathLike, ctx: Context | None = None):
        self.path, self.ctx = Path(path), ctx or Context()

    def main_first(self, fn: Callable[[], object]) -> None:
        """Runs `fn` on rank 0 alone; a ValueError it raises is raised on every rank (the others
        would otherwise wait in the next collective for a rank 0 that has left)."""
        error = None
        if self.ctx.is_main:
            try:
                fn()
            except ValueError as e:
                if not self.ctx.distributed:
                    raise
                error = e
        if self.ctx.distributed:
            box = [None if error is None else str(error)]
            torch.distributed.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise error if error is not None else ValueError(box[0])

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The directory locked for this run: by rank 0 alone, because the ranks of one run are
        separate processes that flock would refuse each other. A refusal raises on every rank."""
        with contextlib.ExitStack() as stack:
            self.main_first(lambda: stack.enter_context(lock(self.path)))
            yield

    def claim(self, config: dict) -> None:
        """Records `config` in config.json, or refuses (ValueError) a directory that holds another.
        Rank 0 first (the ranks would race on writing it), then the others check it."""
        self.main_first(lambda: _claim(self.path, config))
        if not self.ctx.is_main:
            _claim(self.path, config)

    def exists(self, path: Path) -> bool:
        """Whether `path` exists, as rank 0 sees it: every rank then takes the same branch (rank 0
        may write a file another rank has not yet looked for)."""
        exists = path.exists()
        if not self.ctx.distributed:
            return exists
        box = [exists if self.ctx.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return bool(box[0])

    def subset(self, stage: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The sorted pool indices in stage/subset.npy, made by `make()` (on every rank: it may be
        collective) and written by rank 0 if the file does not exist yet."""
        path = stage / "subset.npy"
        if self.exists(path):
            return np.load(path)
        subset = np.sort(np.asarray(make(), dtype=np.int64))
        if self.ctx.is_main:
            stage.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, suffix=".npy") as tmp:  # np.save adds .npy to other names
                np.save(tmp, subset)
        return subset


def _claim(out: Path, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    mine = json.loads(json.dumps(config))  # tuples as the lists they are read back as
    if not saved.exists():
        atomic_json(saved, mine)
        return
    theirs = json.loads(saved.read_text())
    theirs = {**_BEFORE_THEY_EXISTED, **theirs}
    diff = sorted(k for k in set(theirs) | set(mine) if k not in _WHERE_IT_RUNS and theirs.get(k) != mine.get(k))
    if diff:
        raise ValueError(f"{out} holds a run with another configuration (differs in {', '.join(diff)}); use another --out")
