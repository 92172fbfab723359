"""The CPU benchmark report: every provider (bench/providers.py) on the same inputs, in one run.

    .venv/bin/python bench/report.py            # the full report (about 8.5 minutes on 2 cores)
    .venv/bin/python bench/report.py --quick    # a tiny smoke run (well under a minute)

Cases: K in {10, 100, 1000} x E in {8, 64} x {float32, bfloat16}; N = 50,000 for K = 10 and 100,
N = 5,000 for K = 1000, so that the largest inputs (E = 64, K = 100 or 1000, float32) are 1.28 GB.
Each case generates its float32 logits once; the bfloat16 case is the same logits rounded.

Timing: per case, every provider is warmed up (torch.compile compiles there, timed apart), then
the providers take turns, round-robin, for their repeats (so that slow drift of a shared machine
hits them all alike); the reported time is the median of the repeats (time.perf_counter). The
number of repeats is fitted to a time budget per provider and case, between --min-reps and
--max-reps; the reference (float64, softmax materialized, validating) gets fewer.

Columns: ms; GB/s = bytes of logits read (E N K x the input dtype's size) / time; %memcpy = the
memcpy row's time / this time (the same bytes copied by torch into a preallocated buffer, measured
in the same case: the bandwidth ceiling row; a read-only kernel could exceed 100%); x eager and
x ref = speedup over the eager baseline and over the float64 reference in the same case.

Writes <out>/cpu_report.json (with the machine's description), <out>/cpu_report.txt (the table)
and <out>/cpu_report.png
(cpu_report_quick.* with --quick, *_partial.* when --E/--K/--dtypes/--providers pick a subset,
so that a partial run never overwrites the full report).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import providers as P  # noqa: E402

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SLOW = {"reference"}  # fewer repeats


def full_cases() -> list[dict]:
    cases = []
    for E in (8, 64):
        for K in (10, 100, 1000):
            N = 50_000 if K <= 100 else 5_000
            for dtype in DTYPES:
                cases.append(dict(E=E, N=N, K=K, dtype=dtype))
    return cases


def quick_cases() -> list[dict]:
    return [dict(E=4, N=500, K=K, dtype=d) for K in (10, 100) for d in DTYPES]


# ---------------------------------------------------------------------------------------------
# The machine.


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_total_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def ensel_build() -> dict:
    """Which ensel was measured: the checkout's commit, whether its sources differ from it, and
    when the compiled module was built (other work may rebuild it between runs)."""
    import ensel

    info = {"commit": git_commit(), "dirty": None, "module": None, "module_mtime": None}
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "ensel", "csrc", "kernels", "CMakeLists.txt"],
            cwd=HERE.parent, capture_output=True, text=True,
        )
        info["dirty"] = bool(out.stdout.strip()) if out.returncode == 0 else None
    except OSError:
        pass
    try:
        from ensel import _C

        info["module"] = _C.__file__
        info["module_mtime"] = datetime.datetime.fromtimestamp(os.path.getmtime(_C.__file__)).astimezone().isoformat(
            timespec="seconds"
        )
    except (ImportError, OSError):
        pass
    info["version"] = getattr(ensel, "__version__", None)
    return info


def probe_ms() -> float:
    """A fixed compute-bound probe (small float32 matmuls, cache-resident, torch's threads): the
    median of a few. If it drifts between cases, the host's cores were shared (noisy neighbours on
    a VM do not show in the load average), and compute-bound rows are inflated."""
    a = torch.ones(384, 384)
    b = torch.ones(384, 384)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def machine() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_total_gb": round(mem_total_bytes() / 1e9, 1),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "numpy_threads": 1,  # numpy's elementwise ufuncs and reductions run on one thread
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "ensel": ensel_build(),
    }


# ---------------------------------------------------------------------------------------------
# Inputs and timing.


def make_logits(E: int, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """float32 [E, N, K]: a per-sample class preference shared by the members, plus member noise
    (so that the members agree on some samples and disagree on others, as ensembles do)."""
    g = torch.Generator().manual_seed(seed + 1000003 * E + 1009 * K + N)
    x = torch.randn(E, N, K, generator=g)
    x.add_(torch.randn(N, K, generator=g).mul_(2.0))
    return x


def make_labels(N: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 17)
    return torch.randint(0, K, (N,), generator=g)


def timed(fn) -> float:
    t0 = time.perf_counter()
    result = fn()
    t = time.perf_counter() - t0
    del result
    return t


def reps_for(name: str, warm_s: float, args) -> int:
    budget, lo = (args.slow_budget, 1) if name in SLOW else (args.budget, args.min_reps)
    fit = int(budget // max(warm_s, 1e-6))
    return max(lo, min(args.max_reps, fit))


def run_case(case: dict, x: torch.Tensor, labels, names: list[str], args) -> list[dict]:
    E, N, K, dtype = case["E"], case["N"], case["K"], case["dtype"]
    nbytes = x.numel() * x.element_size()
    f32_bytes = x.numel() * 4
    free = mem_available_bytes()
    rows, timers = [], {}
    load_before = os.getloadavg()[0]
    probe_before = probe_ms()
    P.reset_compile()  # a static-shape graph per case; no recompile limit across cases
    for name in names:
        row = dict(provider=name, dtype=dtype, E=E, N=N, K=K, bytes=nbytes, skipped=None)
        rows.append(row)
        need = P.MEMORY_FACTOR[name] * f32_bytes
        limit = args.max_mem_gb * 1e9 if args.max_mem_gb is not None else 0.85 * free
        if need > limit:
            row["skipped"] = f"memory: needs ~{need / 1e9:.2f} GB, {limit / 1e9:.2f} GB allowed"
            continue
        fn = P.prepare(name, x, labels)
        gc.collect()
        try:
            if name == "compile":
                row["compile_s"] = timed(fn)  # tracing + inductor codegen + the first run
            row["warmup_s"] = timed(fn)
        except (RuntimeError, MemoryError) as e:  # an allocation that does not fit after all
            row["skipped"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        row["reps"] = reps_for(name, row["warmup_s"], args)
        row["times_s"] = []
        timers[name] = fn
    # Round-robin: round r times every provider that still has repeats to do. A provider whose
    # repeats already took 3x its budget (the machine got busy) stops early, so that one noisy
    # case cannot stretch the run without bound; `reps` is what was actually done.
    for r in range(max((row.get("reps", 0) for row in rows), default=0)):
        for row in rows:
            if row["skipped"] is None and r < row["reps"]:
                cap = 3 * (args.slow_budget if row["provider"] in SLOW else args.budget)
                if r > 0 and sum(row["times_s"]) > cap:
                    row["reps"] = r
                    continue
                gc.collect()
                row["times_s"].append(timed(timers[row["provider"]]))
    timers.clear()
    gc.collect()
    by = {row["provider"]: row for row in rows}
    for row in rows:
        if row["skipped"] is not None:
            continue
        t = statistics.median(row["times_s"])
        row["ms"] = 1e3 * t
        row["gbps"] = nbytes / t / 1e9
        for key, other in (("frac_memcpy", "memcpy"), ("speedup_eager", "eager"), ("speedup_reference", "reference")):
            o = by.get(other)
            row[key] = (statistics.median(o["times_s"]) / t) if o and o["skipped"] is None else None
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    probe = (round(probe_before, 2), round(probe_ms(), 2))
    for row in rows:
        row["loadavg_1min"] = load  # at the case's start and end: other work on the machine
        row["probe_ms"] = probe  # the compute probe at the case's start and end
    return rows


# ---------------------------------------------------------------------------------------------
# Output.


def fmt(v, spec: str, width: int) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if spec.endswith("%"):
        return f"{format(v, spec[:-1]) + '%':>{width}}"
    return f"{v:>{width}{spec}}"


def table(rows: list[dict]) -> str:
    head = (
        f"{'provider':<11} {'dtype':<8} {'E':>3} {'N':>6} {'K':>5} {'reps':>4} {'ms':>10} "
        f"{'GB/s':>7} {'%memcpy':>8} {'x eager':>8} {'x ref':>8}"
    )
    lines = [head, "-" * len(head)]
    last = None
    for row in rows:
        key = (row["E"], row["N"], row["K"], row["dtype"])
        if last is not None and key != last:
            lines.append("")
        last = key
        lead = f"{row['provider']:<11} {row['dtype']:<8} {row['E']:>3} {row['N']:>6} {row['K']:>5}"
        if row["skipped"] is not None:
            lines.append(f"{lead}    skipped ({row['skipped']})")
            continue
        frac = None if row["frac_memcpy"] is None else 100 * row["frac_memcpy"]
        lines.append(
            f"{lead} {row['reps']:>4} {row['ms']:>10.1f} {row['gbps']:>7.2f} {fmt(frac, '.0f%', 8)} "
            f"{fmt(row['speedup_eager'], '.2f', 8)} {fmt(row['speedup_reference'], '.1f', 8)}"
        )
        if row["provider"] == "compile":
            lines[-1] += f"   (compile + first call {row['compile_s']:.1f} s)"
    return "\n".join(lines)


def plot(rows: list[dict], names: list[str], path: Path, title: str, hlines=()) -> None:
    """GB/s per provider per case on a log scale, one panel per dtype (also bench/gpu_report.py's);
    `hlines`: (GB/s, label, line style) reference lines such as a bandwidth ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(13, 4.2 * len(dtypes)), squeeze=False)
    colors = plt.get_cmap("tab10")
    width = 0.8 / len(names)
    for ax, dtype in zip(axes[:, 0], dtypes):
        sub = [r for r in rows if r["dtype"] == dtype]
        cases = list(dict.fromkeys((r["E"], r["N"], r["K"]) for r in sub))
        for i, name in enumerate(names):
            xs, ys = [], []
            for c, (E, N, K) in enumerate(cases):
                for r in sub:
                    if (r["E"], r["N"], r["K"], r["provider"]) == (E, N, K, name) and r["skipped"] is None:
                        xs.append(c + (i - (len(names) - 1) / 2) * width)
                        ys.append(r["gbps"])
            ax.bar(xs, ys, width=width, label=name, color=colors(i % 10))
        for gbps, label, style in hlines:
            ax.axhline(gbps, color="k", ls=style, lw=1, label=label)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"E={E} K={K}\nN={N}" for E, N, K in cases], fontsize=8)
        ax.set_ylabel("GB/s (bytes read / time)")
        ax.set_title(f"{dtype}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(names) + len(hlines), 6), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.32))
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (E=4, N=500, K in {10, 100})")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default bench/results/)")
    ap.add_argument("--providers", default=",".join(P.NAMES), help="comma-separated subset of " + ",".join(P.NAMES))
    ap.add_argument("--E", default=None, help="only these ensemble sizes, e.g. 64 or 8,64")
    ap.add_argument("--K", default=None, help="only these class counts, e.g. 100")
    ap.add_argument("--dtypes", default=None, help="only these dtypes, e.g. float32")
    ap.add_argument("--labels", action="store_true", help="score with labels too (error_count, forgetting, nll)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per provider and case")
    ap.add_argument("--slow-budget", type=float, default=2.0, help="the same for the float64 reference")
    ap.add_argument("--min-reps", type=int, default=2)
    ap.add_argument("--max-reps", type=int, default=9)
    ap.add_argument("--max-mem-gb", type=float, default=None, help="skip providers needing more (default: 85%% of MemAvailable)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    unknown = set(names) - set(P.NAMES)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}; choose from {P.NAMES}")
    if args.quick:
        args.budget, args.slow_budget, args.max_reps = min(args.budget, 0.5), min(args.slow_budget, 0.5), min(args.max_reps, 3)
    cases = quick_cases() if args.quick else full_cases()
    for key, conv in (("E", int), ("K", int), ("dtypes", str)):
        wanted = getattr(args, key)
        if wanted:
            field = "dtype" if key == "dtypes" else key
            keep = {conv(v) for v in wanted.split(",")}
            cases = [c for c in cases if c[field] in keep]
    if not cases:
        ap.error("no case left after --E/--K/--dtypes")

    info = machine()
    print(
        f"ensel CPU report: {info['cpu_model']}, {info['cpus_usable']} usable cores, torch {info['torch']} "
        f"with {info['torch_threads']} threads (numpy: 1), {info['date']}",
        flush=True,
    )
    start = time.perf_counter()
    rows, logits_key, x32 = [], None, None
    for case in cases:
        E, N, K = case["E"], case["N"], case["K"]
        if logits_key != (E, N, K):
            x32 = None
            gc.collect()
            x32 = make_logits(E, N, K)
            logits_key = (E, N, K)
        x = x32 if case["dtype"] == "float32" else x32.to(DTYPES[case["dtype"]])
        labels = make_labels(N, K) if args.labels else None
        t0 = time.perf_counter()
        case_rows = run_case(case, x, labels, names, args)
        rows += case_rows
        del x
        load, probe = case_rows[0]["loadavg_1min"], case_rows[0]["probe_ms"]
        print(
            f"\n[{time.perf_counter() - start:6.0f} s] case done in {time.perf_counter() - t0:.0f} s "
            f"(1-min load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores; "
            f"compute probe {probe[0]:.1f} -> {probe[1]:.1f} ms)",
            flush=True,
        )
        print(table(case_rows), flush=True)
    total = time.perf_counter() - start

    print("\n" + "=" * 100)
    print(
        f"All cases ({'with' if args.labels else 'without'} labels), median of the repeats, "
        f"torch threads {info['torch_threads']}, numpy single-threaded:\n"
    )
    print(table(rows))
    print(f"\nTotal wall time: {total:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    partial = bool(args.E or args.K or args.dtypes) or names != list(P.NAMES)
    stem = "cpu_report" + ("_quick" if args.quick else "") + ("_partial" if partial else "")
    payload = {
        "machine": info,
        "config": {
            "quick": args.quick,
            "cases": cases,
            "labels": args.labels,
            "providers": names,
            "budget_s": args.budget,
            "slow_budget_s": args.slow_budget,
            "min_reps": args.min_reps,
            "max_reps": args.max_reps,
            "timing": "warm-up, then round-robin repeats; median of time.perf_counter() deltas",
            "gbps": "bytes of logits read (E*N*K*itemsize) / median time / 1e9",
            "frac_memcpy": "memcpy median time / provider median time (same case)",
        },
        "total_wall_s": round(total, 1),
        "results": rows,
    }
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=lambda v: None if v is None else str(v)) + "\n")
    header = (
        f"ensel CPU report ({'with' if args.labels else 'without'} labels): {info['cpu_model']}, "
        f"{info['cpus_usable']} cores, torch {info['torch']} with {info['torch_threads']} threads, numpy single-threaded, "
        f"ensel {info['ensel']['commit']}, {info['date']}; total wall time {total:.0f} s\n\n"
    )
    (args.out / f"{stem}.txt").write_text(header + table(rows) + "\n")
    png_path = args.out / f"{stem}.png"
    title = (
        f"ensel CPU providers: {info['cpu_model']}, {info['torch_threads']} torch threads, torch {info['torch']}, "
        f"{info['date'][:10]}"
    )
    plot(rows, names, png_path, title)
    print(f"Wrote {json_path}, {json_path.with_suffix('.txt')} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
