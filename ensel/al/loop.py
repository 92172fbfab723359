"""The selection loop (paper, Algorithm 1 and section 2.1): acquisition models score the pool, the
most uncertain samples form the subset, subset models train on it and are evaluated.

Schemes:

- `build_up`: start from a random subset of `initial` samples; the models trained on the current
  subset are the acquisition model that picks the samples added to reach the next size, from the
  samples not yet selected; one iteration per size.
- `compress`: the acquisition model is trained on the whole pool; each subset is the top of its
  scores; subset models train from scratch.
- `pretrain`: the same subsets as compress; each subset model starts from the whole-pool model of
  its seed and is fine-tuned at `finetune_lr` (1e-3).

`random` as a method draws subsets from one random permutation of the pool per trial, so the
random subsets of a trial are nested (and in build_up contain the initial subset). Within a trial
every method's run r uses the same seed, so models differ only by their data; the first build-up
step's acquisition model (trained on the shared initial subset) is shared by every method.

The run directory (`out`) holds every stage's output and nothing is recomputed that exists:

    config.json
    trial{t}/full/run{r}/...            whole-pool models (baseline; compress/pretrain acquisition)
    trial{t}/init/subset.npy, run{r}/   build_up's random start
    trial{t}/{method}/size{n}/subset.npy, run{r}/epoch_NNN.pt, metrics.json
    .../acquisition/scores.pt           scores of the samples not in that stage's subset
    results.csv, summary.csv, report.md, accuracy.png

Under `torchrun` (see ensel.distributed) the same run is spread over the ranks: run r of a stage
trains on rank r % world; each rank scores a contiguous shard of the candidates into its own
accumulator (state in acquisition/state/world{W}-rank{r}: a restart on another number of ranks
starts the pass over); the selection is a global top-k with the tie rule of `Scores.top`, so
the subsets are those of a single process. Rank 0 alone writes the shared files (subsets,
scores, metrics, report); what exists is decided by rank 0's view, broadcast, so every rank
takes the same path through the collectives.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .._fields import DIRECTION
from .data import load_dataset
from ..distributed import Context, global_top_k, gather_scores, shard
from .ensembles import ensemble_members
from .inference import ensemble_val_accuracy, score_members
from ..scores import Scores
from .training import TrainConfig, atomic_json, atomic_torch_save, train_run

SCHEMES = ("build_up", "pretrain", "compress")


@dataclass
class ExperimentConfig:
    data: str = "digits"
    data_root: str | None = None
    image_size: int = 224
    workers: int = 2  # DataLoader workers for ImageFolder
    scheme: str = "build_up"
    methods: tuple[str, ...] = ("mutual_info", "variation_ratio", "random")
    sizes: tuple[float | int, ...] = (0.2, 0.4)  # fractions of the pool (float) or counts (int)
    initial: float | int = 0.1  # build_up: the random start
    trials: int = 3
    runs: int = 2  # seeds per model (subset models and acquisition models alike)
    ensemble: str = "combined"  # the acquisition model's configuration
    last: int = 4  # its n (checkpoints / combined)
    stride: int = 1
    exclude_top: float = 0.0  # fraction of the most uncertain skipped as outliers (Table 5)
    full: bool = True  # train the whole-pool baseline
    finetune_lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    save_logits: bool = False  # also write each member's float16 logits under acquisition/logits
    # Stages whose models never score anything (random subsets, the last build-up size, the
    # whole-pool baseline of build_up) keep only their best and last checkpoints: their
    # every-epoch weights would be most of the run directory's disk and are never read.
    prune_unused: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        self.methods = tuple(self.methods)
        for m in self.methods:
            if m != "random" and m not in DIRECTION:
                raise ValueError(f"method {m!r}: expected 'random' or a score among {', '.join(sorted(DIRECTION))}")
        if not self.methods:
            raise ValueError("methods: give at least one acquisition method")
        if not self.sizes:
            raise ValueError("sizes: give at least one subset size")
        self.sizes = tuple(self.sizes)
        for name in ("trials", "runs", "last", "stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be at least 1")
        if not 0.0 <= self.exclude_top < 1.0:
            raise ValueError(f"exclude_top={self.exclude_top!r}: expected a fraction in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> float | int:
    """'0.25' or '25%' is a fraction of the pool, '300' a count."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"size {text!r}: expected a fraction (0.25, 25%) or a count (300)") from None


