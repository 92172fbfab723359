"""The streaming Accumulator (checkpoint-major) against the fused kernel and the reference:
random batch sizes in random orders, the iterable form of ensel.score, finalize's member-count
check, save/load mid-stream, refusal of truncated and foreign files, and hypothesis properties."""

import random
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ensel
from helpers import (
    BACKENDS,
    DTYPES,
    assert_matches_reference,
    assert_scores_equal,
    assert_streaming_matches_fused,
    feed,
    ids,
    make_labels,
    make_logits,
    mask_label_everywhere,
    stream_batches,
)

backends = pytest.mark.parametrize("backend", BACKENDS)


def _data(E, N, K, dtype=torch.float32, kind="ties", seed=0):
    logits = make_logits(E, N, K, dtype, kind, seed)
    labels = make_labels(N, K, seed)
    if kind == "masked" and K > 1:
        mask_label_everywhere(logits, labels, sample=N // 2)
    return logits, labels


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("kind", ["ties", "masked", "normal"])
@pytest.mark.parametrize("interleave", [False, True], ids=["member-major", "interleaved"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 31, 7), (12, 57, 2), (3, 40, 300)], ids=str)
def test_streaming_equals_fused(backend, dtype, kind, interleave, shape):
    """Random batch sizes, random batch order: discrete scores bit for bit equal to the fused
    kernel's, continuous ones within the contract's tolerance, and both match the reference."""
    E, N, K = shape
    logits, labels = _data(E, N, K, dtype, kind, seed=sum(shape))
    fused = ensel.score(logits, labels=labels, backend=backend)
    for seed in range(2):
        acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
        feed(acc, logits, stream_batches(E, N, random.Random(seed), interleave=interleave))
        assert torch.equal(acc.members, torch.full((N,), E, dtype=torch.int32))
        streamed = acc.finalize()
        assert_streaming_matches_fused(streamed, fused, K)
        assert_matches_reference(streamed, logits, labels)


@backends
def test_batch_order_does_not_change_the_result(backend):
    """The state of a sample depends only on its own rows: two different batchings and orders
    give bit-identical scores."""
    E, N, K = 6, 45, 11
    logits, labels = _data(E, N, K, kind="normal", seed=1)
    results = []
    for seed in range(3):
        acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
        feed(acc, logits, stream_batches(E, N, random.Random(100 + seed)))
        results.append(acc.finalize())
    assert_scores_equal(results[0], results[1])
    assert_scores_equal(results[0], results[2])


@backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_iterable_forms(backend, dtype):
    """ensel.score on a list or generator of [N, K] members, of [e, N, K] groups, or a mix,
    equals the Accumulator fed member by member."""
    E, N, K = 7, 23, 9
    logits, labels = _data(E, N, K, dtype, "masked", seed=2)
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
    for member in logits:
        acc.update(member, start=0)
    want = acc.finalize()
    assert_streaming_matches_fused(want, ensel.score(logits, labels=labels, backend=backend), K)
    forms = {
        "list of members": list(logits),
        "generator of members": (m for m in logits),
        "groups": [logits[0:3], logits[3:4], logits[4:7]],
        "mixed": [logits[0], logits[1:5], logits[5], logits[6:7]],
        "tuple": tuple(logits),
    }
    for name, stream in forms.items():
        got = ensel.score(stream, labels=labels, backend=backend)
        assert_scores_equal(got, want)
        assert got.num_members == E, name


@backends
def test_iterable_errors(backend):
    with pytest.raises(ValueError, match="empty"):
        ensel.score([], backend=backend)
    with pytest.raises(ValueError, match="stream item 1"):
        ensel.score([torch.zeros(4, 3), torch.zeros(5, 3)], backend=backend)
    with pytest.raises(ValueError, match="stream item 1"):
        ensel.score([torch.zeros(4, 3), torch.zeros(4, 2)], backend=backend)


