"""The GPU benchmark report: ensel's GPU backends against the eager baseline, torch.compile and a
device-to-device copy, on the same inputs, in one run (the targets in bench/README.md).

    python3 bench/gpu_report.py --out DIR          # the full report (a few minutes on an H100)
    python3 bench/gpu_report.py --quick --out DIR  # a smoke run (seconds)
    python bench/gpu_report.py --quick --device cpu --out /tmp/r   # the script's own dry run,
                                                   # without a GPU (rows that need one are skipped)

Cases: K in {10, 100, 1000, 32000} x E in {8, 100} x {float32, bfloat16}. N is sized so that
the float32 logits take --gb gigabytes (4 by default: 80 times an H100's L2, thousands of
samples per SM, and room for the eager baseline's materialized probabilities); the bfloat16
case rounds the same logits.

Rows:
- cuda, triton                ensel.score(..., backend=...): the fused kernel.
- cuda_stream, triton_stream  an Accumulator fed one member at a time, then finalize.
- cuda_update, triton_update  one Accumulator.update of one member's [N, K] logits alone, with
                              its bytes counted as the logits read plus the state it reads and
                              writes (pbar_sum read and written: 8 N K bytes, plus the per-sample
                              scalars): the streaming target is 70% of bandwidth on that count.
- eager                       the contract's formulas in float32 eager PyTorch on the GPU,
                              softmax materialized (bench/providers.py): the eager baseline.
- compile                     the same function under torch.compile (dynamic shapes, compiled
                              once per dtype/labels signature; compile time reported apart).
- memcpy                      a device-to-device copy of the logits into a preallocated buffer.

Timing: CUDA events around each call on the current stream, after two warm-up calls; providers
take turns round-robin; the median of the repeats is reported. Columns: ms; GB/s = bytes / time
(logit bytes, or the update's bytes as above); %spec = GB/s over the card's specified HBM
bandwidth (3.35 TB/s for the H100 SXM, 4.8 TB/s for the H200); %copy = GB/s over the copy row's
bandwidth counting its bytes read and written (2 x logit bytes / copy time): the measured
ceiling; x eager and x compile = speedups over those rows in the same case. After timing, the
cuda and triton scores of each case are checked against each other (discrete scores exactly,
continuous ones within the contract's tolerance): a fast wrong kernel cannot hide in the report.

Writes <out>/gpu_report.json (with the card, driver, torch/triton versions, ensel's commit),
<out>/gpu_report.txt and <out>/gpu_report.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import providers as P  # noqa: E402
from report import DTYPES, plot as plot_gbps  # noqa: E402

import ensel  # noqa: E402

HERE = Path(__file__).resolve().parent
SPEC_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.04}  # HBM bandwidth from the vendors' data sheets
FUSED = ("cuda", "triton")
ROWS = ("cuda", "triton", "cuda_stream", "triton_stream", "cuda_update", "triton_update", "eager", "compile", "memcpy")


def full_cases(gb: float) -> list[dict]:
    return [
        dict(E=E, N=max(1, int(gb * 1e9 / (E * K * 4))), K=K, dtype=d)
        for K in (10, 100, 1000, 32000)
        for E in (8, 100)
        for d in DTYPES
    ]


def quick_cases() -> list[dict]:
    return [dict(E=4, N=5000, K=K, dtype=d) for K in (10, 1000) for d in DTYPES]


def card(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"gpu": f"none ({device.type} dry run)", "spec_tbps": None, "driver": None, "torch": torch.__version__,
                "triton": None, "ensel_commit": None, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    props = torch.cuda.get_device_properties(device)
    spec = next((v for k, v in SPEC_TBPS.items() if k in props.name), None)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        driver = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "memory_gb": round(props.total_memory / 1e9, 1),
        "spec_tbps": spec,
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "ensel_commit": commit.stdout.strip() or None,
        "backends": {n: runs_on(n, device) for n in FUSED},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def runs_on(backend: str, device: torch.device) -> bool:
    if backend not in ensel.backends.names():
        return False
    b = ensel.backends.get(backend)
    return device.type in b.device_types and b.available()


def update_bytes(N: int, K: int, itemsize: int, labels: bool) -> int:
    """Bytes one update of N rows moves: the logits, pbar_sum read + written, and per sample
    entropy_sum and members read + written and one argmax written (plus, with labels, the label
    read and correct, last_correct, forgetting, nll_max, nll_sum read + written)."""
    per_sample = 8 + 8 + 4 + ((8 + 5 * 8) if labels else 0)
    return N * K * (itemsize + 8) + N * per_sample


def make_logits(E, N, K, device, seed=0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 1009 * K + E)
    x = torch.randn(E, N, K, device=device, generator=g)
    x.add_(torch.randn(N, K, device=device, generator=g).mul_(2.0))
    return x


class Timer:
    """Milliseconds of one call: CUDA events on the current stream (wall clock on a CPU dry run)."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.cuda = fn, device.type == "cuda"

    def __call__(self) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            self.fn()
            return 1e3 * (time.perf_counter() - t0)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)


