"""Every backend against the float64 reference (docs/contract.md section 1) on the contract's cases:
odd shapes, every dtype, ties, -inf masks, huge magnitudes; and the input conventions (no
mutation, numpy and DLPack, non-contiguous views, devices, dtypes of the outputs)."""

import numpy as np
import pytest
import torch

import ensel
from helpers import (
    BACKENDS,
    DTYPES,
    assert_matches_reference,
    assert_scores_equal,
    assert_streaming_matches_fused,
    expected_vote_entropy,
    ids,
    make_labels,
    make_logits,
    mask_label_everywhere,
    run_scoring,
)

# (E, N, K): every K in {1, 2, 7, 1000, 33000}, every E in {1, 2, 100}, every N in {1, 7, 199},
# with N * E * K kept to a few million at most.
SHAPES = [
    (1, 1, 1),
    (2, 7, 1),
    (100, 199, 1),
    (1, 199, 2),
    (2, 7, 2),
    (100, 199, 2),
    (1, 7, 7),
    (2, 199, 7),
    (100, 7, 7),
    (1, 1, 1000),
    (2, 199, 1000),
    (100, 7, 1000),
    (2, 7, 33000),
    (100, 1, 33000),
]
KINDS = ["normal", "ties", "masked"]


def shape_id(shape):
    return "E{}-N{}-K{}".format(*shape)


def _case(shape, dtype, kind, seed=0, with_labels=True):
    E, N, K = shape
    logits = make_logits(E, N, K, dtype, kind, seed)
    labels = make_labels(N, K, seed) if with_labels else None
    if kind == "masked" and K > 1 and with_labels:
        mask_label_everywhere(logits, labels, sample=0)  # nll = +inf for sample 0
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_matches_reference(backend, shape, dtype, kind):
    logits, labels = _case(shape, dtype, kind)
    s = ensel.score(logits, labels=labels, backend=backend)
    assert_matches_reference(s, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["huge", "huge_offset"])
@pytest.mark.parametrize("shape", [(1, 7, 2), (2, 199, 7), (100, 7, 1000), (2, 7, 33000)], ids=shape_id)
def test_huge_magnitudes(backend, shape, kind):
    """|logits| ~ 1e4 in float32 (beyond float16's range): softmax needs the max subtracted."""
    logits, labels = _case(shape, torch.float32, kind, seed=1)
    s = ensel.score(logits, labels=labels, backend=backend)
    assert_matches_reference(s, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("shape", [(2, 7, 1), (100, 7, 7), (2, 199, 1000), (2, 7, 33000)], ids=shape_id)
def test_streaming_matches_reference(backend, shape, dtype):
    for kind in ("ties", "masked"):
        logits, labels = _case(shape, dtype, kind, seed=2)
        assert_matches_reference(run_scoring(logits, labels, backend, "stream", seed=2), logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 7, 1), (2, 199, 7), (100, 7, 1000)], ids=shape_id)
