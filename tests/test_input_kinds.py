"""Inputs of every kind (`kind="logits" | "log_probs" | "probs"`) and in any axis order, as
docs/contract.md section 3 gives them: each equals the scores of the equivalent logits, invalid
probabilities are named at their first (member, sample), permuted views are scored bit for bit
as their contiguous copies, and neither probabilities nor a strided view are ever copied whole
(section 12: a bounded chunk of samples at a time, measured in a fresh process).

Every expected value comes from an independent formulation: the float64 reference of the
probabilities' logs (computed here, in float64), a direct float64 computation from the
normalized probabilities, or the contiguous input scored as logits.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import ensel
import ensel._chunks
from device_shim import DEVICE  # score_files on the backend's device under ENSEL_TEST_DEVICE=cuda
from ensel.outofcore import OUTPUT_BYTES, bytes_per_chunk_sample, plan_chunk
from helpers import (
    BACKENDS,
    DTYPES,
    assert_scores_equal,
    assert_scores_match,
    assert_streaming_matches_fused,
    feed,
    ids,
    make_labels,
    make_logits,
    mask_label_everywhere,
    stream_batches,
)

NAN, INF = float("nan"), float("inf")
KINDS = ("logits", "log_probs", "probs")
MODES = ("fused", "stream", "iterable")
backends = pytest.mark.parametrize("backend", BACKENDS)


# ----------------------------------------------------------------------------- builders


def case(E=4, N=23, K=6, seed=0):
    """float64 logits with masked (-inf) entries, the label masked in every member at sample 0
    (pbar_y = 0: nll = +inf), and labels."""
    logits = make_logits(E, N, K, torch.float64, kind="masked", seed=seed)
    labels = make_labels(N, K, seed=seed)
    mask_label_everywhere(logits, labels, sample=0)
    return logits, labels


def as_kind(logits64: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The input of `kind` in `dtype`, made from float64 logits: probabilities with exact zeros
    where the logits are -inf."""
    if kind == "logits":
        return logits64.to(dtype)
    if kind == "log_probs":
        return torch.log_softmax(logits64, -1).to(dtype)
    return torch.softmax(logits64, -1).to(dtype)


