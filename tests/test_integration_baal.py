"""ensel.integrations.baal against baal 2.1's own heuristics: the same ranks (baal's argsort,
reversed for high-first heuristics) and the same scores within the contract's tolerance, on
logits and probabilities, plain and with extra axes, arrays and generators; each documented
difference shown with baal's own value; ActiveLearningLoop with a small MC-dropout MLP.

Known answers come from baal (or from numpy by hand), never from the adapter."""

import warnings

import numpy as np
import pytest

pytest.importorskip("baal", reason="baal is not installed: pip install 'ensel[baal]'")

import torch  # noqa: E402
from baal.active import ActiveLearningDataset, ActiveLearningLoop  # noqa: E402
from baal.active import heuristics as native  # noqa: E402
from baal.active.heuristics.stochastics import PowerSampling  # noqa: E402
from helpers import atol  # noqa: E402
from scipy.special import softmax  # noqa: E402

from ensel.integrations import baal as ebaal  # noqa: E402

NAMES = ["BALD", "Entropy", "Margin", "Certainty"]
# (N, C, ..., I): plain [N, C, I] in odd sizes, and extra axes (reduced as baal reduces them).
SHAPES = [(400, 10, 8), (257, 3, 5), (33, 2, 7), (1, 4, 3), (120, 6, 1), (90, 5, 3, 4, 6)]


def logits(shape, seed, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def probs(shape, seed):
    return softmax(logits(shape, seed), axis=1).astype(np.float32)


def ranks_and_scores(heuristic, predictions):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # baal's non-finite replacement must not happen
        ranks, scores = heuristic.get_ranks(predictions)
    return np.asarray(ranks), np.asarray(scores)


def assert_same_up_to_near_ties(got_ranks, want_ranks, want_scores, tol):
    """Where scores are within `tol` of each other (near-ties: baal's own rounding decides), the
    i-th pick may differ, but its native score equals the native i-th pick's within `tol`."""
    assert sorted(got_ranks) == sorted(want_ranks)
    np.testing.assert_allclose(want_scores[got_ranks], want_scores[want_ranks], rtol=0, atol=tol)


def assert_parity(name, predictions, k=None, near_ties=None, **options):
    """The adapter ranks exactly as baal (every position, or the first k) and its scores agree
    within tolerance. With `near_ties`, scores closer than that may swap (inputs that are not
    tie-free at float32 precision)."""
    reduction = "none" if predictions.ndim <= 3 else "mean"
    want_ranks, want = ranks_and_scores(getattr(native, name)(reduction=reduction), predictions)
    got_ranks, got = ranks_and_scores(getattr(ebaal, name)(reduction=reduction, **options), predictions)
    assert got.shape == want.shape
    tol = atol(predictions.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    if near_ties is not None:
        assert_same_up_to_near_ties(got_ranks, want_ranks, want, near_ties)
        return
    k = len(want_ranks) if k is None else k
    np.testing.assert_array_equal(got_ranks[:k], want_ranks[:k])


# --- parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_same_ranks_and_scores(name, shape, seed):
    assert_parity(name, logits(shape, seed))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", [0, 1])
def test_probabilities_same_ranks_and_scores(name, shape, seed):
    assert_parity(name, probs(shape, seed))


@pytest.mark.parametrize("name", NAMES)
def test_larger_pool_same_selection(name):
    # A pool where baal's argsort runs its large-array path (N > 16): the first 100 ranks match.
    assert_parity(name, logits((5000, 20, 10), 7), k=100)


@pytest.mark.parametrize("name", ["Entropy", "Margin", "Certainty"])
def test_single_prediction_per_sample(name):
    # [N, C] (no iterations axis): baal's Entropy, Margin and Certainty take it as it is.
    assert_parity(name, logits((150, 4), 3))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["max", "min", "sum"])
def test_extra_axes_every_reduction(name, reduction):
    x = logits((60, 4, 5, 3, 6), 11)
    want_ranks, want = ranks_and_scores(getattr(native, name)(reduction=reduction), x)
    got_ranks, got = ranks_and_scores(getattr(ebaal, name)(reduction=reduction), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol(4) * (15 if reduction == "sum" else 1))
    np.testing.assert_array_equal(got_ranks, want_ranks)


@pytest.mark.parametrize("name", NAMES)
def test_extra_axes_unreduced_scores(name):
    # reduction="none" keeps the [N, ...] scores (baal then refuses to rank them, as natively).
    x = logits((40, 3, 4, 5), 5)
    want = getattr(native, name)().get_uncertainties(x)
    got = getattr(ebaal, name)().get_uncertainties(x)
    assert got.shape == want.shape == (40, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol(3))
    with pytest.raises(ValueError, match="more than 1 dimension"):
        getattr(ebaal, name)().get_ranks(x)


def test_extra_axes_chunked(monkeypatch):
    # Extra axes are flattened into the samples chunk by chunk: a tiny chunk gives the same scores.
    x = logits((50, 4, 3, 5), 2)
    whole = ebaal.BALD(reduction="mean").get_uncertainties(x)
    monkeypatch.setattr(ebaal, "_CHUNK_VALUES", 4 * 3 * 5 * 7)  # 7 samples a chunk
    np.testing.assert_array_equal(ebaal.BALD(reduction="mean").get_uncertainties(x), whole)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_other_dtypes(name, dtype):
    x = logits((300, 5, 6), 4).astype(dtype)
    want_ranks, want = ranks_and_scores(getattr(native, name)(), x)
    got_ranks, got = ranks_and_scores(getattr(ebaal, name)(), x)
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=0, atol=atol(5))
        np.testing.assert_array_equal(got_ranks[:50], want_ranks[:50])
    else:  # baal computes in float16 itself (3 decimal digits): its near-ties are its own rounding
        tol = 4e-3 * max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=0, atol=tol)
        assert_same_up_to_near_ties(got_ranks, want_ranks, want.astype(np.float32), tol)


