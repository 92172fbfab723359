"""small-text 1.4 query strategies scored by ensel.

Plug-in point: small-text's `QueryStrategy`, passed to `PoolBasedActiveLearner(clf_factory,
query_strategy, dataset)` and called by its `query(num_samples)` as
`strategy.query(clf, dataset, indices_unlabeled, indices_labeled, y, n=10)`, which returns
indices relative to `dataset`. The classes here subclass small-text's own strategies; only the
scores come from ensel. The selection is small-text's: `_validate_query_input` (EmptyPool /
PoolExhausted exceptions), all unlabeled indices when exactly `n` are left, otherwise
`np.argpartition(..., n)[:n]` over the unlabeled samples (the n best, in no specified order).

- `BALD(dropout_samples=10)`: `clf.predict_proba(dataset, dropout_sampling=k)` gives [N, k, C]
  (dropout samples or ensemble members on axis 1), scored by ensel as a permuted view
  (`kind="probs"`): `mutual_info` = max(H(pbar) - mean_k H(p_k), 0), natural log. small-text's
  `_bald` uses log2 and adds eps = 1e-8 inside both logs, without the clip at 0: its values are
  the adapter's / ln 2 up to the eps terms (~1e-9) and the +-1e-16 noise of samples without
  disagreement, so the ranking -- and the selection -- is the same (identical on inputs without
  near-ties; in the zero tail native orders noise, the adapter has exact ties). Native keeps no
  scores; the adapter leaves its nats in `scores_` ([N], the whole dataset).
- `PredictionEntropy`, `LeastConfidence`, `BreakingTies` override only `get_confidence` (the
  native `ConfidenceBasedQueryStrategy.query` / `score` select, negate and keep `scores_`):
  H(p) (ensel `entropy`, natural log like `scipy.stats.entropy`), max p (= 1 - ensel's
  `least_confidence`), p_(1) - p_(2) (ensel `margin`) of `clf.predict_proba(dataset)` [N, C],
  scored as one member. Values are float32 widened to float64: within ensel's tolerance of the
  native float64 values, identical selections on inputs without near-ties.
  Addition (not in native): `dropout_samples=k` scores the mean of
  `clf.predict_proba(dataset, dropout_sampling=k)` [N, k, C] in one pass (pbar never
  materialized); the default None is native's `clf.predict_proba(dataset)`.
- A `predict_proba` returning a torch tensor (CPU or CUDA) is scored on its device; the [N]
  scores (not the probabilities) come to the host for small-text's numpy selection.
"""

from __future__ import annotations

import numpy as np
import torch

from .._inputs import as_tensor
from ._common import require, scores_of

require("small_text", "small-text")

from small_text.query_strategies import BALD as _NativeBALD  # noqa: E402
from small_text.query_strategies import BreakingTies as _NativeBreakingTies  # noqa: E402
from small_text.query_strategies import LeastConfidence as _NativeLeastConfidence  # noqa: E402
from small_text.query_strategies import PredictionEntropy as _NativePredictionEntropy  # noqa: E402

__all__ = ["BALD", "PredictionEntropy", "LeastConfidence", "BreakingTies"]


def _as_probs(values, what: str) -> torch.Tensor:
    if not isinstance(values, (torch.Tensor, np.ndarray)) and not hasattr(values, "__dlpack__"):
        values = np.asarray(values, dtype=float)
    return as_tensor(values, what)


def _sampled_scores(clf, dataset, samples: int):
    """ensel's scores of `clf.predict_proba(dataset, dropout_sampling=samples)` [N, k, C], a view."""
    x = _as_probs(clf.predict_proba(dataset, dropout_sampling=samples),
                  f"clf.predict_proba(dataset, dropout_sampling={samples})")
    if x.dim() != 3:
        raise ValueError(f"clf.predict_proba(dataset, dropout_sampling={samples}): expected [N, k, C] "
                         f"(samples, dropout samples or members, classes), got shape {tuple(x.shape)}")
    return scores_of(x, "NEK", "probs")


def _single_scores(clf, dataset):
    """ensel's scores of `clf.predict_proba(dataset)` [N, C] as one member."""
    x = _as_probs(clf.predict_proba(dataset), "clf.predict_proba(dataset)")
    if x.dim() != 2:
        raise ValueError(f"clf.predict_proba(dataset): expected [N, C], got shape {tuple(x.shape)}")
    return scores_of(x.unsqueeze(0), "ENK", "probs")


