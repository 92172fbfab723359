"""Shared helpers of the ensel test suite: backends, dtypes, tolerances, input builders, and the
three ways to run a scoring (fused, Accumulator streaming, iterable), plus the comparison against
the float64 reference (`ensel.reference_scores`, the oracle of docs/contract.md sections 1 and 7)."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

import ensel
from device_shim import backends_under_test

# ["cpu", "reference"] in CI; ["cuda", "triton"] under ENSEL_TEST_DEVICE=cuda (tests/device_shim.py).
BACKENDS = backends_under_test()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}

# How a scoring is run: the fused kernel on the whole [E, N, K] block, an Accumulator fed one
# member at a time in random batches in random order, or ensel.score on an iterable of members.
MODES = ["fused", "stream", "iterable"]

FLOAT_SCORES = ("entropy", "mean_entropy", "mutual_info", "margin", "least_confidence")
# Discrete scores: exact in every backend (docs/contract.md section 7).
INT_SCORES = ("mode", "mode_votes")
RATIO_SCORES = ("variation_ratio",)
# Computed exactly from the vote counts (ensel/_votes.py): bit-identical across backends and
# between fused and streaming; against the float64 reference, within one float32 ulp (the
# reference's float64 sum of -p log p is itself rounded, so the exact value may sit on either side
# of a float32 rounding boundary that the float64 value does not).
VOTE_SCORES = ("vote_entropy",)
LABEL_INT_SCORES = ("forgetting",)
LABEL_RATIO_SCORES = ("error_count",)
ALL_FIELDS = ensel.ALL_FIELDS


def atol(num_classes: int, dtype: torch.dtype = torch.float32) -> float:
    """The contract's tolerance: 1e-5 * (1 + log K) for float32 input.

    The same bound is used for float16 and bfloat16: the kernels read those values exactly and
    accumulate in float32, and the oracle is the reference of the *same* low-precision tensor,
    so the input's precision adds no error. float64 input is the one dtype a float32 kernel has
    to round on the way in (relative 2^-24 per logit, i.e. about 1e-6 on the scores for the
    |logits| <= 20 that the float64 cases use), which fits inside the same bound too."""
    del dtype  # the justification above: one bound for every dtype
    return 1e-5 * (1.0 + math.log(num_classes))


# nll = -log pbar_y is unbounded (about 2e4 for logits of magnitude 1e4): a float32 output has
# a spacing of 2e-3 there, so an absolute bound alone cannot hold for any float32 result. Add a
# relative part of 8 float32 ulps.
NLL_RTOL = 8 * 2.0**-24


def ids(values) -> list[str]:
    return [DTYPE_IDS.get(v, str(v)) for v in values]


# ----------------------------------------------------------------------------- input builders


def make_logits(E: int, N: int, K: int, dtype=torch.float32, kind: str = "normal", seed: int = 0) -> torch.Tensor:
    """Valid [E, N, K] logits of a given flavour.

    normal: N(0, 3^2); ties: integers in {0, 1, 2} (argmax and mode ties everywhere);
    masked: normal with about 40% of the entries set to -inf (never a whole row);
    huge: N(0, 1e4^2) (float32 only); huge_offset: +-1e4 plus N(0, 3^2) per row (float32 only).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(E, N, K, generator=g, dtype=torch.float64) * 3
    elif kind == "ties":
        x = torch.randint(0, 3, (E, N, K), generator=g).to(torch.float64)
    elif kind == "masked":
        x = torch.randn(E, N, K, generator=g, dtype=torch.float64) * 3
        mask = torch.rand(E, N, K, generator=g) < 0.4
        keep = torch.randint(0, K, (E, N), generator=g)  # one finite entry per row
        mask.scatter_(2, keep[..., None], False)
        x[mask] = float("-inf")
    elif kind == "huge":
        x = torch.randn(E, N, K, generator=g, dtype=torch.float64) * 1e4
    elif kind == "huge_offset":
        sign = torch.randint(0, 2, (E, N, 1), generator=g).to(torch.float64) * 2 - 1
        x = sign * 1e4 + torch.randn(E, N, K, generator=g, dtype=torch.float64) * 3
    else:
        raise ValueError(kind)
    return x.to(dtype)


def make_labels(N: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, K, (N,), generator=g)