def size_count(size: float | int, pool: int) -> int:
    if isinstance(size, float):
        if not 0.0 < size <= 1.0:
            raise ValueError(f"size {size}: a fraction must lie in (0, 1]")
        count = round(size * pool)
    else:
        count = int(size)
    if not 1 <= count <= pool:
        raise ValueError(f"size {size}: {count} samples, but the pool has {pool}")
    return count


def shard_dir(base: Path, ctx: Context) -> Path:
    """Where rank `ctx.rank` keeps its shard's files under `base` (`base` itself in one process).
    The name holds the world size because the shard depends on it: a run restarted on another
    number of ranks starts these over, instead of resuming a saved accumulator on another shard
    that merely has the same number of samples (the only thing `score_members` can check)."""
    return base / f"world{ctx.world}-rank{ctx.rank}" if ctx.distributed else base


class Experiment:
    """One experiment in one run directory. `run()` does (or resumes) everything and returns the
    per-trial result rows; `hook(event, **info)` sees every epoch, scored member and stage.
    `ctx` (ensel.distributed.init_from_env()) spreads the work over torch.distributed ranks."""

    ctx = Context()  # single process (also for instances made by `transfer`)

    def __init__(self, cfg: ExperimentConfig, out: str | Path, hook=None, progress: bool = True, log=print,
                 ctx: Context | None = None):
        self.ctx = ctx or Context()
        if not self.ctx.is_main:  # one voice and one progress bar per run
            log, progress = (lambda *_: None), False
        self.cfg, self.out, self.hook, self.log = cfg, Path(out), hook, log
        self.progress = progress
        self.data = load_dataset(cfg.data, cfg.data_root, cfg.image_size, cfg.workers)
        self.pool = self.data.num_train
        self.counts = [size_count(s, self.pool) for s in cfg.sizes]
        if sorted(set(self.counts)) != self.counts:
            raise ValueError(f"sizes {cfg.sizes}: expected increasing sizes, got counts {self.counts}")
        if cfg.scheme == "build_up":
            self.initial = size_count(cfg.initial, self.pool)
            if self.initial >= self.counts[0]:
                raise ValueError(f"initial={cfg.initial} ({self.initial} samples) must be smaller than the first size ({self.counts[0]})")
        # Each acquisition takes count - selected samples from the pool - selected unselected ones,
        # after skipping exclude_top of those (Scores.top): check now, not after hours of training.
        if cfg.exclude_top and any(m != "random" for m in cfg.methods):
            if cfg.scheme == "build_up":
                steps = zip([self.initial, *self.counts[:-1]], self.counts)
            else:
                steps = ((0, c) for c in self.counts)
            for selected, count in steps:
                candidates = self.pool - selected
                skip = int(cfg.exclude_top * candidates)
                if count - selected > candidates - skip:
                    raise ValueError(
                        f"exclude_top={cfg.exclude_top}: acquiring {count - selected} of {candidates} unselected samples "
                        f"leaves too few after skipping the {skip} most uncertain"
                    )
        # Only a valid configuration claims the directory: a typo must not lock it for the fix.
        # Rank 0 first (the others would race on writing config.json), then the others check it.
        if self.ctx.is_main:
            _claim_out(self.out, cfg)
        self.ctx.barrier()
        if not self.ctx.is_main:
            _claim_out(self.out, cfg)

    # -- pieces ------------------------------------------------------------------------------

    def _seed(self, trial: int, run: int) -> int:
        return self.cfg.seed * 1_000_003 + trial * 1000 + run

    def _permutation(self, trial: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, trial, 7]).permutation(self.pool)

    def _bar(self, total, desc):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # off when not a terminal

    def _exists(self, path: Path) -> bool:
        """Whether `path` exists, as rank 0 sees it: every rank then takes the same branch (rank 0
        may write a file another rank has not yet looked for)."""
        exists = path.exists()
        if not self.ctx.distributed:
            return exists
        box = [exists if self.ctx.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return bool(box[0])

    def _subset(self, stage: Path, make) -> np.ndarray:
        path = stage / "subset.npy"
        if self._exists(path):
            return np.load(path)
        subset = np.sort(np.asarray(make(), dtype=np.int64))  # every rank: make() may be collective
        if not self.ctx.is_main:
            return subset
        stage.mkdir(parents=True, exist_ok=True)
        tmp = stage / "subset.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, subset)
        tmp.replace(path)
        return subset

    def _train(self, stage: Path, subset: np.ndarray, trial: int, init_stage: Path | None = None,
               scores_later: bool = True) -> list[dict]:
        cfg = self.cfg
        train_cfg = cfg.train if scores_later or not cfg.prune_unused else replace(cfg.train, keep=1)
        summaries = []
        for r in range(cfg.runs):
            if r % self.ctx.world != self.ctx.rank:  # another rank trains this run
                continue
            bar = None
            run_dir = stage / f"run{r}"
            if not (run_dir / "done.json").exists():
                bar = self._bar(cfg.train.run_epochs(len(subset)) if cfg.train.schedule == "step" else cfg.train.max_epochs,
                                f"{stage.relative_to(self.out)}/run{r}")
            init = lr = None
            if init_stage is not None:  # pretrain: fine-tune run r of the whole-pool model
                init_summary = json.loads((init_stage / f"run{r}" / "done.json").read_text())
                init, lr = (init_stage / f"run{r}", init_summary["epochs"]), cfg.finetune_lr
            summaries.append(
                train_run(self.data, torch.from_numpy(subset), self._seed(trial, r), train_cfg, run_dir,
                          cfg.device, init=init, lr=lr, hook=self.hook, progress=bar)
            )
            if bar is not None:
                bar.close()
        if self.ctx.distributed:
            self.ctx.barrier()  # every run's done.json is written
            summaries = [json.loads((stage / f"run{r}" / "done.json").read_text()) for r in range(cfg.runs)]
        return summaries

    def _evaluate(self, stage: Path, subset: np.ndarray, trial: int, method: str, init_stage=None,
                  scores_later: bool = True) -> dict:
        """Trains the stage's runs (if not done) and evaluates them. `scores_later`: the stage's
        checkpoints will be an acquisition ensemble (or a fine-tuning start) later on."""
        path = stage / "metrics.json"
        if self._exists(path):
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        summaries = self._train(stage, subset, trial, init_stage, scores_later)
        if not self.ctx.is_main:  # rank 0 evaluates and writes the metrics
            self.ctx.barrier()
            return json.loads(path.read_text())
        run_dirs = [stage / f"run{r}" for r in range(self.cfg.runs)]
        seeds = ensemble_members("seeds", summaries)
        ens = ensemble_val_accuracy(self.data, run_dirs, seeds, self.cfg.train.arch, self.cfg.device,
                                    self.cfg.train.eval_batch_size, self.cfg.train.amp)
        single = [s["best_val_acc"] for s in summaries]
        metrics = {
            "trial": trial,
            "method": method,
            "size": int(len(subset)),
            "fraction": len(subset) / self.pool,
            "single_acc": float(np.mean(single)),
            "single_accs": single,
            "ensemble_acc": ens,
            "ensemble_members": len(seeds),
            "epochs": [s["epochs"] for s in summaries],
            "seconds": time.perf_counter() - t0,
        }
        atomic_json(path, metrics)
        self.ctx.barrier()
        self._event("stage", stage=stage, kind="train")
        self.log(f"  {stage.relative_to(self.out)}: {len(subset)} samples, single {metrics['single_acc']:.4f}, "
                 f"ensemble of {len(seeds)} {ens:.4f}")
        return metrics

    def _scores(self, stage: Path, subset: np.ndarray) -> tuple[np.ndarray, Scores]:
        """The acquisition model of `stage` (its runs) scores the pool samples outside `subset`."""
        out = stage / "acquisition"
        path = out / "scores.pt"
        if self._exists(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return saved["indices"].numpy(), _scores_from(saved)
        cfg = self.cfg
        candidates = np.setdiff1d(np.arange(self.pool), subset)
        ctx = self.ctx
        # Each rank scores its contiguous shard of the candidates, resumably in its own state dir.
        start, stop = shard(len(candidates), ctx.rank, ctx.world)
        state_dir = shard_dir(out / "state", ctx)
        logits_dir = shard_dir(out / "logits", ctx) if cfg.save_logits else None
        summaries = [json.loads((stage / f"run{r}" / "done.json").read_text()) for r in range(cfg.runs)]
        members = ensemble_members(cfg.ensemble, summaries, n=cfg.last, stride=cfg.stride)
        bar = self._bar(len(members), f"{stage.relative_to(self.out)}/acquisition")
        scores = score_members(
            self.data, [stage / f"run{r}" for r in range(cfg.runs)], members, cfg.train.arch,
            indices=torch.from_numpy(candidates[start:stop]), device=cfg.device,
            logits_dir=logits_dir, state_dir=state_dir,
            batch_size=cfg.train.eval_batch_size, amp=cfg.train.amp, progress=bar, hook=self.hook,
        )
        if bar is not None:
            bar.close()
        if ctx.distributed:
            # N x 56 bytes (72 MB at ImageNet's 1.28M), received by every rank: kept for the report
            # and for resuming; the selection itself only moves each rank's top candidates.
            scores = gather_scores(scores, ctx)
            if not ctx.is_main:
                ctx.barrier()
                return candidates, scores
        payload = {
            "indices": torch.from_numpy(candidates),
            "num_members": scores.num_members,
            "fields": {k: v.cpu() for k, v in scores.to_dict().items()},
            "members": [list(m) for m in members],
        }
        atomic_torch_save(payload, path)
        # The resumable accumulator (4 N K bytes and more) is no longer needed once scores.pt exists.
        shutil.rmtree(out / "state", ignore_errors=True)
        ctx.barrier()
        scores = _scores_from(payload)
        self._event("stage", stage=stage, kind="scores")
        return candidates, scores

    def _acquire(self, stage: Path, subset: np.ndarray, method: str, count: int) -> np.ndarray:
        """`count` new samples for `method` from the acquisition model of `stage`."""
        candidates, scores = self._scores(stage, subset)
        if not self.ctx.distributed:
            picked = scores.top(count, by=method, exclude_top=self.cfg.exclude_top)
            return candidates[picked.numpy()]
        # Each rank offers its shard's top; the merge is Scores.top's rule, so the same subset.
        start, stop = shard(len(candidates), self.ctx.rank, self.ctx.world)
        values = getattr(scores, method)[start:stop]
        picked = global_top_k(values, torch.arange(start, stop), count, by=method,
                              exclude_top=self.cfg.exclude_top, ctx=self.ctx)
        return candidates[picked.cpu().numpy()]

    def _event(self, event, **info):
        if self.hook is not None:
            self.hook(event, **info)

    # -- schemes -----------------------------------------------------------------------------

    def run(self) -> list[dict]:
        cfg = self.cfg
        rows = []
        for t in range(cfg.trials):
            self.log(f"trial {t + 1}/{cfg.trials}")
            trial_dir = self.out / f"trial{t}"
            perm = self._permutation(t)
            full_dir = trial_dir / "full"
            if cfg.full or cfg.scheme != "build_up":
                everything = self._subset(full_dir, lambda: np.arange(self.pool))
                rows.append(self._evaluate(full_dir, everything, t, "full", scores_later=cfg.scheme != "build_up"))
            if cfg.scheme == "build_up":
                rows += self._build_up(t, trial_dir, perm)
            else:
                rows += self._single_step(t, trial_dir, perm, full_dir)
        from .report import write_report

        if self.ctx.is_main:
            write_report(self.out, rows, cfg, self.pool)
        self.ctx.barrier()
        return rows

    def _build_up(self, t: int, trial_dir: Path, perm: np.ndarray) -> list[dict]:
        rows = []
        init_dir = trial_dir / "init"
        init = self._subset(init_dir, lambda: perm[: self.initial])
        rows.append(self._evaluate(init_dir, init, t, "initial"))
        for method in self.cfg.methods:
            prev_dir, prev = init_dir, init
            for i, count in enumerate(self.counts):
                stage = trial_dir / method / f"size{count}"
                if method == "random":
                    subset = self._subset(stage, lambda: perm[:count])
                else:
                    subset = self._subset(
                        stage, lambda: np.concatenate([prev, self._acquire(prev_dir, prev, method, count - len(prev))])
                    )
                acquires_next = method != "random" and i + 1 < len(self.counts)
                rows.append(self._evaluate(stage, subset, t, method, scores_later=acquires_next))
                prev_dir, prev = stage, subset
        return rows

    def _single_step(self, t: int, trial_dir: Path, perm: np.ndarray, full_dir: Path) -> list[dict]:
        rows = []
        init_stage = full_dir if self.cfg.scheme == "pretrain" else None
        everything = np.array([], dtype=np.int64)
        for method in self.cfg.methods:
            for count in self.counts:
                stage = trial_dir / method / f"size{count}"
                if method == "random":
                    subset = self._subset(stage, lambda: perm[:count])
                else:
                    subset = self._subset(stage, lambda: self._acquire(full_dir, everything, method, count))
                rows.append(self._evaluate(stage, subset, t, method, init_stage, scores_later=False))
        return rows


_WHERE_IT_RUNS = frozenset({"device", "workers"})


def _claim_out(out: Path, cfg: ExperimentConfig) -> None:
    """Records the configuration in out/config.json, or refuses a directory that holds another."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    mine = json.loads(json.dumps(cfg.to_dict()))
    if saved.exists():
        theirs = json.loads(saved.read_text())
        # Where it runs is not what it computes: a run started on a CPU may resume on a GPU.
        diff = sorted(
            k for k in set(theirs) | set(mine) if k not in _WHERE_IT_RUNS and theirs.get(k) != mine.get(k)
        )
        if diff:
            raise ValueError(f"{out} holds a run with another configuration (differs in {', '.join(diff)}); use another --out")
    else:
        atomic_json(saved, mine)


def _scores_from(saved: dict) -> Scores:
    fields = dict(saved["fields"])
    for name in ("error_count", "forgetting", "nll"):
        fields.setdefault(name, None)
    return Scores(num_members=saved["num_members"], **fields)


def transfer(subset_path: str | Path, cfg: ExperimentConfig, out: str | Path, log=print, hook=None, progress=True) -> list[dict]:
    """Trains `cfg.runs` models of `cfg.train.arch` on a saved subset (paper Table 4), once per
    trial, and evaluates them alone and as an ensemble of their seeds. Writes out/trial{t}/ and
    out/results.csv; returns the per-trial metrics."""
    out = Path(out)
    subset = np.load(subset_path)
    exp = Experiment.__new__(Experiment)
    exp.cfg, exp.out, exp.hook, exp.log, exp.progress = cfg, out, hook, log, progress
    exp.data = load_dataset(cfg.data, cfg.data_root, cfg.image_size, cfg.workers)
    exp.pool = exp.data.num_train
    if subset.ndim != 1 or len(subset) == 0 or subset.min() < 0 or subset.max() >= exp.pool:
        raise ValueError(f"{subset_path}: expected a 1-D array of pool indices in [0, {exp.pool})")
    if len(np.unique(subset)) != len(subset):
        raise ValueError(f"{subset_path}: the subset repeats indices")
    # A resumed transfer must train on the same subset and recipe as the interrupted one: the
    # stages it finds done would otherwise be reported for another subset or architecture.
    _claim_out(out, cfg)
    saved = exp._subset(out, lambda: subset)
    if not np.array_equal(saved, np.sort(subset)):
        raise ValueError(f"{out} holds a transfer of another subset than {subset_path}; use another --out")
    subset = saved
    rows = [exp._evaluate(out / f"trial{t}", subset, t, cfg.train.arch, scores_later=False) for t in range(cfg.trials)]
    from .report import write_table_csv

    write_table_csv(out / "results.csv", rows)
    return rows