def _host(values: torch.Tensor) -> np.ndarray:
    """[N] scores as float64 numpy for small-text's selection (only they leave the device)."""
    return values.detach().to(torch.float64).cpu().numpy()


def _check_samples(dropout_samples, what: str) -> None:
    if isinstance(dropout_samples, (bool, np.bool_)) or not isinstance(dropout_samples, (int, np.integer)):
        raise TypeError(f"{what}: expected an integer, got {type(dropout_samples).__name__} {dropout_samples!r}")
    if dropout_samples < 1:
        raise ValueError(f"{what}: expected an integer >= 1, got {dropout_samples}")


class BALD(_NativeBALD):
    """small-text's `BALD` with ensel's mutual information: max(H(pbar) - mean_k H(p_k), 0) of
    `clf.predict_proba(dataset, dropout_sampling=dropout_samples)` [N, k, C], natural log
    (native: log2, eps 1e-8; the same selection). Selects the `n` unlabeled samples of highest
    score with small-text's `np.argpartition`; `scores_` holds the whole dataset's scores."""

    def __init__(self, dropout_samples=10):
        _check_samples(dropout_samples, "dropout_samples")
        super().__init__(dropout_samples=dropout_samples)
        self.scores_ = None

    def query(self, clf, dataset, indices_unlabeled, indices_labeled, y, n=10):
        self._validate_query_input(indices_unlabeled, n)
        bald_scores = _host(_sampled_scores(clf, dataset, self.dropout_samples).mutual_info)
        self.scores_ = bald_scores
        if len(indices_unlabeled) == n:
            return np.array(indices_unlabeled)
        indices_partitioned = np.argpartition(-bald_scores[indices_unlabeled], n)[:n]
        return np.array([indices_unlabeled[i] for i in indices_partitioned])

    def __str__(self):
        return f"BALD(dropout_samples={self.dropout_samples}, ensel)"


class _EnselConfidence:
    """`get_confidence` from ensel's scores of `clf.predict_proba(dataset)` (or, with
    `dropout_samples`, of the mean of the sampled probabilities)."""

    def _ensel_scores(self, clf, dataset):
        if self.dropout_samples is None:
            return _single_scores(clf, dataset)
        return _sampled_scores(clf, dataset, self.dropout_samples)


def _init_samples(strategy, dropout_samples) -> None:
    if dropout_samples is not None:
        _check_samples(dropout_samples, "dropout_samples")
    strategy.dropout_samples = dropout_samples


class PredictionEntropy(_EnselConfidence, _NativePredictionEntropy):
    """small-text's `PredictionEntropy`: selects the highest H(p) (natural log), from ensel's
    `entropy`."""

    def __init__(self, dropout_samples=None):
        super().__init__()
        _init_samples(self, dropout_samples)

    def get_confidence(self, clf, dataset, _indices_unlabeled, _indices_labeled, _y):
        return _host(self._ensel_scores(clf, dataset).entropy)

    def __str__(self):
        return "PredictionEntropy(ensel)"


class LeastConfidence(_EnselConfidence, _NativeLeastConfidence):
    """small-text's `LeastConfidence`: selects the lowest max p, from ensel's `least_confidence`
    (confidence = 1 - least_confidence)."""

    def __init__(self, dropout_samples=None):
        super().__init__()
        _init_samples(self, dropout_samples)

    def get_confidence(self, clf, dataset, _indices_unlabeled, _indices_labeled, _y):
        return 1.0 - _host(self._ensel_scores(clf, dataset).least_confidence)

    def __str__(self):
        return "LeastConfidence(ensel)"


class BreakingTies(_EnselConfidence, _NativeBreakingTies):
    """small-text's `BreakingTies`: selects the lowest p_(1) - p_(2), from ensel's `margin`."""

    def __init__(self, dropout_samples=None):
        super().__init__()
        _init_samples(self, dropout_samples)

    def get_confidence(self, clf, dataset, _indices_unlabeled, _indices_labeled, _y):
        return _host(self._ensel_scores(clf, dataset).margin)

    def __str__(self):
        return "BreakingTies(ensel)"
