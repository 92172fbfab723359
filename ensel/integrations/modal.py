"""modAL 0.4 query strategies scored by ensel.

Plug-in point: modAL's `query_strategy` callables, passed to `Committee(learner_list,
query_strategy=...)` or `ActiveLearner(estimator, query_strategy=...)` and called by their
`query(X_pool, n_instances=...)` as `strategy(committee_or_learner, X, n_instances=1,
random_tie_break=False, **predict_proba_kwargs)`. Each strategy here has that signature and
returns what modAL's own strategies return: the tuple `(indices, values of those indices)`
(`Committee.query` unpacks two values; a bare array would be unpacked wrongly or, through its
bare `except`, make it call the strategy a second time). The selection is modAL's own:
`multi_argmax` / `multi_argmin` (`np.argpartition`, order unspecified) or, with
`random_tie_break=True`, `shuffled_argmax` / `shuffled_argmin` (global `np.random`
permutation, then a stable sort).

Probabilities: for a `Committee` (in every strategy, the uncertainty ones included: a
Committee's `predict_proba` is the mean of its members'), `committee.vote_proba(X)` ([N, E, C],
aligned to the committee's classes) is scored by ensel as a permuted view ([E, N, C],
`kind="probs"`), so the consensus pbar is never materialized (vote entropy needs only each
learner's argmax: the probabilities are read in place, unconverted); for a single learner
(`ActiveLearner`, any fitted sklearn classifier) `predict_proba(X)` [N, C] is scored as one
member. A `predict_proba` returning a torch tensor (CPU or CUDA) is scored on its
device; the [N] scores (not the probabilities) come to the host for modAL's numpy selection.
An unfitted estimator (NotFittedError) gives the native constant scores (zeros; ones for
`uncertainty_sampling`).

Strategies and known differences from modAL's:

- `vote_entropy_sampling` (modAL.disagreement's): ensel `vote_entropy`; the same selection when
  no two samples at the selection boundary share a count multiset in different class orders.
- `consensus_entropy_sampling`: ensel `entropy` = H(pbar); the same selection (no near-ties).
- `bald_sampling`: ensel `mutual_info`; modAL has no BALD (see below; it is **not**
  `max_disagreement_sampling`).
- `uncertainty_sampling`, `margin_sampling`, `entropy_sampling` (modAL.uncertainty's): ensel
  `least_confidence`, `margin` (0 with one class, as modAL), `entropy`; the same selections (no
  near-ties).

- Vote entropy: modAL's votes are each learner's `predict`; the adapter's are the argmax of each
  learner's probabilities (lowest class on ties). They agree for classifiers whose `predict` is
  the argmax of `predict_proba` (LogisticRegression, naive Bayes, trees, forests, kNN, ...), not
  for e.g. `SVC(probability=True)`. modAL's value is `scipy.stats.entropy` of the histogram in
  class order (renormalized), so the same counts in another class order can differ by an ulp;
  ensel's `vote_entropy` is exactly invariant under a permutation of the classes, so such
  samples are tied for the adapter (and `argpartition` / the shuffle may pick another of them).
- `KL_max_disagreement` / `max_disagreement_sampling` is max over members of KL(p_e || pbar).
  ensel has no such score and this module does not offer it: BALD is the *mean* over members,
  KL averaged = mutual_info = H(pbar) - mean_e H(p_e), offered under its own name
  `bald_sampling`. They rank samples differently.
- Values are float32 scores widened to float64 (modAL computes in float64): within ensel's
  tolerance (`docs/contract.md` section 7); selections differ only where two values are closer
  than float32 resolution.
"""

from __future__ import annotations

import numpy as np
import torch

from .._inputs import as_tensor
from ._common import require, scores_of, votes_of

require("modAL", "modal")

from modAL.models.base import BaseCommittee  # noqa: E402
from modAL.utils.selection import multi_argmax, multi_argmin, shuffled_argmax, shuffled_argmin  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

__all__ = [
    "vote_entropy", "consensus_entropy", "mutual_information",
    "classifier_uncertainty", "classifier_margin", "classifier_entropy",
    "vote_entropy_sampling", "consensus_entropy_sampling", "bald_sampling",
    "uncertainty_sampling", "margin_sampling", "entropy_sampling",
]  # fmt: skip


