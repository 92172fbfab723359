"""Scores.top(k, by, exclude_top): the most uncertain first (highest, or lowest for margin),
ties by sample index, exclude_top skipping floor(x N) outliers; expectations built by hand."""

import math

import pytest
import torch

import ensel
from helpers import BACKENDS, make_labels, make_logits

HIGH = ["entropy", "mean_entropy", "mutual_info", "variation_ratio", "vote_entropy", "least_confidence"]
HIGH_LABELLED = ["error_count", "forgetting", "nll"]


def scores_with(**fields) -> ensel.Scores:
    """A Scores with hand-chosen values for some fields (zeros elsewhere)."""
    n = len(next(iter(fields.values())))
    values = {}
    for name in ensel.ALL_FIELDS:
        dtype = torch.int64 if name in ("mode", "mode_votes", "forgetting") else torch.float32
        values[name] = torch.tensor(fields[name], dtype=dtype) if name in fields else torch.zeros(n, dtype=dtype)
    return ensel.Scores(num_members=4, **values)


def by_hand(values, k, high=True, exclude=0):
    """Sort indices by value (descending when high) then index, skip `exclude`, take k."""
    order = sorted(range(len(values)), key=lambda i: (-values[i] if high else values[i], i))
    return order[exclude : exclude + k]


@pytest.mark.parametrize("by", HIGH + HIGH_LABELLED)
def test_top_picks_highest(by):
    values = [0.3, 0.9, 0.1, 0.7, 0.5, 0.2]
    if by == "forgetting":
        values = [3, 9, 1, 7, 5, 2]
    s = scores_with(**{by: values})
    assert s.top(3, by=by).tolist() == [1, 3, 4]
    assert s.top(6, by=by).tolist() == [1, 3, 4, 0, 5, 2]
    assert s.top(0, by=by).tolist() == []


def test_top_picks_lowest_margin():
    s = scores_with(margin=[0.3, 0.9, 0.1, 0.7, 0.05, 0.2])
    assert s.top(3, by="margin").tolist() == [4, 2, 5]


@pytest.mark.parametrize("by", ["entropy", "margin", "forgetting", "variation_ratio", "vote_entropy"])
def test_ties_go_to_the_lowest_index(by):
    values = [0.5, 0.25, 0.5, 0.75, 0.25, 0.5, 0.75, 0.25]
    if by == "forgetting":
        values = [2, 1, 2, 3, 1, 2, 3, 1]
    high = by != "margin"
    s = scores_with(**{by: values})
    for k in range(len(values) + 1):
        assert s.top(k, by=by).tolist() == by_hand(values, k, high), k
    want = [3, 6, 0, 2, 5, 1, 4, 7] if high else [1, 4, 7, 0, 2, 5, 3, 6]
    assert s.top(8, by=by).tolist() == want


def test_all_equal_scores_give_the_first_indices():
    s = scores_with(entropy=[1.0] * 50, margin=[0.0] * 50)
    assert s.top(7, by="entropy").tolist() == list(range(7))
    assert s.top(7, by="margin").tolist() == list(range(7))
    assert s.top(7, by="entropy", exclude_top=0.1).tolist() == list(range(5, 12))


@pytest.mark.parametrize("exclude_top, skipped", [(0.0, 0), (0.1, 1), (0.15, 1), (0.25, 2), (0.5, 5), (0.95, 9)])
def test_exclude_top_skips_floor_x_n(exclude_top, skipped):
    values = [0.1 * i for i in range(10)]  # sample 9 most uncertain
    assert math.floor(exclude_top * 10) == skipped
    s = scores_with(entropy=values, margin=values)
    k = 10 - skipped
    assert s.top(k, by="entropy", exclude_top=exclude_top).tolist() == list(range(9 - skipped, -1, -1))
    assert s.top(k, by="margin", exclude_top=exclude_top).tolist() == list(range(skipped, 10))
    assert s.top(1, by="entropy", exclude_top=exclude_top).tolist() == [9 - skipped]


def test_exclude_top_with_ties_at_the_boundary():
    """The excluded samples are the first floor(x N) of the same deterministic order."""
    values = [0.9, 0.5, 0.9, 0.9, 0.1, 0.5]  # order: 0, 2, 3, 1, 5, 4
    s = scores_with(mutual_info=values)
    assert s.top(3, by="mutual_info", exclude_top=0.2).tolist() == [2, 3, 1]  # floor(1.2) = 1: skips 0
    assert s.top(3, by="mutual_info", exclude_top=0.34).tolist() == [3, 1, 5]  # floor(2.04) = 2: skips 0, 2
    assert s.top(2, by="mutual_info", exclude_top=0.5).tolist() == [1, 5]  # floor(3) = 3: skips 0, 2, 3


@pytest.mark.parametrize("by", ["mode", "mode_votes", "num_members"])
def test_scores_without_direction(by):
    s = scores_with(entropy=[0.1, 0.2])
    with pytest.raises(ValueError):
        s.top(1, by=by)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("by", HIGH + HIGH_LABELLED + ["margin"])
def test_top_on_real_scores(backend, by):
    """On scores of random ensembles (with ties from integer logits): the result is the hand
    ordering of the score's values, is int64, on the scores' device, and has distinct indices."""
    logits = make_logits(5, 40, 3, kind="ties", seed=1)
    s = ensel.score(logits, labels=make_labels(40, 3, seed=1), backend=backend)
    values = getattr(s, by).tolist()
    for k, exclude in [(10, 0.0), (40, 0.0), (5, 0.3), (0, 0.9)]:
        idx = s.top(k, by=by, exclude_top=exclude)
        assert idx.dtype == torch.int64 and idx.device == logits.device
        assert idx.tolist() == by_hand(values, k, by != "margin", math.floor(exclude * 40))
        assert len(set(idx.tolist())) == k


def test_top_is_deterministic():
    s = scores_with(entropy=[0.5] * 30 + [0.7] * 30)
    first = s.top(40, by="entropy").tolist()
    assert first == list(range(30, 60)) + list(range(10))
    for _ in range(5):
        assert s.top(40, by="entropy").tolist() == first


@pytest.mark.parametrize("by", ["entropy", "margin", "nll"])
def test_nan_scores_are_refused_naming_the_first(by):
    """A sort puts NaN first in descending order: top ranked it as the most uncertain sample."""
    s = scores_with(**{by: [0.3, 0.9, float("nan"), 0.7, float("nan")]})
    with pytest.raises(ValueError, match=r"NaN.*sample 2\b"):
        s.top(1, by=by)
    assert scores_with(**{by: [0.3, float("inf"), 0.1]}).top(1, by=by).tolist() == ([1] if by != "margin" else [2])
