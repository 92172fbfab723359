"""Integer arguments (docs/contract.md section 6): every entry point accepts any integral type
(numpy integers, 0-d integer tensors, anything with __index__) and refuses bool and non-integral
types with a TypeError naming the argument; the result with a numpy or torch integer equals the
result with the Python int."""

import numpy as np
import pytest
import torch

import ensel
from ensel.distributed import global_top_k
from helpers import assert_scores_equal, make_labels, make_logits


class Index:
    """A user type that is an integer by protocol only (operator.index)."""

    def __init__(self, v):
        self.v = v

    def __index__(self):
        return self.v


INTEGRAL = [np.int8, np.int64, np.uint32, lambda v: torch.tensor(v), Index]
INTEGRAL_IDS = ["np.int8", "np.int64", "np.uint32", "torch-0d", "__index__"]
# Refused by type, whatever the value: TypeError naming the argument.
def none(v):
    return None


NOT_INTEGRAL = [bool, float, np.float64, str, none, np.bool_, lambda v: torch.tensor(bool(v)), lambda v: torch.tensor(float(v))]
NOT_INTEGRAL_IDS = ["bool", "float", "np.float64", "str", "None", "np.bool_", "torch-bool", "torch-float"]
OPTIONAL = {"num_members", "max_memory", "chunk_samples"}  # None is their default

E, N, K = 3, 6, 5


def accumulate(num_samples=N, num_classes=K, num_members=None, start=2):
    logits = make_logits(E, N, K, kind="ties", seed=1)
    acc = ensel.Accumulator(num_samples, num_classes, labels=make_labels(N, K, seed=1), num_members=num_members)
    for member in logits:
        acc.update(member[:2], start=0)
        acc.update(member[2:], start=start)
    return acc.finalize()


def entry_points(tmp_path):
    """argument name -> a call taking the value of that argument (with every other one plain)."""
    logits = make_logits(E, N, K, kind="ties", seed=1)
    paths = []
    for e, member in enumerate(logits):
        paths.append(tmp_path / f"m{e}.bin")
        member.numpy().tofile(paths[-1])
    scores = ensel.score(logits)

    def raw(shape=(N, K), **kw):
        return ensel.score_files(paths, shape=shape, dtype="float32", **kw)

    return {
        "num_samples": lambda v: accumulate(num_samples=v),
        "num_classes": lambda v: accumulate(num_classes=v),
        "num_members": lambda v: accumulate(num_members=v),
        "start": lambda v: accumulate(start=v),
        "top(k)": lambda v: scores.top(v, by="entropy"),
        "global_top_k(k)": lambda v: global_top_k(scores.entropy, torch.arange(N), v, by="entropy"),
        "shape[0] (N)": lambda v: raw(shape=(v, K)),
        "shape[1] (K)": lambda v: raw(shape=(N, v)),
        "max_memory": lambda v: raw(max_memory=v),
        "chunk_samples": lambda v: raw(chunk_samples=v),
        "offset": lambda v: raw(offset=v),
    }


# The plain value of each argument in the calls above.
PLAIN = {
    "num_samples": N, "num_classes": K, "num_members": 2, "start": 2, "top(k)": 3, "global_top_k(k)": 3,
    "shape[0] (N)": N, "shape[1] (K)": K, "max_memory": 1 << 20, "chunk_samples": 4, "offset": 0,
}  # fmt: skip


def same(a, b):
    if isinstance(a, ensel.Scores):
        assert_scores_equal(a, b)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", INTEGRAL, ids=INTEGRAL_IDS)
@pytest.mark.parametrize("arg", list(PLAIN))
def test_any_integral_type_is_accepted(tmp_path, arg, kind):
    if kind is np.int8 and PLAIN[arg] > 127:
        pytest.skip("does not fit in int8")
    call = entry_points(tmp_path)[arg]
    same(call(kind(PLAIN[arg])), call(PLAIN[arg]))


@pytest.mark.parametrize("kind", NOT_INTEGRAL, ids=NOT_INTEGRAL_IDS)
@pytest.mark.parametrize("arg", list(PLAIN))
def test_non_integral_types_are_a_type_error_naming_the_argument(tmp_path, arg, kind):
    if kind is none and arg in OPTIONAL:
        pytest.skip("None is this argument's default")
    call = entry_points(tmp_path)[arg]
    with pytest.raises(TypeError) as info:
        call(kind(PLAIN[arg]))
    assert arg in str(info.value), str(info.value)


@pytest.mark.parametrize("value", [1000.5, 6.0])
def test_a_fractional_or_float_shape_is_refused(tmp_path, value):
    """score_files(shape=(1000.5, 10)) was accepted (truncated to 1000)."""
    with pytest.raises(TypeError, match=r"shape\[0\]"):
        entry_points(tmp_path)["shape[0] (N)"](value)


@pytest.mark.parametrize(
    "arg, value",
    [("num_samples", -1), ("num_classes", 0), ("num_members", 0), ("start", -1), ("top(k)", -1),
     ("shape[0] (N)", -1), ("shape[1] (K)", 0), ("chunk_samples", 0), ("max_memory", -1), ("offset", -1)],
)  # fmt: skip
def test_integral_but_out_of_range_is_a_value_error(tmp_path, arg, value):
    call = entry_points(tmp_path)[arg]
    with pytest.raises(ValueError):
        call(np.int64(value))


def test_a_one_element_tensor_is_not_an_integer_and_shard_takes_numpy_integers():
    with pytest.raises(TypeError, match="num_samples: expected an integer, got a 1-D tensor"):
        ensel.Accumulator(torch.tensor([50]), 5)
    from ensel.distributed import shard

    assert shard(np.int64(10), np.int32(1), torch.tensor(2)) == (5, 10)
    with pytest.raises(TypeError, match=r"shard\(n\)"):
        shard(10.0, 0, 2)