def _num_samples(X) -> int:
    return X.shape[0] if hasattr(X, "shape") else len(X)


def _as_probs(values, what: str) -> torch.Tensor:
    if not isinstance(values, (torch.Tensor, np.ndarray)) and not hasattr(values, "__dlpack__"):
        values = np.asarray(values, dtype=float)
    return as_tensor(values, what)


def _committee_scores(committee, X, _votes_only=False, **predict_proba_kwargs):
    """ensel's scores of `committee.vote_proba(X)` [N, E, C], as a view (with `_votes_only`, only the
    argmax-derived ones, read with no conversion: a dict); None when not fitted."""
    if not isinstance(committee, BaseCommittee) or not hasattr(committee, "vote_proba"):
        raise TypeError(f"expected a modAL Committee (with vote_proba), got {type(committee).__name__}")
    try:
        proba = committee.vote_proba(X, **predict_proba_kwargs)
    except NotFittedError:
        return None
    x = _as_probs(proba, "committee.vote_proba(X)")
    if x.dim() != 3:
        raise ValueError(f"committee.vote_proba(X): expected [N, E, C], got shape {tuple(x.shape)}")
    return votes_of(x, "NEK") if _votes_only else scores_of(x, "NEK", "probs")


def _classifier_scores(classifier, X, **predict_proba_kwargs):
    """ensel's scores of a classifier's probabilities, with their class count; None when not
    fitted. A Committee's [N, E, C] `vote_proba` (its predict_proba is their mean: the same
    scores, without materializing it); any other classifier's `predict_proba(X)` [N, C] as one
    member."""
    if isinstance(classifier, BaseCommittee) and hasattr(classifier, "vote_proba"):
        s = _committee_scores(classifier, X, **predict_proba_kwargs)
        return None if s is None else (s, classifier.n_classes_)
    if not hasattr(classifier, "predict_proba"):
        raise TypeError(f"expected a classifier with predict_proba, got {type(classifier).__name__}")
    try:
        proba = classifier.predict_proba(X, **predict_proba_kwargs)
    except NotFittedError:
        return None
    x = _as_probs(proba, "predict_proba(X)")
    if x.dim() != 2:
        raise ValueError(f"predict_proba(X): expected [N, C], got shape {tuple(x.shape)}")
    return scores_of(x.unsqueeze(0), "ENK", "probs"), x.shape[1]


def _host(values: torch.Tensor) -> np.ndarray:
    """[N] scores as float64 numpy for modAL's selection (only they leave the device)."""
    return values.detach().to(torch.float64).cpu().numpy()


def _select(values: np.ndarray, n_instances: int, random_tie_break: bool, highest: bool = True):
    if highest:
        return (shuffled_argmax if random_tie_break else multi_argmax)(values, n_instances=n_instances)
    return (shuffled_argmin if random_tie_break else multi_argmin)(values, n_instances=n_instances)


# --- measures: [N] float64, like modAL.disagreement / modAL.uncertainty --------------------------


def vote_entropy(committee, X, **predict_proba_kwargs) -> np.ndarray:
    """-sum_c (v_c / E) log(v_c / E), v_c = #learners whose most probable class is c (ensel's
    `vote_entropy` of `committee.vote_proba(X)`); zeros when the committee is not fitted."""
    s = _committee_scores(committee, X, _votes_only=True, **predict_proba_kwargs)
    return np.zeros(_num_samples(X)) if s is None else _host(s["vote_entropy"])


def consensus_entropy(committee, X, **predict_proba_kwargs) -> np.ndarray:
    """H(pbar), pbar = mean over learners of their probabilities (ensel's `entropy`); zeros when
    the committee is not fitted."""
    s = _committee_scores(committee, X, **predict_proba_kwargs)
    return np.zeros(_num_samples(X)) if s is None else _host(s.entropy)


def mutual_information(committee, X, **predict_proba_kwargs) -> np.ndarray:
    """BALD: max(H(pbar) - mean_e H(p_e), 0) = mean_e KL(p_e || pbar) (ensel's `mutual_info`);
    zeros when the committee is not fitted. Not modAL's `KL_max_disagreement` (max_e)."""
    s = _committee_scores(committee, X, **predict_proba_kwargs)
    return np.zeros(_num_samples(X)) if s is None else _host(s.mutual_info)


