"""ensel.integrations.small_text: the same selections as small-text's own BALD, PredictionEntropy,
LeastConfidence and BreakingTies (as sets: small-text's argpartition leaves the order
unspecified), BALD's log2 / eps difference shown against the native values, and
PoolBasedActiveLearner loops with sklearn classifiers."""

import math

import numpy as np
import pytest

pytest.importorskip("small_text", reason="small-text is not installed: pip install 'ensel[small-text]'")

import torch  # noqa: E402
from scipy.special import softmax  # noqa: E402
from scipy.sparse import random as sparse_random  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from small_text import (  # noqa: E402
    ConfidenceEnhancedLinearSVC,
    PoolBasedActiveLearner,
    SklearnClassifierFactory,
    SklearnDataset,
)
from small_text import query_strategies as native  # noqa: E402
from small_text.classifiers import SklearnClassifier  # noqa: E402
from small_text.query_strategies.bayesian import _bald as native_bald  # noqa: E402
from small_text.query_strategies.exceptions import EmptyPoolException, PoolExhaustedException  # noqa: E402

from ensel.integrations import small_text as ours  # noqa: E402

# small-text's own datasets warn about their own deprecated helper on every label access.
pytestmark = pytest.mark.filterwarnings("ignore:The function get_flattened_unique_labels:DeprecationWarning")


def atol(K):
    """The contract's float32 tolerance for K classes (docs/contract.md section 7)."""
    return 1e-5 * (1 + math.log(K))


class Table(SklearnClassifier):
    """Fixed probabilities: dataset.x[:, 0] holds row ids into `probas` [N, k, C].
    `predict_proba(dataset, dropout_sampling=k)` gives the [N, k, C] rows, without it their mean."""

    def __init__(self, probas, as_tensor=False):
        self.probas, self.num_classes, self.multi_label, self.as_tensor = probas, probas.shape[2], False, as_tensor

    def fit(self, train_set, weights=None):
        return self

    def predict_proba(self, data_set, dropout_sampling=1):
        rows = self.probas[np.asarray(data_set.x)[:, 0].astype(int)]
        out = rows if dropout_sampling > 1 else rows.mean(1)
        return torch.from_numpy(out) if self.as_tensor else out


class Ensemble(SklearnClassifier):
    """An ensemble of sklearn members exposing their probabilities through dropout_sampling (the
    idiom that makes small-text's BALD work with sklearn models): [N, E, C] when
    dropout_sampling > 1, their mean otherwise."""

    def __init__(self, members, num_classes):
        self.members, self.num_classes, self.multi_label = members, num_classes, False

    def fit(self, train_set, weights=None):
        for m in self.members:
            m.fit(train_set.x, train_set.y)
        return self

    def predict_proba(self, data_set, dropout_sampling=1):
        P = np.stack([m.predict_proba(data_set.x) for m in self.members], axis=1)
        return P if dropout_sampling > 1 else P.mean(1)


class EnsembleFactory:
    def __init__(self, num_classes):
        self.num_classes = num_classes

    def new(self):
        return Ensemble([LogisticRegression(C=c) for c in (0.1, 1.0, 10.0)], self.num_classes)


def sampled_probas(N, k, C, seed, scale=3.0):
    return softmax(scale * np.random.default_rng(seed).standard_normal((N, k, C)), axis=-1)


def table_dataset(N, C):
    return SklearnDataset(np.arange(N, dtype=float)[:, None], np.zeros(N, int), target_labels=np.arange(C))


def split(N, labeled, seed):
    rng = np.random.default_rng(seed + 7)
    lab = np.sort(rng.choice(N, labeled, replace=False))
    return np.setdiff1d(np.arange(N), lab), lab


SHAPES = [(60, 5, 3), (151, 7, 10), (33, 2, 2), (300, 12, 41), (20, 3, 5)]
STRATEGIES = ["PredictionEntropy", "LeastConfidence", "BreakingTies"]


