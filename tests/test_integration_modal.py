"""ensel.integrations.modal: the same selections as modAL's own query strategies (multi_argmax /
shuffled_argmax, as sets where modAL's order is unspecified), the known differences shown
against modAL's values (KL_max_disagreement is not BALD; vote entropy of permuted histograms),
and Committee.query / ActiveLearner.query loops with sklearn learners."""

import math

import numpy as np
import pytest

pytest.importorskip("modAL", reason="modAL is not installed: pip install 'ensel[modal]'")

import torch  # noqa: E402
from modAL import disagreement as native_dis  # noqa: E402
from modAL import uncertainty as native_unc  # noqa: E402
from modAL.models import ActiveLearner, Committee  # noqa: E402
from scipy.special import softmax  # noqa: E402
from scipy.stats import entropy as scipy_entropy  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

from ensel.integrations import modal as ours  # noqa: E402


def atol(K):
    """The contract's float32 tolerance for K classes (docs/contract.md section 7)."""
    return 1e-5 * (1 + math.log(K))


class Fixed(ClassifierMixin, BaseEstimator):
    """A learner with fixed probabilities: X[:, 0] holds row ids into `table` [N, C]; `predict` is
    the argmax of `predict_proba`, as for LogisticRegression or trees."""

    def __init__(self, table=None, as_tensor=False):
        self.table = table
        self.as_tensor = as_tensor

    def fit(self, X, y):
        self.classes_ = np.arange(self.table.shape[1])
        return self

    def predict_proba(self, X):
        p = self.table[np.asarray(X)[:, 0].astype(int)]
        return torch.from_numpy(p) if self.as_tensor else p

    def predict(self, X):
        return self.classes_[self.table[np.asarray(X)[:, 0].astype(int)].argmax(1)]


def committee_of(probas, strategy=native_dis.vote_entropy_sampling):
    """A modAL Committee whose learner e predicts probas[e] ([E, N, C])."""
    E, N, C = probas.shape
    Xtr, ytr = np.arange(C, dtype=float)[:, None], np.arange(C)
    learners = [ActiveLearner(estimator=Fixed(probas[e]), X_training=Xtr, y_training=ytr) for e in range(E)]
    return Committee(learner_list=learners, query_strategy=strategy)


def member_probas(E, N, C, seed, scale=3.0):
    return softmax(scale * np.random.default_rng(seed).standard_normal((E, N, C)), axis=-1)


def pool(N):
    return np.arange(N, dtype=float)[:, None]


SHAPES = [(5, 60, 3), (7, 151, 10), (2, 33, 2), (12, 300, 41), (3, 20, 5)]
N_INSTANCES = [1, 5, 19]


def assert_same(a, b, K, ordered=False):
    (ia, va), (ib, vb) = a, b
    if ordered:
        np.testing.assert_array_equal(ia, ib)
    else:
        assert set(ia.tolist()) == set(ib.tolist())
    np.testing.assert_allclose(np.sort(vb), np.sort(va), rtol=0, atol=atol(K))


# ------------------------------------------------------------------------------ disagreement