@pytest.mark.parametrize("name", NAMES)
def test_torch_tensors_as_numpy(name):
    x = logits((200, 6, 5), 8)
    want_ranks, want = ranks_and_scores(getattr(native, name)(), x)
    for t in (torch.from_numpy(x), torch.from_numpy(x).requires_grad_(), torch.from_numpy(x.copy()).bfloat16()):
        ranks, scores = getattr(ebaal, name)().get_ranks(t)
        if t.dtype == torch.bfloat16:  # the values themselves are rounded to 8 bits
            np.testing.assert_allclose(scores, want, rtol=1e-2, atol=1e-2)
        else:
            np.testing.assert_allclose(scores, want, rtol=0, atol=atol(6))
        if t.dtype != torch.bfloat16:
            np.testing.assert_array_equal(ranks, want_ranks)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(300, 6, 5), (60, 4, 3, 2, 5)], ids=["plain", "extra_axes"])
@pytest.mark.parametrize("make", [logits, probs])
def test_device_path(monkeypatch, name, shape, make):
    # What a CUDA tensor takes (torch ops on its device, no numpy), run here on CPU float32.
    monkeypatch.setattr(ebaal, "_as_predictions", lambda p, d, real=ebaal._as_predictions: (real(p, d)[0], None))
    assert_parity(name, make(shape, 3))


def test_list_of_one_output_and_multi_output():
    x = logits((100, 4, 5), 1)
    np.testing.assert_array_equal(ebaal.BALD()([x]), native.BALD()(x))
    with pytest.raises(ValueError, match="single array"):
        ebaal.BALD()([x, x])


# --- logits or probabilities: baal's to_prob test, reproduced ------------------------------


def test_detection_bounded_logits_are_softmaxed():
    # Values in [0, 1] whose class sums are not 1: baal softmaxes them (they are logits).
    x = np.random.default_rng(0).uniform(0.0, 1.0, (200, 5, 6)).astype(np.float32)
    for name in NAMES:  # softmaxes of values in [0, 1] are all close to uniform: near-ties
        assert_parity(name, x, near_ties=atol(5))
    # and the softmax is what baal scored: the scores are those of softmax(x) read as probabilities
    np.testing.assert_allclose(
        ebaal.BALD().get_uncertainties(x), native.BALD().get_uncertainties(softmax(x, 1)), atol=atol(5)
    )


