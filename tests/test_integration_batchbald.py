"""ensel.integrations.batchbald.get_bald_batch against batchbald_redux 2.0.5's own: the same
indices in the same (descending) order, the same scores within the contract's tolerance, on
tie-free random log-probabilities of several shapes; the documented differences (a -inf
log-probability, refused NaN) shown with batchbald_redux's own value.

Known answers come from batchbald_redux (or by hand), never from the adapter."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # batchbald_redux's progress bars

import gc  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("batchbald_redux", reason="batchbald_redux is not installed: pip install 'ensel[batchbald]'")

import torch  # noqa: E402
from batchbald_redux import batchbald as native  # noqa: E402
from helpers import atol  # noqa: E402

from ensel.integrations import batchbald as ebb  # noqa: E402

SHAPES = [(30, 5, 3), (1000, 8, 10), (777, 3, 2), (2049, 17, 7), (1, 4, 5), (64, 1, 6), (300, 20, 101)]


@pytest.fixture(autouse=True, scope="module")
def _fast_gc():
    """batchbald_redux's chunking (toma) runs gc.collect() four times a call: a quarter of a
    second each with torch's objects in the heap. Frozen objects are not traversed, so the
    native function costs milliseconds here; its results do not depend on it."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def log_probs(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(shape, generator=g, dtype=torch.float64) * scale, -1).to(dtype)


def assert_same(got, want, num_classes):
    assert type(got) is native.CandidateBatch
    assert got.indices == want.indices
    assert all(isinstance(i, int) for i in got.indices) and all(isinstance(s, float) for s in got.scores)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=atol(num_classes))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [1, 10, 50])
def test_same_batch_as_batchbald_redux(shape, seed, batch_size):
    lp = log_probs(shape, seed)
    assert_same(ebb.get_bald_batch(lp, batch_size), native.get_bald_batch(lp, batch_size), shape[2])


def test_one_member_all_ties_as_natively():
    # K = 1: BALD is exactly 0 for every sample natively (all ties, in torch.topk's order); so here.
    lp = log_probs((64, 1, 6), 0)
    want = native.get_bald_batch(lp, 20)
    assert set(want.scores) == {0.0}
    assert ebb.get_bald_batch(lp, 20) == want


def test_whole_pool_order():
    # Every sample ranked (batch_size >= N is capped at N): the full descending order matches.
    lp = log_probs((400, 6, 5), 3)
    assert_same(ebb.get_bald_batch(lp, 1000), native.get_bald_batch(lp, 1000), 5)
    assert len(ebb.get_bald_batch(lp, 1000).indices) == 400


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes(dtype):
    lp = log_probs((500, 7, 6), 4, dtype=dtype)
    want, got = native.get_bald_batch(lp, 30), ebb.get_bald_batch(lp, 30)
    if dtype == torch.float64:
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=atol(6))
        assert got.indices == want.indices
    else:  # batchbald_redux computes in float16 itself (its scores are rounded to 3 digits):
        # picks may differ where its scores are within that rounding of each other
        tol = 4e-3
        np.testing.assert_allclose(ebb.bald_scores(lp)[want.indices].numpy(), want.scores, atol=tol)
        everything = ebb.bald_scores(lp).numpy()
        assert np.all(everything[got.indices] >= want.scores[-1] - tol)


def test_scores_by_hand():
    # BALD = H(pbar) - mean_k H(p_k), in float64 numpy.
    lp = log_probs((50, 4, 3), 5, dtype=torch.float64)
    p = lp.exp().numpy()
    pbar = p.mean(1)
    want = -(pbar * np.log(pbar)).sum(-1) + (p * np.log(p)).sum(-1).mean(1)
    np.testing.assert_allclose(ebb.bald_scores(lp).numpy(), want, atol=atol(3))
    assert ebb.bald_scores(lp).dtype == torch.float64


def test_numpy_and_permuted_views():
    lp = log_probs((300, 5, 4), 6)
    want = native.get_bald_batch(lp, 20)
    assert_same(ebb.get_bald_batch(lp.numpy(), 20), want, 4)
    # a [K, N, C] buffer viewed as [N, K, C]: read in place
    buffer = lp.permute(1, 0, 2).contiguous()
    assert_same(ebb.get_bald_batch(buffer.permute(1, 0, 2), 20), want, 4)


def test_dtype_and_device_ignored_as_natively():
    lp = log_probs((100, 5, 3), 7)
    want = native.get_bald_batch(lp, 10, dtype=torch.double, device="cpu")
    assert_same(ebb.get_bald_batch(lp, 10, dtype=torch.double, device="cpu"), want, 3)
    assert_same(ebb.get_bald_batch(lp, 10, torch.float16, "meta"), want, 3)


