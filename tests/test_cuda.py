"""The CUDA backend (csrc/cuda, ensel/backends/cuda.py).

Here, without a GPU: the kernels are in the module's sm_80 and sm_90 cubins, the backend says why
it is unavailable, and the merge algebra the kernels use across threads (cuda/row_stats.h) agrees
with process_row on the host. With a GPU (skipped otherwise): a few contract checks per kernel
strategy (lane / 4 lanes / warp / block per sample, pbar in shared or global memory), unaligned and
strided input, streaming, and invalid input. The whole contract suite runs on CUDA through
ENSEL_TEST_DEVICE=cuda (tests/device_shim.py).
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import subprocess

import pytest
import torch

import ensel
from ensel import _C
from ensel._inputs import DTYPE_CODES
from helpers import (
    assert_matches_reference,
    assert_scores_equal,
    assert_streaming_matches_fused,
    feed,
    make_labels,
    make_logits,
    stream_batches,
)
from test_build import _cuobjdump

NVCC = shutil.which("nvcc")
BACKEND = ensel.backends.get("cuda")
HAS_GPU = BACKEND.available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason=f"needs a CUDA device ({BACKEND.why_unavailable() or 'none'})")

DTYPE_MANGLING = {"f": "float32", "d": "float64", "BFloat16": "bfloat16", "Half": "float16"}
DTYPES = sorted(DTYPE_MANGLING.values())
# Every kernel the launchers can pick: (name, lanes per row or None) for each dtype.
EXPECTED_KERNELS = {
    (name, dtype, lanes)
    for dtype in DTYPES
    for name, lanes_set in [
        ("fused_group_kernel", (1, 4, 32)),
        ("update_group_kernel", (1, 4, 32)),
        ("check_kernel", (1, 4, 32)),
        ("fused_block_kernel", (None,)),
        ("update_block_kernel", (None,)),
    ]
    for lanes in lanes_set
} | {("finalize_kernel", None, None)}


KERNEL_SYMBOL = re.compile(
    r"\d(fused_group_kernel|fused_block_kernel|update_group_kernel|update_block_kernel|check_kernel|finalize_kernel)"
    r"I(f|d|v|NS_\d+(BFloat16|Half)E)(?:Li(\d+)E)?E"
)


def _entry_kernels(symbols: str) -> dict[str, set]:
    """{arch: {(kernel, dtype, lanes)}} of the kernel entry points in each ELF section of
    `cuobjdump -symbols` output (PTX sections are skipped)."""
    found: dict[str, set] = {}
    arch, in_elf = None, False
    for line in symbols.splitlines():
        if line.startswith("Fatbin"):
            in_elf = "elf" in line
        m = re.match(r"arch = (sm_\d+)", line.strip())
        if m:
            arch = m.group(1)
        if in_elf and "STO_ENTRY" in line:
            symbol = line.split()[-1]
            k = KERNEL_SYMBOL.search(symbol)
            assert k, f"unexpected kernel entry {symbol}"
            name, code, struct, lanes = k.groups()
            dtype = None if code == "v" else DTYPE_MANGLING[struct or code]
            found.setdefault(arch, set()).add((name, dtype, int(lanes) if lanes else None))
    return found


# ----------------------------------------------------------------------------- without a GPU


def test_cuda_entry_points_exist_iff_compiled():
    names = {"fused_cuda", "update_cuda", "finalize_cuda", "fused_cuda_workspace", "update_cuda_workspace",
             "finalize_cuda_workspace"}  # fmt: skip
    assert names <= set(dir(_C)) if _C.cuda_compiled else not (names & set(dir(_C)))


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_every_kernel_is_built_for_sm80_and_sm90():
    symbols = subprocess.run([_cuobjdump(), "-symbols", _C.__file__], capture_output=True, text=True, check=True)
    found = _entry_kernels(symbols.stdout)
    for arch in ("sm_80", "sm_90"):
        assert arch in found, f"no {arch} ELF in the module: {sorted(found)}"
        missing = EXPECTED_KERNELS - found[arch]
        assert not missing, f"{arch} lacks {sorted(missing, key=str)}"


def test_unavailable_backend_says_why():
    if HAS_GPU:
        pytest.skip("a CUDA device is present: the backend is available")
    reason = BACKEND.why_unavailable()
    assert not BACKEND.available()
    assert reason
    if not _C.cuda_compiled:
        assert "without CUDA" in reason
    else:
        assert "CUDA device" in reason
    # An explicit request for the backend names it and the reason.
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        ensel.Accumulator(3, 2, device="cuda", backend="cuda")


def test_backend_is_registered_but_not_picked_by_auto():
    assert "cuda" in ensel.backends.names()
    assert BACKEND.device_types == {"cuda"}
    assert BACKEND.verified is False


def _parts_for(K: int) -> int:
    """Threads that share a row in the kernels (csrc/cuda/device.cuh lanes_per_row; blocks of 512)."""
    return 1 if K <= 32 else 4 if K <= 128 else 32 if K <= 1024 else 512


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("K", [1, 3, 10, 33, 100, 129, 1000, 1025, 4099, 33000])
@pytest.mark.parametrize("kind", ["normal", "masked", "ties", "huge", "nan", "+inf", "all -inf", "nan after +inf"])
def test_row_statistics_merged_across_threads_match_process_row(dtype, K, kind):
    """The online softmax per thread and its butterfly merge (what the group and block kernels
    do) against process_row / check_row on the same row: same status, same first argmax, log s
    and H(p) within float32 rounding."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(K, generator=g, dtype=torch.float64) * 3
    if kind == "masked":
        x[torch.rand(K, generator=g) < 0.6] = float("-inf")
        x[K // 2] = 0.0
    elif kind == "ties":
        x = torch.randint(0, 3, (K,), generator=g).to(torch.float64)
    elif kind == "huge":
        x = x * (1e3 if dtype == torch.float16 else 1e4)
    elif kind == "nan":
        x[K - 1] = float("nan")
    elif kind == "+inf":
        x[K // 3] = float("inf")
    elif kind == "all -inf":
        x[:] = float("-inf")
    elif kind == "nan after +inf" and K > 1:
        x[K // 2] = float("inf")
        x[K - 1] = float("nan")
    x = x.to(dtype)
    merged, direct = _C._row_stats_by_parts(x.data_ptr(), DTYPE_CODES[dtype], K, _parts_for(K))
    assert merged[0] == direct[0], f"status: merged {merged}, process_row {direct}"
    if direct[0] != 0:
        return
    assert merged[1] == direct[1] == int(x.to(torch.float64).argmax()), (merged, direct)
    assert merged[2] == pytest.approx(direct[2], rel=2e-6, abs=2e-6)
    assert merged[3] == pytest.approx(direct[3], abs=1e-5)


# ----------------------------------------------------------------------------- on a GPU

# One shape per strategy: a lane per sample (K <= 32), 4 lanes (K <= 128), a warp (K <= 1024), a
# block (K > 1024); N not a multiple of any tile, so the last tile has samples beyond N.
STRATEGY_SHAPES = [(5, 301, 10), (3, 77, 100), (4, 19, 1000), (3, 5, 1500), (2, 3, 33000)]


def _shape_id(shape):
    return "x".join(map(str, shape))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", STRATEGY_SHAPES, ids=_shape_id)
def test_fused_matches_reference_and_cpu(shape, dtype):
    E, N, K = shape
    logits = make_logits(E, N, K, dtype, kind="ties" if K <= 100 else "masked", seed=K)
    labels = make_labels(N, K, seed=K)
    s = ensel.score(logits.cuda(), labels=labels.cuda(), backend="cuda")
    assert s.entropy.device.type == "cuda"
    cpu_scores = _to_cpu(s)
    assert_matches_reference(cpu_scores, logits, labels)
    on_cpu = ensel.score(logits, labels=labels, backend="cpu")
    for name in ("mode", "mode_votes", "variation_ratio", "vote_entropy", "error_count", "forgetting"):
        assert torch.equal(getattr(cpu_scores, name).cpu(), getattr(on_cpu, name)), name


@needs_gpu
@pytest.mark.parametrize("K", [7, 100, 1000, 1500])
def test_unaligned_and_strided_rows_use_scalar_loads(K):
    """Odd offsets and strides (no 16-byte row alignment) and a member-major view."""
    E, N = 3, 45
    base = make_logits(E, 2 * N + 1, K + 1, torch.float32, seed=3)
    view = base[:, 1::2, 1:]  # rows start one element in: never 16-byte aligned
    labels = make_labels(N, K, seed=3)
    s = ensel.score(view.cuda(), labels=labels.cuda(), backend="cuda")
    assert_matches_reference(_to_cpu(s), view.contiguous(), labels)
    transposed = make_logits(N, E, K, torch.bfloat16, seed=4).transpose(0, 1)  # [E, N, K] view, sample-major
    s = ensel.score(transposed.cuda(), backend="cuda")
    assert_matches_reference(_to_cpu(s), transposed.contiguous(), None)


@needs_gpu
def test_block_kernel_with_pbar_beyond_shared_memory():
    """K larger than any GPU's shared memory per block (227 KB): pbar in the global workspace."""
    logits = make_logits(2, 3, 70001, torch.bfloat16, seed=5)
    labels = make_labels(3, 70001, seed=5)
    s = ensel.score(logits.cuda(), labels=labels.cuda(), backend="cuda")
    assert_matches_reference(_to_cpu(s), logits, labels)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_shared_memory_just_below_48_kb_with_the_static_arrays(dtype):
    """K = 12200: K floats of dynamic shared memory (47.7 KB) plus the block and finalize kernels'
    static arrays (0.7 to 1.7 KB) exceed the 48 KB a block gets without the opt-in, although the
    dynamic part alone does not: the launchers must opt in on the sum (they once tested the dynamic
    part alone, and these launches failed)."""
    E, N, K = 2, 5, 12200
    logits = make_logits(E, N, K, dtype, kind="masked", seed=9)
    labels = make_labels(N, K, seed=9)
    fused = ensel.score(logits.cuda(), labels=labels.cuda(), backend="cuda")
    assert_matches_reference(_to_cpu(fused), logits, labels)
    acc = ensel.Accumulator(N, K, labels=labels.cuda(), device="cuda", backend="cuda")
    for member in logits.cuda():
        acc.update(member)
    assert_streaming_matches_fused(acc.finalize(), fused, K)


@needs_gpu
@pytest.mark.parametrize("shape", [(4, 33, 10), (3, 70, 100), (3, 9, 1000), (2, 4, 1500)], ids=_shape_id)
def test_streaming_matches_fused_and_reference(shape):
    E, N, K = shape
    logits = make_logits(E, N, K, torch.float32, kind="ties", seed=6).cuda()
    labels = make_labels(N, K, seed=6).cuda()
    acc = ensel.Accumulator(N, K, labels=labels, device="cuda", backend="cuda")
    feed(acc, logits, stream_batches(E, N, random.Random(0)))
    streamed = acc.finalize()
    fused = ensel.score(logits, labels=labels, backend="cuda")
    assert_streaming_matches_fused(streamed, fused, K)
    assert_matches_reference(_to_cpu(streamed), logits.cpu(), labels.cpu())


@needs_gpu
@pytest.mark.parametrize("K", [5, 100, 1500])
def test_invalid_rows_first_offender_and_nothing_applied(K):
    E, N = 4, 300
    logits = make_logits(E, N, K, torch.float32, seed=7)
    logits[2, 3, 1] = float("nan")
    logits[1, N - 6, 1] = float("inf")
    logits[1, N - 5, :] = float("-inf")
    logits[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\+inf logit at member 1, sample 294\b"):
        ensel.score(logits.cuda(), backend="cuda")

    acc = ensel.Accumulator(N, K, device="cuda", backend="cuda")
    acc.update(logits[0].cuda())
    before = {name: t.clone() for name, t in acc._state.tensors().items()}
    with pytest.raises(ValueError, match=r"\+inf logit at member 1, sample 294\b"):
        acc.update(logits[1].cuda())
    for name, t in acc._state.tensors().items():
        assert torch.equal(t, before[name]), f"{name} changed by a failed update"
    good = logits[1].clone()
    good[N - 6 :] = 0.0
    acc.update(good.cuda())  # the accumulator still works after a refused batch
    assert acc.members.cpu().tolist() == [2] * N


@needs_gpu
def test_empty_and_single_sample_calls():
    s = ensel.score(torch.randn(3, 0, 4, device="cuda"), backend="cuda")
    assert s.entropy.shape == (0,)
    one = make_logits(1, 1, 1, torch.float32)
    s = ensel.score(one.cuda(), backend="cuda")
    assert float(s.margin[0]) == 1.0 and float(s.entropy[0]) == 0.0


@needs_gpu
def test_repeated_calls_are_deterministic():
    logits = make_logits(8, 500, 1000, torch.bfloat16, seed=8).cuda()
    assert_scores_equal(ensel.score(logits, backend="cuda"), ensel.score(logits, backend="cuda"))


def _to_cpu(scores: ensel.Scores) -> ensel.Scores:
    fields = {f.name: getattr(scores, f.name) for f in dataclasses.fields(scores)}
    return type(scores)(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
