"""The Accumulator's state file (docs/contract.md section 9): `load` checks the header and every
field against it before allocating anything (a tampered file is a ValueError naming it, with the
process's memory unchanged), and a failed `save` leaves the previous file and no temporary one."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import ensel
from helpers import assert_scores_equal, make_labels, make_logits

N, K = 4, 5


def saved(tmp_path, labels=True):
    logits = make_logits(3, N, K, seed=1)
    acc = ensel.Accumulator(N, K, labels=make_labels(N, K, seed=1) if labels else None)
    for member in logits:
        acc.update(member, start=0)
    path = tmp_path / "good.pt"
    acc.save(path)
    return path


def _set(key, value):
    def change(p):
        p[key] = value

    return change


def _drop(key):
    def change(p):
        del p[key]

    return change


# name -> how the good payload is changed. Each result must be refused with a ValueError naming
# the file; the header cases claim sizes the file does not hold.
TAMPERED = {
    "num_classes 2**26": _set("num_classes", 2**26),  # 4 x 2^26 float32 = 1 GiB if allocated
    "num_classes 10**12": _set("num_classes", 10**12),
    "num_samples 2**40": _set("num_samples", 2**40),
    "num_samples -1": _set("num_samples", -1),
    "num_classes 0": _set("num_classes", 0),
    "num_samples float": _set("num_samples", float(N)),
    "num_samples bool": _set("num_samples", True),
    "num_samples str": _set("num_samples", str(N)),
    "num_classes None": _set("num_classes", None),
    "no num_samples": _drop("num_samples"),
    "no num_classes": _drop("num_classes"),
    "no labels key": _drop("labels"),
    "labels a list": _set("labels", [0] * N),
    "labels float": _set("labels", torch.zeros(N)),
    "labels of N + 1": _set("labels", torch.zeros(N + 1, dtype=torch.int64)),
    "labels out of range": _set("labels", torch.full((N,), K, dtype=torch.int64)),
    "0-d argmax_history": _set("argmax_history", torch.tensor(0, dtype=torch.int32)),
    "1-D argmax_history": _set("argmax_history", torch.zeros(N, dtype=torch.int32)),
    "argmax_history [3, N + 1]": _set("argmax_history", torch.zeros(3, N + 1, dtype=torch.int32)),
    "argmax_history int64": _set("argmax_history", torch.zeros(3, N, dtype=torch.int64)),
    "pbar_sum float64": _set("pbar_sum", torch.zeros(N, K, dtype=torch.float64)),
    "pbar_sum [N, K + 1]": _set("pbar_sum", torch.zeros(N, K + 1)),
    "members a list": _set("members", [3] * N),
    "members sparse": _set("members", torch.full((N,), 3, dtype=torch.int32).to_sparse()),
    "no nll_sum": _drop("nll_sum"),
    "members beyond the history": _set("members", torch.full((N,), 4, dtype=torch.int32)),
}


def write_tampered(tmp_path, name) -> str:
    payload = torch.load(saved(tmp_path), weights_only=True)
    TAMPERED[name](payload)
    path = tmp_path / (re.sub(r"\W+", "-", name) + ".pt")
    torch.save(payload, path)
    return str(path)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_tampered_state_is_a_value_error_naming_the_file(tmp_path, name):
    path = write_tampered(tmp_path, name)
    with pytest.raises(ValueError, match=re.escape(path)):
        ensel.Accumulator.load(path)


MEMORY_PROBE = r"""
import json, resource, sys
import ensel

good, paths = sys.argv[1], sys.argv[2:]
ensel.Accumulator.load(good).finalize()  # every code path of load, warm
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
before, errors = peak(), {}
for p in paths:
    try:
        ensel.Accumulator.load(p)
        errors[p] = None
    except Exception as e:
        errors[p] = f"{type(e).__name__}: {e}"
