"""The Triton kernels (kernels/, shipped as ensel.kernels) against the contract.

Without a GPU they run under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET),
at about 3 ms per program instance: the shapes here keep grids to a few programs while still
reaching every strategy (many samples per program for K <= 64, a few rows per program up to
TILE_MAX_K, K-chunks with an online softmax beyond: shrunk thresholds reach it at small K, and one
real 33000-class case runs with the shipped thresholds). Under ENSEL_TEST_DEVICE=cuda
(bench/gpu.sh) tests/device_shim.py moves the same calls onto the GPU.

The interpreter accepts code the compiler refuses (a `range` variable is a Python int there, a
non-constexpr global is fine), so one test also compiles every kernel for sm_90 in a subprocess
without the interpreter; that needs no GPU.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import ensel
from device_shim import DEVICE
from helpers import (
    assert_matches_reference,
    assert_scores_equal,
    assert_streaming_matches_fused,
    expected_vote_entropy,
    feed,
    make_labels,
    make_logits,
    mask_label_everywhere,
    run_scoring,
    stream_batches,
)

_backend = ensel.backends.get("triton")
if not _backend.available() or ("cpu" not in _backend.device_types and DEVICE.type != "cuda"):
    pytest.skip(
        "the Triton backend runs here neither under the interpreter (TRITON_INTERPRET=1) nor on a GPU "
        f"through ENSEL_TEST_DEVICE=cuda ({_backend.why_unavailable() or 'CUDA present, interpreter off'})",
        allow_module_level=True,
    )

from ensel.kernels import launch  # noqa: E402  (after conftest has chosen interpreter or compiler)

NAN, INF = float("nan"), float("inf")

# The interpreter runs the kernels in numpy, which warns about the inf / NaN arithmetic of padded
# lanes and invalid rows that the kernels mask or select away (a GPU does the same silently).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture
def chunked(monkeypatch):
    """Sends K > 32 down the K-chunk path in chunks of 32 classes (the shipped threshold, 4096,
    would make the interpreter walk thousands of classes per row)."""
    monkeypatch.setattr(launch, "TILE_MAX_K", 32)
    monkeypatch.setattr(launch, "CHUNK_K", 32)


def check_all_modes(logits, labels, modes=("fused", "stream")):
    results = {}
    for mode in modes:
        results[mode] = run_scoring(logits, labels, backend="triton", mode=mode, seed=len(results))
        assert_matches_reference(results[mode], logits, labels)
    if "fused" in results:
        for mode, scores in results.items():
            K = logits.shape[2]
            assert_streaming_matches_fused(scores, results["fused"], K)
    return results


# ----------------------------------------------------------------------------- strategies by K

# (E, N, K): N chosen so that the grid has a partial last block of samples.
TILE_SHAPES = [(3, 70, 1), (4, 70, 2), (3, 70, 7), (3, 40, 64), (3, 40, 65), (3, 9, 1000)]


@pytest.mark.parametrize("E, N, K", TILE_SHAPES, ids=[f"K{k}" for _, _, k in TILE_SHAPES])
def test_tile_strategies_match_reference(E, N, K):
    logits = make_logits(E, N, K, seed=K)
    check_all_modes(logits, make_labels(N, K, seed=K))
    check_all_modes(logits, None, modes=("fused",))


@pytest.mark.parametrize("K", [33, 97, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_chunk_strategy_matches_reference(chunked, K, dtype):
    logits = make_logits(3, 5, K, dtype, seed=K)
    check_all_modes(logits, make_labels(5, K, seed=K))


def test_chunk_strategy_without_labels_and_one_member(chunked):
    check_all_modes(make_logits(1, 4, 70, seed=3), None)


def test_33000_classes_with_the_shipped_thresholds():
    """The real K-chunk path: 33000 classes in chunks of CHUNK_K, masked entries, the label's
    probability tiny; a row whose first chunks are all -inf."""
    E, N, K = 2, 3, 33000
    logits = make_logits(E, N, K, torch.bfloat16, kind="masked", seed=5)
    logits[:, 1, : 2 * launch.CHUNK_K] = -INF
    assert K > launch.TILE_MAX_K
    check_all_modes(logits, make_labels(N, K, seed=5))


# ----------------------------------------------------------------------------- ties, masks, magnitudes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("K", [3, 65])
def test_ties_are_broken_toward_the_lowest_class(dtype, K):
    """Logits in {0, 1, 2}: argmax and mode ties everywhere; the discrete scores are exact."""
    logits = make_logits(6, 40, K, dtype, kind="ties", seed=K)
    check_all_modes(logits, make_labels(40, K, seed=K), modes=("fused", "stream", "iterable"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_ties_on_the_chunk_path(chunked, dtype):
    logits = make_logits(5, 6, 80, dtype, kind="ties", seed=7)
    check_all_modes(logits, make_labels(6, 80, seed=7))


def test_mode_tie_between_classes_far_apart(chunked):
    """Two classes with equal votes in different chunks: the lower one is the mode."""
    E, N, K = 4, 2, 100
    logits = torch.zeros(E, N, K)
    for e, cls in enumerate([90, 5, 90, 5]):
        logits[e, :, cls] = 1.0
    for mode in ("fused", "stream"):
        s = run_scoring(logits, None, backend="triton", mode=mode)
        assert s.mode.tolist() == [5, 5] and s.mode_votes.tolist() == [2, 2], mode


def test_mode_tie_across_blocks_of_members(chunked, monkeypatch):
    """The pairwise mode (K-chunk path, and streaming finalize for K > 64) compares member
    argmaxes in blocks of MODE_BLOCK_E; a tie between blocks still goes to the lower class."""
    monkeypatch.setattr(launch, "MODE_BLOCK_E", 2)
    E, N, K = 5, 2, 100
    logits = torch.zeros(E, N, K)
    for e, cls in enumerate([90, 90, 5, 5, 7]):
        logits[e, :, cls] = 1.0
    logits[:, 1] = logits[:, 1].flip(0)  # sample 1 sees the members in reverse
    for mode in ("fused", "stream"):
        s = run_scoring(logits, None, backend="triton", mode=mode)
        assert s.mode.tolist() == [5, 5] and s.mode_votes.tolist() == [2, 2], mode
        assert_matches_reference(s, logits)
        # counts (2, 2, 1) summed over blocks of 2 members, in either member order: equal bits
        want = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
        assert torch.equal(s.vote_entropy, torch.tensor([want, want], dtype=torch.float32)), mode


# (path, E, K, MODE_BLOCK_E): the one-hot votes of the fused tile and of the streaming finalize
# (K <= 64), the pairwise counts of the streaming finalize (K > 64) and of the chunk path, over
# one or several blocks of members.
VOTE_PATHS = [("tile", 9, 7, 64), ("tile", 20, 100, 64), ("tile", 20, 100, 4), ("chunk", 9, 80, 64),
              ("chunk", 13, 80, 4)]


@pytest.mark.parametrize("path, E, K, block_e", VOTE_PATHS, ids=[f"{p}-E{e}-K{k}-B{b}" for p, e, k, b in VOTE_PATHS])
def test_vote_entropy_is_exact_on_every_path(request, monkeypatch, path, E, K, block_e):
    """vote_entropy is the float32 nearest to the exact entropy of the votes (decimal arithmetic),
    fused and streamed, whichever way the kernel counts; equal count multisets in another class
    order (the classes permuted: unique maxima, so the votes follow) give the same bits."""
    if path == "chunk":
        request.getfixturevalue("chunked")
    monkeypatch.setattr(launch, "MODE_BLOCK_E", block_e)
    g = torch.Generator().manual_seed(E * K)
    N = 6
    winners = torch.randint(0, 3, (E, N), generator=g)  # 3 candidate classes: many equal multisets
    logits = torch.rand(E, N, K, generator=g)
    logits.scatter_(2, winners[..., None], 2.0)
    logits = torch.cat([logits, logits[:, :, torch.randperm(K, generator=g)]], dim=1)  # samples N..2N-1
    want = expected_vote_entropy(logits)
    assert torch.equal(want[:N], want[N:])
    for mode in ("fused", "stream"):
        got = run_scoring(logits, None, backend="triton", mode=mode).vote_entropy
        assert torch.equal(got, want), (mode, got, want)


@pytest.mark.parametrize("K", [5, 65])
def test_masked_logits_and_a_label_masked_everywhere(K):
    logits = make_logits(3, 12, K, kind="masked", seed=K)
    labels = make_labels(12, K, seed=K)
    mask_label_everywhere(logits, labels, sample=3)
    results = check_all_modes(logits, labels)
    assert results["fused"].nll[3] == INF


def test_masked_logits_on_the_chunk_path(chunked):
    logits = make_logits(3, 5, 100, kind="masked", seed=8)
    logits[:, 2, :64] = -INF  # the first two chunks of a row hold nothing finite
    labels = make_labels(5, 100, seed=8)
    mask_label_everywhere(logits, labels, sample=4)
    check_all_modes(logits, labels)


@pytest.mark.parametrize("kind", ["huge", "huge_offset"])
@pytest.mark.parametrize("K", [10, 1000])
def test_huge_magnitudes(kind, K):
    logits = make_logits(3, 9, K, kind=kind, seed=9)
    check_all_modes(logits, make_labels(9, K, seed=9))


@pytest.mark.parametrize("path", ["tile", "chunk"])
def test_float64_is_compared_in_float64(request, path):
    """1 + 1e-12 beats 1 (no tie, as float32 would make it), and 1e39 is a finite logit (float32
    would overflow it to +inf and call the row invalid)."""
    if path == "chunk":
        request.getfixturevalue("chunked")
    K = 40
    logits = torch.zeros(2, 3, K, dtype=torch.float64)
    logits[:, 0, 3] = 1.0
    logits[:, 0, 30] = 1.0 + 1e-12
    logits[:, 1, 35] = 1e39
    logits[0, 2, 7] = -1e39
    for mode in ("fused", "stream"):
        s = run_scoring(logits, None, backend="triton", mode=mode)
        assert s.mode.tolist() == [30, 35, 0], mode
        assert_matches_reference(s, logits)


# ----------------------------------------------------------------------------- layouts


def test_strided_members_and_samples():
    """Non-contiguous over members and samples (unit class stride): read in place."""
    E, N, K = 3, 30, 7
    base = make_logits(N, E, K + 3, seed=10)  # [N, E, K + 3]
    logits = base.permute(1, 0, 2)[:, ::2, 1 : K + 1]  # strides (K + 3, 2 E (K + 3), 1)
    assert not logits.is_contiguous() and logits.stride(2) == 1
    labels = make_labels(logits.shape[1], K, seed=10)
    check_all_modes(logits, labels, modes=("fused", "stream", "iterable"))


def test_strided_on_the_chunk_path_and_class_stride(chunked):
    base = make_logits(6, 3, 90, seed=11)  # [N, E, K]
    logits = base.permute(1, 0, 2)  # samples strided by E K
    check_all_modes(logits, make_labels(6, 90, seed=11))
    transposed = make_logits(3, 70, 6, seed=12).transpose(1, 2)  # class stride != 1: copied
    check_all_modes(transposed, None, modes=("fused",))


def test_inputs_are_not_mutated():
    logits = make_logits(3, 20, 9, torch.bfloat16, kind="masked", seed=13)
    labels = make_labels(20, 9, seed=13)
    before_logits, before_labels = logits.clone(), labels.clone()
    for mode in ("fused", "stream", "iterable"):
        run_scoring(logits, labels, backend="triton", mode=mode)
    assert torch.equal(logits, before_logits) and torch.equal(labels, before_labels)


def test_label_fields_without_labels_match_the_reference_backend():
    """The packed outputs without labels: forgetting 0 and NaN error_count / nll, as the
    reference backend writes them (Scores drops those fields)."""
    logits = make_logits(3, 10, 5, seed=14)
    if DEVICE.type == "cuda":
        logits = logits.to(DEVICE)
    floats, ints = _backend.fused(logits, None)
    want_floats, want_ints = ensel.backends.get("reference").fused(logits, None)
    assert floats.shape == (9, 10) and floats.dtype == torch.float32
    assert ints.shape == (3, 10) and ints.dtype == torch.int64
    assert torch.equal(ints.cpu(), want_ints.cpu())
    label_rows = [ensel._fields.FLOAT_FIELDS.index(name) for name in ("error_count", "nll")]
    assert torch.isnan(floats[label_rows]).all() and torch.isnan(want_floats[label_rows]).all()
    others = [i for i in range(9) if i not in label_rows]  # vote_entropy among them: no labels needed
    assert not torch.isnan(floats[others]).any()
    from ensel.kernels import _rowmath

    assert _rowmath.NUM_FLOAT_FIELDS == len(ensel._fields.FLOAT_FIELDS)
    assert _rowmath.NUM_INT_FIELDS == len(ensel._fields.INT_FIELDS)
    for fields in (ensel._fields.FLOAT_FIELDS, ensel._fields.INT_FIELDS):
        for i, name in enumerate(fields):  # the kernels' column constants, by name
            assert getattr(_rowmath, name.upper()).value == i, name


# ----------------------------------------------------------------------------- invalid input


def _names(msg: str, member: int, sample: int) -> bool:
    return f"member {member}," in msg and f"sample {sample}" in msg


def _set_bad(logits, member, sample, kind):
    if kind == "nan":
        logits[member, sample, 1] = NAN
    elif kind == "+inf":
        logits[member, sample, 2] = INF
    else:
        logits[member, sample, :] = -INF


@pytest.mark.parametrize("path", ["tile", "chunk"])
@pytest.mark.parametrize("mode", ["fused", "stream", "iterable"])
def test_invalid_rows_name_the_first_offender(request, path, mode):
    """NaN, +inf and all -inf rows in (member, sample) order: the earliest member wins over the
    earliest sample, whichever program or batch holds it."""
    if path == "chunk":
        request.getfixturevalue("chunked")
    K = 5 if path == "tile" else 70
    logits = make_logits(4, 40, K, seed=15)
    _set_bad(logits, 3, 0, "nan")
    _set_bad(logits, 2, 38, "all -inf")
    _set_bad(logits, 2, 39, "nan")
    _set_bad(logits, 3, 38, "+inf")  # a sample bad at two members is named at the first
    with pytest.raises(ValueError, match="row of all -inf logits") as info:
        run_scoring(logits, None, backend="triton", mode=mode)
    assert _names(str(info.value), 2, 38), str(info.value)
    # NaN before +inf in one row is a NaN; +inf before NaN a +inf.
    logits = make_logits(2, 6, K, seed=16)
    logits[1, 4, K - 1], logits[1, 4, 2] = NAN, INF
    with pytest.raises(ValueError, match=r"\+inf logit") as info:
        run_scoring(logits, None, backend="triton", mode=mode)
    assert _names(str(info.value), 1, 4), str(info.value)


def test_nan_hidden_in_a_masked_row():
    logits = make_logits(3, 6, 4, seed=2)
    logits[:, :, 0] = -INF
    logits[1, 4, :] = -INF
    logits[1, 4, 3] = NAN
    for mode in ("fused", "stream"):
        with pytest.raises(ValueError, match="NaN") as info:
            run_scoring(logits, None, backend="triton", mode=mode)
        assert _names(str(info.value), 1, 4), str(info.value)


def test_first_offender_when_samples_are_at_different_members():
    """One update holding rows at different member counts: sample 0 has seen 2 members, 3 has seen
    1, so (member 1, sample 3) comes before (member 2, sample 0); samples are named in dataset
    coordinates."""
    acc = ensel.Accumulator(4, 4, backend="triton")
    acc.update(torch.zeros(4, 4), start=0)
    acc.update(torch.zeros(1, 4), start=0)
    rows = torch.zeros(4, 4)
    rows[0, 0], rows[3, 1] = NAN, INF
    with pytest.raises(ValueError) as info:
        acc.update(rows, start=0)
    assert _names(str(info.value), 1, 3), str(info.value)
    rows = torch.zeros(2, 4)
    rows[1, 2] = NAN
    with pytest.raises(ValueError) as info:
        acc.update(rows, start=2)
    assert _names(str(info.value), 1, 3), str(info.value)


@pytest.mark.parametrize("path", ["tile", "chunk"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_refused_update_changes_no_state(request, path, with_labels):
    """Each refused batch (its last row bad) leaves the state bit for bit as it was: finalizing
    equals the run that never made the bad calls."""
    if path == "chunk":
        request.getfixturevalue("chunked")
    E, N, K = 3, 12, 6 if path == "tile" else 50
    logits = make_logits(E, N, K, kind="ties", seed=17)
    labels = make_labels(N, K, seed=17) if with_labels else None
    batches = stream_batches(E, N, random.Random(17))
    clean = ensel.Accumulator(N, K, labels=labels, backend="triton")
    feed(clean, logits, batches)
    acc = ensel.Accumulator(N, K, labels=labels, backend="triton")
    for i, (e, a, b) in enumerate(batches):
        if i in (0, len(batches) - 1):
            bad = logits[e, a:b].clone()
            bad[-1, 0] = NAN if i == 0 else INF
            state = {k: v.clone() for k, v in acc._state.tensors().items()}
            with pytest.raises(ValueError):
                acc.update(bad, start=a)
            for k, v in acc._state.tensors().items():
                assert torch.equal(v[: state[k].shape[0]], state[k]), k
        acc.update(logits[e, a:b], start=a)
    assert_scores_equal(acc.finalize(), clean.finalize())


# ----------------------------------------------------------------------------- compiled for hardware

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ensel.kernels import fused, streaming

    POINTERS = {
        "labels_ptr": "*i64", "floats_ptr": "*fp32", "ints_ptr": "*i64", "fail_ptr": "*i64",
        "inv_sum_ptr": "*fp32", "argmax_ptr": "*i32", "members_ptr": "*i32", "pbar_sum_ptr": "*fp32",
        "entropy_sum_ptr": "*fp32", "history_ptr": "*i32", "correct_ptr": "*i32",
        "last_correct_ptr": "*i32", "forgetting_ptr": "*i32", "nll_max_ptr": "*fp32", "nll_sum_ptr": "*fp32",
        "vote_log_ptr": "*i64",
    }

    def compile_for(kernel, dtype, constexprs, num_warps, arch):
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name == "x_ptr":
                signature[name] = "*" + dtype
            elif name == "row_max_ptr":
                signature[name] = "*fp64" if dtype == "fp64" else "*fp32"
            elif name in POINTERS:
                signature[name] = POINTERS[name]
            else:  # strides and start as the launcher may pass them at ImageNet scale
                signature[name] = "i64" if name in ("stride_e", "start") else "i32"
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        assert len(compiled.asm["cubin"]) > 0

    def f64(dtype):
        return dtype == "fp64"

    cases = []
    for dtype, labels, block_n, block_k, warps in [
        ("fp32", True, 128, 16, 4), ("bf16", True, 4, 1024, 8), ("fp16", False, 1, 4096, 16),
        ("fp64", True, 32, 64, 4),
    ]:
        cases.append((fused.fused_tile_kernel, dtype,
                      dict(HAS_LABELS=labels, IS_F64=f64(dtype), WIDE_ROWS=dtype == "fp64", BLOCK_N=block_n,
                           BLOCK_K=block_k), warps))
    for dtype in ("bf16", "fp64"):
        cases.append((fused.fused_chunk_stats_kernel, dtype, dict(HAS_LABELS=True, IS_F64=f64(dtype), BLOCK_K=4096), 8))
        cases.append((fused.fused_chunk_finish_kernel, dtype, dict(IS_F64=f64(dtype), BLOCK_K=4096, BLOCK_E=64), 8))
        cases.append((streaming.check_kernel, dtype, dict(IS_F64=f64(dtype), BLOCK_N=2, BLOCK_K=1024), 4))
    for dtype, labels, block_n, block_k, single in [
        ("fp16", True, 128, 16, True), ("fp32", False, 1, 4096, True), ("fp64", True, 1, 4096, False),
    ]:
        cases.append((streaming.update_kernel, dtype,
                      dict(HAS_LABELS=labels, IS_F64=f64(dtype), BLOCK_N=block_n, BLOCK_K=block_k,
                           SINGLE_CHUNK=single), 8))
    for labels, one_hot, block_n, block_k in [(True, True, 128, 16), (False, False, 2, 1024)]:
        cases.append((streaming.finalize_kernel, "fp32",
                      dict(HAS_LABELS=labels, ONE_HOT_VOTES=one_hot, BLOCK_N=block_n, BLOCK_K=block_k,
                           BLOCK_E=64), 4))
    for kernel, dtype, constexprs, warps in cases:
        compile_for(kernel, dtype, constexprs, warps, 90)
    compile_for(fused.fused_tile_kernel, "bf16", dict(HAS_LABELS=True, IS_F64=False, WIDE_ROWS=False, BLOCK_N=2, BLOCK_K=128), 4, 80)
    print("compiled", len(cases) + 1)
    """
)


def test_kernels_compile_for_sm90_without_a_gpu():
    """Every kernel and strategy through Triton's real compiler down to a cubin (ptxas included),
    for sm_90 (and one for sm_80), without TRITON_INTERPRET: no device is needed for that."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