def test_detection_runs_where_baal_runs_it():
    # Each iteration's class sums are off by 4e-5 (not probabilities to np.allclose), alternating
    # in sign so that their mean over iterations sums to 1: BALD (test on the predictions)
    # softmaxes them, Entropy and Margin (test on the mean over iterations) do not.
    p = probs((150, 4, 6), 3).astype(np.float64)
    p[:, 0, :] += np.where(np.arange(6) % 2 == 0, 4e-5, -4e-5)
    assert not np.allclose(p.sum(1), 1) and np.allclose(p.mean(-1).sum(1), 1)
    p = p.astype(np.float32)
    for name in NAMES:
        assert_parity(name, p)
    want = -np.sum(softmax(p.mean(-1), 1) * np.log(softmax(p.mean(-1), 1)), 1)  # if it were logits
    assert np.abs(ebaal.Entropy().get_uncertainties(p) - want).max() > 1e-2  # it is not read as logits


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["logits", "log_probs"])
def test_explicit_kind_logits(name, kind):
    x = logits((200, 5, 4), 9)
    if kind == "log_probs":
        x = np.log(softmax(x, 1)).astype(np.float32)
    want_ranks, want = ranks_and_scores(getattr(native, name)(), x)
    got_ranks, got = ranks_and_scores(getattr(ebaal, name)(kind=kind), x)
    np.testing.assert_allclose(got, want, atol=atol(5))
    np.testing.assert_array_equal(got_ranks, want_ranks)


def test_explicit_kind_overrides_the_test():
    # Bounded logits that sum to one would be read as probabilities by baal; kind="logits" says
    # otherwise: the scores are those of their softmax.
    p = probs((100, 3, 4), 2)
    got = ebaal.BALD(kind="logits").get_uncertainties(p)
    np.testing.assert_allclose(got, native.BALD().get_uncertainties(softmax(p, 1)), atol=atol(3))
    np.testing.assert_allclose(
        ebaal.BALD(kind="probs").get_uncertainties(p), native.BALD().get_uncertainties(p), atol=atol(3)
    )


def test_exact_zero_probabilities():
    p = probs((120, 4, 5), 6)
    p[::3, 2, :] = 0.0
    p /= p.sum(1, keepdims=True)
    for name in NAMES:
        assert_parity(name, p, k=40)


def test_minus_inf_logits_are_valid():
    x = logits((100, 4, 5), 12)
    x[::4, 1, :] = -np.inf
    for name in NAMES:
        assert_parity(name, x, k=40)


# --- the documented differences ----------------------------------------------------------


def _softmax_entropy(p):
    return -np.sum(p * np.log(p), axis=1)


def test_difference_entropy_on_logits():
    x = logits((500, 8, 10), 21)
    p = softmax(x, 1)
    mean_logit_entropy = _softmax_entropy(softmax(x.mean(-1), 1))  # baal: H(softmax(mean logits))
    ensemble_entropy = _softmax_entropy(p.mean(-1))  # ensel: H(mean p)
    baal_value = native.Entropy().get_uncertainties(x)
    np.testing.assert_allclose(baal_value, mean_logit_entropy, atol=1e-5)
    assert np.abs(baal_value - ensemble_entropy).max() > 0.1  # the definitions really differ
    np.testing.assert_allclose(ebaal.Entropy().get_uncertainties(x), baal_value, atol=atol(8))  # default: native
    got = ebaal.Entropy(definition="ensel").get_uncertainties(x)
    np.testing.assert_allclose(got, ensemble_entropy, atol=atol(8))
    # ... which is baal's own value on probabilities
    np.testing.assert_allclose(got, native.Entropy().get_uncertainties(p.astype(np.float32)), atol=atol(8))
    top = set(np.argsort(-baal_value, kind="stable")[:50])
    assert top != set(ebaal.Entropy(definition="ensel")(x)[:50])  # different selections
    assert top == set(ebaal.Entropy()(x)[:50])


def test_difference_margin_on_logits():
    x = logits((500, 8, 10), 22)
    p = softmax(x, 1)
    s_mean_logit = np.sort(softmax(x.mean(-1), 1), 1)
    s_pbar = np.sort(p.mean(-1), 1)
    baal_value = native.Margin().get_uncertainties(x)
    np.testing.assert_allclose(baal_value, s_mean_logit[:, -1] - s_mean_logit[:, -2], atol=1e-6)
    assert np.abs(baal_value - (s_pbar[:, -1] - s_pbar[:, -2])).max() > 0.1
    np.testing.assert_allclose(ebaal.Margin().get_uncertainties(x), baal_value, atol=atol(8))
    got = ebaal.Margin(definition="ensel").get_uncertainties(x)
    np.testing.assert_allclose(got, s_pbar[:, -1] - s_pbar[:, -2], atol=atol(8))
    np.testing.assert_allclose(got, native.Margin().get_uncertainties(p.astype(np.float32)), atol=atol(8))