@backends
@pytest.mark.parametrize("num_members", [None, 1, 3, 40])
def test_num_members_is_only_a_capacity_hint(backend, num_members):
    """A num_members hint smaller or larger than the real ensemble changes nothing."""
    E, N, K = 9, 13, 5
    logits, labels = _data(E, N, K, kind="ties", seed=3)
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend, num_members=num_members)
    feed(acc, logits, stream_batches(E, N, random.Random(3)))
    assert_matches_reference(acc.finalize(), logits, labels)


@backends
def test_finalize_refuses_unequal_member_counts(backend):
    N, K = 20, 4
    acc = ensel.Accumulator(N, K, backend=backend)
    member = make_logits(1, N, K, seed=4)[0]
    for _ in range(3):
        acc.update(member, start=0)
    for _ in range(2):
        acc.update(member[:10], start=0)  # samples 0..9 see 5 members, 10..19 see 3
    before = acc.members
    with pytest.raises(ValueError) as info:
        acc.finalize()
    msg = str(info.value)
    assert re.search(r"\b3\b", msg) and re.search(r"\b5\b", msg), msg
    assert torch.equal(acc.members, before)
    # Completing the lagging samples makes it valid.
    for _ in range(2):
        acc.update(member[10:], start=10)
    s = acc.finalize()
    assert s.num_members == 5
    assert_matches_reference(s, member.expand(5, N, K), None)


@backends
def test_finalize_without_members(backend):
    acc = ensel.Accumulator(5, 3, backend=backend)
    with pytest.raises(ValueError):
        acc.finalize()


@backends
def test_finalize_can_be_called_mid_stream(backend):
    """finalize() reads the state without consuming it: scores after 2 members, then after 4."""
    E, N, K = 4, 10, 6
    logits, labels = _data(E, N, K, kind="normal", seed=5)
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
    for e in range(2):
        acc.update(logits[e], start=0)
    assert_matches_reference(acc.finalize(), logits[:2], labels)
    for e in range(2, 4):
        acc.update(logits[e], start=0)
    assert_matches_reference(acc.finalize(), logits, labels)


# ----------------------------------------------------------------------------- save / load


@backends
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize("num_members", [None, 2])
def test_save_load_round_trip_mid_stream(backend, with_labels, num_members, tmp_path):
    """Save after some batches (samples at different member counts), load into a new
    Accumulator, continue: bit-identical to the uninterrupted stream, well past the
    history capacity the state was created with."""
    E, N, K = 11, 37, 6
    logits, labels = _data(E, N, K, kind="masked", seed=6)
    labels = labels if with_labels else None
    batches = stream_batches(E, N, random.Random(6))
    half = len(batches) // 2

    whole = ensel.Accumulator(N, K, labels=labels, backend=backend, num_members=num_members)
    feed(whole, logits, batches)
    want = whole.finalize()

    first = ensel.Accumulator(N, K, labels=labels, backend=backend, num_members=num_members)
    feed(first, logits, batches[:half])
    path = tmp_path / "state.pt"
    first.save(path)
    members_at_save = first.members
    feed(first, logits, batches[half:])  # the saved file must not follow the live object

    resumed = ensel.Accumulator.load(path, backend=backend)
    assert resumed.num_samples == N and resumed.num_classes == K
    assert resumed.backend == backend
    assert torch.equal(resumed.members, members_at_save)
    feed(resumed, logits, batches[half:])
    assert_scores_equal(resumed.finalize(), want)
    assert_scores_equal(first.finalize(), want)
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"


def test_save_with_one_backend_load_with_another(tmp_path):
    """The state layout is shared by every backend (ensel/_state.py)."""
    E, N, K = 6, 19, 5
    logits, labels = _data(E, N, K, kind="masked", seed=7)
    batches = stream_batches(E, N, random.Random(7))
    half = len(batches) // 2
    for first, second in [(BACKENDS[0], BACKENDS[-1]), (BACKENDS[-1], BACKENDS[0])]:
        acc = ensel.Accumulator(N, K, labels=labels, backend=first)
        feed(acc, logits, batches[:half])
        acc.save(tmp_path / "s.pt")
        acc = ensel.Accumulator.load(tmp_path / "s.pt", backend=second)
        assert acc.backend == second
        feed(acc, logits, batches[half:])
        assert_matches_reference(acc.finalize(), logits, labels)