def mask_label_everywhere(logits: torch.Tensor, labels: torch.Tensor, sample: int = 0) -> None:
    """Sets the label's logit of `sample` to -inf in every member (pbar_y = 0, nll = +inf),
    keeping every row valid. Needs K >= 2."""
    E, N, K = logits.shape
    y = int(labels[sample])
    other = (y + 1) % K
    logits[:, sample, y] = float("-inf")
    row = logits[:, sample]
    all_neg = torch.isneginf(row).all(-1)
    row[all_neg, other] = 0.0


# ----------------------------------------------------------------------------- running a scoring


def stream_batches(E: int, N: int, rng: random.Random, interleave: bool = True):
    """(member, start, stop) batches: every member covers [0, N) in random-size batches, each
    sample receives its members in stream order, and batches come in a random order (with
    `interleave`, batches of a later member may come before other rows' earlier members)."""
    pending = []
    for e in range(E):
        cuts = sorted(rng.sample(range(1, N), k=rng.randint(0, min(N - 1, 4)))) if N > 1 else []
        bounds = [0, *cuts, N]
        batches = [(e, a, b) for a, b in zip(bounds, bounds[1:])]
        rng.shuffle(batches)
        pending.extend(batches)
    count = np.zeros(N, dtype=np.int64)  # members each sample has received so far
    order = []
    while pending:
        if interleave:
            # Always non-empty: the lowest pending member's batches are eligible.
            eligible = [b for b in pending if (count[b[1] : b[2]] == b[0]).all()]
        else:
            low = min(b[0] for b in pending)
            eligible = [b for b in pending if b[0] == low]
        batch = rng.choice(eligible)
        pending.remove(batch)
        count[batch[1] : batch[2]] += 1
        order.append(batch)
    return order


def feed(acc: ensel.Accumulator, logits: torch.Tensor, batches) -> None:
    for e, a, b in batches:
        acc.update(logits[e, a:b], start=a)


def run_scoring(logits, labels=None, backend="cpu", mode="fused", seed=0, **acc_kwargs) -> ensel.Scores:
    """Scores of [E, N, K] logits by one of MODES."""
    if mode == "fused":
        return ensel.score(logits, labels=labels, backend=backend)
    if mode == "iterable":
        return ensel.score(iter(list(logits)), labels=labels, backend=backend)
    if mode == "stream":
        E, N, K = logits.shape
        acc = ensel.Accumulator(N, K, labels=labels, backend=backend, **acc_kwargs)
        feed(acc, logits, stream_batches(E, N, random.Random(seed)))
        return acc.finalize()
    raise ValueError(mode)


# ----------------------------------------------------------------------------- comparisons


def exact_vote_entropy(counts) -> float:
    """-sum_c (v_c / E) log(v_c / E) of vote counts (zeros allowed), as the float32 nearest to
    the exact value: 50-digit decimal arithmetic, then the nearest of the float32 candidates
    around it (a float64 detour could round twice). Independent of ensel's algebra."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 50
        E = sum(counts)
        value = Decimal(0)
        for v in counts:
            if v:
                share = Decimal(v) / E
                value -= share * share.ln()
        f = np.float32(float(value))
        candidates = (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf)))
        return float(min(candidates, key=lambda c: abs(Decimal(float(c)) - value)))


def expected_vote_entropy(logits: torch.Tensor) -> torch.Tensor:
    """float32 [N]: exact_vote_entropy of each sample's votes, the members' argmaxes taken by
    torch.argmax (first maximum) on the input's own values."""
    E, N, K = logits.shape
    argmax = logits.argmax(-1)  # [E, N]
    values = []
    for n in range(N):
        counts = torch.bincount(argmax[:, n], minlength=K).tolist()
        values.append(exact_vote_entropy(counts))
    return torch.tensor(values, dtype=torch.float32)



