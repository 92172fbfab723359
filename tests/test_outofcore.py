"""Out-of-core scoring of per-member logit files: equal to in-memory `ensel.score` bit for bit, and
the process's peak memory stays under the budget it is given while scoring several times more."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ensel
from ensel import score_files
from ensel.outofcore import OUTPUT_BYTES, bytes_per_chunk_sample, plan_chunk


def write_members(tmp_path, logits: torch.Tensor, raw: bool = False) -> list:
    paths = []
    for e, member in enumerate(logits):
        if raw:
            path = tmp_path / f"member{e}.bin"
            member.contiguous().view(torch.uint8).numpy().tofile(path)  # bfloat16 has no numpy dtype
        else:
            path = tmp_path / f"member{e}.npy"
            np.save(path, member.numpy())
        paths.append(path)
    return paths


def assert_same_scores(got, expected):
    assert got.num_members == expected.num_members
    assert got.to_dict().keys() == expected.to_dict().keys()
    for name, value in expected.to_dict().items():
        assert torch.equal(getattr(got, name), value), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_npy_files_under_a_small_budget_equal_in_memory_scores(tmp_path, dtype):
    g = torch.Generator().manual_seed(5)
    E, N, K = 7, 1001, 13
    logits = (torch.randn(E, N, K, generator=g) * 4).to(dtype)
    logits[2, 17] = logits[5, 17]  # tied votes
    logits[:, 40] = 0.0  # every class tied within a row
    labels = torch.randint(0, K, (N,), generator=g)
    paths = write_members(tmp_path, logits)
    itemsize = logits.element_size()
    budget = N * OUTPUT_BYTES + 97 * bytes_per_chunk_sample(E, K * itemsize)
    assert plan_chunk(E, N, K * itemsize, budget) == 97  # 11 chunks, the last partial
    got = score_files(paths, labels=labels.numpy(), max_memory=budget)
    assert_same_scores(got, ensel.score(logits, labels=labels))
    assert_same_scores(score_files(paths, max_memory=budget), ensel.score(logits))


def test_raw_files_given_shape_and_dtype(tmp_path):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(4, 300, 9, generator=g) * 3).bfloat16()
    paths = write_members(tmp_path, logits, raw=True)
    got = score_files(paths, shape=(300, 9), dtype=torch.bfloat16, chunk_samples=64)
    assert_same_scores(got, ensel.score(logits))
    with pytest.raises(ValueError, match="needs exactly"):
        score_files(paths, shape=(301, 9), dtype="bfloat16")
    with pytest.raises(ValueError, match="both shape"):
        score_files(paths, shape=(300, 9))


def test_files_that_disagree_and_budgets_too_small_are_refused(tmp_path):
    a = tmp_path / "a.npy"
    np.save(a, np.zeros((50, 4), np.float16))
    for name, array, match in [
        ("rows.npy", np.zeros((51, 4), np.float16), "shape"),
        ("f32.npy", np.zeros((50, 4), np.float32), "dtype"),
        ("cube.npy", np.zeros((2, 50, 4), np.float16), r"expected \[N, K\]"),
        ("ints.npy", np.zeros((50, 4), np.int32), "not a logits dtype"),
        ("fortran.npy", np.asfortranarray(np.zeros((50, 4), np.float16)), "Fortran"),
    ]:
        np.save(tmp_path / name, array)
        with pytest.raises(ValueError, match=match):
            score_files([a, tmp_path / name])
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy: not a .npy file"):
        score_files([a, tmp_path / "junk.npy"])
    with pytest.raises(ValueError, match="no logit files"):
        score_files([])
    # Scores of 50 samples take 50 x 60 bytes; one more sample of 1 member needs 2 x 8 + 68 bytes.
    need = 50 * OUTPUT_BYTES + bytes_per_chunk_sample(1, 8)
    assert score_files([a], max_memory=need).num_samples == 50
    with pytest.raises(ValueError, match=f"too small.*at least {need} bytes"):
        score_files([a], max_memory=need - 1)


def test_invalid_logits_are_reported_at_their_file_row(tmp_path):
    logits = torch.zeros(3, 200, 5)
    logits[1, 150, 2] = float("nan")
    paths = write_members(tmp_path, logits)
    with pytest.raises(ValueError, match="member 1, sample 150"):
        score_files(paths, chunk_samples=64)  # row 150 is sample 22 of the third chunk
    labels = np.zeros(200, np.int64)
    labels[130] = 5
    with pytest.raises(ValueError, match="sample 130"):
        score_files(write_members(tmp_path, torch.zeros(3, 200, 5)), labels=labels, chunk_samples=64)


def test_the_first_invalid_row_is_member_major_across_chunks(tmp_path):
    """docs/contract.md section 4: the lowest member wins over the lowest sample, whichever chunk
    holds it. Chunk 0 has an offender at member 2, chunk 2 one at member 1 (reported), chunk 3
    one at member 1 of a later sample (not reported). Scoring used to stop at the first chunk
    that failed and report (2, 10)."""
    logits = torch.zeros(3, 200, 5)
    logits[2, 10, 0] = float("nan")
    logits[1, 150, :] = float("-inf")
    logits[1, 199, 3] = float("inf")
    paths = write_members(tmp_path, logits)
    with pytest.raises(ValueError, match=r"^invalid input: row of all -inf logits at member 1, sample 150$"):
        score_files(paths, chunk_samples=64)
    logits[0, 190, 1] = float("nan")  # member 0, in the last chunk: lower than every other
    paths = write_members(tmp_path, logits)
    with pytest.raises(ValueError, match=r"^invalid input: NaN logit at member 0, sample 190$"):
        score_files(paths, chunk_samples=64)


PROBE = r"""
import json, sys, numpy as np, torch
from ensel.outofcore import score_files, plan_chunk

