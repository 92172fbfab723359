"""The CPU kernels at every instruction-set level this machine runs, side by side, in one process.

    .venv/bin/python bench/cpu_isa.py                 # about 2 minutes on 2 cores
    .venv/bin/python bench/cpu_isa.py --reps 3 --out /tmp/isa

Shapes: the table of the CPU issue (E, N, K, dtype). For each shape the logits are made once;
then every contender takes turns, round-robin, for --reps rounds (so slow drift of a shared
machine hits all alike), and the median is reported:

- `read`: `x.sum()` over the same bytes with torch's threads: the speed of reading them once.
- `softmax`: `torch.softmax(x, -1)` alone.
- per level (ensel.backends.cpu.use_isa): `fused`, `ensel.score(x, backend="cpu")`; and
  `stream`, an Accumulator fed one member at a time, then finalized.

Columns: GB/s = logit bytes / fused time; of read = read time / fused time; vs softmax =
softmax time / fused time; stream/fused = fused time / stream time; ns/logit = fused time x
threads / logits (per thread: at 4 GHz, 1 ns is 4 cycles).

Writes <out>/cpu_isa.txt, cpu_isa.json and cpu_isa.png (default out: bench/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import ensel
from ensel.backends import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_model, ensel_build  # noqa: E402

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = [
    (64, 50_000, 100, "float32"),
    (8, 50_000, 100, "bfloat16"),
    (8, 50_000, 10, "float32"),
    (64, 5_000, 1000, "float32"),
    (64, 50_000, 10, "bfloat16"),
    (8, 50_000, 100, "float16"),
]
QUICK_SHAPES = [(4, 2_000, 10, "float32"), (4, 2_000, 100, "bfloat16")]
# The CPU issue's targets: fused at >= 50% of read speed at K >= 100 in float32, >= 25% at K = 10;
# >= 1.5x torch.softmax; streaming >= 0.8 of fused.
TARGETS = {"of_read_k100_f32": 0.5, "of_read_k10": 0.25, "vs_softmax": 1.5, "stream_over_fused": 0.8}


def contenders(x: torch.Tensor, levels: list[str]) -> dict:
    E, N, K = x.shape

    def at(level, fn):
        def run():
            cpu.use_isa(level)
            fn()

        return run

    def fused():
        ensel.score(x, backend="cpu")

    def stream():
        acc = ensel.Accumulator(N, K, num_members=E, backend="cpu")
        for e in range(E):
            acc.update(x[e])
        acc.finalize()

    runs = {"read": lambda: x.sum(), "softmax": lambda: torch.softmax(x, -1)}
    for level in levels:
        runs[f"fused/{level}"] = at(level, fused)
        runs[f"stream/{level}"] = at(level, stream)
    return runs


def measure(E, N, K, dtype, levels, reps) -> dict:
    g = torch.Generator().manual_seed(E * 7 + K)
    x = (torch.randn(E, N, K, generator=g) * 3).to(DTYPES[dtype])
    runs = contenders(x, levels)
    for fn in runs.values():  # warm-up: allocations, first-touch, thread start
        fn()
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    nbytes = x.numel() * x.element_size()
    rows = []
    for level in levels:
        fused, stream = med[f"fused/{level}"], med[f"stream/{level}"]
        rows.append(
            dict(
                E=E, N=N, K=K, dtype=dtype, level=level, fused_ms=fused * 1e3, stream_ms=stream * 1e3,
                gbps=nbytes / fused / 1e9, of_read=med["read"] / fused, vs_softmax=med["softmax"] / fused,
                stream_over_fused=fused / stream, ns_per_logit=fused * torch.get_num_threads() / x.numel() * 1e9,
            )
        )  # fmt: skip
    return dict(read_ms=med["read"] * 1e3, softmax_ms=med["softmax"] * 1e3, read_gbps=nbytes / med["read"] / 1e9, rows=rows)


def table(cases: list[dict]) -> str:
    head = f"{'E':>3} {'N':>6} {'K':>5} {'dtype':9} {'level':9} {'GB/s':>6} {'of read':>8} {'vs softmax':>11} {'stream/fused':>13} {'ns/logit':>9}"
    lines = [head, "-" * len(head)]
    for case in cases:
        for r in case["rows"]:
            lines.append(
                f"{r['E']:3d} {r['N']:6d} {r['K']:5d} {r['dtype']:9} {r['level']:9} {r['gbps']:6.2f} "
                f"{r['of_read']:8.2f} {r['vs_softmax']:10.2f}x {r['stream_over_fused']:13.2f} {r['ns_per_logit']:9.2f}"
            )
        lines.append(f"{'':36}read {case['read_gbps']:.1f} GB/s, softmax {case['softmax_ms']:.1f} ms")
    return "\n".join(lines)


def plot(cases: list[dict], levels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"E={c['rows'][0]['E']} K={c['rows'][0]['K']}\n{c['rows'][0]['dtype']}" for c in cases]
    width = 0.8 / len(levels)
    for i, level in enumerate(levels):
        xs = [j + (i - (len(levels) - 1) / 2) * width for j in range(len(cases))]
        axes[0].bar(xs, [c["rows"][i]["of_read"] for c in cases], width, label=level)
        axes[1].bar(xs, [c["rows"][i]["stream_over_fused"] for c in cases], width, label=level)
    axes[0].axhline(TARGETS["of_read_k100_f32"], ls="--", c="k", lw=1, label="target, K >= 100 f32")
    axes[0].axhline(TARGETS["of_read_k10"], ls=":", c="k", lw=1, label="target, K = 10")
    axes[0].set_ylabel("fused time vs reading the bytes once (x.sum())")
    axes[1].axhline(TARGETS["stream_over_fused"], ls="--", c="k", lw=1, label="target")
    axes[1].set_ylabel("streaming speed / fused speed")
    for ax in axes:
        ax.set_xticks(range(len(cases)), labels, fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("ensel CPU kernels per instruction-set level (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="two tiny shapes (a smoke run)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    levels = cpu.isa_levels()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    started = time.time()
    cases = []
    for E, N, K, dtype in shapes:
        cases.append(measure(E, N, K, dtype, levels, args.reps))
        print(table([cases[-1]]).split("\n", 2)[2], flush=True)
    cpu.use_isa(levels[-1])
    header = (
        f"ensel CPU kernels per ISA level: {cpu_model()}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"median of {args.reps}, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"{time.time() - started:.0f} s"
    )
    text = header + "\n\n" + table(cases) + "\n"
    stem = "cpu_isa_quick" if args.quick else "cpu_isa"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.txt").write_text(text)
    meta = dict(cpu=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads(), reps=args.reps,
                levels=levels, ensel=ensel_build(), targets=TARGETS)  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, cases=cases), indent=1))
    plot(cases, levels, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / stem}.{{txt,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