def test_difference_certainty_raw_max():
    x = logits((500, 8, 10), 23)
    baal_value = native.Certainty().get_uncertainties(x)
    np.testing.assert_array_equal(baal_value, x.mean(-1).max(1))  # the largest mean logit
    assert baal_value.max() > 1.0  # not a probability
    np.testing.assert_array_equal(ebaal.Certainty().get_uncertainties(x), baal_value)  # default: native, exactly
    got = ebaal.Certainty(definition="ensel").get_uncertainties(x)
    np.testing.assert_allclose(got, softmax(x, 1).mean(-1).max(1), atol=atol(8))
    on_probabilities = native.Certainty().get_uncertainties(softmax(x, 1).astype(np.float32))
    np.testing.assert_allclose(got, on_probabilities, atol=atol(8))
    assert ebaal.Certainty(definition="ensel").reversed is False  # still lowest first


def test_difference_bald_clip():
    # Iterations that (nearly) agree: BALD ~ 0, where baal keeps rounding noise of either sign.
    base = logits((300, 5, 1), 30)
    x = np.repeat(base, 6, axis=-1) + logits((300, 5, 6), 31, scale=1e-4)
    baal_value = native.BALD().get_uncertainties(x)
    assert baal_value.min() < 0  # not clipped natively
    unclipped = ebaal.BALD().get_uncertainties(x)
    np.testing.assert_allclose(unclipped, baal_value, atol=atol(5))
    clipped = ebaal.BALD(definition="ensel").get_uncertainties(x)
    assert clipped.min() >= 0
    np.testing.assert_array_equal(clipped, np.maximum(unclipped, 0))


def test_difference_invalid_values_refused():
    x = logits((50, 3, 4), 1)
    x[7, 1, 2] = np.nan
    with pytest.warns(UserWarning, match="Invalid value"):  # baal: warns and replaces
        assert native.BALD().get_uncertainties(x)[7] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        ebaal.BALD().get_uncertainties(x)
    x[7, 1, 2] = np.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        ebaal.Entropy().get_uncertainties(x)


def test_difference_single_output_refused():
    x = logits((30, 1, 4), 1)
    native.BALD().get_uncertainties(x)  # baal: a sigmoid, then -p log p
    for name in ["BALD", "Entropy", "Margin"]:
        with pytest.raises(ValueError, match="C >= 2"):
            getattr(ebaal, name)().get_uncertainties(x)
    # Certainty (baal's definition) needs no probabilities: native, exactly
    np.testing.assert_array_equal(ebaal.Certainty().get_uncertainties(x), native.Certainty().get_uncertainties(x))


def test_scores_are_float32():
    x = logits((40, 3, 4), 0).astype(np.float64)
    assert native.BALD().get_uncertainties(x).dtype == np.float64
    assert ebaal.BALD().get_uncertainties(x).dtype == np.float32


# --- baal's own machinery, inherited ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_subclass_of_the_native_heuristic(name):
    h = getattr(ebaal, name)()
    assert isinstance(h, getattr(native, name)) and isinstance(h, native.AbstractHeuristic)
    assert h.reversed == getattr(native, name)().reversed


