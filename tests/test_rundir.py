"""The run directory: one run at a time (a second is refused at once, naming the holder; a lock
left by a killed run is taken over; the ranks of one torchrun run share it), and nothing is
written by a configuration that can be refused up front.

This file is also a worker script: `python tests/test_rundir.py hold DIR` holds DIR's lock until
its stdin closes; under torchrun, `... ranks LOCKED OUT` tries an experiment on a locked DIR.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ensel.al.loop import Experiment, ExperimentConfig, transfer
from ensel.al.rundir import LOCK_FILE, lock
from ensel._inputs import resolve_device
from ensel.al.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny(**overrides) -> ExperimentConfig:
    base = dict(data="digits", methods=("mutual_info",), sizes=(40,), initial=20, trials=1, runs=1, last=1,
                full=False, device="cpu", train=TrainConfig(arch="resnet10", epochs=1, batch_size=32, validate_last=1))
    base.update(overrides)
    return ExperimentConfig(**base)


def quiet(**kw):
    return dict(progress=False, log=lambda *_: None, **kw)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def hold(out: Path) -> subprocess.Popen:
    """Another process holding the lock of `out`, once it has said so."""
    proc = subprocess.Popen([sys.executable, __file__, "hold", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_env(), cwd=REPO, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def holder_message(proc) -> str:
    return rf"in use by process {proc.pid} on {socket.gethostname()}"


@pytest.fixture
def subset_file(tmp_path):
    path = tmp_path / "subset.npy"
    np.save(path, np.arange(0, 40))
    return path


def test_a_second_run_on_a_locked_directory_is_refused_at_once_naming_the_holder(tmp_path, subset_file):
    out = tmp_path / "run"
    claimed = Experiment(tiny(), out, **quiet())  # claimed before the other run took the lock
    holder = hold(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=holder_message(holder)):
            claimed.run()
        with pytest.raises(ValueError, match=holder_message(holder)):
            Experiment(tiny(), out, **quiet())
        with pytest.raises(ValueError, match=holder_message(holder)):
            transfer(subset_file, tiny(), out, **quiet())
        assert time.monotonic() - t0 < 10  # refused, not waiting for the holder
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "config.json"]  # nothing else written
    finally:
        holder.communicate("")  # stdin closed: the holder releases the lock and exits
    assert holder.returncode == 0 and not (out / LOCK_FILE).exists()  # a finished run leaves no lock file
    Experiment(tiny(), out, **quiet())  # free again


def test_demo_fresh_never_deletes_a_directory_in_use(tmp_path, capsys):
    """`ensel demo --fresh` on the folder of a demo that is running is refused, and deletes nothing."""
    from ensel.cli import main

    out = tmp_path / "demo"
    Experiment(tiny(), out, **quiet())
    (out / "trial0").mkdir()
    holder = hold(out)
    try:
        assert main(["demo", "--fresh", "--no-progress", "--out", str(out)]) == 2
        assert holder_message(holder) in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "config.json", "trial0"]
    finally:
        holder.communicate("")


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, subset_file):
    out = tmp_path / "run"
    holder = hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # The dead run's lock file is still there and names it; only the kernel's lock died with it.
    assert (out / LOCK_FILE).read_text().split()[0] == str(holder.pid)
    Experiment(tiny(), out, **quiet())
    assert (out / "config.json").exists() and not (out / LOCK_FILE).exists()
    holder = hold(tmp_path / "t")
    holder.kill()
    holder.wait()
    rows = transfer(subset_file, tiny(), tmp_path / "t", **quiet())
    assert rows[0]["size"] == 40


class _Stop(Exception):
    pass


@pytest.mark.parametrize("kind", ["experiment", "transfer"])
def test_the_lock_is_held_while_the_run_works_and_released_when_it_fails(tmp_path, subset_file, kind):
    out = tmp_path / kind
    seen = []

    def hook(event, **info):
        if event == "epoch":
            with pytest.raises(ValueError, match=rf"in use by process {os.getpid()} "):
                with lock(out):
                    pass
            seen.append(event)
            raise _Stop

    with pytest.raises(_Stop):
        if kind == "experiment":
            Experiment(tiny(), out, hook=hook, **quiet()).run()
        else:
            transfer(subset_file, tiny(), out, hook=hook, **quiet())
    assert seen == ["epoch"] and not (out / LOCK_FILE).exists()
    with lock(out):
        pass


def test_the_ranks_of_a_torchrun_run_share_its_lock_and_a_second_launch_refuses_on_every_rank(tmp_path):
    """Rank 0 alone takes the lock (the ranks of one run must not refuse each other: the free
    directory is claimed); on a directory another process holds, every rank raises the refusal
    instead of waiting in a collective for a rank 0 that has given up."""
    locked, free, results = tmp_path / "locked", tmp_path / "free", tmp_path / "results"
    results.mkdir()
    holder = hold(locked)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "ranks", str(locked), str(free), str(results)]
        proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    finally:
        holder.communicate("")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert (results / f"free{rank}.txt").read_text() == "claimed"
        assert f"in use by process {holder.pid} on {socket.gethostname()}" in (results / f"locked{rank}.txt").read_text()
    assert (free / "config.json").exists() and not (free / LOCK_FILE).exists()


# -- nothing is written by a configuration that can be refused before it starts --------------------


def test_an_unknown_device_is_refused_before_anything_is_written(tmp_path, subset_file):
    with pytest.raises(ValueError, match="device='bogus'"):
        Experiment(tiny(device="bogus"), tmp_path / "run", **quiet())
    with pytest.raises(ValueError, match="device='bogus'"):
        transfer(subset_file, tiny(device="bogus"), tmp_path / "t", **quiet())
    assert not (tmp_path / "run").exists() and not (tmp_path / "t").exists()
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device("cuda:99")  # a CUDA device this machine lacks (it may have none)


def test_names_of_ensembles_and_architectures_are_checked_with_the_configuration():
    # Both were refused only when first used: the ensemble after the first stage's training.
    with pytest.raises(ValueError, match="ensemble='bagging'"):
        tiny(ensemble="bagging")
    with pytest.raises(ValueError, match="arch='vgg11'"):
        TrainConfig(arch="vgg11")


# -- the workers --------------------------------------------------------------------------------


def _ranks(locked: Path, free: Path, results: Path) -> None:
    from ensel import distributed

    ctx = distributed.init_from_env()
    assert ctx.distributed and ctx.world == 2
    Experiment(tiny(), free, ctx=ctx, **quiet())
    (results / f"free{ctx.rank}.txt").write_text("claimed")
    try:
        Experiment(tiny(), locked, ctx=ctx, **quiet())
        message = "not refused"
    except ValueError as e:
        message = str(e)
    (results / f"locked{ctx.rank}.txt").write_text(message)
    ctx.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        with lock(sys.argv[2]):
            print("held", flush=True)
            sys.stdin.read()
    else:
        _ranks(*map(Path, sys.argv[2:5]))
