"""scikit-activeml 1.0 query strategies scored by ensel.

Plug-in point: scikit-activeml's pool query strategies, `QueryByCommittee.query(X, y, ensemble,
...)` and `UncertaintySampling.query(X, y, clf, ...)`. The classes here subclass the native
ones: same constructor parameters (plus `backend`), same `query` signature and return value.
Everything around the utilities is the library's own code, called as the native `query` calls
it: `_validate_data` (which derives `random_state_` from `random_state` and the number of
unlabeled samples), `_transform_candidates`, the ensemble check and fitting
(`_check_ensemble`, `_aggregate_predict_probas`), NaN utilities for labeled and non-candidate
samples, `utility_weight`, and the selection `simple_batch` (greedy `rand_argmax`: exact ties
broken at random by `random_state_`). Only the utilities of the candidates come from ensel's
one pass over the members' [E, n, C] probabilities (`kind="probs"`, read from any strides; the
vote methods need only each member's argmax, so they read the probabilities in place with no
conversion, `_common.votes_of`).

The native `query` computes its utilities inline (no method to override for them alone), so
`query` is re-stated here with the utility lines replaced; the rest is the native sequence.

Known differences from the native strategies, and what the adapter does:

- `KL_divergence` (native default): native clips the probabilities at `eps` (1e-7), renormalizes
  them and averages KL(p'_e || mean p'), which is the mutual information (BALD) of the clipped
  p'. The adapter **reproduces the clipping** (default, drop-in): it scores log(clip(p, eps, 1))
  as log-probabilities (softmax renormalizes), converted chunk by chunk of samples, never as a
  whole copy; `eps=None` scores the probabilities unclipped (ensel's definition). The value is
  ensel's `mutual_info` of p', `max(H(pbar') - mean_e H(p'_e), 0)`, float32: within ensel's
  tolerance of the native float64 value; native is not clipped at 0, so its exact-zero samples
  carry +-1e-17 noise where the adapter has float32 rounding noise (only the no-disagreement
  tail); a one-member committee is exactly 0 for both (every sample tied: random draws).
- `vote_entropy`: the adapter's value is ensel's `vote_entropy`, exactly invariant under a
  permutation of the classes. Native computes `nansum(-v log v)` over the histogram in class
  order, so two samples with the same multiset of counts in another class order (e.g. votes
  (3, 2, 1) and (1, 2, 3)) can differ by 1 ulp: for native they are not tied, for the adapter
  they are, and `rand_argmax` then draws among more samples. Selections are identical when no
  two samples at the top share a count multiset in different class orders. (No bit-native mode:
  native's split of such ties is an artifact of its summation order.)
- Votes: the adapter's votes are each member's argmax of its probabilities (lowest class on
  ties), which is what native does with `sample_predictions_method_name`. With a list of members
  (or `estimators_`), native calls each member's `predict`; that is the same class for
  classifiers whose `predict` is the argmax of `predict_proba` (LogisticRegression, naive Bayes,
  trees, forests, bagging, kNN, ...), not for e.g. `SVC(probability=True)` (Platt scaling) or a
  member with a `cost_matrix`.
- `variation_ratios`: `(E - v_mode) / E` in float32 against native `1 - v_mode / E` in float64:
  the same order and the same ties (both are exact functions of v_mode), so the same selections.
- Uncertainty `least_confident` = ensel's `least_confidence`, `entropy` = ensel's `entropy`,
  `margin_sampling` = `1 - margin` (native `1 - |p(1) - p(2)|`), float32 values: identical
  selections on inputs without near-ties (values closer than float32 resolution).
  `cost_matrix` and `method="expected_average_precision"` have no ensel score: ValueError
  (use `skactiveml.pool.UncertaintySampling`).
- Regression committees: the native empirical standard deviation (ensel scores classifiers).
- Inputs are never modified (native `average_kl_divergence` clips a float32/float64 `probas`
  array in place, e.g. an array a `sample_proba` method returned from its cache).
- A `sample_predictions_method_name` method may return a torch tensor (CPU or CUDA): it is
  scored on its device; the candidates' [n] utilities (not the [E, n, C] block) come back to the
  host for the library's selection.

Additions (not in native): `UncertaintySampling(sample_predictions_method_name=...)` scores the
entropy / least confidence / margin of the members' mean probability from the [E, n, C] member
probabilities in one pass (the native class only sees `clf.predict_proba`); `backend=` picks
ensel's backend ("auto" by default).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import backends, score
from .._chunks import chunk_samples
from .._inputs import as_tensor
from ._common import require, scores_of, votes_of

require("skactiveml", "skactiveml")

from sklearn import clone  # noqa: E402
from skactiveml.base import SkactivemlClassifier, SkactivemlRegressor  # noqa: E402
from skactiveml.pool import QueryByCommittee as _NativeQueryByCommittee  # noqa: E402
from skactiveml.pool import UncertaintySampling as _NativeUncertaintySampling  # noqa: E402
from skactiveml.pool._query_by_committee import _check_ensemble  # noqa: E402
from skactiveml.utils import (  # noqa: E402
    MISSING_LABEL,
    check_equal_missing_label,
    check_scalar,
    check_type,
    simple_batch,
)
from sklearn.utils.validation import check_array  # noqa: E402

__all__ = ["QueryByCommittee", "UncertaintySampling", "committee_utilities", "uncertainty_utilities"]

_QBC_METHODS = ("KL_divergence", "vote_entropy", "variation_ratios")
_US_METHODS = ("least_confident", "margin_sampling", "entropy")


def _tensor(probas) -> torch.Tensor:
    """A torch view of probabilities: numpy, torch (CPU or CUDA) or DLPack as they are, any other
    array-like (nested lists) as a float64 numpy array."""
    if not isinstance(probas, (torch.Tensor, np.ndarray)) and not hasattr(probas, "__dlpack__"):
        probas = np.asarray(probas, dtype=float)
    x = as_tensor(probas, "probas")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"probas: expected real probabilities, got {x.dtype}")
    # Integer probabilities (hard 0/1 votes), which sklearn's check_array accepts: as float64.
    return x if x.dtype.is_floating_point else x.to(torch.float64)


def _member_probas(probas, num_candidates: int | None = None) -> torch.Tensor:
    """The members' probabilities [E, n, C] as a torch view, checked for rank and candidate count."""
    x = _tensor(probas)
    if x.dim() != 3:
        raise ValueError(f"probas: expected [n_members, n_samples, n_classes], got shape {tuple(x.shape)}")
    if num_candidates is not None and x.shape[1] != num_candidates:
        raise ValueError(f"probas: {x.shape[1]} samples for {num_candidates} candidates")
    return x


