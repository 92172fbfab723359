"""torch.distributed on this machine: 2 (and 4) gloo processes under `torch.distributed.run`,
compared with the single-process path bit for bit on the selected indices.

Launches are few (each costs seconds of torch import): this file is also the worker script, run
as `python tests/test_distributed.py MODE OUT` by torchrun; the workers write what they computed
into OUT and the tests compare it here with `Scores.top` / `ensel.score` of the whole data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ensel
from ensel import distributed
from ensel.accumulator import Accumulator
from ensel.scores import Scores
from ensel._fields import FLOAT_FIELDS, INT_FIELDS

REPO = Path(__file__).resolve().parents[1]

# -- the cases, generated identically by the workers and the tests ---------------------------------

E, N_STREAM, K = 5, 203, 7  # the sharded streaming data: uneven shards of 102 and 101 samples
CRASH_AFTER = 2  # in the resume run, rank 1 dies once members [0, CRASH_AFTER] are saved
COMM_N, COMM_K = 100_000, 10_000


def topk_cases():
    """(name, values [N], rank sizes, permuted, by, k, exclude_top): many exact ties (integer
    values, signed zeros), both directions, an int64 score, a rank with fewer samples than k, an
    empty rank, and samples dealt to ranks out of index order."""
    g = torch.Generator().manual_seed(5)
    ints = torch.randint(0, 5, (101,), generator=g).float()
    zeros = torch.tensor([-0.0, 0.0, 1.0, -1.0])[torch.randint(0, 4, (64,), generator=g)]
    reals = torch.randn(300, generator=g).round(decimals=1)
    forgetting = torch.randint(0, 3, (57,), generator=g)
    cases = []
    for by in ("mutual_info", "margin"):
        for ex in (0.0, 0.1, 0.33):
            for k in (0, 1, 7, 40):
                cases.append((f"ints-{by}-{ex}-{k}", ints, (3, 98), False, by, k, ex))
                cases.append((f"ints-perm-{by}-{ex}-{k}", ints, (60, 41), True, by, k, ex))
        cases.append((f"ints-all-{by}", ints, (50, 51), True, by, 101, 0.0))
        cases.append((f"ints-rest-{by}", ints, (50, 51), False, by, 101 - 33, 0.33))
        cases.append((f"empty-rank-{by}", ints, (0, 101), False, by, 20, 0.1))
        cases.append((f"zeros-{by}", zeros, (31, 33), True, by, 30, 0.05))
        cases.append((f"reals-{by}", reals, (150, 150), True, by, 200, 0.2))
    cases.append(("forgetting", forgetting, (10, 47), True, "forgetting", 25, 0.1))
    return cases


def strategy_cases():
    """(name, values, rank sizes, permuted, by, k, exclude_top, strategy, seed): random ties and
    the stochastic strategies that merge across ranks (power, softmax), with and without
    outliers, on tie-heavy integer scores and on reals; a seed per case."""
    g = torch.Generator().manual_seed(9)
    ints = torch.randint(0, 5, (101,), generator=g).float()
    reals = torch.rand(300, generator=g)
    cases = []
    for seed, (by, values, sizes) in enumerate([("variation_ratio", ints, (60, 41)), ("mutual_info", reals, (150, 150)),
                                                ("margin", reals, (0, 300))]):  # fmt: skip
        for strategy in ("top", "power", "softmax"):
            if strategy == "power" and by == "margin":
                continue
            for k, ex in ((7, 0.0), (40, 0.1)):
                cases.append((f"{strategy}-{by}-{k}-{ex}", values, sizes, True, by, k, ex, strategy, 100 + seed))
    return cases


def rank_pieces(n, sizes, permuted):
    """The global indices each rank holds."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)) if permuted else torch.arange(n)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    assert bounds[-1] == n
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def stream_data():
    g = torch.Generator().manual_seed(11)
    # Coarse logits: argmax ties and repeated rows make the discrete scores non-trivial.
    logits = (torch.randn(E, N_STREAM, K, generator=g) * 2).round()
    labels = torch.randint(0, K, (N_STREAM,), generator=g)
    return logits, labels


