"""Selection beyond plain top-k (ensel/selection.py, `Scores.top(strategy=..., generator=...)`):
random tie breaking, class-balanced top-k, and stochastic batch acquisition by Gumbel top-k.

Expected values come from the definitions, independently of the code under test: a hand-made
example and a plain-Python greedy fill for the class quotas; sampling probabilities w_i / sum w
(for k = 1, Gumbel top-k is exact sampling from the weights) checked by frequency over many
seeds; tie groups checked as sets and for uniform coverage.
"""

from __future__ import annotations

import math

import pytest
import torch

import ensel
from ensel._fields import FLOAT_FIELDS, INT_FIELDS
from ensel.scores import Scores
from ensel.selection import gumbel_noise, tie_keys


def scores_of(by: str, values, mode=None) -> Scores:
    values = torch.as_tensor(values)
    n = len(values)
    fields = {name: torch.zeros(n) for name in FLOAT_FIELDS}
    fields.update({name: torch.zeros(n, dtype=torch.int64) for name in INT_FIELDS})
    fields[by] = values
    if mode is not None:
        fields["mode"] = torch.as_tensor(mode, dtype=torch.int64)
    return Scores(num_members=4, **fields)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- random ties


def test_without_a_generator_ties_go_to_the_lowest_index():
    s = scores_of("variation_ratio", [0.5, 0.75, 0.5, 0.75, 0.25, 0.75])
    assert s.top(2, "variation_ratio").tolist() == [1, 3]


def test_random_ties_take_a_uniform_part_of_the_cut_tie_group():
    """Values 3 (5 samples), 2 (40 samples at scattered indices), 1: k = 15 takes the five 3s and
    10 of the 2s. Over 400 seeds each 2 is taken with frequency 10/40 (binomial, 5 sigma), the
    lowest indices are not favoured, and one seed always gives one selection."""
    g = gen(0)
    values = torch.ones(100)
    perm = torch.randperm(100, generator=g)
    threes, twos = perm[:5], perm[5:45]
    values[threes], values[twos] = 3.0, 2.0
    s = scores_of("variation_ratio", values)
    counts = torch.zeros(100)
    for seed in range(400):
        picked = s.top(15, "variation_ratio", generator=gen(seed))
        assert set(picked[:5].tolist()) == set(threes.tolist())  # above the cut: all, first
        assert set(picked[5:].tolist()) <= set(twos.tolist())
        counts[picked] += 1
    assert torch.equal(s.top(15, "variation_ratio", generator=gen(7)), s.top(15, "variation_ratio", generator=gen(7)))
    p, n = 10 / 40, 400
    freq = counts[twos] / n
    assert float((freq - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / n), freq
    lowest = twos.sort().values[:10]
    assert float(counts[lowest].mean()) < 0.5 * n  # index order would take them every time


def test_tie_keys_are_distinct_and_depend_on_the_seed():
    idx = torch.arange(100_000)
    keys = tie_keys(12345, idx)
    assert keys.unique().numel() == idx.numel()
    assert not torch.equal(keys, tie_keys(12346, idx))
    g = gumbel_noise(3, idx)
    assert bool(torch.isfinite(g).all())
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance pi^2 / 6.
    assert abs(float(g.mean()) - 0.5772156649) < 0.02 and abs(float(g.var()) - math.pi**2 / 6) < 0.05


def test_a_generator_is_advanced_by_one_draw_per_selection():
    s = scores_of("entropy", torch.rand(50, generator=gen(1)))
    g = gen(5)
    s.top(3, "entropy", generator=g)
    twin = gen(5)
    torch.randint(0, 2**62, (), generator=twin)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=twin))


# ----------------------------------------------------------------------------- class-balanced


def greedy_balanced(values, mode, k, descending=True, skip=0):
    """The definition, by hand: rank order (ties by index), drop `skip`, quotas k // C per class
    predicted among the rest, then the rank order fills what is left."""
    order = sorted(range(len(values)), key=lambda i: (-values[i] if descending else values[i], i))[skip:]
    classes = sorted({mode[i] for i in order})
    quota = k // len(classes) if classes else 0
    taken, per_class = set(), {c: 0 for c in classes}
    for i in order:
        if per_class[mode[i]] < quota:
            taken.add(i)
            per_class[mode[i]] += 1
    for i in order:
        if len(taken) == k:
            break
        taken.add(i)
    return [i for i in order if i in taken]


def test_balanced_by_hand():
    # Class 0 holds the six most uncertain; class 1 two; class 2 one. k = 6: quotas of 2 each,
    # class 2 has one, so 5 by quota and 1 more by the rank order (class 0's third).
    values = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.3, 0.2]
    mode = [0, 0, 0, 0, 0, 0, 1, 1, 2]
    got = scores_of("mutual_info", values, mode).top(6, "mutual_info", strategy="balanced")
    assert got.tolist() == [0, 1, 2, 6, 7, 8]
    assert scores_of("mutual_info", values, mode).top(6, "mutual_info").tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("by", ["mutual_info", "margin", "variation_ratio"])