mode, budget, out, warm = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
paths = sys.argv[5:]
score_files([warm] * 2, max_memory=1 << 20)  # load code paths, start a thread once

def rss(kind):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(kind + ":"))

# The peak so far (torch's import) would hide what scoring adds: Linux resets it to the resident
# size now on writing 5 to clear_refs, so the peak after scoring minus the size now is its increase.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, file_before = rss("VmRSS"), rss("RssFile")
if mode == "outofcore":
    s = score_files(paths, max_memory=budget)
else:  # control: the same chunks taken from memory maps, whose pages stay mapped and resident
    import ensel
    maps = [np.load(p, mmap_mode="r") for p in paths]
    n, k = maps[0].shape
    chunk = plan_chunk(len(maps), n, k * 2, budget)
    parts = [ensel.score(torch.from_numpy(np.stack([m[i : i + chunk] for m in maps]))) for i in range(0, n, chunk)]
    s = None
peak = rss("VmHWM")
# Pages of mapped shared libraries that a code path used here for the first time faults in (or
# that the kernel had reclaimed) are shared page cache, not memory this call allocates; pages of
# the logit files themselves, mapped, would count.
logit_pages, path = 0, None
with open("/proc/self/smaps") as f:
    for line in f:
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # a mapping's header line; its path, if any, is last
            path = head[5] if len(head) > 5 else None
        elif head[0] == "Rss:" and path in paths:
            logit_pages += int(head[1]) * 1024
file_pages = max(0, rss("RssFile") - file_before - logit_pages)
if s is not None:
    torch.save(s.to_dict(), out)
