"""The fused op through torch.library: its fake implementation lets torch.compile trace it."""

import pytest
import torch

import ensel
from ensel.ops import fused_scores


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_op_in_a_compiled_graph_matches_eager(backend):
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 5)
    labels = torch.randint(0, 5, (9,))

    def scores(x, y):
        return fused_scores(x, y, backend)

    # aot_eager traces through the fake implementation (shapes and dtypes) without inductor.
    compiled = torch.compile(scores, backend="aot_eager", fullgraph=True)
    got_floats, got_ints = compiled(logits, labels)
    want = ensel.score(logits, labels=labels, backend=backend)
    assert got_floats.shape == (9, 9) and got_floats.dtype == torch.float32
    assert got_ints.shape == (3, 9) and got_ints.dtype == torch.int64
    assert torch.equal(got_floats[0], want.entropy)
    assert torch.equal(got_ints[0], want.mode)


def test_fake_implementation_gives_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(3, 11, 7)
        floats, ints = torch.ops.ensel.fused_scores(logits, None, "cpu")
    assert floats.shape == (9, 11) and ints.shape == (3, 11)


def test_score_inside_a_compiled_function_matches_eager():
    torch.manual_seed(1)
    logits = torch.randn(3, 8, 4)
    want = ensel.score(logits, backend="cpu")
    compiled = torch.compile(lambda x: ensel.score(x, backend="cpu").mutual_info, backend="aot_eager")
    assert torch.equal(compiled(logits), want.mutual_info)


def test_packed_columns_match_the_field_lists():
    """The kernels' column counts (csrc/include/ensel/row.h, kernels/_rowmath.py) are those of
    ensel/_fields.py, whose order Scores.from_columns reads them in."""
    from ensel._fields import FLOAT_FIELDS, INT_FIELDS

    _C = pytest.importorskip("ensel._C")
    assert (_C.num_float_fields, _C.num_int_fields) == (len(FLOAT_FIELDS), len(INT_FIELDS)) == (9, 3)
    assert FLOAT_FIELDS.index("vote_entropy") == 8  # appended: the older columns keep their index