def test_save_overwrites_an_existing_file(tmp_path):
    N, K = 8, 3
    logits = make_logits(3, N, K, seed=8)
    acc = ensel.Accumulator(N, K)
    acc.update(logits[0], start=0)
    path = tmp_path / "s.pt"
    acc.save(path)
    acc.update(logits[1], start=0)
    acc.save(path)
    loaded = ensel.Accumulator.load(path)
    assert torch.equal(loaded.members, torch.full((N,), 2, dtype=torch.int32))
    assert_matches_reference(loaded.finalize(), logits[:2], None)


def _saved_state(tmp_path):
    N, K = 16, 5
    logits, labels = _data(4, N, K, kind="normal", seed=9)
    acc = ensel.Accumulator(N, K, labels=labels)
    for member in logits[:3]:
        acc.update(member, start=0)
    path = tmp_path / "good.pt"
    acc.save(path)
    return path


@pytest.mark.parametrize("keep", [0.0, 0.02, 0.25, 0.5, 0.9, 0.999])
def test_load_refuses_a_truncated_file(tmp_path, keep):
    path = _saved_state(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: min(int(len(data) * keep), len(data) - 1)])
    with pytest.raises(ValueError):
        ensel.Accumulator.load(cut)


class NotAllowedInWeightsOnly:
    pass


@pytest.mark.parametrize(
    "payload",
    [
        "text",
        "empty",
        "random dict",
        "tensor",
        "list",
        "object",
        "header, missing fields",
        "header, wrong version",
        "header, wrong shape",
    ],
)
def test_load_refuses_foreign_files(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    if payload == "text":
        path.write_text("epoch,accuracy\n1,0.5\n")
    elif payload == "empty":
        path.write_bytes(b"")
    elif payload == "random dict":
        torch.save({"weight": torch.randn(3, 3), "step": 7}, path)
    elif payload == "tensor":
        torch.save(torch.randn(4), path)
    elif payload == "list":
        torch.save([1, 2, 3], path)
    elif payload == "object":
        torch.save({"x": NotAllowedInWeightsOnly()}, path)
    else:
        good = torch.load(_saved_state(tmp_path), weights_only=True)
        if payload == "header, missing fields":
            del good["pbar_sum"]
        elif payload == "header, wrong version":
            good["version"] = 999
        else:
            good["pbar_sum"] = good["pbar_sum"][:, :-1].clone()
        torch.save(good, path)
    with pytest.raises(ValueError):
        ensel.Accumulator.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ensel.Accumulator.load(tmp_path / "nope.pt")


# ----------------------------------------------------------------------------- properties

DTYPE_STRATEGY = st.sampled_from(DTYPES)
KIND_STRATEGY = st.sampled_from(["normal", "ties", "masked"])


@st.composite
def ensembles(draw):
    E = draw(st.integers(1, 6))
    N = draw(st.integers(1, 40))
    K = draw(st.integers(1, 12))
    dtype = draw(DTYPE_STRATEGY)
    kind = draw(KIND_STRATEGY)
    seed = draw(st.integers(0, 2**16))
    with_labels = draw(st.booleans())
    logits = make_logits(E, N, K, dtype, kind, seed)
    labels = make_labels(N, K, seed) if with_labels else None
    if with_labels and kind == "masked" and K > 1 and draw(st.booleans()):
        mask_label_everywhere(logits, labels, sample=draw(st.integers(0, N - 1)))
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=ensembles())
def test_property_fused_matches_reference(backend, case):
    logits, labels = case
    assert_matches_reference(ensel.score(logits, labels=labels, backend=backend), logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=ensembles(), order_seed=st.integers(0, 2**16), interleave=st.booleans())
def test_property_streaming_matches_reference_and_fused(backend, case, order_seed, interleave):
    logits, labels = case
    E, N, K = logits.shape
    acc = ensel.Accumulator(N, K, labels=labels, backend=backend)
    feed(acc, logits, stream_batches(E, N, random.Random(order_seed), interleave=interleave))
    streamed = acc.finalize()
    assert_matches_reference(streamed, logits, labels)
    assert_streaming_matches_fused(streamed, ensel.score(logits, labels=labels, backend=backend), K)


