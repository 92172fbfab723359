"""torch.distributed for ensel: sample shards, per-rank scores and a global top-k.

Launched with `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK and MASTER_ADDR in the environment), each
rank scores a contiguous shard of the samples into its own Accumulator; the selection is then a
global top-k that moves only each rank's local top-(k + excluded) candidates, never the scores:

    ctx = init_from_env()                       # NCCL on GPUs, gloo on CPUs; a no-op otherwise
    start, stop = shard(n, ctx.rank, ctx.world)
    ...                                          # score samples [start, stop) -> local Scores
    picked = global_top_k(local.mutual_info, torch.arange(start, stop), k, by="mutual_info")

Why the merge is exact: `Scores.top` orders samples by (value in the score's direction, then
increasing index). A rank's local order is that same order restricted to its samples, so every
sample among the global first k + skip is among its own rank's first k + skip: the union of the
local candidates contains the global answer, and sorting it with the same rule returns exactly the
single-process set and order. Values travel as raw bits, so -0.0 and +0.0 stay what they were
(torch.sort treats them as equal, in both paths, and the index breaks the tie).

Why this module is in the core and not in ensel.al: `global_top_k` is `Scores.top` for a pool
sharded over ranks, and must stay its exact twin (the same direction, tie rule and outlier count),
which only holds if the two change together; and an embedding user who scores a sharded pool
under their own torchrun needs it without the active-learning layer. It imports torch.distributed
only (loaded when this module is, never by `import ensel`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._fields import DIRECTION
from ._inputs import as_int
from .scores import outliers_skipped
from .selection import check_strategy, draw_seed, gumbel_noise, log_weights, rank_order


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank `rank` of `world`, on `device`. `distributed` is False for a
    plain single process (world 1), where every collective is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shard(self, n: int) -> tuple[int, int]:
        return shard(n, self.rank, self.world)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(backend: str | None = None) -> Context:
    """The process group of a `torchrun` launch (initialized once; later calls return the same
    context), or a single-process context when not launched by torchrun.

    backend: NCCL when CUDA is available, gloo otherwise (or as given). Under NCCL each rank uses
    GPU LOCAL_RANK.
    """
    if not launched_by_torchrun():
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, backend=backend, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous range [start, stop) of n samples split over `world` ranks: the
    first n % world ranks hold one sample more; the ranges tile [0, n) in rank order."""
    n, rank, world = (as_int(v, f"shard({name})") for name, v in (("n", n), ("rank", rank), ("world", world)))
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard(n={n}, rank={rank}, world={world}): expected n >= 0 and 0 <= rank < world")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _direction(by: str | None, direction: str | None) -> str:
    if by is not None:
        if by not in DIRECTION:
            raise ValueError(f"global_top_k(by={by!r}): not an acquisition score; choose one of {', '.join(sorted(DIRECTION))}")
        if direction is not None and direction != DIRECTION[by]:
            raise ValueError(f"global_top_k: by={by!r} is acquired {DIRECTION[by]!r}, not direction={direction!r}")
        return DIRECTION[by]
    if direction not in ("high", "low"):
        raise ValueError(f"global_top_k(direction={direction!r}): expected 'high' or 'low' (or give by=)")
    return direction




def _all_gather(t: torch.Tensor, ctx: Context, stats: dict | None) -> list[torch.Tensor]:
    if stats is not None:
        stats["bytes_sent"] = stats.get("bytes_sent", 0) + t.numel() * t.element_size()
        stats["collectives"] = stats.get("collectives", 0) + 1
    if not ctx.distributed:
        return [t]
    out = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(out, t)
    return out