# ------------------------------------------------------------------------------------- BALD


@pytest.mark.parametrize("N, k, C", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bald_selects_what_small_text_selects(N, k, C, seed):
    probas = sampled_probas(N, k, C, seed)
    clf, ds = Table(probas), table_dataset(N, C)
    unl, lab = split(N, N // 4, seed)
    for n in (1, 5, len(unl) - 1, len(unl)):
        want = native.BALD(dropout_samples=k).query(clf, ds, unl, lab, None, n=n)
        got = ours.BALD(dropout_samples=k).query(clf, ds, unl, lab, None, n=n)
        assert set(got.tolist()) == set(want.tolist())
        assert got.dtype == want.dtype and len(got) == n


def test_bald_values_are_natural_log_without_the_eps():
    """The documented difference: small-text's _bald is log2 with eps = 1e-8 inside the logs; the
    adapter's scores_ are ensel's mutual information in nats (= native * ln 2 up to eps terms)."""
    N, k, C = 200, 6, 8
    probas = sampled_probas(N, k, C, seed=4)
    strategy = ours.BALD(dropout_samples=k)
    strategy.query(Table(probas), table_dataset(N, C), np.arange(N), np.array([], int), None, n=5)
    native_bits = native_bald(probas)
    np.testing.assert_allclose(strategy.scores_, native_bits * math.log(2), rtol=0, atol=atol(C))
    assert np.abs(strategy.scores_ - native_bits).max() > 0.05  # log2 vs ln: not the same numbers
    # without the eps, native's formula is exactly ensel's definition (here in float64)
    pbar = probas.mean(1)
    H = -(pbar * np.log(pbar)).sum(-1)
    EH = -(probas * np.log(probas)).sum(-1).mean(1)
    np.testing.assert_allclose(strategy.scores_, np.maximum(H - EH, 0), rtol=0, atol=atol(C))
    assert np.abs(native_bald(probas, eps=0.0) * math.log(2) - (H - EH)).max() < 1e-12
    assert np.abs(native_bits * math.log(2) - (H - EH)).max() > 0  # the eps moves native's values


# ---------------------------------------------------------------------- confidence strategies


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("N, k, C", SHAPES)
def test_confidence_strategies_select_what_small_text_selects(name, N, k, C):
    probas = sampled_probas(N, k, C, seed=N + k)
    clf, ds = Table(probas), table_dataset(N, C)
    unl, lab = split(N, N // 5, seed=k)
    for n in (1, 4, len(unl) - 1, len(unl)):
        a, b = getattr(native, name)(), getattr(ours, name)()
        want = a.query(clf, ds, unl, lab, None, n=n)
        got = b.query(clf, ds, unl, lab, None, n=n)
        assert set(got.tolist()) == set(want.tolist())
        np.testing.assert_allclose(b.scores_, a.scores_, rtol=0, atol=atol(C))  # the native score values
    # The addition: the mean of dropout_sampling=k scored in one pass, the same as predict_proba's mean.
    c = getattr(ours, name)(dropout_samples=k)
    got = c.query(clf, ds, unl, lab, None, n=4)
    want = getattr(native, name)().query(clf, ds, unl, lab, None, n=4)
    assert set(got.tolist()) == set(want.tolist())


# ----------------------------------------------------------------------------------- loops


def test_pool_based_active_learner_loops_select_what_the_native_strategies_select():
    """small-text's own loop: initialize_data, then query / update rounds, with a
    ConfidenceEnhancedLinearSVC (SklearnClassifierFactory) and, for BALD, an sklearn ensemble."""
    rng = np.random.RandomState(0)
    N, D, C = 240, 30, 3
    x = sparse_random(N, D, density=0.3, format="csr", random_state=0)
    y = np.asarray(x[:, :3].sum(1)).ravel()
    y = np.digitize(y, np.quantile(y, [1 / 3, 2 / 3]))
    train = SklearnDataset(x, y, target_labels=np.arange(C))
    init = np.array([i for c in range(C) for i in np.where(y == c)[0][:4]])
    svc = SklearnClassifierFactory(ConfidenceEnhancedLinearSVC(), C)
    cases = [(svc, native.PredictionEntropy(), ours.PredictionEntropy()),
             (svc, native.LeastConfidence(), ours.LeastConfidence()),
             (svc, native.BreakingTies(), ours.BreakingTies()),
             (EnsembleFactory(C), native.BALD(dropout_samples=3), ours.BALD(dropout_samples=3))]
    for factory, native_strategy, our_strategy in cases:
        learners = [PoolBasedActiveLearner(factory, s, train) for s in (native_strategy, our_strategy)]
        for al in learners:
            al.initialize_data(init, y[init])
        for step in range(4):
            qn, qa = (al.query(num_samples=5) for al in learners)
            assert set(qa.tolist()) == set(qn.tolist()), f"{our_strategy} step {step}"
            for al in learners:
                al.update(y[qn])  # the same labels for the same samples, in native's order
        np.testing.assert_array_equal(learners[0].indices_labeled, learners[1].indices_labeled)
    del rng


# ------------------------------------------------------------------- inputs, devices, errors


def test_inputs_are_never_modified_and_torch_probabilities_work():
    N, k, C = 80, 4, 5
    probas = sampled_probas(N, k, C, seed=3)
    before = probas.copy()
    ds = table_dataset(N, C)
    unl, lab = split(N, 10, 3)
    want_bald = native.BALD(dropout_samples=k).query(Table(probas), ds, unl, lab, None, n=6)
    got_bald = ours.BALD(dropout_samples=k).query(Table(probas, as_tensor=True), ds, unl, lab, None, n=6)
    assert set(got_bald.tolist()) == set(want_bald.tolist())
    for name in STRATEGIES:
        want = getattr(native, name)().query(Table(probas), ds, unl, lab, None, n=6)
        got = getattr(ours, name)().query(Table(probas, as_tensor=True), ds, unl, lab, None, n=6)
        assert set(got.tolist()) == set(want.tolist())
    np.testing.assert_array_equal(probas, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probabilities_are_scored_on_the_device():
    N, k, C = 64, 4, 5
    probas = sampled_probas(N, k, C, seed=8)
    gpu = Table(probas)
    gpu.predict_proba = lambda ds, dropout_sampling=1: torch.from_numpy(
        probas[np.asarray(ds.x)[:, 0].astype(int)]).cuda()
    ds = table_dataset(N, C)
    unl, lab = split(N, 10, 8)
    want = native.BALD(dropout_samples=k).query(Table(probas), ds, unl, lab, None, n=5)
    assert set(ours.BALD(dropout_samples=k).query(gpu, ds, unl, lab, None, n=5).tolist()) == set(want.tolist())


def test_bad_input_is_a_clear_error():
    N, k, C = 20, 3, 4
    probas = sampled_probas(N, k, C, seed=0)
    ds = table_dataset(N, C)
    unl, lab = split(N, 5, 0)
    with pytest.raises(TypeError, match="dropout_samples"):
        ours.BALD(dropout_samples=2.5)
    with pytest.raises(ValueError, match="dropout_samples"):
        ours.PredictionEntropy(dropout_samples=0)
    with pytest.raises(PoolExhaustedException):
        ours.BALD(dropout_samples=k).query(Table(probas), ds, unl, lab, None, n=len(unl) + 1)
    with pytest.raises(EmptyPoolException):
        ours.LeastConfidence().query(Table(probas), ds, np.array([], int), lab, None, n=1)
    with pytest.raises(ValueError, match=r"\[N, k, C\]"):
        ours.BALD(dropout_samples=1).query(Table(probas), ds, unl, lab, None, n=2)  # [N, C] back
    bad = probas.copy()
    bad[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN probability at member 1, sample 3"):
        ours.BALD(dropout_samples=k).query(Table(bad), ds, unl, lab, None, n=2)
