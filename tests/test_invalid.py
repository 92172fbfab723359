"""Invalid input raises ValueError / TypeError that names what is wrong and where, on every
backend, fused and streaming; it never returns a partial result or changes an accumulator."""

import random
import re

import numpy as np
import pytest
import torch

import ensel
from helpers import BACKENDS, DTYPES, assert_scores_equal, feed, ids, make_labels, make_logits, stream_batches

backends = pytest.mark.parametrize("backend", BACKENDS)
NAN, INF = float("nan"), float("inf")


def names_location(msg: str, member: int, sample: int) -> bool:
    return bool(re.search(rf"\bmember {member}\b", msg)) and bool(re.search(rf"\bsample {sample}\b", msg))


def set_row(logits, member, sample, kind):
    if kind == "nan":
        logits[member, sample, 1] = NAN
    elif kind == "+inf":
        logits[member, sample, 2] = INF
    elif kind == "all -inf":
        logits[member, sample, :] = -INF
    else:
        raise ValueError(kind)


def stream_members(logits, labels, backend, batch=None):
    """Member by member through an Accumulator, in batches of `batch` rows (all rows if None)."""
    E, N, K = logits.shape
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
    step = batch or N
    for e in range(E):
        for a in range(0, N, step):
            acc.update(logits[e, a : a + step], start=a)
    return acc.finalize()


HOW = ["fused", "stream", "stream-batched", "iterable"]