def global_top_k(
    values: torch.Tensor,
    global_indices: torch.Tensor,
    k: int,
    by: str | None = None,
    direction: str | None = None,
    exclude_top: float = 0.0,
    ctx: Context | None = None,
    stats: dict | None = None,
    *,
    strategy: str = "top",
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The global indices (int64, on values' device, identical on every rank) of the k samples that
    `Scores.top(k, by, exclude_top, strategy=..., generator=..., temperature=...)` would pick
    from all ranks' samples together.

    values: this rank's scores [n_r] (any real dtype, the same on every rank, no NaN);
    global_indices: their sample indices [n_r] (int, distinct across ranks). The direction comes
    from `by` (a score name) or `direction` ("high" or "low"). exclude_top skips floor(x * N) of
    the global N first. `generator` (random ties, and the stochastic strategies "power" and
    "softmax") must be in the same state on every rank: each draws the one seed from it, and the
    noise of a sample is a hash of its global index (ensel/selection.py). "balanced" and
    "softrank" need the global rank order of every sample: gather the scores (`gather_scores`)
    and use `Scores.top`. Each rank sends its count (8 bytes) and m = min(k + skip, max n_r)
    pairs (value, int64 index), once more for a stochastic strategy with outliers excluded:
    world x m x (value size + 8) bytes gathered per round. `stats`, if given, receives
    bytes_sent (by this rank) and the number of collectives.
    """
    ctx = ctx or Context()
    direction = _direction(by, direction)
    descending = direction == "high"
    k = as_int(k, "global_top_k(k)")
    if not 0.0 <= exclude_top < 1.0:
        raise ValueError(f"global_top_k(exclude_top={exclude_top!r}): expected a fraction in [0, 1)")
    if strategy in ("balanced", "softrank"):
        raise ValueError(f"global_top_k(strategy={strategy!r}): needs the global rank order of every sample; "
                         "gather the scores (ensel.distributed.gather_scores) and use Scores.top")
    # A caller that gave only a direction is checked as a score of that direction would be.
    score = by if by is not None else ("entropy" if descending else "margin")
    beta = check_strategy(strategy, temperature, score, generator)
    if not isinstance(values, torch.Tensor) or not isinstance(global_indices, torch.Tensor):
        raise TypeError("global_top_k: values and global_indices must be tensors")
    if values.dim() != 1 or global_indices.shape != values.shape:
        raise ValueError(
            f"global_top_k: values {tuple(values.shape)} and global_indices {tuple(global_indices.shape)} must be 1-D of one length"
        )
    has_nan = values.is_floating_point() and bool(torch.isnan(values).any())
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    comm = ctx.device if ctx.distributed else values.device
    indices = global_indices.to(values.device, torch.int64)

    # A rank holding NaN sends the count -1, so that every rank raises here: one rank raising
    # alone would leave the others waiting in the next collective.
    mine = -1 if has_nan else values.numel()
    counts = torch.cat(_all_gather(torch.tensor([mine], dtype=torch.int64, device=comm), ctx, stats))
    if bool((counts < 0).any()):
        bad = [r for r, c in enumerate(counts.tolist()) if c < 0]
        raise ValueError(f"global_top_k: values hold NaN (no order can rank them) on rank(s) {bad}")
    n = int(counts.sum())
    skip = outliers_skipped(exclude_top, n)
    if not 0 <= k <= n - skip:
        raise ValueError(f"global_top_k(k={k}): there are {n} samples, {skip} of them excluded as outliers")
    seed = None if generator is None else draw_seed(generator)
    if strategy == "top":
        return _merged_top(values, indices, counts, k, skip, descending, seed, ctx, comm, stats)
    # Stochastic: the outliers (the rank order's first `skip`) leave first, then the k largest
    # Gumbel keys of the rest, ties (two -inf weights) by index, as sampling_order takes them.
    if skip:
        outliers = _merged_top(values, indices, counts, skip, 0, descending, seed, ctx, comm, stats)
        keep = ~torch.isin(indices, outliers.to(indices.device))
        values, indices = values[keep], indices[keep]
        counts = torch.cat(_all_gather(torch.tensor([values.numel()], dtype=torch.int64, device=comm), ctx, stats))
    keys = log_weights(values, score, strategy, beta, None) + gumbel_noise(seed, indices)
    return _merged_top(keys, indices, counts, k, 0, True, None, ctx, comm, stats)


def _merged_top(values, indices, counts, k, skip, descending, seed, ctx, comm, stats) -> torch.Tensor:
    """The global indices of positions [skip, skip + k) of the global rank order (rank_order with
    tie seed `seed`) of all ranks' (values, indices); `counts`: every rank's number of samples."""
    out_device = values.device
    m = min(k + skip, int(counts.max()))
    # Both sorts run where the values are, as `Scores.top` would there (sorts on different
    # devices need not agree on -0.0 vs +0.0); only the collectives use the comm device (NCCL's).
    order = rank_order(values, indices, descending, seed)[:m]
    local = order.numel()
    send_values = torch.zeros(m, dtype=values.dtype, device=comm)
    send_indices = torch.full((m,), -1, dtype=torch.int64, device=comm)
    send_values[:local] = values[order].to(comm)
    send_indices[:local] = indices[order].to(comm)
    all_values = _all_gather(send_values, ctx, stats)
    all_indices = _all_gather(send_indices, ctx, stats)

    # Only each rank's first min(count, m) slots are candidates; the rest is padding.
    taken = [min(int(c), m) for c in counts]
    cand_values = torch.cat([v[:t] for v, t in zip(all_values, taken)]).to(out_device)
    cand_indices = torch.cat([i[:t] for i, t in zip(all_indices, taken)]).to(out_device)
    merged = rank_order(cand_values, cand_indices, descending, seed)[skip : skip + k]
    return cand_indices[merged]


def gather_scores(scores, ctx: Context | None = None):
    """Every rank's `Scores` of its shard, concatenated in rank order (the order of `shard`), on
    every rank, on the CPU. Moves N x fields values: for reports and checks, not for selection."""
    from ._fields import LABEL_FIELDS
    from .scores import Scores

    ctx = ctx or Context()
    mine = {name: t.cpu() for name, t in scores.to_dict().items()}
    if not ctx.distributed:
        parts = [mine]
    else:
        parts = [None] * ctx.world
        dist.all_gather_object(parts, mine)
    fields = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    for name in LABEL_FIELDS:
        fields.setdefault(name, None)
    return Scores(num_members=scores.num_members, **fields)
