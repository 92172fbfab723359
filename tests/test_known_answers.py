"""Answers computed by hand (math.log, fractions), never by the implementation or the reference.

Every case runs on every backend, through the fused kernel, the streaming Accumulator (random
batches, random order) and the iterable form of ensel.score.
"""

import math

import pytest
import torch

from helpers import BACKENDS, DTYPES, MODES, atol, ids, run_scoring

NEG_INF = float("-inf")

backends = pytest.mark.parametrize("backend", BACKENDS)
modes = pytest.mark.parametrize("mode", MODES)


def close(t: torch.Tensor, value: float, K: int):
    """Every entry of t within the contract's tolerance of a hand-computed value."""
    assert t.dtype == torch.float32
    expected = torch.full_like(t, value, dtype=torch.float64)
    err = (t.double() - expected).abs().max()
    assert float(err) <= atol(K), f"got {t}, want {value}"


def exact_ratio(t: torch.Tensor, numerator: int, denominator: int):
    """t is the float32 of numerator / denominator, correctly rounded, in every entry."""
    want = torch.full_like(t, numerator / denominator)
    assert torch.equal(t, want), f"got {t.tolist()}, want {numerator}/{denominator}"


@backends
@modes
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("K", [2, 7, 1000])
@pytest.mark.parametrize("E", [1, 3])
@pytest.mark.parametrize("value", [0.0, 5.0])
def test_uniform_logits(backend, mode, dtype, K, E, value):
    N = 4
    logits = torch.full((E, N, K), value, dtype=dtype)
    labels = torch.tensor([0, 1, K - 1, 0])
    s = run_scoring(logits, labels, backend, mode)
    log_k = math.log(K)
    close(s.entropy, log_k, K)
    close(s.mean_entropy, log_k, K)
    close(s.mutual_info, 0.0, K)
    close(s.least_confidence, 1.0 - 1.0 / K, K)
    close(s.margin, 0.0, K)
    close(s.nll, log_k, K)  # pbar_y = 1/K whatever y
    # All-equal rows: every member's argmax is class 0 (lowest index), so the mode is 0 with E votes.
    assert torch.equal(s.mode, torch.zeros(N, dtype=torch.int64))
    assert torch.equal(s.mode_votes, torch.full((N,), E, dtype=torch.int64))
    exact_ratio(s.variation_ratio, 0, E)
    assert torch.equal(s.vote_entropy, torch.zeros(N))  # unanimous votes: exactly 0
    # Label 0 is every member's argmax; any other label is never hit.
    assert torch.equal(s.error_count, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert torch.equal(s.forgetting, torch.zeros(N, dtype=torch.int64))
    assert s.num_members == E


@backends
@modes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_uniform_logits_many_classes(backend, mode, dtype):
    """K = 33000 (a vocabulary-sized head): entropy = mean_entropy = log K still within
    1e-5 (1 + log K) = 1.14e-4, although the sums run over 33000 equal terms."""
    K, E, N = 33000, 2, 3
    s = run_scoring(torch.zeros(E, N, K, dtype=dtype), torch.tensor([0, 1, K - 1]), backend, mode)
    close(s.mean_entropy, math.log(K), K)
    close(s.entropy, math.log(K), K)
    close(s.mutual_info, 0.0, K)
    close(s.nll, math.log(K), K)
    close(s.least_confidence, 1.0 - 1.0 / K, K)
    close(s.margin, 0.0, K)
    assert torch.equal(s.mode, torch.zeros(N, dtype=torch.int64))


@backends
@modes
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("K", [2, 7, 1000])
def test_one_hot_logits(backend, mode, dtype, K):
    """One logit 0, the others -inf: p_e is one-hot; all members agree on class `hot`."""
    E, N = 3, 3
    hot = [0, K // 2, K - 1]
    logits = torch.full((E, N, K), NEG_INF, dtype=dtype)
    for n, k in enumerate(hot):
        logits[:, n, k] = 0.0
    labels = torch.tensor([hot[0], (hot[1] + 1) % K, hot[2]])
    s = run_scoring(logits, labels, backend, mode)
    close(s.entropy, 0.0, K)
    close(s.mean_entropy, 0.0, K)
    close(s.mutual_info, 0.0, K)
    close(s.margin, 1.0, K)
    close(s.least_confidence, 0.0, K)
    assert torch.equal(s.mode, torch.tensor(hot))
    assert torch.equal(s.mode_votes, torch.full((N,), E, dtype=torch.int64))
    exact_ratio(s.variation_ratio, 0, E)
    assert torch.equal(s.error_count, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(s.forgetting, torch.zeros(N, dtype=torch.int64))
    # pbar_y = 1 -> nll 0; pbar_y = 0 (the label's logit is -inf in every member) -> nll = +inf.
    assert float(s.nll[0]) == pytest.approx(0.0, abs=atol(K))
    assert float(s.nll[1]) == math.inf
    assert float(s.nll[2]) == pytest.approx(0.0, abs=atol(K))


@backends
@modes
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("K", [2, 5])
def test_two_member_disagreement(backend, mode, dtype, K):
    """Member 1 one-hot on class 0, member 2 one-hot on class 1: pbar = (1/2, 1/2, 0, ...)."""
    N = 3
    logits = torch.full((2, N, K), NEG_INF, dtype=dtype)
    logits[0, :, 0] = 0.0
    logits[1, :, 1] = 0.0
    labels = torch.tensor([0, 1, K - 1])
    s = run_scoring(logits, labels, backend, mode)
    close(s.entropy, math.log(2), K)
    close(s.mean_entropy, 0.0, K)
    close(s.mutual_info, math.log(2), K)
    close(s.margin, 0.0, K)
    close(s.least_confidence, 0.5, K)
    assert torch.equal(s.mode, torch.zeros(N, dtype=torch.int64))  # 1 vote each: lowest class
    assert torch.equal(s.mode_votes, torch.ones(N, dtype=torch.int64))
    exact_ratio(s.variation_ratio, 1, 2)
    assert torch.equal(s.vote_entropy, torch.full((N,), math.log(2), dtype=torch.float32))
    # label 0: (right, wrong) -> forgotten once; label 1: (wrong, right); label K-1: never right
    # (for K = 2 that is label 1 again).
    assert torch.equal(s.error_count, torch.tensor([0.5, 0.5, 0.5 if K == 2 else 1.0]))
    assert torch.equal(s.forgetting, torch.tensor([1, 0, 0]))
    assert float(s.nll[0]) == pytest.approx(math.log(2), abs=atol(K))
    assert float(s.nll[1]) == pytest.approx(math.log(2), abs=atol(K))
    assert float(s.nll[2]) == (pytest.approx(math.log(2), abs=atol(K)) if K == 2 else math.inf)


@backends
@modes
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_argmax_ties_go_to_lowest_index(backend, mode, dtype):
    """Rows whose maximum appears several times: the member's vote goes to the first maximum.
    Labels sit on a later maximum, so a tie broken upward would show as a correct prediction."""
    rows = [
        [0.0, 2.0, 2.0, 1.0],  # a = 1
        [3.0, 3.0, 3.0, 3.0],  # a = 0
        [-1.0, NEG_INF, 1.5, 1.5],  # a = 2
        [-0.0, 0.0, NEG_INF, -5.0],  # -0.0 == 0.0: a = 0
    ]
    want = torch.tensor([1, 0, 2, 0])
    labels = torch.tensor([2, 3, 3, 1])
    logits = torch.tensor(rows, dtype=dtype)[None]  # E = 1
    s = run_scoring(logits, labels, backend, mode)
    assert torch.equal(s.mode, want)
    assert torch.equal(s.mode_votes, torch.ones(4, dtype=torch.int64))
    assert torch.equal(s.error_count, torch.ones(4))  # no label is a first maximum


@backends
@modes
def test_mode_ties_go_to_lowest_class(backend, mode):
    """Member argmaxes (3, 1, 3, 1): classes 1 and 3 tie at 2 votes -> mode 1, although 3 came
    first; (2, 0, 2, 0, 1) -> mode 0; (4, 4, 2, 2, 0, 0) -> mode 0 with 2 votes."""
    K = 5
    sequences = [[3, 1, 3, 1, 3, 1], [2, 0, 2, 0, 1, 1], [4, 4, 2, 2, 0, 0]]
    E = 6
    logits = torch.zeros(E, len(sequences), K)
    for n, seq in enumerate(sequences):
        for e, a in enumerate(seq):
            logits[e, n, a] = 4.0
    s = run_scoring(logits, None, backend, mode)
    assert torch.equal(s.mode, torch.tensor([1, 0, 0]))
    assert torch.equal(s.mode_votes, torch.tensor([3, 2, 2]))
    assert torch.equal(s.variation_ratio, torch.tensor([3 / 6, 4 / 6, 4 / 6], dtype=torch.float32))
    # counts (3, 3), (2, 2, 2), (2, 2, 2): log 2, log 3, log 3
    assert torch.equal(s.vote_entropy, torch.tensor([math.log(2), math.log(3), math.log(3)], dtype=torch.float32))


@backends
@modes
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("E", [1, 4])
def test_single_class(backend, mode, dtype, E):
    """K = 1: p = (1), so entropy 0, margin 1 by definition, least_confidence 0, nll 0."""
    N = 5
    logits = (torch.arange(E * N, dtype=torch.float64).reshape(E, N, 1) * 7 - 30).to(dtype)
    labels = torch.zeros(N, dtype=torch.int64)
    s = run_scoring(logits, labels, backend, mode)
    close(s.entropy, 0.0, 1)
    close(s.mean_entropy, 0.0, 1)
    close(s.mutual_info, 0.0, 1)
    close(s.margin, 1.0, 1)
    close(s.least_confidence, 0.0, 1)
    close(s.nll, 0.0, 1)
    assert torch.equal(s.mode, torch.zeros(N, dtype=torch.int64))
    assert torch.equal(s.mode_votes, torch.full((N,), E, dtype=torch.int64))
    exact_ratio(s.variation_ratio, 0, E)
    exact_ratio(s.error_count, 0, E)
    assert torch.equal(s.forgetting, torch.zeros(N, dtype=torch.int64))


def _argmax_sequences_logits(sequences, K):
    """[E, N, K] logits whose member argmaxes for sample n are sequences[n]."""
    E = len(sequences[0])
    logits = torch.zeros(E, len(sequences), K)
    for n, seq in enumerate(sequences):
        for e, a in enumerate(seq):
            logits[e, n, a] = 2.0
    return logits


@backends
@modes
def test_forgetting_and_error_count_by_hand(backend, mode):
    """Toneva forgetting counts right -> wrong transitions in stream order, label y = 1:
    y,n,y,n -> 2;  n,y,n,y -> 1 (the reverse order);  y,y,y,y -> 0;  n,n,n,n -> 0;
    y,n,n,y -> 1;  n,y,y,n -> 1.  error_count = wrong members / E."""
    y, w = 1, 0  # right and wrong predictions
    sequences = [
        [y, w, y, w],
        [w, y, w, y],
        [y, y, y, y],
        [w, w, w, w],
        [y, w, w, y],
        [w, y, y, w],
        [y, 2, 3, y],  # wrong through different classes
    ]
    logits = _argmax_sequences_logits(sequences, K=4)
    labels = torch.full((len(sequences),), y)
    s = run_scoring(logits, labels, backend, mode, seed=3)
    assert torch.equal(s.forgetting, torch.tensor([2, 1, 0, 0, 1, 1, 1]))
    wrong = [2, 2, 0, 4, 2, 2, 2]
    assert torch.equal(s.error_count, torch.tensor([v / 4 for v in wrong], dtype=torch.float32))


@backends
@modes
@pytest.mark.parametrize("E", [3, 7, 11])
def test_variation_ratio_and_error_count_are_exact_fractions(backend, mode, E):
    """variation_ratio = (E - votes) / E and error_count = (E - correct) / E, as float32 of the
    exact fraction, for thirds, sevenths and elevenths (not representable in binary)."""
    K = E + 1
    # Sample v: the first v members vote for class 0, the others for distinct classes 1, 2, ...
    # so sample v has mode 0 with v votes when v >= 2 (v = 1: all E classes tie at 1 vote -> 0).
    sequences = [[0] * v + list(range(1, E - v + 1)) for v in range(1, E + 1)]
    logits = _argmax_sequences_logits(sequences, K)
    labels = torch.zeros(E, dtype=torch.int64)  # correct exactly when voting for 0
    s = run_scoring(logits, labels, backend, mode)
    votes = list(range(1, E + 1))
    assert torch.equal(s.mode_votes, torch.tensor(votes))
    assert torch.equal(s.mode, torch.zeros(E, dtype=torch.int64))
    assert torch.equal(s.variation_ratio, torch.tensor([(E - v) / E for v in votes], dtype=torch.float32))
    assert torch.equal(s.error_count, torch.tensor([(E - v) / E for v in votes], dtype=torch.float32))


@backends
@modes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_small_example_by_hand(backend, mode, dtype):
    """E = 2, K = 3, softmaxes chosen to be simple fractions:
    member 1: logits (0, log 2, 0)   -> p = (1/4, 1/2, 1/4), argmax 1
    member 2: logits (log 3, 0, 0)   -> p = (3/5, 1/5, 1/5), argmax 0
    pbar = (17/40, 14/40, 9/40); three samples with these logits and labels 0, 1, 2."""
    m1 = [0.0, math.log(2), 0.0]
    m2 = [math.log(3), 0.0, 0.0]
    logits = torch.tensor([[m1] * 3, [m2] * 3], dtype=dtype)
    labels = torch.tensor([0, 1, 2])
    s = run_scoring(logits, labels, backend, mode)
    pbar = [17 / 40, 14 / 40, 9 / 40]
    entropy = -sum(p * math.log(p) for p in pbar)
    h1 = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    h2 = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))
    K = 3
    close(s.entropy, entropy, K)
    close(s.mean_entropy, (h1 + h2) / 2, K)
    close(s.mutual_info, entropy - (h1 + h2) / 2, K)
    close(s.margin, 17 / 40 - 14 / 40, K)
    close(s.least_confidence, 1 - 17 / 40, K)
    assert torch.equal(s.mode, torch.zeros(3, dtype=torch.int64))  # 1 vote each for 1 and 0
    assert torch.equal(s.mode_votes, torch.ones(3, dtype=torch.int64))
    exact_ratio(s.variation_ratio, 1, 2)
    # label 0: (wrong, right); label 1: (right, wrong) -> forgotten once; label 2: never right.
    assert torch.equal(s.error_count, torch.tensor([0.5, 0.5, 1.0]))
    assert torch.equal(s.forgetting, torch.tensor([0, 1, 0]))
    for n, p in enumerate(pbar):
        assert float(s.nll[n]) == pytest.approx(-math.log(p), abs=atol(K))


@backends
@modes
def test_mutual_info_is_clamped_at_zero(backend, mode):
    """Identical members: entropy = mean_entropy mathematically; rounding must not leave a
    negative mutual information."""
    g = torch.Generator().manual_seed(5)
    one = torch.randn(1, 50, 9, generator=g) * 4
    logits = one.expand(6, 50, 9).contiguous()
    s = run_scoring(logits, None, backend, mode)
    assert bool((s.mutual_info >= 0).all())
    close(s.mutual_info, 0.0, 9)
    assert torch.equal(s.mode_votes, torch.full((50,), 6))


# ----------------------------------------------------------------------------- vote_entropy


def f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def h(*shares) -> float:
    """-sum p log p of vote shares given as fractions of E (by hand, in float64)."""
    return -sum(p * math.log(p) for p in shares)


@backends
@modes
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_vote_entropy_by_hand(backend, mode, dtype):
    """E = 6 members, K = 8 classes; vote counts per sample and their entropy by hand:
    unanimous -> 0 exactly; one vote per class over 6 classes -> log 6; (4, 2) -> H(2/3, 1/3);
    (3, 3) -> log 2; (2, 2, 2) -> log 3; (3, 2, 1) -> H(1/2, 1/3, 1/6)."""
    sequences = [
        [3, 3, 3, 3, 3, 3],
        [0, 1, 2, 3, 4, 5],
        [7, 7, 2, 7, 2, 7],
        [1, 6, 1, 6, 6, 1],
        [5, 0, 4, 4, 0, 5],
        [2, 0, 2, 1, 0, 0],
    ]
    logits = _argmax_sequences_logits(sequences, K=8).to(dtype)
    s = run_scoring(logits, None, backend, mode)
    want = [0.0, math.log(6), h(4 / 6, 2 / 6), math.log(2), math.log(3), h(3 / 6, 2 / 6, 1 / 6)]
    assert s.vote_entropy.dtype == torch.float32
    assert float(s.vote_entropy[0]) == 0.0  # exactly: unanimous votes
    assert torch.equal(s.vote_entropy, torch.tensor(want, dtype=torch.float32)), (s.vote_entropy, want)


@backends
@modes
@pytest.mark.parametrize("E", [2, 3, 5, 7, 16, 20])
def test_vote_entropy_of_an_even_split_is_log_e(backend, mode, E):
    """E members, each voting for its own class: v_c = 1 for E classes, vote_entropy = log E."""
    logits = _argmax_sequences_logits([list(range(E))], K=E + 1)
    s = run_scoring(logits, None, backend, mode)
    assert torch.equal(s.vote_entropy, f32(math.log(E))[None]), (E, s.vote_entropy)


@backends
@modes
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_vote_entropy_votes_follow_the_lowest_index_tie_rule(backend, mode, dtype):
    """Three members; the first maximum of each row decides its vote.
    Sample 0: rows (0, 2, 2), (0, 2, 0), (0, 2, 1) -> votes 1, 1, 1: unanimous, 0 (ties broken
    upward would give 2, 1, 1 and H(2/3, 1/3)).
    Sample 1: rows (3, 3, 0), (0, 1, 0), (0, 1, 0) -> votes 0, 1, 1: 2 for class 1, 1 for class 0,
    -(2/3 log 2/3 + 1/3 log 1/3) (ties broken upward: unanimous)."""
    rows = [
        [[0, 2, 2], [3, 3, 0]],
        [[0, 2, 0], [0, 1, 0]],
        [[0, 2, 1], [0, 1, 0]],
    ]
    logits = torch.tensor(rows, dtype=dtype)  # [E = 3, N = 2, K = 3]
    s = run_scoring(logits, None, backend, mode)
    two_thirds = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert torch.equal(s.vote_entropy, torch.tensor([0.0, two_thirds], dtype=torch.float32)), s.vote_entropy
    assert torch.equal(s.mode, torch.tensor([1, 1]))


@backends
@modes
def test_vote_entropy_of_equal_count_multisets_is_bit_identical(backend, mode):
    """E = 7, K = 9: the counts (3, 2, 1, 1) on different classes, in different member orders, in
    every sample: one value, bit for bit (so top() breaks the tie by sample index), equal to
    H(3/7, 2/7, 1/7, 1/7) by hand."""
    import random

    rng = random.Random(7)
    sequences = []
    for _ in range(24):
        classes = rng.sample(range(9), 4)
        votes = [classes[0]] * 3 + [classes[1]] * 2 + [classes[2], classes[3]]
        rng.shuffle(votes)
        sequences.append(votes)
    logits = _argmax_sequences_logits(sequences, K=9)
    s = run_scoring(logits, None, backend, mode)
    want = f32(h(3 / 7, 2 / 7, 1 / 7, 1 / 7))
    assert torch.equal(s.vote_entropy, want.expand(24)), s.vote_entropy
    assert s.top(5, by="vote_entropy").tolist() == [0, 1, 2, 3, 4]


def _partitions(n: int, largest: int | None = None):
    """Every multiset of positive counts summing to n (integer partitions), largest part first."""
    largest = n if largest is None else largest
    if n == 0:
        yield []
        return
    for part in range(min(n, largest), 0, -1):
        for rest in _partitions(n - part, part):
            yield [part, *rest]


@backends
@pytest.mark.parametrize("mode", ["fused", "stream"])
@pytest.mark.parametrize("E", [1, 2, 4, 6, 9, 12])
def test_vote_entropy_of_every_count_multiset(backend, mode, E):
    """Every multiset of vote counts of E members (every partition of E: 77 of them for E = 12),
    one sample each, its classes scattered over K = E + 3: vote_entropy is the float32 nearest to
    the exact value (decimal arithmetic, tests/helpers.py exact_vote_entropy)."""
    from helpers import exact_vote_entropy

    import random

    rng = random.Random(E)
    K = E + 3
    sequences, want = [], []
    for counts in _partitions(E):
        classes = rng.sample(range(K), len(counts))
        votes = [c for c, v in zip(classes, counts) for _ in range(v)]
        rng.shuffle(votes)
        sequences.append(votes)
        want.append(exact_vote_entropy(counts))
    s = run_scoring(_argmax_sequences_logits(sequences, K), None, backend, mode)
    want = torch.tensor(want, dtype=torch.float32)
    if backend == "reference":  # float64 -p log p summed, then rounded: one ulp (tests/helpers.py)
        from helpers import assert_within_one_ulp

        assert_within_one_ulp(s.vote_entropy, want.double(), "vote_entropy")
    else:
        assert torch.equal(s.vote_entropy, want), (s.vote_entropy, want)