def classifier_uncertainty(classifier, X, **predict_proba_kwargs) -> np.ndarray:
    """1 - max_c p_c of the classifier's probabilities (ensel's `least_confidence`); ones when not
    fitted."""
    sk = _classifier_scores(classifier, X, **predict_proba_kwargs)
    return np.ones(_num_samples(X)) if sk is None else _host(sk[0].least_confidence)


def classifier_margin(classifier, X, **predict_proba_kwargs) -> np.ndarray:
    """p_(1) - p_(2), the two largest probabilities (ensel's `margin`); zeros with one class
    (ensel's margin is 1 there) or when not fitted, as modAL."""
    sk = _classifier_scores(classifier, X, **predict_proba_kwargs)
    if sk is None:
        return np.zeros(_num_samples(X))
    margin = _host(sk[0].margin)
    return np.zeros_like(margin) if sk[1] == 1 else margin


def classifier_entropy(classifier, X, **predict_proba_kwargs) -> np.ndarray:
    """H(p) of the classifier's probabilities (ensel's `entropy`); zeros when not fitted."""
    sk = _classifier_scores(classifier, X, **predict_proba_kwargs)
    return np.zeros(_num_samples(X)) if sk is None else _host(sk[0].entropy)


# --- strategies: (indices, values), modAL's signature and selection ------------------------------


def vote_entropy_sampling(committee, X, n_instances: int = 1, random_tie_break: bool = False,
                          **predict_proba_kwargs):
    """Vote entropy sampling for a modAL `Committee`: the `n_instances` samples of highest
    `vote_entropy` (the learners' most probable classes), selected by modAL's `multi_argmax`
    (`shuffled_argmax` with `random_tie_break`). Returns (indices, values)."""
    return _select(vote_entropy(committee, X, **predict_proba_kwargs), n_instances, random_tie_break)


def consensus_entropy_sampling(committee, X, n_instances: int = 1, random_tie_break: bool = False,
                               **predict_proba_kwargs):
    """Consensus entropy sampling for a modAL `Committee`: highest H(pbar), modAL's selection.
    Returns (indices, values)."""
    return _select(consensus_entropy(committee, X, **predict_proba_kwargs), n_instances, random_tie_break)


def bald_sampling(committee, X, n_instances: int = 1, random_tie_break: bool = False, **predict_proba_kwargs):
    """BALD sampling for a modAL `Committee`: highest mutual information H(pbar) - mean_e H(p_e)
    (the mean over learners of KL(p_e || pbar); modAL's `max_disagreement_sampling` takes the max
    instead), modAL's selection. Returns (indices, values)."""
    return _select(mutual_information(committee, X, **predict_proba_kwargs), n_instances, random_tie_break)


def uncertainty_sampling(classifier, X, n_instances: int = 1, random_tie_break: bool = False,
                         **predict_proba_kwargs):
    """Least-confidence sampling: highest 1 - max p of `classifier.predict_proba(X)` (a learner,
    an sklearn classifier or a Committee, whose predict_proba is pbar), modAL's selection.
    Returns (indices, values)."""
    return _select(classifier_uncertainty(classifier, X, **predict_proba_kwargs), n_instances, random_tie_break)


def margin_sampling(classifier, X, n_instances: int = 1, random_tie_break: bool = False, **predict_proba_kwargs):
    """Margin sampling: lowest p_(1) - p_(2), modAL's `multi_argmin` (`shuffled_argmin` with
    `random_tie_break`). Returns (indices, values)."""
    margin = classifier_margin(classifier, X, **predict_proba_kwargs)
    return _select(margin, n_instances, random_tie_break, highest=False)


def entropy_sampling(classifier, X, n_instances: int = 1, random_tie_break: bool = False, **predict_proba_kwargs):
    """Entropy sampling: highest H(p) of `classifier.predict_proba(X)`, modAL's selection.
    Returns (indices, values)."""
    return _select(classifier_entropy(classifier, X, **predict_proba_kwargs), n_instances, random_tie_break)