def test_small_pool_tie_order_is_baals():
    # Exact ties: baal's argsort (insertion sort for N <= 16), reversed for high-first heuristics.
    x = np.zeros((6, 3, 2), np.float32)
    np.testing.assert_array_equal(ebaal.BALD()(x), native.BALD()(x))  # [5 4 3 2 1 0]
    np.testing.assert_array_equal(ebaal.BALD()(x), [5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(ebaal.Margin()(x), native.Margin()(x))  # [0 1 2 3 4 5]


def test_shuffle_prop_uses_baals_shuffle():
    x = logits((300, 4, 5), 3)
    with pytest.warns(DeprecationWarning):
        h_native, h_ensel = native.BALD(shuffle_prop=0.3), ebaal.BALD(shuffle_prop=0.3)
    np.random.seed(5)
    want = h_native(x)
    np.random.seed(5)
    np.testing.assert_array_equal(h_ensel(x), want)


def test_callable_reduction():
    x = logits((80, 4, 3, 5), 4)
    red = lambda s: np.median(s, axis=1)  # noqa: E731
    np.testing.assert_array_equal(ebaal.Entropy(reduction=red)(x), native.Entropy(reduction=red)(x))


def test_power_sampling_wraps_it():
    x = logits((200, 4, 5), 5)
    np.random.seed(0)
    want = PowerSampling(native.BALD(), query_size=10).get_ranks(x)[0]
    np.random.seed(0)
    np.testing.assert_array_equal(PowerSampling(ebaal.BALD(), query_size=10).get_ranks(x)[0], want)


@pytest.mark.parametrize("name", NAMES)
def test_generator_same_as_baal(name):
    x = logits((230, 5, 6), 14)
    batches = lambda: (x[i : i + 32] for i in range(0, len(x), 32))  # noqa: E731
    want_ranks, want = getattr(native, name)().get_ranks(batches())
    got_ranks, got = getattr(ebaal, name)().get_ranks(batches())
    np.testing.assert_allclose(got, want, atol=atol(5))
    np.testing.assert_array_equal(got_ranks, want_ranks)
    with pytest.raises(ValueError, match="No prediction"):
        getattr(ebaal, name)().get_ranks(x[i] for i in [])


def test_generator_detection_per_batch():
    # One batch of probabilities, one of logits: baal decides per batch, and so does the adapter.
    p, x = probs((40, 4, 5), 1), logits((40, 4, 5), 2)
    want = native.BALD().get_uncertainties_generator(iter([p, x]))
    got = ebaal.BALD().get_uncertainties_generator(iter([p, x]))
    np.testing.assert_allclose(got, want, atol=atol(4))


def test_empty_pool():
    x = np.zeros((0, 4, 5), np.float32)
    for name in NAMES:
        assert getattr(ebaal, name)().get_uncertainties(x).shape == (0,)


def test_inputs_not_modified():
    for make in (logits, probs):
        x = make((120, 5, 3, 4), 3)
        t = torch.from_numpy(make((120, 5, 4), 4))
        x0, t0 = x.copy(), t.clone()
        for name in NAMES:
            for definition in ("baal", "ensel"):
                getattr(ebaal, name)(reduction="mean", definition=definition)(x)
                getattr(ebaal, name)(definition=definition)(t)
        np.testing.assert_array_equal(x, x0)
        assert torch.equal(t, t0)


# --- bad input ----------------------------------------------------------------------------


def test_bad_input():
    x = logits((20, 3, 4), 0)
    with pytest.raises(ValueError, match="at least 3 axes"):
        ebaal.BALD()(x[:, :, 0])
    with pytest.raises(ValueError, match="at least 2 axes"):
        ebaal.Entropy()(x[:, 0, 0])
    with pytest.raises(TypeError, match="floating"):
        ebaal.BALD()(np.ones((20, 3, 4), np.int64))
    with pytest.raises(TypeError, match="predictions"):
        ebaal.Margin()("not an array")
    with pytest.raises(ValueError, match="kind="):
        ebaal.BALD(kind="softmax")
    with pytest.raises(ValueError, match="definition="):
        ebaal.Entropy(definition="native")


# --- end to end: ActiveLearningLoop with a small MC-dropout model -------------------------


def _run_loop(heuristic, generator=False, steps=3):
    """baal's own loop: an MLP with dropout, trained on the labelled set, MC-dropout iterations
    over the pool, query_size samples labelled per step. Returns baal's labelled_map (the step
    at which each sample was labelled)."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from baal.bayesian.dropout import MCDropoutModule
    from baal.modelwrapper import ModelWrapper, TrainingArgs

    torch.manual_seed(0)
    np.random.seed(0)
    n, d, k = 240, 6, 4
    features = torch.randn(n, d)
    labels = (features[:, :k] + 0.5 * torch.randn(n, k)).argmax(1)
    dataset = ActiveLearningDataset(TensorDataset(features, labels))
    dataset.label_randomly(12)
    net = MCDropoutModule(nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, k)))
    args = TrainingArgs(
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        batch_size=16,
        epoch=3,
        use_cuda=False,
        workers=0,
    )
    wrapper = ModelWrapper(net, args)
    predict = wrapper.predict_on_dataset_generator if generator else wrapper.predict_on_dataset
    loop = ActiveLearningLoop(dataset, predict, heuristic=heuristic, query_size=6, iterations=10, verbose=False)
    for _ in range(steps):
        wrapper.train_on_dataset(dataset)
        assert loop.step()
    return dataset.labelled_map.copy()


@pytest.mark.parametrize(
    "name, generator", [("BALD", False), ("BALD", True), ("Entropy", False), ("Margin", True), ("Certainty", False)]
)
def test_active_learning_loop_selects_what_baal_selects(name, generator):
    want = _run_loop(getattr(native, name)(), generator)
    got = _run_loop(getattr(ebaal, name)(), generator)
    assert (want > 0).sum() == 12 + 3 * 6
    np.testing.assert_array_equal(got, want)  # the same samples, labelled at the same steps