def comm_values():
    g = torch.Generator().manual_seed(3)
    return (torch.rand(COMM_N, generator=g) * 1000).floor()  # ~100 ties per value


# -- the workers (run by torchrun) -----------------------------------------------------------------


def stream_shard(ctx, state_dir: Path, crash_after: int | None):
    """This rank's shard of the stream, member by member, its accumulator saved at each member
    boundary; a restarted worker continues from the saved member count."""
    logits, labels = stream_data()
    start, stop = ctx.shard(N_STREAM)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"rank{ctx.rank}.pt"
    if path.exists():
        acc = Accumulator.load(path)
        assert acc.num_samples == stop - start
    else:
        acc = Accumulator(stop - start, K, labels=labels[start:stop], num_members=E)
    done = int(acc.members.max())
    for e in range(done, E):
        half = (stop - start) // 2  # two batches per member, in reverse order
        acc.update(logits[e, start + half : stop], start=half)
        acc.update(logits[e, start : start + half], start=0)
        acc.save(path)
        if crash_after is not None and ctx.rank == 1 and e == crash_after:
            raise RuntimeError("simulated crash of rank 1")
    return distributed.gather_scores(acc.finalize(), ctx)


def worker(mode: str, out: Path):
    torch.set_num_threads(1)
    ctx = distributed.init_from_env()
    assert ctx.distributed and ctx.backend == "gloo", ctx
    if mode == "main":
        results = {}
        for name, values, sizes, permuted, by, k, ex in topk_cases():
            mine = rank_pieces(len(values), sizes, permuted)[ctx.rank]
            results[name] = distributed.global_top_k(values[mine], mine, k, by=by, exclude_top=ex, ctx=ctx)
        for name, values, sizes, permuted, by, k, ex, strategy, seed in strategy_cases():
            mine = rank_pieces(len(values), sizes, permuted)[ctx.rank]
            results[name] = distributed.global_top_k(values[mine], mine, k, by=by, exclude_top=ex, ctx=ctx,
                                                     strategy=strategy, generator=torch.Generator().manual_seed(seed))
        # NaN on rank 1 only: every rank must raise, not rank 1 alone (the others would then wait
        # in a collective rank 1 never enters, and the all_gather_object below would hang).
        try:
            own = torch.tensor([1.0, float("nan") if ctx.rank == 1 else 2.0])
            distributed.global_top_k(own, torch.tensor([2 * ctx.rank, 2 * ctx.rank + 1]), 1, by="entropy", ctx=ctx)
            results["nan"] = "no error"
        except ValueError as e:
            results["nan"] = str(e)
        # Every rank must hold the same answer.
        theirs = [None] * ctx.world
        torch.distributed.all_gather_object(theirs, results)
        if ctx.is_main:
            torch.save({"topk": theirs}, out / "topk.pt")
        scores = stream_shard(ctx, out / "state_clean", None)
        if ctx.is_main:
            torch.save(scores.to_dict(), out / "stream_clean.pt")
        ctx.barrier()
        stream_shard(ctx, out / "state_crash", CRASH_AFTER)  # rank 1 raises: the launch fails
    elif mode == "resume":
        scores = stream_shard(ctx, out / "state_crash", None)
        if ctx.is_main:
            torch.save(scores.to_dict(), out / "stream_resumed.pt")
    elif mode == "comm":
        values = comm_values()
        start, stop = ctx.shard(COMM_N)
        stats = {}
        picked = distributed.global_top_k(values[start:stop], torch.arange(start, stop), COMM_K, by="mutual_info",
                                          exclude_top=0.01, ctx=ctx, stats=stats)
        gathered = [None] * ctx.world
        torch.distributed.all_gather_object(gathered, stats)
        if ctx.is_main:
            torch.save({"picked": picked, "stats": gathered}, out / "comm.pt")
    ctx.barrier()
    distributed.shutdown()


# -- the tests -------------------------------------------------------------------------------------