def _clipped_mutual_info(x: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    """ensel's mutual_info of p' = clip(p, eps, 1) / sum(clip(p, eps, 1)), skactiveml's clipped and
    renormalized probabilities, clipped chunk by chunk of samples in one reused buffer: scored as
    probabilities where the backend reads them (the kernel renormalizes), else as their logs
    (log-probabilities: softmax renormalizes)."""
    E, N, K = x.shape
    # float32 copies of float32 (and half) probabilities: mutual_info is continuous (a rounded
    # value moves it by float32 rounding, well inside the tolerance), and the kernel reads half the bytes.
    dtype = torch.float64 if x.dtype == torch.float64 or not x.dtype.is_floating_point else torch.float32
    reads_probs = backends.resolve(backend, x.device).reads_probs
    out = torch.empty(N, dtype=torch.float32, device=x.device)
    step = min(chunk_samples(E, K, dtype), max(N, 1))
    buffer = torch.empty((E, step, K), dtype=dtype, device=x.device)
    for start in range(0, N, step):
        block = x[:, start : start + step]
        staged = buffer[:, : block.shape[1]].copy_(block)  # a strided view: the kernel reads it in place
        lo, hi = torch.aminmax(staged)  # NaN propagates: one cheap pass decides
        if not (float(lo) > -math.inf and float(hi) < math.inf):
            _raise_not_finite(staged, start)
        staged.clamp_(eps, 1.0)
        if not reads_probs:
            staged.log_()
        kind = "probs" if reads_probs else "log_probs"
        out[start : start + block.shape[1]] = score(staged, kind=kind, backend=backend).mutual_info
    return out


def _raise_not_finite(block: torch.Tensor, start: int) -> None:
    """The first (member, sample) of `block` holding a NaN or an infinity, as native refuses them
    (sklearn's check_array); `start` is the block's first sample."""
    bad = ~torch.isfinite(block)
    e, n, k = (int(i) for i in bad.nonzero()[0])
    raise ValueError(f"probas: {float(block[e, n, k])} at member {e}, sample {start + n}: "
                     "probabilities must be finite")


def committee_utilities(probas, method: str = "KL_divergence", eps: float | None = 1e-7,
                        backend: str = "auto") -> torch.Tensor:
    """The QueryByCommittee utilities of members' probabilities `probas` [E, n, C] (numpy or torch,
    any strides, never modified), float32 [n] on their device:

    - "KL_divergence": mean_e KL(p'_e || mean_e p'_e) = mutual_info(p') = H(pbar') - mean_e H(p'_e)
      (clipped at 0), p' = clip(p, eps, 1) renormalized (skactiveml's `average_kl_divergence`);
      `eps=None`: unclipped p;
    - "vote_entropy": -sum_c (v_c / E) log(v_c / E), v_c = #members whose argmax is c;
    - "variation_ratios": 1 - v_mode / E."""
    check_type(method, "method", target_vals=list(_QBC_METHODS))
    x = _member_probas(probas)
    if method == "KL_divergence":
        if eps is not None:
            check_scalar(eps, "eps", min_val=0, max_val=0.1, target_type=(float, int), min_inclusive=False)
        if x.shape[0] == 1:
            # One member: exactly 0, as native (ensel's float32 rounding would order the noise).
            scores_of(x, "ENK", "probs", backend=backend)  # validates the values all the same
            return torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        if eps is None:
            return scores_of(x, "ENK", "probs", backend=backend).mutual_info
        return _clipped_mutual_info(x, float(eps), backend)
    votes = votes_of(x, "ENK", backend=backend)  # each member's argmax, read in place
    return votes["vote_entropy"] if method == "vote_entropy" else votes["variation_ratio"]


def uncertainty_utilities(probas, method: str = "least_confident", backend: str = "auto") -> torch.Tensor:
    """The UncertaintySampling utilities, float32 [n] on the input's device, of the mean
    probability pbar of `probas`: [n, C] (one model, as `clf.predict_proba` gives) or [E, n, C]
    (members; pbar is never materialized): "least_confident" 1 - max pbar, "margin_sampling"
    1 - (pbar_(1) - pbar_(2)), "entropy" H(pbar)."""
    check_type(method, "method", target_vals=list(_US_METHODS))
    x = _tensor(probas)
    x = _member_probas(x.unsqueeze(0) if x.dim() == 2 else x)
    s = scores_of(x, "ENK", "probs", backend=backend)
    if method == "least_confident":
        return s.least_confidence
    if method == "entropy":
        return s.entropy
    return 1.0 - s.margin


def _on_host(utilities: torch.Tensor) -> np.ndarray:
    """The [n] utilities as float64 numpy, as the library's selection wants them (only they leave
    the device)."""
    return utilities.detach().to(torch.float64).cpu().numpy()


class QueryByCommittee(_NativeQueryByCommittee):
    """`skactiveml.pool.QueryByCommittee` with its classification utilities from ensel
    (`committee_utilities`): "KL_divergence" (default; mutual information of the eps-clipped,
    renormalized member probabilities, as native), "vote_entropy", "variation_ratios".
    Same parameters as the native class, plus `backend` (ensel's, default "auto"); same
    `query(X, y, ensemble, fit_ensemble=True, sample_weight=None, candidates=None, batch_size=1,
    return_utilities=False)`: the ensemble is checked, fitted and asked for probabilities as
    native does, labeled samples get NaN utilities and `simple_batch` selects with
    `random_state_`. The module docstring lists the differences from the native values."""

    def __init__(self, method="KL_divergence", eps=1e-7, sample_predictions_method_name=None,
                 sample_predictions_dict=None, missing_label=MISSING_LABEL, random_state=None,
                 backend="auto"):
        super().__init__(method=method, eps=eps, sample_predictions_method_name=sample_predictions_method_name,
                         sample_predictions_dict=sample_predictions_dict, missing_label=missing_label,
                         random_state=random_state)
        self.backend = backend

    def query(self, X, y, ensemble, fit_ensemble=True, sample_weight=None, candidates=None, batch_size=1,
              return_utilities=False):
        """Indices of the `batch_size` candidates to label (and their utilities): the native
        `QueryByCommittee.query` with ensel's utilities."""
        X, y, candidates, batch_size, return_utilities = self._validate_data(
            X, y, candidates, batch_size, return_utilities, reset=True
        )
        X_cand, mapping = self._transform_candidates(candidates, X, y)
        check_type(fit_ensemble, "fit_ensemble", bool)
        ensemble, est_arr, classes, sample_func, sample_dict = _check_ensemble(
            ensemble=ensemble, X=X, y=y, sample_weight=sample_weight, fit_ensemble=fit_ensemble,
            missing_label=self.missing_label_, estimator_types=[SkactivemlClassifier, SkactivemlRegressor],
            sample_predictions_method_name=self.sample_predictions_method_name,
            sample_predictions_dict=self.sample_predictions_dict,
        )
        check_type(self.method, "method", target_vals=list(_QBC_METHODS))

        if classes is not None:
            if sample_func is None:
                probas = self._aggregate_predict_probas(X_cand, ensemble, est_arr)
            else:
                probas = sample_func(X_cand, **sample_dict)
            _member_probas(probas, len(X_cand))
            utilities_cand = _on_host(committee_utilities(probas, self.method, self.eps, self.backend))
        else:  # a regression committee: the native empirical standard deviation
            if sample_func is None:
                results = np.array([learner.predict(X_cand) for learner in est_arr])
            else:
                results = sample_func(X_cand, **sample_dict).T
            utilities_cand = np.std(results, axis=0)

        if mapping is None:
            utilities = utilities_cand
        else:
            utilities = np.full(len(X), np.nan)
            utilities[mapping] = utilities_cand
        return simple_batch(utilities, self.random_state_, batch_size=batch_size,
                            return_utilities=return_utilities)


class UncertaintySampling(_NativeUncertaintySampling):
    """`skactiveml.pool.UncertaintySampling` with its utilities from ensel
    (`uncertainty_utilities`): "least_confident" (default) 1 - max p, "margin_sampling"
    1 - (p_(1) - p_(2)), "entropy" H(p), where p is `clf.predict_proba(X_cand)` as native or, with
    `sample_predictions_method_name`, the mean of the [E, n, C] member probabilities that method
    of `clf` returns (scored in one pass; an addition, not in native). Same `query(X, y, clf,
    fit_clf=True, sample_weight=None, utility_weight=None, candidates=None, batch_size=1,
    return_utilities=False)`, same selection (`simple_batch` with `random_state_`, NaN for
    labeled samples). `cost_matrix` and "expected_average_precision": ValueError (native only)."""

    def __init__(self, method="least_confident", cost_matrix=None, missing_label=MISSING_LABEL,
                 random_state=None, sample_predictions_method_name=None, sample_predictions_dict=None,
                 backend="auto"):
        super().__init__(method=method, cost_matrix=cost_matrix, missing_label=missing_label,
                         random_state=random_state)
        self.sample_predictions_method_name = sample_predictions_method_name
        self.sample_predictions_dict = sample_predictions_dict
        self.backend = backend

    def query(self, X, y, clf, fit_clf=True, sample_weight=None, utility_weight=None, candidates=None,
              batch_size=1, return_utilities=False):
        """Indices of the `batch_size` candidates to label (and their utilities): the native
        `UncertaintySampling.query` with ensel's utilities."""
        X, y, candidates, batch_size, return_utilities = self._validate_data(
            X, y, candidates, batch_size, return_utilities, reset=True
        )
        X_cand, mapping = self._transform_candidates(candidates, X, y)
        check_type(clf, "clf", SkactivemlClassifier)
        check_equal_missing_label(clf.missing_label, self.missing_label_)
        check_type(fit_clf, "fit_clf", bool)

        if utility_weight is None:
            utility_weight = np.ones(len(X_cand) if mapping is None else len(X))
        utility_weight = check_array(utility_weight, ensure_2d=False)
        if mapping is None and not len(X_cand) == len(utility_weight):
            raise ValueError(f"'utility_weight' must have length 'n_candidates' but "
                             f"{len(X_cand)} != {len(utility_weight)}.")
        if mapping is not None and not len(X) == len(utility_weight):
            raise ValueError(f"'utility_weight' must have length 'n_samples' but "
                             f"{len(utility_weight)} != {len(X)}.")
        if not isinstance(self.method, str):
            raise TypeError(f"{type(self.method)} is an invalid type for method. Type {str} is expected")
        if self.method not in _US_METHODS:
            raise ValueError(f"method={self.method!r}: ensel scores {', '.join(_US_METHODS)}; "
                             "use skactiveml.pool.UncertaintySampling for other methods")
        if self.cost_matrix is not None:
            raise ValueError("cost_matrix: ensel has no cost-sensitive score; "
                             "use skactiveml.pool.UncertaintySampling")
        name, kwargs = self.sample_predictions_method_name, self.sample_predictions_dict
        if name is not None and not hasattr(clf, name):
            raise ValueError(f"clf has no method {name!r} (sample_predictions_method_name)")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError("sample_predictions_dict must be a dict or None")

        if fit_clf:
            clf = clone(clf).fit(X, y) if sample_weight is None else clone(clf).fit(X, y, sample_weight)

        if name is None:
            probas = clf.predict_proba(X_cand)
            _check_rows_sum_to_one(probas)
        else:
            probas = getattr(clf, name)(X_cand, **(kwargs or {}))
            _member_probas(probas, len(X_cand))
        utilities_cand = _on_host(uncertainty_utilities(probas, self.method, self.backend))

        if mapping is None:
            utilities = utilities_cand
        else:
            utilities = np.full(len(X), np.nan)
            utilities[mapping] = utilities_cand
        utilities *= utility_weight
        return simple_batch(utilities, self.random_state_, batch_size=batch_size,
                            return_utilities=return_utilities)


def _check_rows_sum_to_one(probas) -> None:
    """The native check of `uncertainty_scores`: [n, C], each row summing to 1 within 1e-3."""
    x = _tensor(probas)
    if x.dim() != 2:
        raise ValueError(f"clf.predict_proba: expected [n_samples, n_classes], got shape {tuple(x.shape)}")
    if not bool(((x.sum(dim=1, dtype=torch.float64) - 1).abs() <= 1e-3).all()):
        raise ValueError("'probas' are invalid. The sum over axis 1 must be one.")
