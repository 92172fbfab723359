"""Threads sharing one Accumulator (docs/contract.md section 9): concurrent updates of disjoint row
ranges equal the serial stream bit for bit, through history growth; finalize and save wait for
the updates that are running.

The shared-state runs happen in a subprocess: the defect they guard against (a thread growing the
argmax history while another thread's kernel writes into the old one) is a segmentation fault,
which must fail a test rather than end the test run."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import ensel
from device_shim import cpu_isa_of
from helpers import BACKENDS, assert_matches_reference, assert_scores_equal, make_labels, make_logits

THREADED = r"""
import json, random, sys, tempfile, threading, os
import torch, ensel

backend, N, K, E, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
logits = torch.randint(0, 3, (E, N, K), generator=g).float()  # ties: modes and argmaxes tie often
labels = torch.randint(0, K, (N,), generator=g)
acc = ensel.Accumulator(N, K, labels=labels, backend=backend)  # default history capacity: 8
bounds = [N * t // T for t in range(T + 1)]
errors, observed = [], {"finalized": 0, "saved": 0}
running = threading.Event()
running.set()

def feed(t):
    # Each thread owns rows [a, b): every member in order, in batches of random sizes, so the
    # threads reach the history's capacity at different moments.
    try:
        rng = random.Random(t)
        a, b = bounds[t], bounds[t + 1]
        for e in range(E):
            s = a
            while s < b:
                c = min(b, s + rng.randint(1, max(1, (b - a) // 3)))
                acc.update(logits[e, s:c], start=s)
                s = c
    except BaseException as exc:
        errors.append(repr(exc))

def watch(folder):
    # finalize and save while the updates run: each sees the state between updates.
    path = os.path.join(folder, "state.pt")
    try:
        while running.is_set():
            try:
                acc.finalize()
                observed["finalized"] += 1
            except ValueError as exc:  # mid-stream: samples at different member counts, or none yet
                assert "different numbers of members" in str(exc) or "no member" in str(exc), exc
            acc.save(path)
            ensel.Accumulator.load(path, backend=backend)  # a consistent state passes load's checks
            observed["saved"] += 1
    except BaseException as exc:
        errors.append(repr(exc))

with tempfile.TemporaryDirectory() as folder:
    watcher = threading.Thread(target=watch, args=(folder,))
    threads = [threading.Thread(target=feed, args=(t,)) for t in range(T)]
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running.clear()
    watcher.join()
assert not errors, errors
got = acc.finalize()
serial = ensel.Accumulator(N, K, labels=labels, backend=backend)
for e in range(E):
    serial.update(logits[e], start=0)
want = serial.finalize()
# Each sample's members still arrive in member order (its rows belong to one thread), so the
# result is the serial one bit for bit, forgetting included.
diff = [name for name, v in want.to_dict().items() if not torch.equal(getattr(got, name), v)]
print(json.dumps({"differ": diff, "members": int(acc.members.min()), **observed}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_on_disjoint_rows_equal_the_serial_stream(backend):
    """4 threads, 40 members, history growth from the default capacity of 8: before the history
    growth was locked, this crashed (SIGSEGV) every time on the CPU backend."""
    N, K, E, T = (20_000, 10, 40, 4) if backend != "reference" else (4_000, 10, 24, 4)
    env = dict(os.environ)
    level = cpu_isa_of(backend)
    if level is not None:  # the child runs the cpu backend at that level
        backend, env["ENSEL_CPU_ISA"] = "cpu", level
    res = subprocess.run(
        [sys.executable, "-c", THREADED, backend, str(N), str(K), str(E), str(T)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert res.returncode == 0, f"exit status {res.returncode}\n{res.stderr[-3000:]}"
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["differ"] == [], out
    assert out["members"] == E
    assert out["saved"] >= 1, out


class _BlockingBackend:
    """Wraps a backend so that its update blocks until released: an update "inside the kernel"."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.entered, self.release = threading.Event(), threading.Event()

    def update(self, state, logits, start):
        self.entered.set()
        assert self.release.wait(30)
        self.inner.update(state, logits, start)

    def finalize(self, state, num_members):
        return self.inner.finalize(state, num_members)


@pytest.mark.parametrize("call", ["finalize", "save", "grow"])
def test_exclusive_calls_wait_for_running_updates(call, tmp_path):
    """While one update is inside the kernel, finalize, save and an update that must grow the
    history wait for it, and then see its rows."""
    N, K = 8, 3
    logits = make_logits(3, N, K, seed=1)
    acc = ensel.Accumulator(N, K, num_members=2)  # history capacity 2
    acc.update(logits[0], start=0)
    acc.update(logits[1, 4:], start=4)  # rows 4..7 at 2 members: the capacity
    blocking = _BlockingBackend(acc._backend)
    acc._backend = blocking
    slow = threading.Thread(target=acc.update, args=(logits[1, :4], 0))  # rows 0..3: no growth
    slow.start()
    assert blocking.entered.wait(30)
    outcome = []

    def other():
        try:
            if call == "finalize":
                acc.finalize()
            elif call == "save":
                acc.save(tmp_path / "s.pt")
            else:
                acc.update(logits[2, 4:], start=4)  # a third member for rows 4..7: growth
            outcome.append("ok")
        except ValueError as e:
            outcome.append(str(e))

    waiter = threading.Thread(target=other)
    waiter.start()
    try:
        time.sleep(0.3)
        assert not outcome, f"{call} ran while an update was inside the kernel: {outcome}"
        # Nor was the history replaced under the running kernel (growth installs a larger one).
        assert acc._state.argmax_history.shape[0] == 2
    finally:
        blocking.release.set()
        slow.join(30)
        waiter.join(30)
    assert acc.members[:4].tolist() == [2] * 4
    if call == "finalize":  # it waited, so it saw rows 0..3 at 2 members and 4..7 at 2: equal
        assert outcome == ["ok"], outcome
    elif call == "save":
        assert outcome == ["ok"], outcome
        assert ensel.Accumulator.load(tmp_path / "s.pt").members.tolist() == [2] * 8
    else:
        assert outcome == ["ok"], outcome
        assert acc.members.tolist() == [2] * 4 + [3] * 4


def test_threads_each_with_its_own_rows_and_labels_match_the_reference():
    """In process, small: 3 threads, rows interleaved in blocks, against the float64 reference."""
    E, N, K = 12, 300, 5
    logits, labels = make_logits(E, N, K, kind="ties", seed=3), make_labels(N, K, seed=3)
    acc = ensel.Accumulator(N, K, labels=labels)
    blocks = [(a, min(N, a + 50)) for a in range(0, N, 50)]

    def feed(mine):
        for e in range(E):
            for a, b in mine:
                acc.update(logits[e, a:b], start=a)

    threads = [threading.Thread(target=feed, args=(blocks[t::3],)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_matches_reference(acc.finalize(), logits, labels)
    serial = ensel.Accumulator(N, K, labels=labels)
    for e in range(E):
        serial.update(logits[e], start=0)
    assert_scores_equal(acc.finalize(), serial.finalize())


def test_an_update_of_overlapping_rows_waits_for_the_running_one():
    """Two kernels on one sample would both append its argmax at the same member count, one past
    the history's room: an update of rows that overlap a running update's rows waits for it."""
    N, K = 8, 3
    logits = make_logits(2, N, K, seed=2)
    acc = ensel.Accumulator(N, K, num_members=2)
    blocking = _BlockingBackend(acc._backend)
    acc._backend = blocking
    slow = threading.Thread(target=acc.update, args=(logits[0, :4], 0))  # rows 0..3
    slow.start()
    assert blocking.entered.wait(30)
    blocking.entered.clear()
    disjoint = threading.Thread(target=acc.update, args=(logits[0, 4:], 4))  # rows 4..7: runs beside it
    disjoint.start()
    assert blocking.entered.wait(30), "an update of disjoint rows waited for the running one"
    blocking.entered.clear()
    overlapping = threading.Thread(target=acc.update, args=(logits[1, 2:6], 2))  # rows 2..5
    overlapping.start()
    try:
        assert not blocking.entered.wait(0.3), "an update of overlapping rows entered the kernel beside another"
    finally:
        blocking.release.set()
        for t in (slow, disjoint, overlapping):
            t.join(30)
    assert acc.members.tolist() == [1, 1, 2, 2, 2, 2, 1, 1]


OVERLAPPING = r"""
import json, sys, threading
import torch, ensel

N, K, E, T = 3000, 10, 12, 4
g = torch.Generator().manual_seed(0)
logits = torch.randint(0, 3, (T * E, N, K), generator=g).float()
labels = torch.randint(0, K, (N,), generator=g)
acc = ensel.Accumulator(N, K, labels=labels)  # default history capacity 8: grown 3 times
errors = []

def feed(t):
    try:
        for e in range(t * E, (t + 1) * E):  # every thread on every row
            for s in range(0, N, 700):
                acc.update(logits[e, s : s + 700], start=s)
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=feed, args=(t,)) for t in range(T)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
got = acc.finalize()
serial = ensel.Accumulator(N, K, labels=labels)
for member in logits:
    serial.update(member, start=0)
want = serial.finalize()
# The members of a sample arrive in some interleaving of the threads' orders: the votes do not
# depend on it; the float sums only in their last bits; forgetting does.
exact = [n for n in ("mode", "mode_votes", "variation_ratio", "error_count") if not torch.equal(getattr(got, n), getattr(want, n))]
close = [n for n in ("entropy", "mean_entropy", "mutual_info", "margin", "nll") if not torch.allclose(getattr(got, n), getattr(want, n), atol=1e-5)]
print(json.dumps({"exact": exact, "close": close, "members": acc.members.unique().tolist()}))
"""


def test_threads_on_overlapping_rows_never_corrupt_the_state():
    res = subprocess.run([sys.executable, "-c", OVERLAPPING], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"exit status {res.returncode}\n{res.stderr[-3000:]}"
    out = json.loads(res.stdout.splitlines()[-1])
    assert out == {"exact": [], "close": [], "members": [48]}, out