def launch(mode: str, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, mode, str(out)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def scores_with(by: str, values: torch.Tensor) -> Scores:
    """A Scores whose field `by` holds `values` (the others zeros), for the single-process top."""
    n = len(values)
    fields = {name: torch.zeros(n) for name in FLOAT_FIELDS}
    fields.update({name: torch.zeros(n, dtype=torch.int64) for name in INT_FIELDS})
    fields[by] = values
    return Scores(num_members=1, **fields)




@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    first = launch("main", out)
    # The first launch must die of rank 1's simulated crash, after the checks were written.
    assert first.returncode != 0, first.stdout + first.stderr
    assert "simulated crash of rank 1" in first.stdout + first.stderr
    assert (out / "topk.pt").exists() and (out / "stream_clean.pt").exists(), first.stdout + first.stderr
    second = launch("resume", out)
    assert second.returncode == 0, second.stdout + second.stderr
    return out


def test_global_top_k_matches_single_process_top(two_rank_runs):
    per_rank = torch.load(two_rank_runs / "topk.pt")["topk"]
    assert len(per_rank) == 2
    cases = topk_cases()
    for name, values, sizes, permuted, by, k, ex in cases:
        expected = scores_with(by, values).top(k, by=by, exclude_top=ex)
        for rank, results in enumerate(per_rank):
            got = results[name]
            assert got.dtype == torch.int64, name
            assert torch.equal(got, expected), f"{name} on rank {rank}: {got.tolist()} != {expected.tolist()}"
    for name, values, sizes, permuted, by, k, ex, strategy, seed in strategy_cases():
        g = torch.Generator().manual_seed(seed)
        expected = scores_with(by, values).top(k, by=by, exclude_top=ex, strategy=strategy, generator=g)
        for rank, results in enumerate(per_rank):
            assert torch.equal(results[name], expected), f"{name} on rank {rank}: {results[name].tolist()} != {expected.tolist()}"
    for rank, results in enumerate(per_rank):
        assert "NaN" in results["nan"] and "rank(s) [1]" in results["nan"], (rank, results["nan"])
    # The cases do exercise what they claim: a rank with fewer samples than k + excluded.
    assert any(min(sizes) < k + int(ex * len(values)) for _, values, sizes, _, _, k, ex in cases)


def test_sharded_streaming_equals_single_process(two_rank_runs):
    logits, labels = stream_data()
    clean = torch.load(two_rank_runs / "stream_clean.pt")
    # Rows are independent: the per-rank accumulators give the bits of one whole accumulator.
    whole = ensel.score(list(logits), labels=labels).to_dict()
    fused = ensel.score(logits, labels=labels).to_dict()
    assert set(clean) == set(whole)
    for name in whole:
        assert torch.equal(clean[name], whole[name]), name
        if name in ("mode", "mode_votes", "variation_ratio", "vote_entropy", "error_count", "forgetting"):
            assert torch.equal(clean[name], fused[name]), name
        else:
            torch.testing.assert_close(clean[name], fused[name], rtol=1e-5, atol=1e-5)


def test_killed_run_resumes_to_identical_scores(two_rank_runs):
    clean = torch.load(two_rank_runs / "stream_clean.pt")
    resumed = torch.load(two_rank_runs / "stream_resumed.pt")
    assert set(clean) == set(resumed)
    for name in clean:
        assert torch.equal(clean[name], resumed[name]), name


def test_communication_volume_four_ranks(tmp_path):
    result = launch("comm", tmp_path, nproc=4)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = torch.load(tmp_path / "comm.pt")
    values = comm_values()
    expected = scores_with("mutual_info", values).top(COMM_K, by="mutual_info", exclude_top=0.01)
    assert torch.equal(saved["picked"], expected)
    # Each rank sends its count (8 bytes) and m = k + skip pairs of (float32 value, int64 index).
    m = COMM_K + int(0.01 * COMM_N)
    for stats in saved["stats"]:
        assert stats["bytes_sent"] == 8 + m * 12, stats
        assert stats["collectives"] == 3
    total = sum(s["bytes_sent"] for s in saved["stats"])
    assert total == 4 * (8 + m * 12)
    print(f"\n4 ranks, N={COMM_N}, k={COMM_K}, exclude 1%: {total} bytes sent in all "
          f"({total / 4} per rank; each rank receives {4 * (8 + m * 12)} bytes)")


def test_ensel_run_under_torchrun_selects_the_single_process_subsets(tmp_path):
    """`ensel run` with an unchanged command line under torchrun (2 gloo ranks): the same subsets,
    and the same scores bit for bit, as one process. One thread per process in both, so the
    trained weights do not depend on how the cores were split."""
    args = ["run", "--data", "digits", "--sizes", "40,80", "--initial", "20", "--methods", "mutual_info,margin",
            "--epochs", "2", "--runs", "2", "--no-full", "--trials", "1", "--last", "2", "--batch-size", "32",
            "--exclude-top", "0.01", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ENSEL_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    single, multi = tmp_path / "single", tmp_path / "multi"
    launches = [
        [sys.executable, "-m", "ensel", *args, "--out", str(single)],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ensel", *args,
         "--out", str(multi)],
    ]
    for cmd in launches:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rank 0 alone prints the report.
    assert proc.stdout.count("# build_up on digits") == 1, proc.stdout
    subsets = sorted(p.relative_to(single) for p in single.rglob("subset.npy"))
    assert len(subsets) == 5  # init, and two sizes for each of the two methods
    for rel in subsets:
        assert np.array_equal(np.load(single / rel), np.load(multi / rel)), rel
    scored = sorted(p.relative_to(single) for p in single.rglob("scores.pt"))
    assert len(scored) == 3
    for rel in scored:
        a, b = torch.load(single / rel), torch.load(multi / rel)
        assert torch.equal(a["indices"], b["indices"]) and set(a["fields"]) == set(b["fields"]), rel
        for name in a["fields"]:
            assert torch.equal(a["fields"][name], b["fields"][name]), (rel, name)
    assert not list(multi.rglob("state")), "per-rank accumulator states are removed once scores.pt exists"
    assert (multi / "report.md").exists()


def test_shard_tiles_the_samples():
    for n in (0, 1, 5, 7, 100, 101):
        for world in (1, 2, 3, 4, 8):
            ranges = [distributed.shard(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        distributed.shard(10, 2, 2)


def test_shard_dirs_differ_whenever_the_shard_may():
    """A restart on another number of ranks must not resume a state saved for another shard, even
    one of the same size (n = 5: rank 1 holds [3, 5) of 2 ranks and [2, 4) of 3)."""
    from ensel.al.loop import shard_dir

    base = Path("acq") / "state"
    assert shard_dir(base, distributed.Context()) == base
    n = 5
    assert distributed.shard(n, 1, 2) != distributed.shard(n, 1, 3)
    dirs = {}
    for world in (1, 2, 3, 4):
        for rank in range(world):
            ctx = distributed.Context(rank=rank, world=world, backend="gloo")
            d = shard_dir(base, ctx)
            assert d.parent == base
            assert dirs.setdefault(d, (rank, world)) == (rank, world), f"{d} serves two shards"


def test_single_process_context_and_validation(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init_from_env()
    assert not ctx.distributed and ctx.world == 1 and ctx.rank == 0
    ctx.barrier()  # a no-op
    values = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    idx = torch.tensor([10, 14, 12, 11, 13])
    assert distributed.global_top_k(values, idx, 3, by="entropy").tolist() == [12, 13, 14]
    assert distributed.global_top_k(values, idx, 2, direction="low", exclude_top=0.2).tolist() == [11, 12]
    with pytest.raises(ValueError, match="not an acquisition score"):
        distributed.global_top_k(values, idx, 1, by="mode")
    with pytest.raises(ValueError, match="5 samples"):
        distributed.global_top_k(values, idx, 5, by="entropy", exclude_top=0.2)
    with pytest.raises(ValueError, match="NaN"):
        distributed.global_top_k(torch.tensor([float("nan")]), torch.tensor([0]), 1, by="entropy")


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