def prepare(name: str, x: torch.Tensor, labels, compiled) -> tuple[object, int]:
    """(zero-argument callable, bytes it moves) for row `name`."""
    E, N, K = x.shape
    logit_bytes = x.numel() * x.element_size()
    if name in ("cuda_update", "triton_update"):
        backend = name.split("_")[0]
        acc = ensel.Accumulator(N, K, labels=labels, device=x.device, backend=backend, num_members=1024)
        member = x[0]
        return (lambda: acc.update(member, start=0)), update_bytes(N, K, x.element_size(), labels is not None)
    if name == "memcpy":
        out = torch.empty_like(x)
        return (lambda: out.copy_(x)), logit_bytes
    if name == "compile":
        return (lambda: compiled(x, labels)), logit_bytes
    fn = P.PROVIDERS[name]
    return (lambda: fn(x, labels)), logit_bytes


def check_agreement(x, labels) -> str:
    """cuda against triton on this case's logits: 'ok' or what differs."""
    if not all(runs_on(b, x.device) for b in FUSED):
        return "n/a (a backend is not available)"
    a, b = (ensel.score(x, labels, backend=n).to_dict() for n in FUSED)
    tol = 1e-5 * (1 + math.log(x.shape[-1]))
    bad = []
    for name in a:
        if a[name].dtype == torch.int64 or name in ("variation_ratio", "error_count"):
            if not torch.equal(a[name], b[name]):
                bad.append(f"{name}: {int((a[name] != b[name]).sum())} differ")
        elif name == "nll":
            if not torch.allclose(a[name], b[name], atol=tol, rtol=1e-6, equal_nan=False):
                bad.append(name)
        elif float((a[name] - b[name]).abs().max()) > tol:
            bad.append(f"{name}: max diff {float((a[name] - b[name]).abs().max()):.2e}")
    return "ok" if not bad else "; ".join(bad)


