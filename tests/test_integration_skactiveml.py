"""ensel.integrations.skactiveml: the same selections as scikit-activeml's own QueryByCommittee
and UncertaintySampling (same random_state, same NaN utilities for labeled samples), the
known differences shown against the native values, and a query loop with a real sklearn
ensemble. Modelled on scikit-activeml's query-strategy tests: every `query` parameter form
(candidates None / indices / samples, batch_size, return_utilities) against the native class."""

import math

import numpy as np
import pytest

pytest.importorskip("skactiveml", reason="scikit-activeml is not installed: pip install 'ensel[skactiveml]'")

import torch  # noqa: E402
from scipy.special import softmax  # noqa: E402
from skactiveml.base import SkactivemlClassifier  # noqa: E402
from skactiveml.classifier import SklearnClassifier  # noqa: E402
from skactiveml.pool import QueryByCommittee as NativeQBC  # noqa: E402
from skactiveml.pool import UncertaintySampling as NativeUS  # noqa: E402
from skactiveml.pool._query_by_committee import average_kl_divergence  # noqa: E402
from skactiveml.pool._query_by_committee import vote_entropy as native_vote_entropy  # noqa: E402
from skactiveml.utils import MISSING_LABEL  # noqa: E402
from sklearn.ensemble import BaggingClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from ensel.integrations.skactiveml import (  # noqa: E402
    QueryByCommittee,
    UncertaintySampling,
    committee_utilities,
)

# The contract's float32 tolerance for K classes (docs/contract.md section 7).
def atol(K):
    return 1e-5 * (1 + math.log(K))


class Precomputed(SkactivemlClassifier):
    """A committee whose member probabilities are fixed: X holds row ids into `probas` [E, N, C];
    `sample_proba` returns the members' rows, `predict_proba` their mean (the skactiveml plug-in
    for precomputed predictions: sample_predictions_method_name="sample_proba")."""

    def __init__(self, probas=None, classes=None, missing_label=MISSING_LABEL, random_state=None,
                 as_tensor=False):
        super().__init__(classes=classes, missing_label=missing_label, random_state=random_state)
        self.probas = probas
        self.as_tensor = as_tensor

    def fit(self, X, y, sample_weight=None):
        self.classes_ = np.asarray(self.classes)
        return self

    def sample_proba(self, X):
        p = self.probas[:, np.asarray(X)[:, 0].astype(int)]
        return torch.from_numpy(p) if self.as_tensor else p

    def predict_proba(self, X):
        return self.probas[:, np.asarray(X)[:, 0].astype(int)].mean(0)


def fitted(probas, classes, **kw):
    return Precomputed(probas, classes=classes, **kw).fit(None, None)