@st.composite
def committees(draw):
    """[E, N, K] logits whose every row has one maximum, on a member-chosen class among the first
    few (many samples share a vote count multiset), in any dtype; and permutations of the classes
    and of the members."""
    E = draw(st.integers(1, 12))
    N = draw(st.integers(1, 30))
    K = draw(st.integers(1, 70))
    dtype = draw(DTYPE_STRATEGY)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    winners = torch.randint(0, min(K, draw(st.integers(1, 5))), (E, N), generator=g)
    logits = torch.rand(E, N, K, generator=g, dtype=torch.float64)  # below 1: the winner's 2 is unique
    logits.scatter_(2, winners[..., None], 2.0)
    if draw(st.booleans()):
        logits[torch.rand(E, N, K, generator=g) < 0.3] = float("-inf")
        logits.scatter_(2, winners[..., None], 2.0)
    classes = torch.randperm(K, generator=g)
    members = torch.randperm(E, generator=g)
    return logits.to(dtype), classes, members


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=committees(), stream=st.booleans())
def test_property_vote_entropy_depends_on_the_vote_counts_only(backend, case, stream):
    """vote_entropy bit for bit under a permutation of the classes (each row's unique maximum moves
    with its class, so the count multiset stays) and of the members (a reordered stream), fused
    and streamed; equal count multisets among the samples give equal bits."""
    logits, classes, members = case
    E, N, K = logits.shape

    def vote_entropy(x):
        if not stream:
            return ensel.score(x, backend=backend).vote_entropy
        acc = ensel.Accumulator(N, K, backend=backend)
        for member in x:
            acc.update(member)
        return acc.finalize().vote_entropy

    base = vote_entropy(logits)
    assert torch.equal(vote_entropy(logits[:, :, classes]), base)
    assert torch.equal(vote_entropy(logits[members]), base)
    assert torch.equal(vote_entropy(logits[members][:, :, classes]), base)
    signature = [tuple(sorted(torch.bincount(logits[:, n].argmax(-1), minlength=K).tolist())) for n in range(N)]
    for n in range(N):
        for m in range(n):
            if signature[n] == signature[m]:
                assert base[n].item() == base[m].item() and torch.equal(base[n], base[m]), (n, m)


def _tampered(tmp_path, field, index, value):
    """A saved state with one value of one field changed, written back as a valid torch file."""
    payload = torch.load(_saved_state(tmp_path), weights_only=True)
    payload[field][index] = value
    path = tmp_path / f"tampered-{field}.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "field, index, value",
    [
        ("argmax_history", (0, 3), 5),  # a class index >= K (K = 5)
        ("argmax_history", (1, 0), -1),
        ("members", 2, -1),  # a negative member count
        ("members", 2, 4),  # more members than the argmax history holds
    ],
)
def test_load_refuses_out_of_range_state_values(tmp_path, field, index, value):
    """Values the kernels use as indices (class ids, member counts) must be checked on load:
    torch.load verifies no checksum, so a corrupted byte in a state file loads without error,
    and the CPU kernel then indexes out of bounds (a segmentation fault in finalize())."""
    path = _tampered(tmp_path, field, index, value)
    with pytest.raises(ValueError):
        ensel.Accumulator.load(path)


def test_load_refuses_a_corrupted_byte(tmp_path):
    """The realistic case of the test above: one flipped byte inside the saved argmax history."""
    import struct
    import zipfile

    path = _saved_state(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        payload = torch.load(path, weights_only=True)
        history_bytes = payload["argmax_history"].numpy().tobytes()
        # Find the stored record holding the argmax history (stored uncompressed by torch.save).
        for info in z.infolist():
            if z.read(info) == history_bytes:
                break
        else:
            pytest.fail("argmax history record not found in the state file")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 3] = 0x7F  # argmax of (member 0, sample 0) becomes about 2.1e9
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        ensel.Accumulator.load(corrupted)