print(json.dumps({"extra": peak - before - file_pages, "file_pages": file_pages, "hwm_extra": peak - before}))
"""

E, N, K = 6, 200_000, 100  # float16: 240 MB of logits
BUDGET = 32 * 2**20
# Not in the budget: the CPU kernel's per-thread scratch, the chunk of labels ensel.score makes,
# allocator slack and thread stacks; measured at about 1 MB here.
ALLOWANCE = 4 * 2**20


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    g = torch.Generator().manual_seed(11)
    paths = []
    for e in range(E):
        path = root / f"member{e}.npy"
        np.save(path, (torch.randn(N, K, generator=g) * 3).half().numpy())
        paths.append(path)
    warm = root / "warm.npy"
    np.save(warm, np.zeros((10, K), np.float16))
    return root, paths, warm


def run_probe(mode, root, paths, warm) -> dict:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    out = root / f"{mode}.pt"
    cmd = [sys.executable, "-c", PROBE, mode, str(BUDGET), str(out), str(warm), *map(str, paths)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return {**json.loads(res.stdout.splitlines()[-1]), "out": out}


def test_scoring_7x_its_budget_stays_under_it_and_equals_in_memory(big_pool):
    root, paths, warm = big_pool
    assert E * N * K * 2 > 7 * BUDGET
    m = run_probe("outofcore", root, paths, warm)
    print("peak extra", m)
    assert m["extra"] < BUDGET + ALLOWANCE, m
    got = torch.load(m["out"])
    expected = ensel.score(torch.stack([torch.from_numpy(np.load(p)) for p in paths])).to_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_the_probe_sees_memory_mapped_pages(big_pool):
    # Reading the same chunks through memory maps leaves the file's pages resident in the process:
    # the probe must see them, or its bound above proves nothing.
    root, paths, warm = big_pool
    m = run_probe("mmap", root, paths, warm)
    assert m["extra"] > 4 * BUDGET, m


# ----------------------------------------------------------------------------- paths and messages


@pytest.mark.parametrize("form", ["str", "Path", "list of str", "tuple of Path", "generator"])
def test_one_path_or_a_sequence_of_paths(tmp_path, form):
    """A single str was iterated as one-letter paths, a single Path was a TypeError."""
    logits = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(3))
    paths = write_members(tmp_path, logits)
    given = {
        "str": str(paths[0]),
        "Path": paths[0],
        "list of str": [str(paths[0])],
        "tuple of Path": (paths[0],),
        "generator": (p for p in paths[:1]),
    }[form]
    assert_same_scores(score_files(given), ensel.score(logits[:1]))
    assert_same_scores(score_files(p for p in paths), ensel.score(logits))


def test_a_path_that_is_not_a_path_is_a_type_error(tmp_path):
    paths = write_members(tmp_path, torch.zeros(1, 3, 2))
    with pytest.raises(TypeError, match=r"paths\[1\]"):
        score_files([paths[0], 7])
    with pytest.raises(TypeError, match="paths"):
        score_files(7)


def _not_logits(tmp_path):
    """name -> (file content writer, what the message must say)."""
    import pickle

    def npy_of(array, **kw):
        return lambda p: np.save(p, array, **kw)

    def bytes_of(data):
        return lambda p: p.write_bytes(data)

    def npz(p):
        with open(p, "wb") as f:
            np.savez(f, a=np.zeros((3, 2)))

    def truncated(p):
        np.save(p, np.zeros((10, 4), np.float32))
        p.write_bytes(p.read_bytes()[:-8])

    return {
        "junk": (bytes_of(b"not numpy"), "not a .npy file"),
        "empty": (bytes_of(b""), "not a .npy file"),
        "pickle": (bytes_of(pickle.dumps({"a": 1})), "not a .npy file"),
        "npz": (npz, "not a .npy file"),
        "objects": (npy_of(np.array([{"a": 1}, 2], dtype=object), allow_pickle=True), "holds Python objects"),
        "strings": (npy_of(np.array([["a", "b"]])), "not a .npy file of real numbers"),
        "truncated": (truncated, "truncated"),
    }


@pytest.mark.parametrize("case", list(_not_logits(None)))
@pytest.mark.parametrize("reader", ["score_files", "open_logit_files"])
def test_a_file_that_is_not_logits_says_what_is_wrong(tmp_path, case, reader):
    """numpy's own message for several of these advises loading the file "unsafely using the
    allow_pickle= keyword argument": never suggest that; say what is wrong with the file."""
    write, says = _not_logits(tmp_path)[case]
    path = tmp_path / f"{case}.npy"
    write(path)
    if reader == "score_files":
        read = score_files
    else:
        read = pytest.importorskip("ensel.al.consensus").open_logit_files
    with pytest.raises(ValueError) as info:
        read([path])
    msg = str(info.value)
    assert str(path) in msg and says in msg, msg
    assert "allow_pickle" not in msg and "unsafe" not in msg, msg


def test_open_logit_files_reads_one_path_or_several(tmp_path):
    open_logit_files = pytest.importorskip("ensel.al.consensus").open_logit_files
    paths = write_members(tmp_path, torch.randn(2, 5, 3))
    assert [a.shape for a in open_logit_files(paths[0])] == [(5, 3)]
    assert [a.shape for a in open_logit_files(p for p in paths)] == [(5, 3), (5, 3)]


def test_a_uint64_label_is_reported_as_given(tmp_path):
    paths = write_members(tmp_path, torch.zeros(2, 100, 3))
    labels = np.zeros(100, np.uint64)
    labels[70] = 2**64 - 1
    with pytest.raises(ValueError, match=f"label {2**64 - 1} of sample 70"):
        score_files(paths, labels=labels, chunk_samples=32)


def test_labels_are_checked_before_any_chunk_is_scored(tmp_path, monkeypatch):
    """A bad label in the last chunk is refused before the first chunk is read or scored."""
    from ensel import outofcore

    paths = write_members(tmp_path, torch.zeros(3, 200, 5))
    labels = np.zeros(200, dtype=np.int64)
    labels[-1] = 5
    scored = []
    real = outofcore.score
    monkeypatch.setattr(outofcore, "score", lambda *a, **k: scored.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match=r"label 5 of sample 199 is outside \[0, 5\)"):
        score_files(paths, labels=labels, chunk_samples=64)
    assert scored == []
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        score_files(paths, labels=np.zeros(200), chunk_samples=64)