def score_by(how, logits, labels, backend):
    if how == "fused":
        return ensel.score(logits, labels=labels, backend=backend)
    if how == "stream":
        return stream_members(logits, labels, backend)
    if how == "stream-batched":
        return stream_members(logits, labels, backend, batch=max(3, logits.shape[1] // 7))
    if how == "iterable":
        return ensel.score(list(logits), labels=labels, backend=backend)
    raise ValueError(how)


@backends
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", ["nan", "+inf", "all -inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_invalid_value_names_member_and_sample(backend, how, kind, dtype):
    logits = make_logits(4, 9, 5, dtype, seed=1)
    labels = make_labels(9, 5)
    set_row(logits, 2, 5, kind)
    with pytest.raises(ValueError) as info:
        score_by(how, logits, labels, backend)
    msg = str(info.value)
    assert names_location(msg, 2, 5), msg
    assert {"nan": "NaN", "+inf": "+inf", "all -inf": "-inf"}[kind] in msg, msg


@backends
@pytest.mark.parametrize("how", HOW)
def test_nan_next_to_minus_inf_and_in_masked_rows(backend, how):
    """A NaN hiding in a row that is otherwise all -inf, or at the row's maximum position, is
    still found; -inf entries elsewhere stay valid."""
    logits = make_logits(3, 6, 4, seed=2)
    logits[:, :, 0] = -INF  # valid mask
    logits[1, 4, :] = -INF
    logits[1, 4, 3] = NAN
    with pytest.raises(ValueError) as info:
        score_by(how, logits, None, backend)
    assert names_location(str(info.value), 1, 4), str(info.value)


@backends
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    "bad, first",
    [
        ([(3, 0), (2, 6), (2, 8)], (2, 6)),  # member first: (2, 6) before (3, 0)
        ([(0, 8), (1, 0)], (0, 8)),
        ([(1, 7), (1, 2), (3, 1)], (1, 2)),
    ],
)
def test_first_offender_in_member_sample_order(backend, how, bad, first):
    logits = make_logits(4, 9, 5, seed=3)
    kinds = ["nan", "+inf", "all -inf"]
    for i, (e, n) in enumerate(bad):
        set_row(logits, e, n, kinds[i % 3])
    with pytest.raises(ValueError) as info:
        score_by(how, logits, None, backend)
    assert names_location(str(info.value), *first), str(info.value)


@backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("N, K", [(256, 700), (2000, 7), (70, 3)])
def test_first_offender_across_threads_and_tiles(backend, dtype, N, K):
    """Large enough for the CPU kernel to split samples across threads (or to span several
    tiles of samples): the offender late in the samples at an earlier member must win over
    one early in the samples at a later member."""
    E = 3
    logits = make_logits(E, N, K, dtype, seed=4)
    logits[2, 3, 1] = NAN
    logits[1, N - 6, 1] = INF
    logits[1, N - 5, :] = -INF
    logits[2, N - 1, 0] = NAN
    for how in ("fused", "stream", "stream-batched"):
        with pytest.raises(ValueError) as info:
            score_by(how, logits, None, backend)
        assert names_location(str(info.value), 1, N - 6), f"{how}: {info.value}"


@backends
@pytest.mark.parametrize("N", [31, 32, 33, 65])
def test_offender_in_the_last_partial_tile(backend, N):
    """A bad row in the last sample of a partial tile of samples is found, and an all -inf row
    whose lane neighbours are valid is not missed."""
    logits = make_logits(2, N, 5, seed=14)
    logits[1, N - 1, :] = -INF
    with pytest.raises(ValueError) as info:
        ensel.score(logits, backend=backend)
    assert names_location(str(info.value), 1, N - 1), str(info.value)


@backends
def test_first_offender_when_samples_are_at_different_members(backend):
    """In one update the rows can be at different member counts: sample 0 has seen 2 members,
    samples 1..3 have seen 1. A bad row at sample 0 is (member 2, sample 0); one at sample 3 is
    (member 1, sample 3), which comes first in (member, sample) order."""
    K = 4
    acc = ensel.Accumulator(4, K, backend=backend)
    acc.update(torch.zeros(4, K), start=0)
    acc.update(torch.zeros(1, K), start=0)
    rows = torch.zeros(4, K)
    rows[0, 0] = NAN
    rows[3, 1] = INF
    with pytest.raises(ValueError) as info:
        acc.update(rows, start=0)
    assert names_location(str(info.value), 1, 3), str(info.value)
    # The offender's sample is reported in dataset coordinates (start + row), not batch rows.
    acc2 = ensel.Accumulator(10, K, backend=backend)
    rows = torch.zeros(3, K)
    rows[1, 2] = NAN
    with pytest.raises(ValueError) as info:
        acc2.update(rows, start=6)
    assert names_location(str(info.value), 0, 7), str(info.value)


@backends
@pytest.mark.parametrize("kind", ["nan", "+inf", "all -inf"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_invalid_update_leaves_state_unchanged(backend, kind, with_labels):
    """update with a bad row raises and changes nothing: finalizing after the valid updates
    equals the run that never made the bad call, bit for bit."""
    E, N, K = 4, 15, 6
    logits = make_logits(E, N, K, kind="ties", seed=5)
    labels = make_labels(N, K, seed=5) if with_labels else None
    batches = stream_batches(E, N, random.Random(5))

    clean = ensel.Accumulator(N, K, labels=labels, backend=backend)
    feed(clean, logits, batches)
    want = clean.finalize()

    acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
    for i, (e, a, b) in enumerate(batches):
        if i in (0, len(batches) // 2, len(batches) - 1):
            bad = logits[e, a:b].clone()
            bad = torch.cat([bad, bad[-1:]]) if b < N else bad  # one extra (bad) row when it fits
            set_row(bad[None], 0, bad.shape[0] - 1, kind)
            members = acc.members
            with pytest.raises(ValueError):
                acc.update(bad, start=a)
            assert torch.equal(acc.members, members)
        acc.update(logits[e, a:b], start=a)
    assert_scores_equal(acc.finalize(), want)


@backends
def test_rejected_updates_of_every_kind_leave_state_unchanged(backend):
    N, K = 8, 3
    logits = make_logits(2, N, K, seed=6)
    labels = make_labels(N, K, seed=6)
    clean = ensel.Accumulator(N, K, labels=labels, backend=backend)
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
    for e in range(2):
        clean.update(logits[e], start=0)
    acc.update(logits[0], start=0)
    attempts = [
        lambda: acc.update(logits[1, :5], start=4),  # past the end
        lambda: acc.update(logits[1, :5], start=-1),
        lambda: acc.update(logits[1, :, :2], start=0),  # K mismatch
        lambda: acc.update(logits[1:], start=0),  # 3-D
        lambda: acc.update(logits[1].to(torch.int64), start=0),  # integer
        lambda: acc.update(logits[1], start=1.0),  # float start
    ]
    for attempt in attempts:
        with pytest.raises((ValueError, TypeError)):
            attempt()
    assert torch.equal(acc.members, torch.ones(N, dtype=torch.int32))
    acc.update(logits[1], start=0)
    assert_scores_equal(acc.finalize(), clean.finalize())


# ----------------------------------------------------------------------------- labels


def take_labels(how, logits, labels, backend):
    """Hand `labels` to ensel the way `how` names: an Accumulator, or score_by's routes."""
    if how == "accumulator":
        ensel.Accumulator(logits.shape[1], logits.shape[2], labels=labels, backend=backend)
    else:
        score_by(how, logits, labels, backend)


@backends
@pytest.mark.parametrize("bad_label", [-1, 5, 1000])
@pytest.mark.parametrize("how", ["fused", "iterable", "accumulator"])
def test_label_out_of_range(backend, bad_label, how):
    N, K = 7, 5
    logits = make_logits(2, N, K, seed=7)
    labels = make_labels(N, K)
    labels[4] = bad_label
    with pytest.raises(ValueError) as info:
        take_labels(how, logits, labels, backend)
    msg = str(info.value)
    assert "label" in msg and re.search(r"\bsample 4\b", msg) and str(bad_label) in msg, msg


@backends
@pytest.mark.parametrize("how", ["fused", "iterable", "accumulator"])
@pytest.mark.parametrize("length", [0, 6, 8])
def test_labels_of_wrong_length(backend, how, length):
    N, K = 7, 5
    logits = make_logits(2, N, K, seed=8)
    labels = torch.zeros(length, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels"):
        take_labels(how, logits, labels, backend)


@backends
@pytest.mark.parametrize("how", ["fused", "accumulator"])
def test_labels_of_wrong_rank(backend, how):
    N, K = 6, 3
    labels = torch.zeros(N, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels"):
        take_labels(how, make_logits(2, N, K), labels, backend)


@backends
@pytest.mark.parametrize(
    "labels",
    [
        torch.zeros(6, dtype=torch.float32),
        torch.zeros(6, dtype=torch.float64),
        torch.zeros(6, dtype=torch.bool),
        np.zeros(6, dtype=np.float32),
    ],
    ids=["f32", "f64", "bool", "numpy-f32"],
)
@pytest.mark.parametrize("how", ["fused", "accumulator"])
def test_non_integer_labels(backend, labels, how):
    N, K = 6, 3
    with pytest.raises(TypeError, match="labels"):
        take_labels(how, make_logits(2, N, K), labels, backend)


@backends
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8])
def test_any_integer_label_dtype_is_accepted(backend, dtype):
    N, K = 6, 3
    logits = make_logits(2, N, K, kind="ties", seed=9)
    labels = make_labels(N, K, seed=9)
    want = ensel.score(logits, labels=labels, backend=backend)
    assert_scores_equal(ensel.score(logits, labels=labels.to(dtype), backend=backend), want)


# ----------------------------------------------------------------------------- shapes and dtypes


@backends
@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 4, 5)], ids=str)
def test_score_wrong_rank(backend, shape):
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        ensel.score(torch.zeros(shape), backend=backend)


@backends
@pytest.mark.parametrize("shape", [(5,), (2, 4, 5)], ids=str)
def test_update_wrong_rank(backend, shape):
    acc = ensel.Accumulator(4, 5, backend=backend)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        acc.update(torch.zeros(shape), start=0)


@backends
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_logits(backend, dtype):
    with pytest.raises(TypeError, match="dtype"):
        ensel.score(torch.zeros(2, 3, 4, dtype=dtype), backend=backend)
    acc = ensel.Accumulator(3, 4, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        acc.update(torch.zeros(3, 4, dtype=dtype), start=0)
    with pytest.raises(TypeError, match="dtype"):
        ensel.score([torch.zeros(3, 4, dtype=dtype)], backend=backend)


@backends
def test_not_an_array(backend):
    with pytest.raises(TypeError):
        ensel.score("logits", backend=backend)
    with pytest.raises(TypeError):
        ensel.score([[[0.0, 1.0]]], backend=backend)  # nested Python lists are not arrays
    acc = ensel.Accumulator(1, 2, backend=backend)
    with pytest.raises(TypeError):
        acc.update([[0.0, 1.0]], start=0)


@backends
def test_empty_ensemble_or_no_classes(backend):
    with pytest.raises(ValueError, match="E = 0"):
        ensel.score(torch.zeros(0, 3, 4), backend=backend)
    with pytest.raises(ValueError, match="K = 0"):
        ensel.score(torch.zeros(2, 3, 0), backend=backend)
    with pytest.raises(ValueError):
        ensel.Accumulator(3, 0, backend=backend)


# ----------------------------------------------------------------------------- update's rows


@backends
@pytest.mark.parametrize("start, rows", [(-1, 2), (-5, 5), (10, 1), (11, 1), (9, 2), (0, 11), (5, 6)])
def test_update_rows_outside_the_dataset(backend, start, rows):
    N, K = 10, 3
    acc = ensel.Accumulator(N, K, backend=backend)
    with pytest.raises(ValueError, match="start"):
        acc.update(torch.zeros(rows, K), start=start)
    assert torch.equal(acc.members, torch.zeros(N, dtype=torch.int32))


@backends
@pytest.mark.parametrize("start", [-1, 11, 100])
def test_update_empty_batch_with_start_outside(backend, start):
    """start must lie in [0, N] (an empty batch at start = N, the end, is a no-op:
    tests/test_empty.py); a start outside is a caller's bug, whatever the batch size."""
    acc = ensel.Accumulator(10, 3, backend=backend)
    with pytest.raises(ValueError, match="start"):
        acc.update(torch.zeros(0, 3), start=start)


@backends
@pytest.mark.parametrize("start", [1.0, "0", None, True, np.float64(0)])
def test_update_start_of_wrong_type(backend, start):
    acc = ensel.Accumulator(10, 3, backend=backend)
    with pytest.raises(TypeError, match="start"):
        acc.update(torch.zeros(2, 3), start=start)


@backends
def test_update_class_count_mismatch(backend):
    acc = ensel.Accumulator(4, 5, backend=backend)
    with pytest.raises(ValueError, match="5 classes"):
        acc.update(torch.zeros(4, 6), start=0)


@pytest.mark.parametrize(
    "args, error",
    [
        ((-1, 3), ValueError),
        ((3, 0), ValueError),
        ((3.0, 3), TypeError),
        ((3, "3"), TypeError),
    ],
)
def test_accumulator_bad_sizes(args, error):
    with pytest.raises(error):
        ensel.Accumulator(*args)


def test_accumulator_bad_num_members():
    with pytest.raises(ValueError):
        ensel.Accumulator(3, 3, num_members=0)
    with pytest.raises(TypeError):
        ensel.Accumulator(3, 3, num_members=2.5)


# ----------------------------------------------------------------------------- backends


def test_backend_names():
    assert {"cpu", "reference"} <= set(ensel.backends.names())


@pytest.mark.parametrize("name", ["gpu", "CPU", "torch", "cuda:0"])
def test_unknown_backend(name):
    logits = make_logits(2, 3, 4)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        ensel.score(logits, backend=name)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        ensel.Accumulator(3, 4, backend=name)
    with pytest.raises(ValueError):
        ensel.score([logits[0]], backend=name)


def test_env_backend_is_honoured(monkeypatch):
    assert ensel.Accumulator(3, 4).backend == "cpu"  # auto on CPU: the compiled kernel
    monkeypatch.setenv("ENSEL_BACKEND", "reference")
    assert ensel.Accumulator(3, 4).backend == "reference"
    assert ensel.Accumulator(3, 4, backend="auto").backend == "reference"
    # An explicit backend wins over the variable.
    assert ensel.Accumulator(3, 4, backend="cpu").backend == "cpu"
    monkeypatch.setenv("ENSEL_BACKEND", "cpu")
    assert ensel.Accumulator(3, 4).backend == "cpu"


def test_env_backend_unknown(monkeypatch):
    monkeypatch.setenv("ENSEL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        ensel.Accumulator(3, 4)
    with pytest.raises(ValueError, match="nonsense"):
        ensel.score(make_logits(2, 3, 4))


def test_env_backend_changes_what_auto_computes(monkeypatch):
    """Under ENSEL_BACKEND=reference the auto path gives the reference backend's numbers."""
    logits = make_logits(3, 20, 7, seed=10)
    want = ensel.score(logits, backend="reference")
    monkeypatch.setenv("ENSEL_BACKEND", "reference")
    assert_scores_equal(ensel.score(logits), want)


# ----------------------------------------------------------------------------- top()


@pytest.fixture
def scored():
    logits = make_logits(3, 10, 4, seed=11)
    return ensel.score(logits), ensel.score(logits, labels=make_labels(10, 4))


def test_top_unknown_score(scored):
    s, _ = scored
    with pytest.raises(ValueError, match="entropyy"):
        s.top(3, by="entropyy")


@pytest.mark.parametrize("by", ["error_count", "forgetting", "nll"])
def test_top_label_score_without_labels(scored, by):
    s, with_labels = scored
    with pytest.raises(ValueError, match="labels"):
        s.top(3, by=by)
    assert with_labels.top(3, by=by).shape == (3,)


@pytest.mark.parametrize("k, exclude_top", [(11, 0.0), (-1, 0.0), (9, 0.2), (8, 0.3)])
def test_top_k_too_large(scored, k, exclude_top):
    s, _ = scored
    with pytest.raises(ValueError):
        s.top(k, by="entropy", exclude_top=exclude_top)


@pytest.mark.parametrize("exclude_top", [-0.1, 1.0, 1.5, float("nan")])
def test_top_exclude_top_out_of_range(scored, exclude_top):
    s, _ = scored
    with pytest.raises(ValueError, match="exclude_top"):
        s.top(1, by="entropy", exclude_top=exclude_top)


@pytest.mark.parametrize("k", [2.0, "3", None])
def test_top_k_not_an_int(scored, k):
    s, _ = scored
    with pytest.raises(TypeError):
        s.top(k, by="entropy")


# ----------------------------------------------------------------------------- refused growth


def _triton_on_cpu() -> bool:
    triton = ensel.backends.get("triton")
    return triton.available() and "cpu" in triton.device_types


# Every backend that takes CPU tensors here; Triton (under its interpreter, slow) on a tiny case.
STATE_BACKENDS = BACKENDS + (["triton"] if "triton" not in BACKENDS and _triton_on_cpu() else [])


def _state_snapshot(acc):
    return {name: t.clone() for name, t in acc._state.tensors().items()}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN rows
@pytest.mark.parametrize("backend", STATE_BACKENDS)
@pytest.mark.parametrize("num_members", [2, None], ids=["capacity-2", "default-capacity"])
@pytest.mark.parametrize("rows", [(0, 4), (1, 3)], ids=["all-rows", "some-rows"])
def test_a_refused_batch_at_capacity_leaves_the_state_identical(backend, num_members, rows):
    """At the history's capacity, the refused batch is the one that would grow it: before, the
    history was replaced by a larger one (values unchanged) before the batch was checked."""
    N, K = 4, 3
    E = 2 if num_members else 8  # the default capacity is 8 rows
    logits = make_logits(E + 1, N, K, kind="ties", seed=15)
    labels = make_labels(N, K, seed=15)
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend, num_members=num_members)
    clean = ensel.Accumulator(N, K, labels=labels, backend=backend, num_members=num_members)
    for e in range(E):
        acc.update(logits[e], start=0)
        clean.update(logits[e], start=0)
    before = _state_snapshot(acc)
    assert before["argmax_history"].shape == (E, N)  # full: the next member needs growth
    a, b = rows
    bad = logits[E, a:b].clone()
    bad[-1, 1] = NAN
    with pytest.raises(ValueError, match="NaN"):
        acc.update(bad, start=a)
    after = _state_snapshot(acc)
    for name, t in before.items():
        assert after[name].shape == t.shape and torch.equal(after[name], t), name
    acc.update(logits[E], start=0)
    clean.update(logits[E], start=0)
    assert_scores_equal(acc.finalize(), clean.finalize())


# ----------------------------------------------------------------------------- labels as given


@backends
@pytest.mark.parametrize("how", ["fused", "iterable", "accumulator"])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_a_uint64_label_is_reported_as_given(backend, how, container):
    """2**64 - 1 wraps to -1 in int64; the message gives the caller's value."""
    N, K = 7, 5
    labels = np.zeros(N, np.uint64)
    labels[3] = 2**64 - 1
    labels[5] = 2**63 + 4
    if container == "torch":
        labels = torch.from_numpy(labels)
    with pytest.raises(ValueError) as info:
        take_labels(how, make_logits(2, N, K, seed=7), labels, backend)
    msg = str(info.value)
    assert f"label {2**64 - 1} of sample 3" in msg and "-1" not in msg, msg