print(json.dumps({"grew": peak() - before, "errors": errors}))
"""


def test_tampered_headers_allocate_nothing(tmp_path):
    """In a fresh process (the peak resident size is per process): loading every tampered file
    raises the contract's ValueError and raises the peak by far less than the 1 GiB that the
    2**26-class header would claim. Before the checks came first, load allocated the whole state
    the header described, then found the fields did not match."""
    paths = [write_tampered(tmp_path, name) for name in TAMPERED]
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(saved(tmp_path)), *paths], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    for p, error in out["errors"].items():
        assert error is not None and error.startswith("ValueError: ") and p in error, (p, error)
    assert out["grew"] < 64 * 2**20, out["grew"]


def test_an_untouched_file_still_loads(tmp_path):
    for labels in (True, False):
        path = saved(tmp_path, labels)
        acc = ensel.Accumulator.load(path)
        assert acc.members.tolist() == [3] * N
        assert acc.finalize().has_labels == labels


def test_a_state_of_no_samples_round_trips(tmp_path):
    acc = ensel.Accumulator(0, K, labels=torch.zeros(0, dtype=torch.int64))
    acc.save(tmp_path / "empty.pt")
    loaded = ensel.Accumulator.load(tmp_path / "empty.pt")
    assert (loaded.num_samples, loaded.num_classes) == (0, K)
    assert loaded.finalize().num_samples == 0


# ----------------------------------------------------------------------------- failed saves


@pytest.mark.parametrize("failure", ["after writing some bytes", "before writing"])
def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, failure):
    logits = make_logits(3, N, K, seed=2)
    acc = ensel.Accumulator(N, K)
    acc.update(logits[0], start=0)
    path = tmp_path / "state.pt"
    acc.save(path)
    old_bytes = path.read_bytes()
    acc.update(logits[1], start=0)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if failure == "after writing some bytes":
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as out:
                out.truncate(100)  # a half-written file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        acc.save(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["state.pt"], os.listdir(tmp_path)
    assert path.read_bytes() == old_bytes
    assert ensel.Accumulator.load(path).members.tolist() == [1] * N
    # The live accumulator is untouched by the failure: saving again works and round-trips.
    acc.save(path)
    assert_scores_equal(ensel.Accumulator.load(path).finalize(), acc.finalize())
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]


def test_save_into_a_missing_folder_leaves_nothing(tmp_path):
    acc = ensel.Accumulator(N, K)
    with pytest.raises(FileNotFoundError):
        acc.save(tmp_path / "missing" / "state.pt")
    assert os.listdir(tmp_path) == []


def test_fields_that_do_not_hold_their_values_are_refused_before_any_copy(tmp_path):
    """A field saved as one value stretched over the header's shape (stride 0) is a few bytes on
    disk that every check or copy would expand to the full size: refused as it is read; and a
    file of Python objects is refused without torch's advice to unpickle it."""
    import pickle

    acc = ensel.Accumulator(4, 3)
    acc.update(torch.zeros(4, 3), start=0)
    path = tmp_path / "s.pt"
    acc.save(path)
    payload = torch.load(path, weights_only=True)
    n, k = 1 << 18, 1000
    payload.update(num_samples=n, num_classes=k, labels=None)
    payload["pbar_sum"] = torch.zeros(1, 1).expand(n, k)
    for name in ("entropy_sum", "nll_sum"):
        payload[name] = torch.zeros(1).expand(n)
    payload["nll_max"] = torch.full((1,), float("-inf")).expand(n)
    for name in ("members", "correct", "last_correct", "forgetting"):
        payload[name] = torch.zeros(1, dtype=torch.int32).expand(n)
    payload["argmax_history"] = torch.zeros(1, 1, dtype=torch.int32).expand(0, n)
    tampered = tmp_path / "expanded.pt"
    torch.save(payload, tampered)
    assert tampered.stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"expanded\.pt: state field 'pbar_sum' does not hold its values"):
        ensel.Accumulator.load(tampered)
    code = tmp_path / "code.pt"
    with open(code, "wb") as f:
        pickle.dump({"format": print}, f)
    with pytest.raises(ValueError, match="code.pt") as info:
        ensel.Accumulator.load(code)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
