"""The stages of the selection loop, each on a stage directory (`stage`) of the run directory:

- `train`: the stage's `runs` seeds trained on its subset (under torchrun, run r on rank r % world);
- `evaluate`: trains them if needed, then single-model and seed-ensemble validation accuracy
  (metrics.json);
- `score`: the stage's acquisition ensemble scores the pool samples outside its subset
  (acquisition/scores.pt), resumably, each rank a contiguous shard of them;
- `acquire`: the top `count` of those by a score (a global top-k under torchrun, the same
  samples as one process).

Every stage skips what its files say is done. `Env` holds what they all read.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..distributed import Context, gather_scores, global_top_k, shard
from ..scores import Scores
from ..selection import STOCHASTIC
from .ensembles import ensemble_members
from .inference import ensemble_val_accuracy, score_members
from .rundir import RunDir
from .training import atomic_json, atomic_torch_save, train_run

if TYPE_CHECKING:
    from .loop import ExperimentConfig


@dataclass(frozen=True)
class Env:
    """What every stage reads: the recipe, the pool, the device, the run directory (and with it
    the rank), and who hears about the work: `hook(event, **info)`, `log`, progress bars."""

    cfg: ExperimentConfig
    data: object  # an ensel.al.data dataset
    device: torch.device
    rundir: RunDir
    hook: Callable | None = None
    log: Callable = print
    progress: bool = True

    @property
    def ctx(self) -> Context:
        return self.rundir.ctx

    def name(self, stage: Path) -> str:
        return str(stage.relative_to(self.rundir.path))

    def bar(self, total: int, desc: str):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # off when not a terminal

    def event(self, event: str, **info) -> None:
        if self.hook is not None:
            self.hook(event, **info)


def run_seed(cfg: ExperimentConfig, trial: int, run: int) -> int:
    """Run r of every stage of a trial has one seed: its models differ only by their data."""
    return cfg.seed * 1_000_003 + trial * 1000 + run


def _summaries(stage: Path, runs: int) -> list[dict]:
    return [json.loads((stage / f"run{r}" / "done.json").read_text()) for r in range(runs)]


def train(env: Env, stage: Path, subset: np.ndarray, trial: int, init_stage: Path | None = None,
          scores_later: bool = True) -> list[dict]:
    """Trains (or finds trained) the stage's runs on `subset`; returns their summaries.
    `init_stage`: fine-tune run r of that stage (pretrain); `scores_later`: see `evaluate`."""
    cfg, ctx = env.cfg, env.ctx
    train_cfg = cfg.train if scores_later or not cfg.prune_unused else replace(cfg.train, keep=1)
    summaries = []
    for r in range(cfg.runs):
        if r % ctx.world != ctx.rank:  # another rank trains this run
            continue
        run_dir = stage / f"run{r}"
        bar = None
        if not (run_dir / "done.json").exists():
            epochs = cfg.train.run_epochs(len(subset)) if cfg.train.schedule == "step" else cfg.train.max_epochs
            bar = env.bar(epochs, f"{env.name(stage)}/run{r}")
        init = lr = None
        if init_stage is not None:
            init_summary = json.loads((init_stage / f"run{r}" / "done.json").read_text())
            init, lr = (init_stage / f"run{r}", init_summary["epochs"]), cfg.finetune_lr
        summaries.append(train_run(env.data, torch.from_numpy(subset), run_seed(cfg, trial, r), train_cfg, run_dir,
                                   env.device, init=init, lr=lr, hook=env.hook, progress=bar))
        if bar is not None:
            bar.close()
    if ctx.distributed:
        ctx.barrier()  # every run's done.json is written
        summaries = _summaries(stage, cfg.runs)
    return summaries


def evaluate(env: Env, stage: Path, subset: np.ndarray, trial: int, method: str, init_stage: Path | None = None,
             scores_later: bool = True) -> dict:
    """Trains the stage's runs (if not done) and evaluates them (metrics.json, by rank 0).
    `scores_later`: the stage's checkpoints will be an acquisition ensemble (or a fine-tuning
    start) later on; if not, `prune_unused` keeps only their best and last."""
    path = stage / "metrics.json"
    if env.rundir.exists(path):
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    summaries = train(env, stage, subset, trial, init_stage, scores_later)
    if not env.ctx.is_main:
        env.ctx.barrier()
        return json.loads(path.read_text())
    cfg = env.cfg
    seeds = ensemble_members("seeds", summaries)
    ens = ensemble_val_accuracy(env.data, [stage / f"run{r}" for r in range(cfg.runs)], seeds, cfg.train.arch,
                                env.device, cfg.train.eval_batch_size, cfg.train.amp)
    single = [s["best_val_acc"] for s in summaries]
    metrics = {
        "trial": trial,
        "method": method,
        "size": int(len(subset)),
        "fraction": len(subset) / env.data.num_train,
        "single_acc": float(np.mean(single)),
        "single_accs": single,
        "ensemble_acc": ens,
        "ensemble_members": len(seeds),
        "epochs": [s["epochs"] for s in summaries],
        "seconds": time.perf_counter() - t0,
    }
    atomic_json(path, metrics)
    env.ctx.barrier()
    env.event("stage", stage=stage, kind="train")
    env.log(f"  {env.name(stage)}: {len(subset)} samples, single {metrics['single_acc']:.4f}, "
            f"ensemble of {len(seeds)} {ens:.4f}")
    return metrics


def shard_dir(base: Path, ctx: Context) -> Path:
    """Where rank `ctx.rank` keeps its shard's files under `base` (`base` itself in one process).
    The name holds the world size because the shard depends on it: a run restarted on another
    number of ranks starts these over, instead of resuming a saved accumulator on another shard
    that merely has the same number of samples (the only thing `score_members` can check)."""
    return base / f"world{ctx.world}-rank{ctx.rank}" if ctx.distributed else base


def score(env: Env, stage: Path, subset: np.ndarray, need: str | None = None) -> tuple[np.ndarray, Scores]:
    """The acquisition ensemble of `stage` (its runs) scores the pool samples outside `subset`:
    returns those samples (sorted) and their scores, on every rank. `need`: the score the caller
    selects by; a saved scores.pt that predates it is refused (see `_scores_from`)."""
    out = stage / "acquisition"
    if env.rundir.exists(out / "scores.pt"):
        saved = torch.load(out / "scores.pt", map_location="cpu", weights_only=True)
        if need in _ADDED_FIELDS and need not in saved["fields"]:
            raise ValueError(
                f"{out / 'scores.pt'} was written before the score {need!r} existed; delete it to score "
                f"{env.name(stage)}'s acquisition ensemble again (its checkpoints are kept)"
            )
        return saved["indices"].numpy(), _scores_from(saved)
    cfg, ctx = env.cfg, env.ctx
    candidates = np.setdiff1d(np.arange(env.data.num_train), subset)
    # Each rank scores its contiguous shard of the candidates, resumably in its own state dir.
    start, stop = shard(len(candidates), ctx.rank, ctx.world)
    members = ensemble_members(cfg.ensemble, _summaries(stage, cfg.runs), n=cfg.last, stride=cfg.stride)
    bar = env.bar(len(members), f"{env.name(stage)}/acquisition")
    scores = score_members(
        env.data, [stage / f"run{r}" for r in range(cfg.runs)], members, cfg.train.arch,
        indices=torch.from_numpy(candidates[start:stop]), device=env.device,
        logits_dir=shard_dir(out / "logits", ctx) if cfg.save_logits else None,
        state_dir=shard_dir(out / "state", ctx),
        batch_size=cfg.train.eval_batch_size, amp=cfg.train.amp, progress=bar, hook=env.hook,
    )
    if bar is not None:
        bar.close()
    if ctx.distributed:
        # N x 60 bytes (77 MB at ImageNet's 1.28M), received by every rank: kept for the report
        # and for resuming; the selection itself only moves each rank's top candidates.
        scores = gather_scores(scores, ctx)
    if not ctx.is_main:
        ctx.barrier()
        return candidates, scores
    scores = _save_scores(out, candidates, scores, members)
    ctx.barrier()
    env.event("stage", stage=stage, kind="scores")
    return candidates, scores


def _save_scores(out: Path, candidates: np.ndarray, scores: Scores, members: list) -> Scores:
    """Writes acquisition/scores.pt; returns the scores as saved (on the CPU), so that a fresh
    pass selects from exactly what a resumed one will load."""
    payload = {
        "indices": torch.from_numpy(candidates),
        "num_members": scores.num_members,
        "fields": {k: v.cpu() for k, v in scores.to_dict().items()},
        "members": [list(m) for m in members],
    }
    atomic_torch_save(payload, out / "scores.pt")
    # The resumable accumulator (4 N K bytes and more) is no longer needed once scores.pt exists.
    shutil.rmtree(out / "state", ignore_errors=True)
    return _scores_from(payload)


# Scores added after scores.pt files were first written, which such files lack.
_ADDED_FIELDS = ("vote_entropy",)


def _scores_from(saved: dict) -> Scores:
    """The Scores of a scores.pt. One written before vote_entropy existed still loads, so that a
    run started then resumes as it was, selecting what it would have (its methods cannot include
    vote_entropy: a run directory's configuration is fixed). The saved scores cannot give
    vote_entropy back (they hold the mode's votes, not every class's), so it is NaN, which
    `Scores.top` and `global_top_k` refuse to rank; a selection by it from such a file (a stage
    copied from an older run) is refused first by `score(need=...)`, naming the file to delete."""
    fields = dict(saved["fields"])
    for name in ("error_count", "forgetting", "nll"):
        fields.setdefault(name, None)
    for name in _ADDED_FIELDS:
        if name not in fields:
            fields[name] = torch.full_like(fields["entropy"], float("nan"))
    return Scores(num_members=saved["num_members"], **fields)


def selection_generator(env: Env, stage: Path) -> torch.Generator | None:
    """The generator of one acquisition's random ties and draws (None: ties by index, plain top):
    seeded by the run's seed and the stage's place in the run directory (trial, method, size), so
    every trial and stage draws its own, and a resumed run or another rank draws the same."""
    cfg = env.cfg
    if cfg.ties == "index" and cfg.acquisition not in STOCHASTIC:
        return None
    where = zlib.crc32(Path(env.name(stage)).as_posix().encode())
    seed = int(np.random.SeedSequence([cfg.seed, where]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def acquire(env: Env, stage: Path, subset: np.ndarray, method: str, count: int) -> np.ndarray:
    """`count` new samples for `method` (a score name) from the acquisition ensemble of `stage`,
    by the run's strategy (`Scores.top`)."""
    candidates, scores = score(env, stage, subset, need=method)
    ctx, cfg = env.ctx, env.cfg
    options = dict(exclude_top=cfg.exclude_top, strategy=cfg.acquisition, temperature=cfg.temperature,
                   generator=selection_generator(env, stage))
    # Every rank holds every candidate's scores. The strategies that need the global rank order
    # select from them on every rank alike; the others merge the ranks' shards (global_top_k),
    # by Scores.top's rule, so the same subset.
    if not ctx.distributed or cfg.acquisition in ("balanced", "softrank"):
        picked = scores.top(count, by=method, **options)
        return candidates[picked.numpy()]
    start, stop = shard(len(candidates), ctx.rank, ctx.world)
    values = getattr(scores, method)[start:stop]
    picked = global_top_k(values, torch.arange(start, stop), count, by=method, ctx=ctx, **options)
    return candidates[picked.cpu().numpy()]