def equivalent_logits(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What the scores of an input of `kind` are defined as: the logits of the values as given
    (the probabilities' logs taken here in float64; log 0 = -inf)."""
    return torch.log(x.double()) if kind == "probs" else x


def expected(x: torch.Tensor, kind: str, labels) -> dict:
    return ensel.reference_scores(equivalent_logits(x, kind), labels)


def from_probs(p: torch.Tensor, labels=None) -> dict:
    """The contract's definitions computed directly from (possibly unnormalized) probabilities
    in float64: the scores of the normalized rows. Independent of any log or softmax."""
    p = p.double()
    q = p / p.sum(-1, keepdim=True)
    E, N, K = q.shape
    pbar = q.mean(0)
    entropy = -torch.special.xlogy(pbar, pbar).sum(-1)
    mean_entropy = (-torch.special.xlogy(q, q).sum(-1)).mean(0)
    a = p.argmax(-1)  # [E, N]: the lowest class among the maxima
    votes = torch.nn.functional.one_hot(a, K).sum(0)  # [N, K]
    mode_votes = votes.max(-1).values
    mode = (votes == mode_votes[:, None]).to(torch.int8).argmax(-1)
    top = pbar.topk(min(2, K), -1).values
    out = {
        "entropy": entropy,
        "mean_entropy": mean_entropy,
        "mutual_info": (entropy - mean_entropy).clamp_min(0),
        "mode": mode,
        "mode_votes": mode_votes,
        "variation_ratio": (E - mode_votes).double() / E,
        "vote_entropy": -torch.special.xlogy(votes.double() / E, votes.double() / E).sum(-1),
        "margin": top[:, 0] - top[:, 1] if K > 1 else torch.ones(N, dtype=torch.float64),
        "least_confidence": 1 - top[:, 0],
    }
    if labels is not None:
        correct = a == labels[None]
        out["error_count"] = (E - correct.sum(0)).double() / E
        out["forgetting"] = (correct[:-1] & ~correct[1:]).sum(0)
        out["nll"] = -torch.log(pbar.gather(1, labels[:, None])[:, 0])
    return out


def score_as(x, labels, backend, kind, mode, seed=0):
    """Scores of an [E, N, K] input of `kind`: fused, an Accumulator fed in random batches in a
    random order, or the iterable form."""
    if mode == "fused":
        return ensel.score(x, labels=labels, backend=backend, kind=kind)
    if mode == "iterable":
        return ensel.score(iter(list(x)), labels=labels, backend=backend, kind=kind)
    E, N, K = x.shape
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend, kind=kind)
    feed(acc, x, stream_batches(E, N, random.Random(seed)))
    return acc.finalize()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few samples, so that small inputs cross many chunk boundaries: returns a
    function setting the bound to `samples` samples of E x K values of `dtype`."""

    def set_chunk(E, K, dtype, samples):
        itemsize = torch.empty((), dtype=dtype).element_size()
        monkeypatch.setattr(ensel._chunks, "CHUNK_BYTES", samples * E * K * itemsize)

    return set_chunk


def permuted_view(x: torch.Tensor, order: tuple[int, int, int]) -> torch.Tensor:
    """x [E, N, K] stored in the axis order `order` (a permutation of (0, 1, 2) = (E, N, K)),
    seen again as [E, N, K]: a strided view of a buffer laid out that way."""
    buffer = x.permute(order).contiguous()
    inverse = tuple(order.index(d) for d in range(3))
    view = buffer.permute(inverse)
    assert view.shape == x.shape and view.data_ptr() == buffer.data_ptr()
    return view


ORDERS = list(itertools.permutations(range(3)))
ORDER_IDS = ["".join("ENK"[d] for d in order) for order in ORDERS]


# ----------------------------------------------------------------------------- equal to the equivalent logits


@backends
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_every_kind_equals_the_scores_of_its_logits(backend, kind, dtype, mode):
    """Probabilities with exact zeros (masked logits), a label of probability 0 in every member
    (nll = +inf), in every dtype: the scores of log p (float64, taken here) within the contract's
    tolerance, discrete fields exactly; log-probabilities are logits bit for bit."""
    logits, labels = case(seed=1)
    x = as_kind(logits, kind, dtype)
    if kind == "probs":
        assert bool((x == 0).any()), "the case must hold exact zeros"
    for lab in (labels, None):
        got = score_as(x, lab, backend, kind, mode, seed=2)
        assert got.num_members == 4 and got.num_samples == 23
        assert_scores_match(got, expected(x, kind, lab), 6, lab is not None, dtype)
    if kind == "log_probs":  # no conversion: the very scores of the same values as logits
        as_logits = score_as(x, labels, backend, "logits", mode, seed=3)
        assert_scores_equal(score_as(x, labels, backend, kind, mode, seed=3), as_logits)


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_probabilities_score_as_their_normalized_rows(backend, dtype):
    """Rows that do not sum to 1 (scaled by factors from 1e-3 to 50: values above 1 included)
    score as the normalized rows, computed directly from the probabilities in float64; the
    discrete fields are those of the probabilities' own argmax."""
    logits, labels = case(E=5, N=30, K=7, seed=3)
    g = torch.Generator().manual_seed(3)
    scale = torch.exp(torch.empty(5, 30, 1, dtype=torch.float64).uniform_(-7, 4, generator=g))
    p = (torch.softmax(logits, -1) * scale).to(dtype)
    assert bool((p > 1).any()) and bool((p.double().sum(-1) < 0.5).any())
    want = from_probs(p, labels)
    for mode in MODES:
        got = score_as(p, labels, backend, "probs", mode, seed=4)
        assert_scores_match(got, want, 7, True, dtype)


# One K on each side of every strategy boundary of the CPU kernels (lanes up to 128 classes,
# short rows below 48) and beyond, for probabilities read by the kernels themselves.
PROBS_KS = (1, 2, 10, 47, 48, 128, 129, 700)


@backends
@pytest.mark.parametrize("K", PROBS_KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_probabilities_at_every_row_length(backend, K, dtype):
    """Unnormalized probabilities with exact zeros (masked classes), at every row-length strategy,
    fused and streamed, with labels: the scores of the normalized rows, computed directly from
    the probabilities in float64. Scales down to 1e-30 (a row far below 1 whose ratios to its
    maximum are ordinary numbers) where the dtype holds them."""
    logits, labels = case(E=6, N=37, K=K, seed=20 + K)
    g = torch.Generator().manual_seed(K)
    low = -3.0 if dtype == torch.float16 else -69.0  # float16's smallest normal is 6e-5
    scale = torch.exp(torch.empty(6, 37, 1, dtype=torch.float64).uniform_(low, 3.0, generator=g))
    p = (torch.softmax(logits, -1) * scale).to(dtype)
    want = from_probs(p, labels)
    for mode in ("fused", "stream"):
        assert_scores_match(score_as(p, labels, backend, "probs", mode, seed=K), want, K, True, dtype)


@backends
def test_probability_ties_and_one_class(backend):
    """Equal probabilities are ties (the lowest class), exactly as equal logits are; K = 1."""
    p = torch.tensor([[[0.25, 0.25, 0.5, 0.0]], [[0.4, 0.4, 0.2, 0.0]], [[0.0, 0.3, 0.3, 0.4]]])
    s = ensel.score(p, backend=backend, kind="probs")
    assert s.mode.tolist() == [0] and s.mode_votes.tolist() == [1]  # votes 2, 0, 3: one each
    one = torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(5)) + 0.1
    s = ensel.score(one, labels=torch.zeros(5, dtype=torch.int64), backend=backend, kind="probs")
    assert torch.equal(s.mode, torch.zeros(5, dtype=torch.int64)) and torch.equal(s.margin, torch.ones(5))
    assert float(s.nll.abs().max()) < 1e-6 and float(s.entropy.abs().max()) < 1e-6


@backends
@pytest.mark.parametrize(
    "dtype, value", [(torch.float16, 1e-4), (torch.bfloat16, 1e-20), (torch.float32, 1e-20)], ids=["f16", "bf16", "f32"]
)
def test_probabilities_one_step_apart_keep_their_order(backend, dtype, value):
    """Probabilities one step of their dtype apart, where their logs in the same dtype would
    round together (|log p| ~ 46: a float32 ulp of 4e-6, against a relative step of 6e-8), keep
    their order through the conversion (float16/bfloat16 -> float32, float32 -> float64): each
    member's argmax is the larger one. (float64 neighbours may tie: docs/contract.md section 3.)"""
    v = torch.tensor(value, dtype=dtype)
    up = torch.nextafter(v, torch.tensor(1.0, dtype=dtype))
    row = torch.stack([v, up, v, up])
    p = torch.stack([row, row.flip(0), row]).reshape(3, 1, 4)  # argmaxes 1, 0, 1
    s = ensel.score(p, backend=backend, kind="probs")
    assert s.mode.tolist() == [1] and s.mode_votes.tolist() == [2]
    acc = ensel.Accumulator(1, 4, backend=backend, kind="probs")
    for member in p:
        acc.update(member)
    assert acc.finalize().mode_votes.tolist() == [2]


# ----------------------------------------------------------------------------- invalid probabilities

PROBS_CASES = {
    # name -> (values set in the row, the message's <what>)
    "NaN": ({1: NAN}, "NaN probability"),
    "negative": ({2: -0.25}, "negative probability"),
    "-inf": ({0: -INF}, "negative probability"),
    "+inf": ({3: INF}, "+inf probability"),
    "all zero": ("zero", "row of probabilities summing to 0"),
    "NaN before negative": ({1: NAN, 3: -1.0}, "NaN probability"),
    "negative before NaN": ({1: -1.0, 3: NAN}, "negative probability"),
    "+inf before NaN": ({0: INF, 2: NAN}, "+inf probability"),
    "zero row with a negative": ({"zero": True, 4: -1e-30}, "negative probability"),
}


def set_probs_row(p, member, sample, values):
    if values == "zero" or values.get("zero"):
        p[member, sample] = 0.0
    if values != "zero":
        for k, v in values.items():
            if k != "zero":
                p[member, sample, k] = v


def probs_case(dtype=torch.float32, E=4, N=30, K=5, seed=6):
    return as_kind(make_logits(E, N, K, torch.float64, kind="masked", seed=seed), "probs", dtype)


PROBS_HOW = ["fused", "chunked", "strided", "stream", "stream-batched", "iterable", "files"]


def score_probs_by(how, p, labels, backend, tmp_path, small_chunks):
    E, N, K = p.shape
    if how == "fused":
        return ensel.score(p, labels=labels, backend=backend, kind="probs")
    if how == "chunked":
        small_chunks(E, K, torch.float64, 4)
        return ensel.score(p, labels=labels, backend=backend, kind="probs")
    if how == "strided":  # an [N, K, E] buffer, in chunks of 3 samples
        small_chunks(E, K, torch.float64, 3)
        return ensel.score(permuted_view(p, (1, 2, 0)), labels=labels, backend=backend, kind="probs")
    if how in ("stream", "stream-batched"):
        acc = ensel.Accumulator(N, K, labels=labels, backend=backend, kind="probs")
        step = N if how == "stream" else 7
        for e in range(E):
            for a in range(0, N, step):
                acc.update(p[e, a : a + step], start=a)
        return acc.finalize()
    if how == "iterable":
        return ensel.score(list(p), labels=labels, backend=backend, kind="probs")
    if how == "files":
        paths = []
        for e, member in enumerate(p):
            paths.append(tmp_path / f"m{e}.npy")
            np.save(paths[-1], member.numpy())
        return ensel.score_files(paths, labels=labels, backend=backend, kind="probs", chunk_samples=4, device=DEVICE)
    raise ValueError(how)


@backends
@pytest.mark.parametrize("how", PROBS_HOW)
@pytest.mark.parametrize("name", list(PROBS_CASES))
def test_invalid_probabilities_name_what_and_where(backend, how, name, tmp_path, small_chunks):
    p = probs_case()
    values, what = PROBS_CASES[name]
    set_probs_row(p, 2, 17, values)
    before = p.clone()
    with pytest.raises(ValueError) as info:
        score_probs_by(how, p, make_labels(30, 5), backend, tmp_path, small_chunks)
    assert str(info.value) == f"invalid input: {what} at member 2, sample 17"
    assert torch.equal(torch.isnan(p), torch.isnan(before)) and torch.equal(p.nan_to_num(), before.nan_to_num())


@backends
@pytest.mark.parametrize("how", PROBS_HOW)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_first_invalid_probability_in_member_sample_order(backend, how, dtype, tmp_path, small_chunks):
    """Offenders in several chunks: the lowest member wins over the lowest sample, whichever
    chunk (or batch) holds it: (1, 25) comes before (2, 3) and (3, 0)."""
    if how == "files" and dtype == torch.bfloat16:
        pytest.skip("no bfloat16 .npy files")
    p = probs_case(dtype)
    set_probs_row(p, 3, 0, {0: NAN})
    set_probs_row(p, 2, 3, "zero")
    set_probs_row(p, 1, 29, {1: INF})
    set_probs_row(p, 1, 25, {4: -1.0})
    with pytest.raises(ValueError, match=r"^invalid input: negative probability at member 1, sample 25$"):
        score_probs_by(how, p, None, backend, tmp_path, small_chunks)


@backends
@pytest.mark.parametrize("how", ["fused", "strided", "stream", "iterable", "files"])
@pytest.mark.parametrize(
    "bad, what",
    [
        ("nan", "NaN log-probability"),
        ("+inf", "+inf log-probability"),
        ("all -inf", "row of all -inf log-probabilities"),
    ],
)
def test_invalid_log_probabilities_are_said_of_log_probabilities(backend, how, bad, what, tmp_path, small_chunks):
    lp = as_kind(make_logits(4, 30, 5, torch.float64, seed=7), "log_probs", torch.float32)
    lp[3, 1, 0] = NAN  # a later member at an earlier sample: not the first
    {"nan": lambda: lp[2, 17].__setitem__(1, NAN), "+inf": lambda: lp[2, 17].__setitem__(2, INF),
     "all -inf": lambda: lp[2, 17].fill_(-INF)}[bad]()  # fmt: skip
    with pytest.raises(ValueError) as info:
        if how == "fused":
            ensel.score(lp, backend=backend, kind="log_probs")
        elif how == "strided":
            small_chunks(4, 5, torch.float32, 4)
            ensel.score(permuted_view(lp, (2, 1, 0)), backend=backend, kind="log_probs")
        elif how == "stream":
            acc = ensel.Accumulator(30, 5, backend=backend, kind="log_probs")
            for member in lp:
                acc.update(member)
        elif how == "iterable":
            ensel.score(iter(lp), backend=backend, kind="log_probs")
        else:
            paths = [tmp_path / f"m{e}.npy" for e in range(4)]
            for path, member in zip(paths, lp):
                np.save(path, member.numpy())
            ensel.score_files(paths, backend=backend, kind="log_probs", chunk_samples=4, device=DEVICE)
    assert str(info.value) == f"invalid input: {what} at member 2, sample 17"


@backends
def test_invalid_logits_on_the_chunked_path_keep_their_words(backend, small_chunks):
    """A class-strided view of logits, in chunks of 4 samples: the offender in a later chunk at a
    lower member is reported at its own sample, in the logits' words."""
    logits = make_logits(4, 30, 5, seed=8)
    logits[3, 2, 1] = NAN
    logits[1, 22, :] = -INF
    small_chunks(4, 5, torch.float32, 4)
    with pytest.raises(ValueError, match=r"^invalid input: row of all -inf logits at member 1, sample 22$"):
        ensel.score(permuted_view(logits, (0, 2, 1)), backend=backend)


@backends
def test_a_refused_probability_update_leaves_the_state_as_it_was(backend):
    p = probs_case(N=12)
    acc = ensel.Accumulator(12, 5, labels=make_labels(12, 5), backend=backend, kind="probs")
    twin = ensel.Accumulator(12, 5, labels=make_labels(12, 5), backend=backend, kind="probs")
    for e in range(2):
        acc.update(p[e])
        twin.update(p[e])
    bad = p[2].clone()
    bad[7, 3] = -0.5
    with pytest.raises(ValueError, match="negative probability at member 2, sample 7$"):
        acc.update(bad[3:], start=3)
    for e in range(2, 4):
        acc.update(p[e])
        twin.update(p[e])
    assert_scores_equal(acc.finalize(), twin.finalize())


# ----------------------------------------------------------------------------- axis orders and strides


@backends
@pytest.mark.parametrize("order", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", ["default", "small"])
def test_every_axis_order_scores_as_the_contiguous_tensor(backend, order, kind, chunks, small_chunks):
    """A buffer in any of the 6 axis orders, passed as a permuted [E, N, K] view: bit for bit the
    scores of the contiguous tensor, fused (in one chunk or in chunks of 5 samples) and streamed."""
    logits, labels = case(E=4, N=23, K=6, seed=9)
    x = as_kind(logits, kind, torch.float32)
    want = ensel.score(x, labels=labels, backend=backend, kind=kind)
    if chunks == "small":
        small_chunks(4, 6, torch.float64, 5)
    view = permuted_view(x, order)
    assert_scores_equal(ensel.score(view, labels=labels, backend=backend, kind=kind), want)
    streamed = score_as(x, labels, backend, kind, "stream", seed=10)
    assert_scores_equal(score_as(view, labels, backend, kind, "stream", seed=10), streamed)
    iterated = score_as(x, labels, backend, kind, "iterable")
    assert_scores_equal(score_as(view, labels, backend, kind, "iterable"), iterated)


def _spy_on_fused(monkeypatch, name: str) -> list:
    """(data_ptr, shape, contiguous, bytes, probs) of every block backend `name`'s fused is handed."""
    backend = ensel.backends.get(name)
    seen, real = [], backend.fused

    def spy(x, labels, **options):
        # dense: unit class stride, and its values span exactly numel elements (no gaps, no overlap)
        span = 1 + sum(stride * (size - 1) for stride, size in zip(x.stride(), x.shape))
        dense = x.stride(-1) == 1 and span == x.numel()
        seen.append((x.data_ptr(), tuple(x.shape), dense, x.numel() * x.element_size(), options.get("probs", False)))
        return real(x, labels, **options)

    monkeypatch.setattr(backend, "fused", spy)
    return seen


def test_chunks_are_bounded_and_unit_class_stride_goes_straight_to_the_kernel(monkeypatch, small_chunks):
    """What the kernel is handed: an [N, E, K] buffer's view (unit class stride), and probabilities
    for the cpu backend (which reads them), are the caller's own memory, in one call; an [N, K, E]
    buffer's view, and probabilities for a backend that does not read them, arrive as dense
    chunks of at most the bound (copied, converted), never the whole tensor."""
    seen = _spy_on_fused(monkeypatch, "cpu")
    E, N, K = 3, 50, 8
    x = make_logits(E, N, K, seed=11)
    p = torch.softmax(x, -1)
    nek = permuted_view(x, (1, 0, 2))
    ensel.score(nek, backend="cpu")
    assert seen == [(nek.data_ptr(), (E, N, K), True, E * N * K * 4, False)]
    seen.clear()
    ensel.score(p, backend="cpu", kind="probs")
    assert seen == [(p.data_ptr(), (E, N, K), True, E * N * K * 4, True)]

    small_chunks(E, K, torch.float32, 7)
    bound = ensel._chunks.CHUNK_BYTES
    converted = _spy_on_fused(monkeypatch, "reference")
    for given, kind, backend, calls in [(permuted_view(x, (1, 2, 0)), "logits", "cpu", seen),
                                        (p, "probs", "reference", converted)]:  # fmt: skip
        calls.clear()
        ensel.score(given, backend=backend, kind=kind)
        assert len(calls) > 1 and all(dense for _, _, dense, _, _ in calls)
        assert all(nbytes <= bound for _, _, _, nbytes, _ in calls), (calls, bound)
        assert sum(shape[1] for _, shape, *_ in calls) == N
        assert len({ptr for ptr, *_ in calls}) == 1  # one buffer, reused by every chunk
        assert not any(probs for *_, probs in calls)  # logits, or probabilities converted to log p


def test_the_chunk_bound_and_one_sample_at_least():
    assert ensel._chunks.CHUNK_BYTES == 32 << 20
    assert ensel._chunks.chunk_samples(8, 100, torch.float32) == (32 << 20) // 3200
    assert ensel._chunks.chunk_samples(8, 100, torch.float64) == (32 << 20) // 6400
    assert ensel._chunks.chunk_samples(1000, 10**5, torch.float32) == 1  # 400 MB a sample: still one


@backends
@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_and_sliced_views(backend, kind):
    """Zero-stride views over members or classes, and strided slices, read as what they show."""
    logits, labels = case(E=1, N=9, K=5, seed=12)
    x = as_kind(logits, kind, torch.float32)
    members = x.expand(4, 9, 5)
    assert_scores_equal(
        ensel.score(members, labels=labels, backend=backend, kind=kind),
        ensel.score(members.contiguous(), labels=labels, backend=backend, kind=kind),
    )
    flat = torch.full((3, 9, 1), 0.5 if kind == "probs" else -1.0).expand(3, 9, 5)  # class stride 0
    want = ensel.score(flat.contiguous(), backend=backend, kind=kind)
    assert_scores_equal(ensel.score(flat, backend=backend, kind=kind), want)
    big = torch.full((8, 27, 9), 7.0)
    big[::2, ::3, 3:8] = as_kind(case(E=4, N=9, K=5, seed=13)[0], kind, torch.float32)
    sliced = big[::2, ::3, 3:8]  # unit class stride
    class_sliced = big.transpose(1, 2).contiguous().transpose(1, 2)[::2, ::3, 3:8]  # class stride 27
    assert class_sliced.stride(-1) == 27 and torch.equal(class_sliced, sliced)
    want = ensel.score(sliced.contiguous(), labels=labels, backend=backend, kind=kind)
    for view in (sliced, class_sliced):
        assert_scores_equal(ensel.score(view, labels=labels, backend=backend, kind=kind), want)


@backends
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_inputs_are_never_mutated(backend, kind, dtype, small_chunks):
    logits, labels = case(seed=14)
    x = permuted_view(as_kind(logits, kind, dtype), (2, 0, 1))
    before, labels_before = x.clone(), labels.clone()
    small_chunks(4, 6, torch.float64, 5)
    for mode in MODES:
        score_as(x, labels, backend, kind, mode)
    assert torch.equal(x, before) and torch.equal(labels, labels_before)
    if dtype != torch.bfloat16:  # a read-only numpy array: any write would fault
        array = as_kind(logits, kind, dtype).numpy().copy()
        array.setflags(write=False)
        want = ensel.score(torch.from_numpy(array.copy()), labels=labels, backend=backend, kind=kind)
        assert_scores_equal(ensel.score(array, labels=labels, backend=backend, kind=kind), want)


# ----------------------------------------------------------------------------- the keyword


def test_kind_is_checked_everywhere(tmp_path):
    x = torch.rand(2, 3, 4)
    path = tmp_path / "m.npy"
    np.save(path, x[0].numpy())
    calls = {
        "score": lambda kind: ensel.score(x, kind=kind),
        "score iterable": lambda kind: ensel.score([x[0]], kind=kind),
        "Accumulator": lambda kind: ensel.Accumulator(3, 4, kind=kind),
        "score_files": lambda kind: ensel.score_files([path], kind=kind),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"kind='prob': expected one of 'logits', 'log_probs', 'probs'"):
            call("prob")
        with pytest.raises(TypeError, match="kind"):
            call(None)
    acc = ensel.Accumulator(3, 4)
    acc.update(x[0])
    acc.save(tmp_path / "s.pt")
    with pytest.raises(ValueError, match="kind='Probs'"):
        ensel.Accumulator.load(tmp_path / "s.pt", kind="Probs")


def test_a_probabilities_accumulator_saves_and_resumes_its_kind(tmp_path):
    p = probs_case(N=10)
    labels = make_labels(10, 5)
    whole = ensel.Accumulator(10, 5, labels=labels, kind="probs")
    part = ensel.Accumulator(10, 5, labels=labels, kind="probs")
    for e in range(4):
        whole.update(p[e])
    for e in range(2):
        part.update(p[e])
    part.save(tmp_path / "s.pt")
    resumed = ensel.Accumulator.load(tmp_path / "s.pt")
    assert resumed.kind == "probs" and ensel.Accumulator(1, 1).kind == "logits"
    for e in range(2, 4):
        resumed.update(p[e])
    assert_scores_equal(resumed.finalize(), whole.finalize())
    # A file without the key (written before kinds existed) holds logits; an explicit kind wins.
    payload = torch.load(tmp_path / "s.pt", weights_only=True)
    del payload["kind"]
    torch.save(payload, tmp_path / "old.pt")
    assert ensel.Accumulator.load(tmp_path / "old.pt").kind == "logits"
    assert ensel.Accumulator.load(tmp_path / "old.pt", kind="probs").kind == "probs"
    payload["kind"] = "odds"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: corrupted state header.*kind 'odds'"):
        ensel.Accumulator.load(tmp_path / "bad.pt")


def test_probabilities_inside_torch_compile():
    p = probs_case(N=8)
    want = ensel.score(p, backend="cpu", kind="probs")
    compiled = torch.compile(lambda x: ensel.score(x, backend="cpu", kind="probs").mutual_info, backend="aot_eager")
    assert torch.equal(compiled(p), want.mutual_info)


# ----------------------------------------------------------------------------- out of core


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_files_of_every_kind_equal_in_memory_scores(tmp_path, dtype, kind):
    logits, labels = case(E=5, N=301, K=7, seed=15)
    x = as_kind(logits, kind, dtype)
    paths = []
    for e, member in enumerate(x):
        paths.append(tmp_path / f"m{e}.npy")
        np.save(paths[-1], member.numpy())
    itemsize = x.element_size()
    converted = 7 * (4 if dtype == torch.float16 else 8) if kind == "probs" else 0
    budget = 301 * OUTPUT_BYTES + 29 * bytes_per_chunk_sample(5, 7 * itemsize, converted)
    assert plan_chunk(5, 301, 7 * itemsize, budget, converted) == 29  # 11 chunks, the last partial
    # reference: the backend that converts probabilities (and counts them in the budget)
    converting = ensel.score_files(paths, labels=labels.numpy(), max_memory=budget, kind=kind, backend="reference")
    assert_scores_equal(converting, ensel.score(x, labels=labels, kind=kind, backend="reference"))
    got = ensel.score_files(paths, labels=labels.numpy(), max_memory=budget, kind=kind)
    assert_scores_equal(got, ensel.score(x, labels=labels, kind=kind))
    assert_scores_match(got, expected(x, kind, labels), 7, True, dtype)


def test_a_budget_too_small_for_converted_probabilities(tmp_path):
    """A backend that converts probabilities counts the float64 logs in the budget; the cpu
    backend reads them as they are, so they cost what logits cost."""
    np.save(tmp_path / "m.npy", np.full((50, 4), 0.25, np.float32))
    need = 50 * OUTPUT_BYTES + bytes_per_chunk_sample(1, 16, 32)  # float32 rows, float64 logs
    m = [tmp_path / "m.npy"]
    assert ensel.score_files(m, max_memory=need, kind="probs", backend="reference").num_samples == 50
    with pytest.raises(ValueError, match=f"at least {need} bytes"):
        ensel.score_files(m, max_memory=need - 1, kind="probs", backend="reference")
    for kind in ("probs", "logits"):  # no conversion
        assert ensel.score_files(m, max_memory=need - 1, kind=kind, backend="cpu").num_samples == 50


# ----------------------------------------------------------------------------- Triton, under its interpreter


def _triton_runs_here() -> bool:
    backend = ensel.backends.get("triton")
    return backend.available() and "cpu" in backend.device_types


@pytest.mark.skipif(not _triton_runs_here(), reason="Triton runs neither under its interpreter nor on a GPU here")
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("kind", KINDS)
def test_triton_every_kind_and_a_permuted_view(kind, small_chunks):
    logits, labels = case(E=3, N=9, K=4, seed=16)
    x = as_kind(logits, kind, torch.float32)
    fused = ensel.score(x, labels=labels, backend="triton", kind=kind)
    assert_scores_match(fused, expected(x, kind, labels), 4, True)
    small_chunks(3, 4, torch.float64, 4)
    assert_scores_equal(ensel.score(permuted_view(x, (1, 2, 0)), labels=labels, backend="triton", kind=kind), fused)
    streamed = score_as(x, labels, "triton", kind, "stream", seed=17)
    assert_streaming_matches_fused(streamed, fused, 4)
    bad = x.clone()
    bad[1, 6] = 0.0 if kind == "probs" else -INF
    what = {"logits": "row of all -inf logits", "log_probs": "row of all -inf log-probabilities",
            "probs": "row of probabilities summing to 0"}[kind]  # fmt: skip
    with pytest.raises(ValueError, match=f"^invalid input: {what} at member 1, sample 6$"):
        ensel.score(bad, backend="triton", kind=kind)


# ----------------------------------------------------------------------------- memory

MEMORY_PROBE = r"""
import json, sys, torch, ensel
from ensel.outofcore import OUTPUT_BYTES

mode = sys.argv[1]
E, N, K = 8, 62_500, 100  # 200 MB of float32
g = torch.Generator().manual_seed(0)
if mode in ("NKE", "NKE copied whole"):  # baal's layout, seen as [E, N, K]: class stride E
    x = torch.randn(N, K, E, generator=g).permute(2, 0, 1)
elif mode == "NEK":  # unit class stride: read in place
    x = torch.randn(N, E, K, generator=g).permute(1, 0, 2)
else:  # probabilities [E, N, K], unnormalized
    x = torch.rand(E, N, K, generator=g)
kind = "probs" if mode == "probs" else "logits"
ensel.score(x[:, :10], kind=kind, backend="cpu")  # load every code path, start the threads once

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

# Linux resets the peak resident size to the current one on writing 5 to clear_refs, so the
# peak after scoring minus the size now is what scoring added (as tests/test_outofcore.py).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss("VmRSS")
if mode == "NKE copied whole":  # the control: the whole-tensor copy that the chunks replace
    s = ensel.backends.get("cpu").fused(x, None)
else:
    s = ensel.score(x, kind=kind, backend="cpu")
print(json.dumps({"input": x.numel() * x.element_size(), "extra": rss("VmHWM") - before,
                  "outputs": N * OUTPUT_BYTES, "chunk": ensel._chunks.CHUNK_BYTES}))
"""

# Not in the bound: the CPU kernel's per-thread scratch, allocator slack, thread stacks.
ALLOWANCE = 8 << 20


def memory_probe(mode: str) -> dict:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.parametrize("mode", ["NKE", "NEK", "probs"])
def test_a_200_mb_view_or_probabilities_allocate_one_chunk_beyond_the_input(mode):
    """A class-strided view: one chunk and the outputs. A unit-class-stride view, and
    probabilities (which the cpu kernels read as they are): the outputs alone."""
    m = memory_probe(mode)
    print(mode, m)
    assert m["input"] >= 200e6
    chunk = m["chunk"] if mode == "NKE" else 0
    assert m["extra"] < chunk + m["outputs"] + ALLOWANCE, m


def test_the_memory_probe_sees_a_whole_copy():
    # The kernel's own fallback copies the whole class-strided tensor: the probe must see it, or
    # the bound above proves nothing.
    m = memory_probe("NKE copied whole")
    assert m["extra"] > 0.9 * m["input"], m