@pytest.mark.parametrize("E, N, C", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consensus_entropy_selects_what_modal_selects(E, N, C, seed):
    com = committee_of(member_probas(E, N, C, seed))
    X = pool(N)
    for n in N_INSTANCES:
        assert_same(native_dis.consensus_entropy_sampling(com, X, n_instances=n),
                    ours.consensus_entropy_sampling(com, X, n_instances=n), C)
    np.testing.assert_allclose(ours.consensus_entropy(com, X), native_dis.consensus_entropy(com, X),
                               rtol=0, atol=atol(C))


def partitions(total, parts, largest=None):
    largest = total if largest is None else largest
    if parts == 1:
        return [(total,)] if total <= largest else []
    return [(first,) + rest for first in range(min(total, largest), -1, -1)
            for rest in partitions(total - first, parts - 1, first)]


def distinct_histogram_probas(E, C, seed):
    """[E, N, C] probabilities whose vote histograms are pairwise distinct as multisets (no two
    samples tie in vote entropy, whatever the class order), each on a random class order."""
    rng = np.random.default_rng(seed)
    hist, ents = [], []
    for h in partitions(E, C):
        ent = -sum(c / E * math.log(c / E) for c in h if c)
        if all(abs(ent - other) > 1e-4 for other in ents):
            hist.append(np.array(h))
            ents.append(ent)
    order = rng.permutation(len(hist))
    hist = [hist[i] for i in order]
    logits = rng.standard_normal((E, len(hist), C))
    for n, h in enumerate(hist):
        votes = np.repeat(rng.permutation(C), h)
        rng.shuffle(votes)
        logits[np.arange(E), n, votes] += 8.0
    return softmax(logits, axis=-1)


@pytest.mark.parametrize("E, C", [(12, 6), (9, 5), (15, 3), (7, 7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vote_entropy_selects_what_modal_selects_on_distinct_histograms(E, C, seed):
    probas = distinct_histogram_probas(E, C, seed)
    N = probas.shape[1]
    com = committee_of(probas)
    X = pool(N)
    for n in (1, 4, N // 2):
        assert_same(native_dis.vote_entropy_sampling(com, X, n_instances=n),
                    ours.vote_entropy_sampling(com, X, n_instances=n), C)
    np.testing.assert_allclose(ours.vote_entropy(com, X), native_dis.vote_entropy(com, X), rtol=0, atol=atol(C))


def test_vote_entropy_of_permuted_histograms_is_a_documented_difference():
    # The same counts (4, 1, 1) in several class orders: modAL's scipy entropy of the histogram in
    # class order differs in the last bit, ensel's vote entropy is exactly invariant.
    votes = np.array([[0, 0, 0, 0, 1, 2], [1, 1, 0, 1, 2, 1], [2, 0, 2, 1, 2, 2], [2, 2, 1, 2, 0, 2],
                      [0, 1, 0, 0, 0, 0]])
    E, N, C = 6, len(votes), 3
    logits = np.zeros((E, N, C))
    logits[np.arange(E)[None], np.arange(N)[:, None], votes] = 5.0
    com = committee_of(softmax(logits, axis=-1))
    X = pool(N)
    native = native_dis.vote_entropy(com, X)
    adapter = ours.vote_entropy(com, X)
    want = -(4 / 6 * math.log(4 / 6) + 2 * (1 / 6 * math.log(1 / 6)))
    np.testing.assert_allclose(native[:4], want, rtol=1e-15)
    np.testing.assert_allclose(adapter, native, rtol=0, atol=atol(C))
    assert len(set(native[:4].tolist())) > 1  # not tied for modAL
    assert len(set(adapter[:4].tolist())) == 1  # tied for ensel
    # With random_tie_break the adapter draws among all four; modAL only among its exact maxima.
    top_native = set(np.flatnonzero(native == native.max()).tolist())
    picks_native, picks_ours = set(), set()
    for seed in range(40):
        np.random.seed(seed)
        picks_native.add(int(native_dis.vote_entropy_sampling(com, X, random_tie_break=True)[0][0]))
        np.random.seed(seed)
        picks_ours.add(int(ours.vote_entropy_sampling(com, X, random_tie_break=True)[0][0]))
    assert picks_native == top_native and len(top_native) < 4
    assert picks_ours == {0, 1, 2, 3}


def test_bald_is_not_kl_max_disagreement():
    """modAL's KL_max_disagreement is max_e KL(p_e || pbar); BALD (ensel's mutual_info, offered
    as bald_sampling) is the mean over members. The values and the selections differ."""
    E, N, C = 6, 400, 8
    probas = member_probas(E, N, C, seed=0)
    com = committee_of(probas)
    X = pool(N)
    p_vote = com.vote_proba(X)  # [N, E, C]
    pbar = p_vote.mean(1)
    kl = np.stack([scipy_entropy(p_vote[:, e].T, qk=pbar.T) for e in range(E)], axis=1)  # [N, E]
    np.testing.assert_allclose(native_dis.KL_max_disagreement(com, X), kl.max(1), rtol=1e-12)
    np.testing.assert_allclose(ours.mutual_information(com, X), kl.mean(1), rtol=0, atol=atol(C))
    assert np.abs(kl.max(1) - kl.mean(1)).max() > 0.1
    native_top = set(native_dis.max_disagreement_sampling(com, X, n_instances=50)[0].tolist())
    bald_top = set(ours.bald_sampling(com, X, n_instances=50)[0].tolist())
    assert native_top != bald_top
    assert bald_top == set(np.argsort(-kl.mean(1))[:50].tolist())
    assert not hasattr(ours, "max_disagreement_sampling") and not hasattr(ours, "KL_max_disagreement")


# ------------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("name", ["uncertainty", "margin", "entropy"])
@pytest.mark.parametrize("E, N, C", SHAPES)
def test_uncertainty_strategies_select_what_modal_selects(name, E, N, C):
    probas = member_probas(E, N, C, seed=E * N)
    X = pool(N)
    native_strategy = getattr(native_unc, f"{name}_sampling")
    strategy = getattr(ours, f"{name}_sampling")
    learner = ActiveLearner(estimator=Fixed(probas[0]), X_training=pool(C), y_training=np.arange(C))
    com = committee_of(probas)
    for estimator in (learner, com, Fixed(probas[1]).fit(None, None)):
        for n in N_INSTANCES:
            assert_same(native_strategy(estimator, X, n_instances=n), strategy(estimator, X, n_instances=n), C)


@pytest.mark.parametrize("strategy", ["consensus_entropy", "vote_entropy", "uncertainty", "margin", "entropy"])
def test_random_tie_break_draws_as_modal(strategy):
    # modAL shuffles with the global numpy RNG; the same seed gives the same pick, ties included.
    E, N, C = 4, 80, 3
    probas = distinct_histogram_probas(9, 5, seed=3) if strategy == "vote_entropy" else member_probas(E, N, C, 3)
    com = committee_of(probas)
    X = pool(probas.shape[1])
    module = native_dis if strategy in ("consensus_entropy", "vote_entropy") else native_unc
    for seed in range(3):
        np.random.seed(seed)
        a = getattr(module, f"{strategy}_sampling")(com, X, n_instances=6, random_tie_break=True)
        np.random.seed(seed)
        b = getattr(ours, f"{strategy}_sampling")(com, X, n_instances=6, random_tie_break=True)
        assert_same(a, b, probas.shape[2], ordered=True)


def test_one_class_and_unfitted_estimators_score_as_modal():
    probas = np.ones((1, 10, 1))
    learner = ActiveLearner(estimator=Fixed(probas[0]), X_training=pool(1), y_training=np.zeros(1, int))
    X = pool(10)
    np.testing.assert_array_equal(ours.classifier_margin(learner, X), native_unc.classifier_margin(learner, X))
    unfitted = ActiveLearner(estimator=LogisticRegression())
    for measure in ("classifier_uncertainty", "classifier_margin", "classifier_entropy"):
        np.testing.assert_array_equal(getattr(ours, measure)(unfitted, X), getattr(native_unc, measure)(unfitted, X))


# ---------------------------------------------------------------------------------- the loop


def test_committee_query_loops_select_what_the_native_strategies_select():
    """Committee.query / ActiveLearner.query with real sklearn learners: query, label, retrain,
    repeat. (modAL 0.4.2's `teach` passes `force_all_finite` to sklearn's check_X_y, which
    scikit-learn 1.8 removed, so each round builds its learners afresh on the grown labeled set,
    as `teach(..., only_new=False)` would.)"""
    rng = np.random.RandomState(0)
    X = rng.randn(300, 4)
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 0.8)

    def committee(strategy, labeled):
        learners = [ActiveLearner(estimator=est, X_training=X[labeled[i::3]], y_training=y[labeled[i::3]])
                    for i, est in enumerate([LogisticRegression(), LogisticRegression(C=0.1),
                                             LogisticRegression(C=10.0)])]
        return Committee(learner_list=learners, query_strategy=strategy)

    def learner(strategy, labeled):
        return ActiveLearner(LogisticRegression(), strategy, X_training=X[labeled], y_training=y[labeled])

    cases = [(committee, native_dis.consensus_entropy_sampling, ours.consensus_entropy_sampling),
             (committee, native_unc.margin_sampling, ours.margin_sampling),
             (committee, native_unc.uncertainty_sampling, ours.uncertainty_sampling),
             (learner, native_unc.entropy_sampling, ours.entropy_sampling)]
    for make, native_strategy, our_strategy in cases:
        labeled = np.arange(30)
        for step in range(4):
            pool_idx = np.setdiff1d(np.arange(300), labeled)
            qn, xn = make(native_strategy, labeled).query(X[pool_idx], n_instances=3)
            qa, xa = make(our_strategy, labeled).query(X[pool_idx], n_instances=3)
            assert set(qa.tolist()) == set(qn.tolist()), f"{our_strategy.__name__} step {step}"
            np.testing.assert_array_equal(xa[np.argsort(qa)], xn[np.argsort(qn)])
            labeled = np.concatenate([labeled, pool_idx[qn]])


def test_committee_query_with_trees_and_vote_entropy():
    # A committee of trees votes with predict = argmax predict_proba: the vote entropies are the
    # same; where histograms at the boundary are permutations of each other the sets may differ,
    # so compare the scores and the selection's values (the tied ones are interchangeable).
    rng = np.random.RandomState(1)
    X = rng.randn(200, 4)
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 0.8)
    learners = [ActiveLearner(estimator=DecisionTreeClassifier(max_depth=3, random_state=i),
                              X_training=X[i * 7:i * 7 + 25], y_training=y[i * 7:i * 7 + 25]) for i in range(5)]
    com = Committee(learner_list=learners, query_strategy=ours.vote_entropy_sampling)
    Xp = X[60:]
    np.testing.assert_allclose(ours.vote_entropy(com, Xp), native_dis.vote_entropy(com, Xp), rtol=0, atol=atol(3))
    idx, inst, metrics = com.query(Xp, return_metrics=True, n_instances=4)
    _, native_metrics = native_dis.vote_entropy_sampling(com, Xp, n_instances=4)
    np.testing.assert_allclose(np.sort(metrics), np.sort(native_metrics), rtol=0, atol=atol(3))
    np.testing.assert_array_equal(inst, Xp[idx])


def test_committee_query_calls_the_strategy_once_and_gets_a_tuple():
    calls = []

    def counted(committee, X, **kw):
        calls.append(1)
        return ours.consensus_entropy_sampling(committee, X, **kw)

    com = committee_of(member_probas(3, 40, 4, seed=0), strategy=counted)
    result = com.query(pool(40), n_instances=3)
    assert len(calls) == 1  # a bare array would make modAL's bare except call it twice
    assert isinstance(ours.consensus_entropy_sampling(com, pool(40)), tuple)
    assert len(result[0]) == 3


# ------------------------------------------------------------------- inputs, devices, errors


def test_inputs_are_never_modified_and_torch_probabilities_work():
    probas = member_probas(4, 50, 5, seed=2)
    before = probas.copy()
    X = pool(50)
    com = committee_of(probas)
    for s in ("vote_entropy", "consensus_entropy", "bald"):
        getattr(ours, f"{s}_sampling")(com, X, n_instances=3)
    np.testing.assert_array_equal(probas, before)
    np.testing.assert_array_equal(X, pool(50))
    learner = Fixed(probas[0], as_tensor=True).fit(None, None)
    assert_same(native_unc.entropy_sampling(Fixed(probas[0]).fit(None, None), X, n_instances=4),
                ours.entropy_sampling(learner, X, n_instances=4), 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probabilities_are_scored_on_the_device():
    probas = member_probas(1, 64, 5, seed=6)
    gpu = Fixed(probas[0]).fit(None, None)
    gpu.predict_proba = lambda X: torch.from_numpy(probas[0][np.asarray(X)[:, 0].astype(int)]).cuda()
    assert_same(native_unc.margin_sampling(Fixed(probas[0]).fit(None, None), pool(64), n_instances=5),
                ours.margin_sampling(gpu, pool(64), n_instances=5), 5)


def test_bad_input_is_a_clear_error():
    learner = Fixed(member_probas(1, 10, 3, 0)[0]).fit(None, None)
    with pytest.raises(TypeError, match="Committee"):
        ours.vote_entropy_sampling(learner, pool(10))
    with pytest.raises(TypeError, match="predict_proba"):
        ours.uncertainty_sampling(object(), pool(10))
    bad = member_probas(1, 10, 3, 0)[0]
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN probability at member 0, sample 4"):
        ours.entropy_sampling(Fixed(bad).fit(None, None), pool(10))
    flat = Fixed(member_probas(1, 10, 3, 0)[0]).fit(None, None)
    flat.predict_proba = lambda X: np.ones(len(X))
    with pytest.raises(ValueError, match=r"expected \[N, C\]"):
        ours.margin_sampling(flat, pool(10))
