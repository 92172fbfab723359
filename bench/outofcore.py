"""Out-of-core scoring throughput (GB/s of logits from disk) beside plain sequential reading of the
same files, each after dropping the page cache when this process may (root on Linux), else warm.

    .venv/bin/python bench/outofcore.py [--dir DIR] [--members 8] [--samples 200000] [--classes 100]
                                        [--max-memory 268435456] [--reps 2]

Writes bench/results/outofcore.txt. Sequential read: each file read whole, in 8 MB preadv calls
into one reused buffer (what `cat file > /dev/null` does): the disk's rate with no compute.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ensel.outofcore import plan_chunk, score_files


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def sequential_read(paths, block=8 << 20) -> None:
    buf = memoryview(bytearray(block))
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            offset = 0
            while got := os.preadv(fd, [buf], offset):
                offset += got
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--max-memory", type=int, default=256 << 20)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="ensel-ooc-"))
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    paths = []
    for e in range(a.members):
        p = root / f"member{e}.npy"
        if not p.exists():
            np.save(p, (torch.randn(a.samples, a.classes, generator=g) * 3).half().numpy())
        paths.append(p)
    nbytes = a.members * a.samples * a.classes * 2
    chunk = plan_chunk(a.members, a.samples, a.classes * 2, a.max_memory)
    runs = {"sequential read": lambda: sequential_read(paths),
            "out-of-core score": lambda: score_files(paths, max_memory=a.max_memory)}
    cold = drop_caches()
    rows = []
    for rep in range(a.reps):
        for name, fn in runs.items():
            if cold:
                drop_caches()
            t0 = time.perf_counter()
            fn()
            rows.append((name, rep, time.perf_counter() - t0))
    warm = {}
    for name, fn in runs.items():  # warm cache: everything already in the page cache
        fn()
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    block = torch.stack([torch.from_numpy(np.load(p)) for p in paths])
    import ensel

    ensel.score(block[:, :1000])
    t0 = time.perf_counter()
    ensel.score(block)
    warm["in-memory score"] = time.perf_counter() - t0  # the kernel alone: no file, no chunking
    del block
    disk = subprocess.run(["df", "-h", str(root)], capture_output=True, text=True).stdout.splitlines()[-1]
    lines = [
        f"ensel out-of-core scoring vs sequential read: {platform.node()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"files: {a.members} x [{a.samples}, {a.classes}] float16 .npy = {nbytes / 1e9:.3f} GB in {root} ({disk.split()[0]})",
        f"max_memory={a.max_memory} bytes -> chunk of {chunk} samples",
        f"page cache dropped before each run: {'yes (echo 3 > /proc/sys/vm/drop_caches)' if cold else 'NO (not permitted): warm-cache numbers'}",
        "",
        f"{'run':<20}{'rep':>4}{'s':>9}{'GB/s':>8}",
    ]
    for name, rep, t in rows:
        lines.append(f"{name:<20}{rep:>4}{t:>9.3f}{nbytes / t / 1e9:>8.2f}   ({'cold' if cold else 'warm'} cache)")
    for name, t in warm.items():
        what = "the fused kernel on the whole block in RAM, no I/O" if name == "in-memory score" else "warm cache: files in the page cache"
        lines.append(f"{name:<20}{'w':>4}{t:>9.3f}{nbytes / t / 1e9:>8.2f}   ({what})")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "outofcore.txt"
    out.write_text(text)


if __name__ == "__main__":
    main()