def run_case(case, x, labels, names, args, compiled, spec_gbps) -> list[dict]:
    E, N, K, dtype = case["E"], case["N"], case["K"], case["dtype"]
    rows, timers = [], {}
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
    else:
        free = float("inf")
    for name in names:
        row = dict(provider=name, dtype=dtype, E=E, N=N, K=K, skipped=None)
        rows.append(row)
        need = P.MEMORY_FACTOR.get(name, 0.0) * x.numel() * 4
        if need > 0.85 * free:
            row["skipped"] = f"memory: needs ~{need / 1e9:.1f} GB, {0.85 * free / 1e9:.1f} GB free"
            continue
        try:
            fn, row["bytes"] = prepare(name, x, labels, compiled)
            timer = Timer(fn, x.device)
            t0 = time.perf_counter()
            timer()
            row["first_call_s"] = time.perf_counter() - t0  # includes JIT/autotuning/compilation
            warm = timer()
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
            row["skipped"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
            continue
        row["reps"] = max(args.min_reps, min(args.max_reps, int(args.budget * 1e3 / max(warm, 1e-3))))
        row["times_ms"] = []
        timers[name] = timer
    for r in range(max((row.get("reps", 0) for row in rows), default=0)):
        for row in rows:
            if row["skipped"] is None and r < row["reps"]:
                row["times_ms"].append(timers[row["provider"]]())
    timers.clear()
    by = {}
    for row in rows:
        if row["skipped"] is None:
            row["ms"] = statistics.median(row["times_ms"])
            row["gbps"] = row["bytes"] / row["ms"] / 1e6
            by[row["provider"]] = row
    copy_gbps = 2 * by["memcpy"]["gbps"] if "memcpy" in by else None
    for row in rows:
        if row["skipped"] is not None:
            continue
        row["frac_spec"] = row["gbps"] / spec_gbps if spec_gbps else None
        row["frac_copy"] = row["gbps"] / copy_gbps if copy_gbps and row["provider"] != "memcpy" else None
        for key, other in (("speedup_eager", "eager"), ("speedup_compile", "compile")):
            o = by.get(other)
            fused_like = not row["provider"].endswith("_update") and row["provider"] != "memcpy"
            row[key] = o["ms"] / row["ms"] if o and fused_like else None
    agreement = check_agreement(x, labels)
    for row in rows:
        row["cuda_vs_triton"] = agreement
    return rows


def fmt(v, spec, width):
    return f"{'-':>{width}}" if v is None else f"{format(v, spec):>{width}}"


def table(rows) -> str:
    head = (
        f"{'provider':<14} {'dtype':<8} {'E':>3} {'N':>9} {'K':>5} {'reps':>4} {'ms':>9} {'GB/s':>8} "
        f"{'%spec':>6} {'%copy':>6} {'x eager':>8} {'x compile':>9}"
    )
    lines, last = [head, "-" * len(head)], None
    for row in rows:
        key = (row["E"], row["N"], row["K"], row["dtype"])
        if last is not None and key != last:
            lines.append(f"  (cuda vs triton: {prev_agreement})")
            lines.append("")
        last, prev_agreement = key, row["cuda_vs_triton"]
        lead = f"{row['provider']:<14} {row['dtype']:<8} {row['E']:>3} {row['N']:>9} {row['K']:>5}"
        if row["skipped"] is not None:
            lines.append(f"{lead}  skipped ({row['skipped']})")
            continue
        pct = lambda v: None if v is None else 100 * v  # noqa: E731
        lines.append(
            f"{lead} {row['reps']:>4} {row['ms']:>9.3f} {row['gbps']:>8.0f} {fmt(pct(row['frac_spec']), '.0f', 6)} "
            f"{fmt(pct(row['frac_copy']), '.0f', 6)} {fmt(row['speedup_eager'], '.1f', 8)} "
            f"{fmt(row['speedup_compile'], '.1f', 9)}"
        )
    if rows:
        lines.append(f"  (cuda vs triton: {prev_agreement})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/gpu-<card>)")
    ap.add_argument("--providers", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--K", default=None, help="only these class counts, e.g. 100,32000")
    ap.add_argument("--E", default=None, help="only these ensemble sizes")
    ap.add_argument("--dtypes", default=None, help="only these dtypes")
    ap.add_argument("--gb", type=float, default=4.0, help="float32 logit gigabytes per case (sets N)")
    ap.add_argument("--labels", action="store_true", help="score with labels too")
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of repeats per row and case")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu for a dry run of this script")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_report: no CUDA device (use --device cpu for a dry run of the script)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    if set(names) - set(ROWS):
        ap.error(f"unknown rows {sorted(set(names) - set(ROWS))}; choose from {ROWS}")
    cases = quick_cases() if args.quick else full_cases(args.gb)
    for key, conv in (("E", int), ("K", int), ("dtypes", str)):
        if getattr(args, key):
            field = "dtype" if key == "dtypes" else key
            keep = {conv(v) for v in getattr(args, key).split(",")}
            cases = [c for c in cases if c[field] in keep]
    info = card(device)
    spec_gbps = info["spec_tbps"] * 1e3 if info["spec_tbps"] else None
    out = args.out or HERE / "results" / f"gpu-{info['gpu'].replace(' ', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"ensel GPU report: {info}", flush=True)
    compiled = torch.compile(P.eager_scores, dynamic=True)
    rows, start, x32, key = [], time.perf_counter(), None, None
    for case in cases:
        E, N, K = case["E"], case["N"], case["K"]
        if key != (E, N, K):
            x32 = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            x32, key = make_logits(E, N, K, device), (E, N, K)
        x = x32 if case["dtype"] == "float32" else x32.to(DTYPES[case["dtype"]])
        labels = torch.randint(0, K, (N,), device=device) if args.labels else None
        case_rows = run_case(case, x, labels, names, args, compiled, spec_gbps)
        rows += case_rows
        del x
        print(f"\n[{time.perf_counter() - start:5.0f} s]\n{table(case_rows)}", flush=True)
        # After every case, so that a run cut short by a time limit keeps what it measured.
        write(out, info, args, rows, names, spec_gbps, time.perf_counter() - start, len(cases))
    total = time.perf_counter() - start
    print("\n" + "=" * 100 + "\n" + table(rows) + f"\n\nTotal wall time: {total:.0f} s")
    print(f"wrote {out}/gpu_report.{{json,txt,png}}")
    return 0


def write(out: Path, info, args, rows, names, spec_gbps, wall_s: float, num_cases: int) -> None:
    done = len({(r["E"], r["K"], r["dtype"]) for r in rows})
    payload = {
        "machine": info,
        "labels": args.labels,
        "gb": args.gb,
        "cases_done": f"{done} of {num_cases}",
        "wall_s": round(wall_s, 1),
        "results": rows,
    }
    (out / "gpu_report.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    header = (
        f"ensel GPU report: {info['gpu']}, driver {info['driver']}, torch {info['torch']}, triton {info['triton']}, "
        f"ensel {info['ensel_commit']}, {info['date']}; {done} of {num_cases} cases, {wall_s:.0f} s\n\n"
    )
    (out / "gpu_report.txt").write_text(header + table(rows) + "\n")
    ceilings = [(spec_gbps, "spec HBM bandwidth", "--"), (0.9 * spec_gbps, "90% of spec (target)", ":")] if spec_gbps else []
    plot_gbps(rows, names, out / "gpu_report.png", f"ensel on {info['gpu']} ({info['date'][:10]})", ceilings)


if __name__ == "__main__":
    sys.exit(main())