def test_without_labels(backend, shape):
    logits, _ = _case(shape, torch.float32, "normal", seed=3, with_labels=False)
    s = ensel.score(logits, backend=backend)
    assert_matches_reference(s, logits, None)
    assert not s.has_labels
    assert list(s.to_dict()) == [f for f in ensel.ALL_FIELDS if f not in ("error_count", "forgetting", "nll")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_low_precision_ties_between_members(backend, dtype):
    """bfloat16 rows that differ by less than bf16's spacing collapse into exact ties: the
    argmax of the *rounded* values decides, identically to the reference of the same tensor."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 64, 16, generator=g, dtype=torch.float64) * 2
    jitter = torch.randn(9, 64, 16, generator=g, dtype=torch.float64) * 1e-3
    logits = (base + jitter).to(dtype)
    labels = make_labels(64, 16, seed=4)
    assert_matches_reference(ensel.score(logits, labels=labels, backend=backend), logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fused", "stream"])
def test_float64_values_that_collapse_in_float32(backend, mode):
    """float64 logits are a supported input dtype, and the reference is float64: two logits that
    differ in float64 but round to the same float32 must not become a tie (argmax = the true
    maximum, index 1 here, as torch.argmax of the input)."""
    logits = torch.tensor([[[1.0, 1.0 + 1e-12, 0.0]], [[0.5, 0.5 + 1e-12, 0.5]]], dtype=torch.float64)
    labels = torch.tensor([1])
    s = run_scoring(logits, labels, backend, mode)
    assert int(s.mode) == 1 and int(s.mode_votes) == 2
    assert float(s.error_count) == 0.0
    assert_matches_reference(s, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fused", "stream"])
def test_float64_values_beyond_float32_range(backend, mode):
    """A finite float64 logit above float32's max (3.4e38) is valid input, not '+inf', and a
    row of finite float64 values below -3.4e38 is not a row of all -inf."""
    logits = torch.tensor([[[0.0, 1e39, -1e39]], [[-1e39, -2e39, -1e39]]], dtype=torch.float64)
    labels = torch.tensor([1])
    s = run_scoring(logits, labels, backend, mode)
    assert_matches_reference(s, logits, labels)


# The kernel backends: every one computes vote_entropy exactly from the counts (ensel/_votes.py);
# the reference backend sums -p log p in float64 and is held to one ulp (tests/helpers.py).
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend under test")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("shape", [(2, 199, 7), (100, 7, 7), (12, 199, 3), (7, 50, 1000), (20, 3, 33000)],
                         ids=shape_id)
def test_vote_entropy_is_the_correctly_rounded_exact_value(backend, shape, dtype):
    """vote_entropy bit for bit on every kernel backend, fused and streamed: the float32 nearest to
    the exact entropy of the vote counts (decimal arithmetic on torch.argmax's votes). Equal bits
    for every backend and order follow: acquisition by vote_entropy is all ties, broken by index."""
    for kind in ("ties", "normal"):
        logits, labels = _case(shape, dtype, kind, seed=14)
        want = expected_vote_entropy(logits)
        for mode in ("fused", "stream"):
            got = run_scoring(logits, labels, backend, mode, seed=14).vote_entropy
            assert torch.equal(got, want), f"{kind} {mode}: got {got}, want {want}"


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_results_do_not_depend_on_thread_count(threads):
    """The CPU kernel splits samples across torch.get_num_threads() threads; every split gives
    bit-identical scores."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not registered")
    logits, labels = _case((3, 301, 257), torch.float32, "masked", seed=13)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = ensel.score(logits, labels=labels, backend="cpu")
        want_stream = run_scoring(logits, labels, "cpu", "stream", seed=13)
        torch.set_num_threads(threads)
        assert_scores_equal(ensel.score(logits, labels=labels, backend="cpu"), want)
        assert_scores_equal(run_scoring(logits, labels, "cpu", "stream", seed=13), want_stream)
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- input conventions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fused", "stream", "iterable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_inputs_are_not_mutated(backend, mode, dtype):
    logits, labels = _case((3, 11, 6), dtype, "masked", seed=5)
    logits_before, labels_before = logits.clone(), labels.clone()
    run_scoring(logits, labels, backend, mode)
    assert torch.equal(logits, logits_before)
    assert torch.equal(labels, labels_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["f32", "f16", "f64"])
def test_numpy_input(backend, dtype):
    logits, labels = _case((3, 13, 5), dtype, "ties", seed=6)
    want = ensel.score(logits, labels=labels, backend=backend)
    got = ensel.score(logits.numpy(), labels=labels.numpy(), backend=backend)
    assert_scores_equal(got, want)
    # Read-only arrays (memory-mapped checkpoints) are fine: nothing writes the input.
    array = logits.numpy().copy()
    array.setflags(write=False)
    assert_scores_equal(ensel.score(array, labels=labels.numpy(), backend=backend), want)
    # Per-member numpy arrays through the iterable form and the Accumulator.
    streamed = ensel.score([m for m in logits.numpy()], labels=labels, backend=backend)
    assert_streaming_matches_fused(streamed, want, 5)
    acc = ensel.Accumulator(13, 5, labels=labels.numpy(), backend=backend)
    for member in logits.numpy():
        acc.update(member, start=0)
    assert_scores_equal(acc.finalize(), streamed)


class DLPackOnly:
    """A foreign array that speaks only the DLPack protocol (as CuPy and JAX arrays do)."""

    def __init__(self, tensor):
        self._t = tensor

    def __dlpack__(self, *args, **kwargs):
        return self._t.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_dlpack_input(backend, dtype):
    logits, labels = _case((4, 9, 7), dtype, "masked", seed=7)
    want = ensel.score(logits, labels=labels, backend=backend)
    got = ensel.score(DLPackOnly(logits), labels=DLPackOnly(labels), backend=backend)
    assert_scores_equal(got, want)
    acc = ensel.Accumulator(9, 7, labels=DLPackOnly(labels), backend=backend)
    for member in logits:
        acc.update(DLPackOnly(member), start=0)
    assert_scores_equal(acc.finalize(), run_scoring(logits, labels, backend, "iterable"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_non_contiguous_inputs(backend, dtype):
    E, N, K = 5, 17, 9
    logits, labels = _case((E, N, K), dtype, "masked", seed=8)
    want = ensel.score(logits, labels=labels, backend=backend)

    # A sample-major [N, E, K] buffer seen as [E, N, K].
    transposed = logits.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not transposed.is_contiguous()
    assert_scores_equal(ensel.score(transposed, labels=labels, backend=backend), want)

    # Classes not unit-stride: a [E, N, K] view of an [E, K, N] buffer.
    class_strided = logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert class_strided.stride(-1) != 1
    assert_scores_equal(ensel.score(class_strided, labels=labels, backend=backend), want)

    # Strided slices of a bigger buffer: every other member, every third sample, a class window.
    big = torch.full((2 * E, 3 * N, K + 4), 123.0, dtype=dtype)
    big[::2, ::3, 2 : 2 + K] = logits
    view = big[::2, ::3, 2 : 2 + K]
    assert not view.is_contiguous()
    assert_scores_equal(ensel.score(view, labels=labels, backend=backend), want)

    # Labels with a stride, too.
    strided_labels = torch.stack([labels, labels], 1)[:, 0]
    assert strided_labels.stride(0) == 2
    assert_scores_equal(ensel.score(logits, labels=strided_labels, backend=backend), want)

    # Streaming: non-contiguous member blocks.
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
    for e in range(E):
        acc.update(view[e, :10], start=0)
        acc.update(class_strided[e, 10:], start=10)
    assert_streaming_matches_fused(acc.finalize(), want, K)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_view(backend):
    """A zero-stride view (the same member repeated) is read as what it shows."""
    member = make_logits(1, 6, 4, kind="ties", seed=9)
    expanded = member.expand(5, 6, 4)
    labels = make_labels(6, 4, seed=9)
    s = ensel.score(expanded, labels=labels, backend=backend)
    assert_matches_reference(s, expanded.contiguous(), labels)
    assert torch.equal(s.mode_votes, torch.full((6,), 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fused", "stream", "iterable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_output_dtypes_and_device(backend, mode, dtype):
    logits, labels = _case((3, 8, 5), dtype, "normal", seed=10)
    s = run_scoring(logits, labels, backend, mode)
    for name, t in s.to_dict().items():
        assert t.device == logits.device, name
        assert t.shape == (8,), name
        want = torch.int64 if name in ("mode", "mode_votes", "forgetting") else torch.float32
        assert t.dtype == want, f"{name}: {t.dtype}"
    assert s.num_members == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("mode", ["fused", "stream"])
def test_cuda_scores_stay_on_cuda(mode):
    logits, labels = _case((3, 8, 5), torch.float32, "masked", seed=11)
    cuda_logits, cuda_labels = logits.cuda(), labels.cuda()
    if mode == "fused":
        s = ensel.score(cuda_logits, labels=cuda_labels)
    else:
        acc = ensel.Accumulator(8, 5, labels=cuda_labels, device="cuda")
        for member in cuda_logits:
            acc.update(member, start=0)
        s = acc.finalize()
    for name, t in s.to_dict().items():
        assert t.device.type == "cuda", name
    assert_matches_reference(
        ensel.Scores(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(s).items()}),
        logits,
        labels,
    )


def test_auto_backend_on_cpu_is_a_registered_backend():
    """"auto" resolves to a backend that gives the same discrete answers as each named one."""
    logits, labels = _case((4, 30, 6), torch.float16, "ties", seed=12)
    auto = ensel.score(logits, labels=labels)
    assert_matches_reference(auto, logits, labels)
    assert ensel.Accumulator(3, 2).backend in BACKENDS
