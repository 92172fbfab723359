"""Atomic file writes: a reader sees the old file or the new one, never a part of either.

Every file ensel writes (accumulator states, scores, subsets, metrics, reports) goes through
`atomic_write`: the content is written to a temporary file beside the target (same file system,
so the final rename is atomic), flushed, then renamed over the target. If writing fails the
temporary file is removed and the target is untouched. Temporary names are unique per call, so
two writers of one path never rename each other's half-written file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on any error it is removed.

    `suffix` ends the temporary name, for writers that choose a format by extension
    (matplotlib's savefig, numpy's savez)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    # Created here (exclusively, with the umask's permissions, unlike mkstemp's 0600) so that a
    # missing folder or an unwritable one fails before any work is spent on the content.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