def member_probas(E, N, C, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    return softmax(scale * rng.standard_normal((E, N, C)), axis=-1)


def pool(N, labeled, seed):
    rng = np.random.default_rng(seed + 1000)
    X = np.arange(N, dtype=float)[:, None]
    y = np.full(N, MISSING_LABEL)
    idx = rng.choice(N, size=labeled, replace=False)
    y[idx] = rng.integers(0, 2, labeled)
    return X, y


SHAPES = [(5, 50, 3), (7, 123, 10), (2, 31, 2), (16, 200, 37), (3, 17, 1 + 4)]


def qbc_pair(method, seed, **kw):
    native = NativeQBC(method=method, sample_predictions_method_name="sample_proba", random_state=seed, **kw)
    ours = QueryByCommittee(method=method, sample_predictions_method_name="sample_proba", random_state=seed, **kw)
    return native, ours


def both(native, ours, *args, **kwargs):
    # skactiveml's average_kl_divergence clips float64 inputs in place: give it its own copy.
    nargs = [fitted(a.probas.copy(), a.classes) if isinstance(a, Precomputed) else a for a in args]
    nkw = {k: fitted(v.probas.copy(), v.classes) if isinstance(v, Precomputed) else v
           for k, v in kwargs.items()}
    return native.query(*nargs, **nkw), ours.query(*args, **kwargs)


def assert_same_query(a, b, K):
    (ia, ua), (ib, ub) = a, b
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(np.isnan(ua), np.isnan(ub))  # labeled / already chosen: NaN
    np.testing.assert_allclose(ub, ua, rtol=0, atol=atol(K))


# ------------------------------------------------------------------------- QueryByCommittee


@pytest.mark.parametrize("E, N, C", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_divergence_selects_what_native_selects(E, N, C, seed):
    probas = member_probas(E, N, C, seed)
    X, y = pool(N, labeled=N // 5, seed=seed)
    com = fitted(probas, classes=list(range(C)))
    for batch_size in (1, 4):
        native, ours = qbc_pair("KL_divergence", seed)
        a, b = both(native, ours, X, y, ensemble=com, fit_ensemble=False, batch_size=batch_size,
                    return_utilities=True)
        assert_same_query(a, b, C)


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_divergence_reproduces_the_eps_clipping(seed):
    # Sharp members: many probabilities below eps = 1e-7, where native clips and renormalizes.
    E, N, C = 6, 150, 8
    probas = member_probas(E, N, C, seed, scale=12.0)
    assert (probas < 1e-7).mean() > 0.2
    X, y = pool(N, labeled=10, seed=seed)
    com = fitted(probas, classes=list(range(C)))
    for eps in (1e-7, 1e-3):
        native, ours = qbc_pair("KL_divergence", seed, eps=eps)
        a, b = both(native, ours, X, y, ensemble=com, fit_ensemble=False, batch_size=5, return_utilities=True)
        assert_same_query(a, b, C)
    # The documented difference: without the clip (eps=None, ensel's definition) the values move
    # by far more than the tolerance wherever a probability is below eps.
    clipped = average_kl_divergence(probas.copy(), 1e-3)
    unclipped = committee_utilities(probas, "KL_divergence", eps=None).double().numpy()
    assert np.abs(unclipped - clipped).max() > 100 * atol(C)


def test_kl_divergence_on_members_that_agree_is_a_tie_broken_as_native():
    # One member: every utility is exactly 0 for both, so rand_argmax draws among all of them.
    probas = member_probas(1, 40, 4, seed=3)
    X, y = pool(40, labeled=5, seed=3)
    com = fitted(probas, classes=[0, 1, 2, 3])
    for rs in range(5):
        native, ours = qbc_pair("KL_divergence", rs)
        a, b = both(native, ours, X, y, ensemble=com, fit_ensemble=False, batch_size=6, return_utilities=True)
        assert np.nanmax(np.abs(a[1])) == 0 and np.nanmax(np.abs(b[1])) == 0
        assert_same_query(a, b, 4)


def partitions(total, parts, largest=None):
    """The vote histograms of `total` votes over `parts` classes, as non-increasing count tuples."""
    largest = total if largest is None else largest
    if parts == 1:
        return [(total,)] if total <= largest else []
    return [(first,) + rest for first in range(min(total, largest), -1, -1)
            for rest in partitions(total - first, parts - 1, first)]


def distinct_histogram_probas(E, C, seed, extra_labeled=8):
    """[E, N, C] member probabilities whose vote histograms (argmax counts) are pairwise distinct as
    multisets -- no two samples tie in vote entropy, in any class order -- plus `extra_labeled`
    samples (to be labeled) with repeated histograms, last. Returns probas, N, #distinct."""
    rng = np.random.default_rng(seed)
    hist, ents = [], []
    for h in partitions(E, C):
        ent = -sum(c / E * math.log(c / E) for c in h if c)
        if all(abs(ent - other) > 1e-4 for other in ents):  # distinct values, far beyond float32
            hist.append(np.array(h))
            ents.append(ent)
    distinct = len(hist)
    hist += [hist[i] for i in rng.integers(0, len(hist), extra_labeled)]
    N = len(hist)
    logits = rng.standard_normal((E, N, C))
    for n, h in enumerate(hist):
        votes = np.repeat(rng.permutation(C), h[:C])  # counts on a random class order
        rng.shuffle(votes)
        logits[np.arange(E), n, votes] += 8.0
    return softmax(logits, axis=-1), N, distinct


@pytest.mark.parametrize("E, C", [(12, 6), (9, 5), (15, 3), (7, 7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vote_entropy_selects_what_native_selects_on_distinct_histograms(E, C, seed):
    probas, N, distinct = distinct_histogram_probas(E, C, seed)
    X = np.arange(N, dtype=float)[:, None]
    y = np.full(N, MISSING_LABEL)
    y[distinct:] = 0  # the repeated histograms are labeled: NaN for both
    com = fitted(probas, classes=list(range(C)))
    for batch_size in (1, 7):
        native, ours = qbc_pair("vote_entropy", seed)
        a, b = both(native, ours, X, y, ensemble=com, fit_ensemble=False, batch_size=batch_size,
                    return_utilities=True)
        assert_same_query(a, b, C)


def test_vote_entropy_on_permuted_histograms_is_a_documented_difference():
    # Counts (3, 2, 1) in the class orders skactiveml sums them in: mathematically equal entropies.
    votes = np.array([[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 2], [1, 0, 2, 2, 2, 1],
                      [0, 0, 0, 0, 1, 2]])
    native = native_vote_entropy(votes, classes=[0, 1, 2])
    E, N, C = 6, len(votes), 3
    logits = np.zeros((E, N, C))
    logits[np.arange(E)[None], np.arange(N)[:, None], votes] = 5.0
    ours = committee_utilities(softmax(logits, axis=-1), "vote_entropy").double().numpy()
    want = -(3 / 6 * math.log(3 / 6) + 2 / 6 * math.log(2 / 6) + 1 / 6 * math.log(1 / 6))
    # native: the first four samples are not all equal bit for bit (class order of the sum) ...
    assert len(set(native[:4].tolist())) > 1
    np.testing.assert_allclose(native[:4], want, rtol=1e-15)
    # ... ensel's vote entropy is invariant under the class order: they tie exactly.
    assert len(set(ours[:4].tolist())) == 1
    np.testing.assert_allclose(ours, native, rtol=0, atol=atol(C))
    # So rand_argmax draws among the 4 tied samples for the adapter, among fewer for native.
    X = np.arange(N, dtype=float)[:, None]
    y = np.full(N, MISSING_LABEL)
    com = fitted(softmax(logits, axis=-1), classes=[0, 1, 2])
    na, oa = [], []
    for rs in range(40):
        native_q, ours_q = qbc_pair("vote_entropy", rs)
        a, b = both(native_q, ours_q, X, y, ensemble=com, fit_ensemble=False)
        na.append(int(a[0])), oa.append(int(b[0]))
    assert set(oa) == {0, 1, 2, 3}
    top = np.flatnonzero(native == native.max())
    assert set(na) == set(top.tolist()) and len(top) < 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variation_ratios_selects_what_native_selects_ties_included(seed):
    # Few members: variation ratios are full of exact ties; both keep the same tie pattern, so
    # rand_argmax with the same random_state_ draws the same samples.
    E, N, C = 4, 90, 3
    probas = member_probas(E, N, C, seed)
    X, y = pool(N, labeled=20, seed=seed)
    com = fitted(probas, classes=[0, 1, 2])
    native, ours = qbc_pair("variation_ratios", seed)
    a, b = both(native, ours, X, y, ensemble=com, fit_ensemble=False, batch_size=8, return_utilities=True)
    assert len(np.unique(a[1][0][~np.isnan(a[1][0])])) <= E  # ties everywhere
    assert_same_query(a, b, C)


@pytest.mark.parametrize("method", ["KL_divergence", "vote_entropy", "variation_ratios"])
def test_candidates_as_indices_and_as_samples(method):
    E, N, C = 5, 60, 4
    probas = member_probas(E, N, C, seed=7) if method == "KL_divergence" else distinct_histogram_probas(5, 4, 7)[0]
    N = probas.shape[1]
    X, y = pool(N, labeled=6, seed=7)
    com = fitted(probas, classes=list(range(C)))
    for candidates in (np.arange(0, N, 3), X[5:20]):
        native, ours = qbc_pair(method, 11)
        a, b = both(native, ours, X, y, ensemble=com, fit_ensemble=False, candidates=candidates, batch_size=3,
                    return_utilities=True)
        assert_same_query(a, b, C)


def test_members_as_a_list_and_as_estimators_of_a_fitted_ensemble():
    rng = np.random.RandomState(0)
    X = rng.randn(80, 4)
    y_true = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int) + (X[:, 2] > 1)
    y = np.full(80, MISSING_LABEL)
    y[:15] = y_true[:15]
    members = [SklearnClassifier(LogisticRegression(C=c), classes=[0, 1, 2], random_state=0) for c in (0.1, 1, 10)]
    bag = SklearnClassifier(BaggingClassifier(LogisticRegression(), n_estimators=6, random_state=0),
                            classes=[0, 1, 2], random_state=0)
    for ensemble in (members, bag):
        for method in ("KL_divergence", "variation_ratios"):
            a = NativeQBC(method=method, random_state=5).query(X, y, ensemble=ensemble, batch_size=4,
                                                                return_utilities=True)
            b = QueryByCommittee(method=method, random_state=5).query(X, y, ensemble=ensemble, batch_size=4,
                                                                       return_utilities=True)
            assert_same_query(a, b, 3)


def test_a_regression_committee_keeps_the_native_std():
    from sklearn.ensemble import BaggingRegressor
    from sklearn.linear_model import LinearRegression
    from skactiveml.regressor import SklearnRegressor

    rng = np.random.RandomState(1)
    X = rng.randn(50, 3)
    y = np.full(50, MISSING_LABEL)
    y[:10] = X[:10, 0]
    reg = SklearnRegressor(BaggingRegressor(LinearRegression(), n_estimators=4, random_state=0), random_state=0)
    a = NativeQBC(random_state=2).query(X, y, ensemble=reg, batch_size=3, return_utilities=True)
    b = QueryByCommittee(random_state=2).query(X, y, ensemble=reg, batch_size=3, return_utilities=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ------------------------------------------------------------------------ UncertaintySampling


@pytest.mark.parametrize("method", ["least_confident", "margin_sampling", "entropy"])
@pytest.mark.parametrize("E, N, C", SHAPES)
def test_uncertainty_sampling_selects_what_native_selects(method, E, N, C):
    probas = member_probas(E, N, C, seed=E + N)
    X, y = pool(N, labeled=N // 4, seed=N)
    clf = fitted(probas, classes=list(range(C)))
    for batch_size in (1, 5):
        a = NativeUS(method=method, random_state=3).query(X, y, clf=clf, fit_clf=False, batch_size=batch_size,
                                                          return_utilities=True)
        b = UncertaintySampling(method=method, random_state=3).query(X, y, clf=clf, fit_clf=False,
                                                                     batch_size=batch_size, return_utilities=True)
        assert_same_query(a, b, C)
        # The addition: the members' [E, n, C] probabilities, their mean never materialized.
        c = UncertaintySampling(method=method, random_state=3, sample_predictions_method_name="sample_proba").query(
            X, y, clf=clf, fit_clf=False, batch_size=batch_size, return_utilities=True)
        assert_same_query(a, c, C)


def test_uncertainty_sampling_utility_weight_and_candidates():
    E, N, C = 4, 70, 5
    probas = member_probas(E, N, C, seed=9)
    X, y = pool(N, labeled=10, seed=9)
    clf = fitted(probas, classes=list(range(C)))
    w = np.random.default_rng(0).uniform(0.5, 1.5, N)
    for method in ("least_confident", "margin_sampling", "entropy"):
        kw = dict(clf=clf, fit_clf=False, utility_weight=w, candidates=np.arange(1, N, 2), batch_size=4,
                  return_utilities=True)
        a = NativeUS(method=method, random_state=1).query(X, y, **kw)
        b = UncertaintySampling(method=method, random_state=1).query(X, y, **kw)
        assert_same_query(a, b, C)


# --------------------------------------------------------------------------------- the loop


def test_an_active_learning_loop_with_sklearn_ensembles_selects_what_native_selects():
    """scikit-activeml's own cycle: query, label, refit inside query (fit_ensemble=True), repeat."""
    rng = np.random.RandomState(0)
    X = rng.randn(150, 5)
    y_true = (X[:, 0] + 0.5 * X[:, 1] - 0.3 * X[:, 3] > 0).astype(int) + (X[:, 2] > 0.8)
    bag = SklearnClassifier(BaggingClassifier(LogisticRegression(), n_estimators=5, random_state=0),
                            classes=[0, 1, 2], random_state=0)
    members = [SklearnClassifier(LogisticRegression(C=c), classes=[0, 1, 2], random_state=0)
               for c in (0.05, 0.5, 5.0)]
    cases = [
        (NativeQBC(random_state=42), QueryByCommittee(random_state=42), dict(ensemble=bag)),
        (NativeQBC(method="variation_ratios", random_state=42),
         QueryByCommittee(method="variation_ratios", random_state=42), dict(ensemble=members)),
        (NativeUS(method="entropy", random_state=42), UncertaintySampling(method="entropy", random_state=42),
         dict(clf=bag)),
        (NativeUS(method="margin_sampling", random_state=42),
         UncertaintySampling(method="margin_sampling", random_state=42), dict(clf=bag)),
    ]
    for native, ours, kw in cases:
        y_native = np.full(150, MISSING_LABEL)
        y_native[:9] = y_true[:9]
        y_ours = y_native.copy()
        for cycle in range(3):
            qn = native.query(X, y_native, batch_size=3, **kw)
            qo = ours.query(X, y_ours, batch_size=3, **kw)
            np.testing.assert_array_equal(qo, qn, err_msg=f"{type(native).__name__} cycle {cycle}")
            y_native[qn] = y_true[qn]
            y_ours[qo] = y_true[qo]


# ------------------------------------------------------------------- inputs, devices, errors


def test_inputs_are_never_modified():
    probas = member_probas(4, 40, 6, seed=1, scale=12.0)  # entries below eps: native clips in place
    X, y = pool(40, labeled=8, seed=1)
    before = probas.copy(), X.copy(), y.copy()
    com = fitted(probas, classes=list(range(6)))
    QueryByCommittee(sample_predictions_method_name="sample_proba", random_state=0).query(
        X, y, ensemble=com, fit_ensemble=False, batch_size=3)
    UncertaintySampling(random_state=0, sample_predictions_method_name="sample_proba").query(
        X, y, clf=com, fit_clf=False)
    np.testing.assert_array_equal(probas, before[0])
    np.testing.assert_array_equal(X, before[1])
    np.testing.assert_array_equal(y, before[2])
    # (native average_kl_divergence does clip a float64 array in place)
    native_copy = probas.copy()
    average_kl_divergence(native_copy)
    assert not np.array_equal(native_copy, probas)


def test_torch_probabilities_are_scored_as_they_are():
    E, N, C = 5, 80, 4
    probas = member_probas(E, N, C, seed=4)
    X, y = pool(N, labeled=10, seed=4)
    for method in ("KL_divergence", "vote_entropy", "variation_ratios"):
        native, ours = qbc_pair(method, 0)
        want = native.query(X, y, ensemble=fitted(probas.copy(), list(range(C))), fit_ensemble=False,
                            batch_size=4)
        got = ours.query(X, y, ensemble=fitted(probas, list(range(C)), as_tensor=True), fit_ensemble=False,
                         batch_size=4)
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probabilities_are_scored_on_the_device():
    E, N, C = 5, 80, 4
    probas = member_probas(E, N, C, seed=5)
    on_gpu = torch.from_numpy(probas).cuda()
    for method in ("KL_divergence", "vote_entropy", "variation_ratios"):
        u = committee_utilities(on_gpu, method)
        assert u.is_cuda
        np.testing.assert_allclose(u.double().cpu().numpy(), committee_utilities(probas, method).double().numpy(),
                                   rtol=0, atol=atol(C))


def test_bad_input_is_a_clear_error():
    E, N, C = 3, 20, 3
    probas = member_probas(E, N, C, seed=0)
    X, y = pool(N, labeled=4, seed=0)
    com = fitted(probas, classes=[0, 1, 2])
    with pytest.raises(TypeError, match="method"):
        QueryByCommittee(method="KL", sample_predictions_method_name="sample_proba").query(
            X, y, ensemble=com, fit_ensemble=False)
    with pytest.raises(ValueError, match="eps"):
        QueryByCommittee(eps=0.5, sample_predictions_method_name="sample_proba").query(
            X, y, ensemble=com, fit_ensemble=False)
    with pytest.raises(ValueError, match=r"\[n_members, n_samples, n_classes\]"):
        committee_utilities(probas[0])
    bad = probas.copy()
    bad[1, 7, 2] = np.nan
    with pytest.raises(ValueError, match="member 1, sample 7"):
        committee_utilities(bad)
    with pytest.raises(ValueError, match="NaN probability at member 1, sample 7"):
        committee_utilities(bad, "vote_entropy")
    with pytest.raises(ValueError, match="cost_matrix"):
        UncertaintySampling(cost_matrix=1 - np.eye(3)).query(X, y, clf=com, fit_clf=False)
    with pytest.raises(ValueError, match="expected_average_precision"):
        UncertaintySampling(method="expected_average_precision").query(X, y, clf=com, fit_clf=False)
    unnormalized = fitted(probas * 2, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="sum over axis 1 must be one"):
        UncertaintySampling().query(X, y, clf=unnormalized, fit_clf=False)
    with pytest.raises(TypeError):
        QueryByCommittee().query(X, y, ensemble=LogisticRegression())  # plain sklearn, as native