def test_zero_batch_and_empty_pool():
    lp = log_probs((20, 3, 4), 8)
    assert ebb.get_bald_batch(lp, 0) == native.get_bald_batch(lp, 0) == native.CandidateBatch([], [])
    empty = torch.zeros(0, 3, 4)
    assert ebb.get_bald_batch(empty, 5) == native.get_bald_batch(empty, 5) == native.CandidateBatch([], [])


def test_integer_batch_size_types():
    lp = log_probs((60, 3, 4), 9)
    want = native.get_bald_batch(lp, 7)
    for size in (np.int64(7), torch.tensor(7)):
        assert ebb.get_bald_batch(lp, size).indices == want.indices


def test_inputs_not_modified():
    lp = log_probs((200, 6, 5), 10)
    lp[3, 1, 2] = -math.inf
    before = lp.clone()
    ebb.get_bald_batch(lp, 10)
    ebb.get_bald_batch(lp.numpy(), 10)
    assert torch.equal(lp, before)


# --- the documented differences ----------------------------------------------------------


def test_difference_minus_inf_log_prob():
    # A probability of exactly 0: batchbald_redux computes -inf * 0 = NaN for that sample and
    # torch.topk ranks NaN first, so it is selected whatever its BALD. ensel scores it: 0 log 0 = 0.
    lp = log_probs((500, 5, 4), 11, scale=0.3)  # low-BALD samples
    lp[42] = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, -math.inf]]).repeat(5, 1), -1)  # agreeing members
    want = native.get_bald_batch(lp, 5)
    assert want.indices[0] == 42 and math.isnan(want.scores[0])
    got = ebb.get_bald_batch(lp, 5)
    assert 42 not in got.indices and not any(math.isnan(s) for s in got.scores)
    assert ebb.bald_scores(lp)[42].item() == pytest.approx(0.0, abs=atol(4))  # its true BALD
    # apart from the NaN sample the choice is batchbald_redux's
    assert got.indices[:4] == want.indices[1:]


def test_difference_invalid_values_refused():
    lp = log_probs((50, 4, 3), 12)
    lp[7, 2, 1] = math.nan
    assert math.isnan(native.get_bald_batch(lp, 50).scores[0])  # natively: a NaN score, ranked first
    with pytest.raises(ValueError, match=r"NaN log-probability at member 2, sample 7"):
        ebb.get_bald_batch(lp, 5)
    lp[7, 2, 1] = math.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        ebb.get_bald_batch(lp, 5)
    lp[7, 2] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        ebb.get_bald_batch(lp, 5)


def test_difference_unnormalized_rows():
    # Raw logits passed by mistake: ensel reads them as logits (softmax), batchbald_redux uses
    # exp(x) as it is. On their log_softmax both agree.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(200, 5, 4, generator=g) * 2
    got = ebb.get_bald_batch(x, 10)
    assert_same(got, native.get_bald_batch(torch.log_softmax(x, -1), 10), 4)
    assert native.get_bald_batch(x, 10).indices != got.indices


def test_bad_input():
    lp = log_probs((20, 3, 4), 0)
    with pytest.raises(ValueError, match=r"\[N samples, K members, C classes\]"):
        ebb.get_bald_batch(lp[0], 3)
    with pytest.raises(ValueError, match="K = 0"):
        ebb.get_bald_batch(torch.zeros(5, 0, 3), 3)
    with pytest.raises(ValueError, match="batch_size"):
        ebb.get_bald_batch(lp, -1)
    with pytest.raises(TypeError, match="batch_size"):
        ebb.get_bald_batch(lp, 2.0)
    with pytest.raises(TypeError, match="floating"):
        ebb.get_bald_batch(torch.zeros(5, 3, 4, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="log_probs_N_K_C"):
        ebb.get_bald_batch([[0.0]], 3)


# --- end to end: an acquisition round of the BatchBALD repository's MC-dropout recipe ------


def test_mc_dropout_acquisition_selects_what_batchbald_redux_selects():
    # batchbald_redux's own recipe: K MC-dropout samples of log_softmax, stacked on axis 1.
    from torch import nn

    torch.manual_seed(0)
    x, y = torch.randn(600, 8), torch.randint(0, 5, (600,))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    labelled = torch.zeros(600, dtype=torch.bool)
    labelled[:20] = True
    for _ in range(3):  # acquisition rounds
        model.train()
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[labelled]), y[labelled]).backward()
            opt.step()
        pool = (~labelled).nonzero()[:, 0]
        gc.collect()
        gc.freeze()  # what training imported: see _fast_gc
        with torch.no_grad():  # dropout on: K = 16 stochastic passes
            lp = torch.stack([torch.log_softmax(model(x[pool]), -1) for _ in range(16)], dim=1)
        want = native.get_bald_batch(lp, 10)
        got = ebb.get_bald_batch(lp, 10)
        assert got.indices == want.indices
        labelled[pool[got.indices]] = True
    assert int(labelled.sum()) == 50