def assert_close_with_inf(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0, name=""):
    """|got - want| <= atol + rtol |want| where finite; equal infinities elsewhere."""
    want = want.to(torch.float64)
    got64 = got.to(torch.float64)
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got64), inf), f"{name}: infinities differ: got {got}, want {want}"
    assert torch.equal(got64[inf], want[inf]), f"{name}: infinities of a different sign"
    assert not torch.isnan(got64).any(), f"{name}: NaN in {got}"
    err = (got64[~inf] - want[~inf]).abs()
    bound = atol + rtol * want[~inf].abs()
    if err.numel() and not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{name}: max excess at finite index {i}: got {float(got64[~inf][i])!r}, "
            f"want {float(want[~inf][i])!r}, |err| = {float(err[i]):.3g} > {float(bound[i]):.3g}"
        )


def float32_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 at each |value| (float64 tensor): the gap to the next float32 above."""
    f = values.abs().to(torch.float32)
    return (torch.nextafter(f, torch.full_like(f, math.inf)) - f).to(torch.float64)


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor, name=""):
    """float32 `got` within one float32 ulp of the float64 `want`, NaN-free."""
    assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN in {got}"
    want = want.to(torch.float64)
    err = (got.to(torch.float64) - want).abs()
    bad = err > float32_ulp(want)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise AssertionError(f"{name}: sample {i}: got {float(got[i])!r}, want {float(want[i])!r} (more than 1 ulp)")


def assert_scores_match(scores: ensel.Scores, expected: dict, K: int, labels: bool, dtype=torch.float32):
    """A Scores against a dict of expected float64/int64 values (the reference's output):
    continuous scores within the contract's tolerance, discrete scores exactly."""
    tol = atol(K, dtype)
    for name in FLOAT_SCORES:
        got = getattr(scores, name)
        assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}"
        assert_close_with_inf(got, expected[name], tol, name=name)
    for name in INT_SCORES:
        got = getattr(scores, name)
        assert got.dtype == torch.int64, f"{name}: dtype {got.dtype}"
        assert torch.equal(got, expected[name]), f"{name}: got {got}, want {expected[name]}"
    for name in RATIO_SCORES:
        got = getattr(scores, name)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected[name].float()), f"{name}: got {got}, want {expected[name]}"
    for name in VOTE_SCORES:
        assert_within_one_ulp(getattr(scores, name), expected[name], name)
    if labels:
        for name in LABEL_INT_SCORES:
            got = getattr(scores, name)
            assert got.dtype == torch.int64
            assert torch.equal(got, expected[name]), f"{name}: got {got}, want {expected[name]}"
        for name in LABEL_RATIO_SCORES:
            got = getattr(scores, name)
            assert got.dtype == torch.float32
            assert torch.equal(got, expected[name].float()), f"{name}: got {got}, want {expected[name]}"
        assert scores.nll.dtype == torch.float32
        assert_close_with_inf(scores.nll, expected["nll"], tol, NLL_RTOL, name="nll")
    else:
        for name in ("error_count", "forgetting", "nll"):
            assert getattr(scores, name) is None, f"{name} without labels should be None"


def assert_matches_reference(scores: ensel.Scores, logits: torch.Tensor, labels=None):
    """Scores against the float64 reference of the very same input values."""
    expected = ensel.reference_scores(logits, labels)
    E, N, K = logits.shape
    assert scores.num_members == E
    assert scores.num_samples == N
    assert_scores_match(scores, expected, K, labels is not None, logits.dtype)


def assert_scores_equal(a: ensel.Scores, b: ensel.Scores):
    """Bit-identical Scores (same fields, same values, NaN-free)."""
    da, db = a.to_dict(), b.to_dict()
    assert list(da) == list(db)
    assert a.num_members == b.num_members
    for name in da:
        assert da[name].dtype == db[name].dtype, name
        assert torch.equal(da[name], db[name]), f"{name}: {da[name]} != {db[name]}"


def assert_streaming_matches_fused(streamed: ensel.Scores, fused: ensel.Scores, K: int):
    """docs/contract.md sections 7-8: discrete scores bit for bit, continuous ones within tolerance."""
    assert streamed.num_members == fused.num_members
    for name in ("mode", "mode_votes", "variation_ratio", "vote_entropy", "error_count", "forgetting"):
        a, b = getattr(streamed, name), getattr(fused, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: streamed {a}, fused {b}"
    for name in FLOAT_SCORES + ("nll",):
        a, b = getattr(streamed, name), getattr(fused, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype == torch.float32
            assert_close_with_inf(a, b, atol(K), NLL_RTOL if name == "nll" else 0.0, name=name)
