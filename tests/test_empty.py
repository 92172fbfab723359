"""One rule for empty input (docs/contract.md section 5): N = 0 samples gives empty Scores on every
entry point; E = 0 members and K = 0 classes are ValueErrors everywhere."""

import numpy as np
import pytest
import torch

import ensel
from ensel._fields import FLOAT_FIELDS, INT_FIELDS, LABEL_FIELDS
from helpers import BACKENDS

backends = pytest.mark.parametrize("backend", BACKENDS)
labelled = pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
K = 4


def assert_empty(s: ensel.Scores, num_members: int, with_labels: bool):
    assert s.num_samples == 0 and s.num_members == num_members and s.has_labels == with_labels
    for name in FLOAT_FIELDS + INT_FIELDS:
        value = getattr(s, name)
        if name in LABEL_FIELDS and not with_labels:
            assert value is None, name
            continue
        want = torch.float32 if name in FLOAT_FIELDS else torch.int64
        assert value.shape == (0,) and value.dtype == want and value.device.type == "cpu", name
    assert s.top(0, by="entropy").tolist() == []


def no_labels(with_labels):
    return torch.zeros(0, dtype=torch.int64) if with_labels else None


@backends
@labelled
def test_fused_of_no_samples(backend, with_labels):
    assert_empty(ensel.score(torch.randn(3, 0, K), labels=no_labels(with_labels), backend=backend), 3, with_labels)


@backends
@labelled
@pytest.mark.parametrize(
    "items, members",
    [([torch.randn(0, K)], 1), ([torch.randn(0, K)] * 3, 3), ([torch.randn(2, 0, K), torch.randn(0, K)], 3)],
    ids=["one member", "three members", "groups"],
)
def test_iterable_of_no_samples(backend, with_labels, items, members):
    """The iterable form knows E from its items (before: "rows [0, 0) are outside [0, 0)")."""
    assert_empty(ensel.score(items, labels=no_labels(with_labels), backend=backend), members, with_labels)


@backends
@labelled
def test_accumulator_of_no_samples(backend, with_labels):
    """Its updates are no-ops, so nothing tells it E: num_members is 0 (docs/contract.md)."""
    acc = ensel.Accumulator(0, K, labels=no_labels(with_labels), backend=backend)
    assert_empty(acc.finalize(), 0, with_labels)
    acc.update(torch.randn(0, K), start=0)
    assert_empty(acc.finalize(), 0, with_labels)
    with pytest.raises(ValueError, match="start"):
        acc.update(torch.randn(1, K), start=0)


@backends
@pytest.mark.parametrize("start", [0, 3, 10])
def test_an_empty_batch_is_a_no_op_anywhere_in_0_to_n(backend, start):
    acc = ensel.Accumulator(10, K, backend=backend)
    acc.update(torch.randn(0, K), start=start)
    assert acc.members.tolist() == [0] * 10


@labelled
@pytest.mark.parametrize("raw", [False, True], ids=["npy", "raw"])
def test_files_of_no_rows(tmp_path, with_labels, raw):
    paths = []
    for e in range(2):
        paths.append(tmp_path / f"m{e}.{'bin' if raw else 'npy'}")
        if raw:
            paths[-1].write_bytes(b"")
        else:
            np.save(paths[-1], np.zeros((0, K), np.float32))
    kw = dict(shape=(0, K), dtype="float32") if raw else {}
    labels = np.zeros(0, np.int64) if with_labels else None
    assert_empty(ensel.score_files(paths, labels=labels, **kw), 2, with_labels)


@backends
def test_no_members_is_a_value_error(backend):
    with pytest.raises(ValueError, match="E = 0"):
        ensel.score(torch.zeros(0, 3, K), backend=backend)
    with pytest.raises(ValueError, match="E = 0"):
        ensel.score(torch.zeros(0, 0, K), backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ensel.score([], backend=backend)
    with pytest.raises(ValueError, match="E = 0"):
        ensel.score([torch.zeros(0, 3, K)], backend=backend)
    with pytest.raises(ValueError, match="E = 0"):
        ensel.score([torch.zeros(0, 0, K)], backend=backend)
    with pytest.raises(ValueError, match="no member"):
        ensel.Accumulator(3, K, backend=backend).finalize()
    with pytest.raises(ValueError, match="num_members"):
        ensel.Accumulator(3, K, backend=backend, num_members=0)
    with pytest.raises(ValueError, match="no logit files"):
        ensel.score_files([], backend=backend)


@backends
@pytest.mark.parametrize("n", [0, 3])
def test_no_classes_is_a_value_error(backend, n, tmp_path):
    with pytest.raises(ValueError, match="K = 0"):
        ensel.score(torch.zeros(2, n, 0), backend=backend)
    with pytest.raises(ValueError, match="K = 0"):
        ensel.score([torch.zeros(n, 0)], backend=backend)
    with pytest.raises(ValueError, match="K = 0"):
        ensel.Accumulator(n, 0, backend=backend)
    with pytest.raises(ValueError, match="K = 0"):
        ensel.Accumulator(n, K, backend=backend).update(torch.zeros(n, 0), start=0)
    np.save(tmp_path / "m.npy", np.zeros((n, 0), np.float32))
    with pytest.raises(ValueError, match="K = 0"):
        ensel.score_files(tmp_path / "m.npy", backend=backend)
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="K = 0"):
        ensel.score_files(tmp_path / "m.bin", shape=(n, 0), dtype="float32", backend=backend)


def test_the_reference_refuses_no_members_like_every_backend():
    with pytest.raises(ValueError, match="at least one member"):
        ensel.reference_scores(torch.randn(0, 5, 4))