def test_balanced_equals_the_greedy_definition(seed, by):
    g = gen(seed)
    n = int(torch.randint(1, 200, (), generator=g))
    values = torch.randint(0, 6, (n,), generator=g).float() / 5 if by == "variation_ratio" else torch.rand(n, generator=g)
    mode = torch.randint(0, int(torch.randint(1, 12, (), generator=g)), (n,), generator=g) ** 2  # sparse class ids
    ex = [0.0, 0.1, 0.3][seed % 3]
    skip = int(ex * n)
    k = int(torch.randint(0, n - skip + 1, (), generator=g))
    got = scores_of(by, values, mode).top(k, by, exclude_top=ex, strategy="balanced")
    want = greedy_balanced(values.tolist(), mode.tolist(), k, descending=by != "margin", skip=skip)
    assert got.tolist() == want


def test_balanced_on_real_scores_takes_every_predicted_class():
    """The demo's failure mode: plain top-k can take no sample of a class; balanced takes the quota."""
    x = torch.randn(6, 400, 10, generator=gen(3))
    x[:, :, 6] += 3.0  # class 6 predicted confidently almost everywhere, with low uncertainty
    x[:, 200:, 6] -= 5.0
    s = ensel.score(x)
    classes = s.mode.unique().numel()
    picked = s.top(100, "mutual_info", strategy="balanced")
    counts = torch.bincount(s.mode[picked], minlength=10)
    available = torch.bincount(s.mode, minlength=10)
    assert bool((counts >= torch.minimum(available, torch.tensor(100 // classes))).all())
    assert picked.unique().numel() == 100


# ----------------------------------------------------------------------------- stochastic


def sampled_frequencies(s: Scores, by: str, strategy: str, temperature: float, draws: int) -> torch.Tensor:
    counts = torch.zeros(s.num_samples)
    for seed in range(draws):
        counts[s.top(1, by, strategy=strategy, generator=gen(seed), temperature=temperature)] += 1
    return counts / draws


@pytest.mark.parametrize(
    "strategy, by, values, weights",
    [
        ("power", "mutual_info", [0.1, 0.4, 0.0, 0.5], [0.1**2, 0.4**2, 0.0, 0.5**2]),  # s^beta, beta = 2
        ("softmax", "mutual_info", [0.1, 0.4, 0.0, 0.5], [math.exp(2 * v) for v in (0.1, 0.4, 0.0, 0.5)]),
        ("softmax", "margin", [0.1, 0.4, 0.0, 0.5], [math.exp(-2 * v) for v in (0.1, 0.4, 0.0, 0.5)]),
        # rank order 3, 1, 0, 2: ranks 3, 2, 4, 1; weights r^-2
        ("softrank", "mutual_info", [0.1, 0.4, 0.0, 0.5], [3.0**-2, 2.0**-2, 4.0**-2, 1.0]),
    ],
)
def test_one_draw_samples_in_proportion_to_the_weights(strategy, by, values, weights):
    """k = 1: the sample is drawn with probability w_i / sum_j w_j (temperature 0.5: beta = 2)."""
    draws = 3000
    freq = sampled_frequencies(scores_of(by, values), by, strategy, 0.5, draws)
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    sigma = torch.sqrt(p * (1 - p) / draws)
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all()), (freq.tolist(), p.tolist())


def test_batches_are_drawn_without_replacement_and_cold_sampling_is_top_k():
    values = torch.rand(500, generator=gen(2))
    s = scores_of("entropy", values)
    for strategy in ("power", "softmax", "softrank"):
        picked = s.top(60, "entropy", strategy=strategy, generator=gen(1))
        assert picked.unique().numel() == 60
        cold = s.top(20, "entropy", strategy=strategy, generator=gen(1), temperature=1e-6)
        assert set(cold.tolist()) == set(s.top(20, "entropy").tolist()), strategy
    # Hot sampling spreads: at temperature 1 softrank's batch reaches deep into the order.
    rank = torch.empty(500, dtype=torch.int64)
    rank[s.top(500, "entropy")] = torch.arange(500)
    assert int(rank[s.top(60, "entropy", strategy="softrank", generator=gen(1))].max()) > 100


def test_exclude_top_removes_outliers_before_sampling():
    values = torch.rand(200, generator=gen(4))
    s = scores_of("mutual_info", values)
    outliers = set(s.top(20, "mutual_info").tolist())
    for seed in range(20):
        picked = s.top(50, "mutual_info", exclude_top=0.1, strategy="softmax", generator=gen(seed), temperature=0.05)
        assert not outliers & set(picked.tolist())


def test_refusals_name_the_problem():
    s = scores_of("margin", torch.rand(10, generator=gen(0)))
    with pytest.raises(ValueError, match="pass generator="):
        s.top(2, "margin", strategy="softmax")
    with pytest.raises(ValueError, match="strategy='power' needs a score where higher"):
        s.top(2, "margin", strategy="power", generator=gen(0))
    with pytest.raises(ValueError, match="strategy='best': choose one of top, balanced"):
        s.top(2, "margin", strategy="best")
    with pytest.raises(ValueError, match="temperature=0"):
        s.top(2, "margin", strategy="softrank", generator=gen(0), temperature=0)
    with pytest.raises(TypeError, match="temperature: expected a number"):
        s.top(2, "margin", strategy="softrank", generator=gen(0), temperature="hot")
    with pytest.raises(TypeError, match="expected a torch.Generator"):
        s.top(2, "margin", generator=0)
    neg = scores_of("entropy", torch.tensor([0.5, -0.1, 0.2]))
    with pytest.raises(ValueError, match="entropy is negative at candidate"):
        neg.top(1, "entropy", strategy="power", generator=gen(0))
