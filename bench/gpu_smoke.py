"""A small run of every GPU kernel, for compute-sanitizer (bench/gpu.sh) and as a quick check.

    python3 bench/gpu_smoke.py [--backends cuda,triton] [--quick]

For each backend: the fused kernel and the streaming update + finalize over class counts that
cross every strategy boundary (K = 1 ... 33000), odd sample counts, every dtype, with and without
labels, strided input, and an invalid row (which must raise the contract's ValueError naming the
first offender and leave a streaming state unchanged); every result is compared with the float64
reference. It also checks that the fused path allocates O(N) beyond its input on the GPU (the
CUDA caching allocator's peak), as docs/contract.md section 12 states. Exits 1 on the first wrong answer.

Sizes are small on purpose: under compute-sanitizer every access is instrumented (10-100x slower).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import ensel

# Every strategy boundary of both backends: CUDA's 1 / 4 / 32 lanes per sample (K <= 32, 128,
# 1024), its block kernel with pbar in shared memory (K = 12200 is just under 48 KB with the
# static arrays) or in a global workspace (K = 70001); Triton's tile (K <= 4096) and chunk paths.
KS = (1, 2, 7, 10, 33, 64, 65, 100, 129, 257, 1000, 1025, 1500, 4097, 12200, 33000, 70001)
QUICK_KS = (10, 100, 1000, 1500, 12200, 70001)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check(scores: ensel.Scores, x: torch.Tensor, labels, what: str) -> None:
    want = ensel.reference_scores(x, labels)
    K = x.shape[-1]
    tol = 1e-5 * (1 + math.log(K))
    for name, got in scores.to_dict().items():
        exp = want[name].to(got.device)
        if name in ("mode", "mode_votes", "forgetting"):
            ok = torch.equal(got, exp)
        elif name in ("variation_ratio", "error_count"):
            ok = torch.equal(got, exp.float())
        else:
            inf = torch.isinf(exp)
            ok = torch.equal(torch.isinf(got), inf) and bool(
                ((got.double() - exp.double()).abs()[~inf] <= tol + (8 * 2.0**-24) * exp.abs()[~inf]).all()
            )
        if not ok:
            raise AssertionError(f"{what}: {name} differs from the reference\n got {got[:8]}\nwant {exp[:8]}")


def make(E, N, K, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(E, N, K, generator=g, dtype=torch.float64) * 3
    x[torch.rand(E, N, K, generator=g) < 0.2] = float("-inf")
    x[..., 0] = torch.randn(E, N, generator=g, dtype=torch.float64)  # never a row of all -inf
    return x.to(dtype).to(device)


def run_backend(backend: str, device, quick: bool) -> int:
    cases = 0
    ks = QUICK_KS if quick else KS
    for K in ks:
        for dtype in DTYPES[:2] if quick else DTYPES:
            E, N = (3, 37) if K < 4000 else (2, 5)
            x = make(E, N, K, dtype, device, seed=K)
            labels = torch.randint(0, K, (N,), device=device)
            for y in (labels, None):
                what = f"{backend} K={K} {dtype} {'labels' if y is not None else 'no labels'}"
                check(ensel.score(x, y, backend=backend), x, y, f"{what} fused")
                acc = ensel.Accumulator(N, K, labels=y, device=device, backend=backend)
                for e in range(E):
                    cut = N // 3
                    acc.update(x[e, cut:], start=cut)
                    acc.update(x[e, :cut], start=0)
                check(acc.finalize(), x, y, f"{what} stream")
                cases += 2
            # strided: every other sample of a wider tensor, members reversed
            wide = make(E, 2 * N, K, dtype, device, seed=K + 1)
            view = wide.flip(0)[:, ::2]
            check(ensel.score(view, labels, backend=backend), view, labels, f"{backend} K={K} {dtype} strided")
            cases += 1
    # invalid input: NaN at (member 1, sample 3) and +inf at (member 2, sample 0): member-major order
    x = make(3, 9, 100, torch.float32, device, seed=1)
    x[1, 3, 5], x[2, 0, 7] = float("nan"), float("inf")
    try:
        ensel.score(x, backend=backend)
        raise AssertionError(f"{backend}: NaN input was not refused")
    except ValueError as e:
        if "member 1, sample 3" not in str(e):
            raise AssertionError(f"{backend}: wrong first offender: {e}") from None
    acc = ensel.Accumulator(9, 100, device=device, backend=backend)
    acc.update(make(1, 9, 100, torch.float32, device, seed=2)[0])
    before = acc.members
    try:
        acc.update(x[1])
        raise AssertionError(f"{backend}: an invalid streaming batch was not refused")
    except ValueError:
        pass
    if not torch.equal(acc.members, before):
        raise AssertionError(f"{backend}: a refused batch changed the state")
    cases += 2
    # O(N) beyond the input: the caching allocator's peak during a fused call.
    if device.type == "cuda":
        x = make(16, 4000, 1000, torch.bfloat16, device, seed=3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ensel.score(x, backend=backend)
        extra = torch.cuda.max_memory_allocated() - base
        bound = 64 * x.shape[1] + (4 << 20)  # the outputs (11 x 8 bytes per sample) and a little scratch
        if extra > bound:
            raise AssertionError(f"{backend}: fused scoring allocated {extra / 1e6:.1f} MB beyond its input")
        cases += 1
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="one K per strategy, two dtypes")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    failed = False
    for backend in args.backends.split(","):
        try:
            n = run_backend(backend, device, args.quick)
            print(f"gpu_smoke: {backend}: {n} cases agree with the reference", flush=True)
        except Exception as e:  # report every backend, then fail
            failed = True
            print(f"gpu_smoke: {backend}: FAILED: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
