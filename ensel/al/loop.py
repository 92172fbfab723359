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

This module chains the stages; each stage is one function of `stages` (train and evaluate,
score, acquire), and `rundir` holds the run directory's lock, its config claim and its subsets.

The run directory (`out`) holds every stage's output and nothing is recomputed that exists:

    config.json
    .lock                               while a run works here (another run is refused)
    trial{t}/full/run{r}/...            whole-pool models (baseline; compress/pretrain acquisition)
    trial{t}/init/subset.npy, run{r}/   build_up's random start
    trial{t}/{method}/size{n}/subset.npy, run{r}/epoch_NNN.pt, metrics.json
    .../acquisition/scores.pt           scores of the samples not in that stage's subset
    results.csv, summary.csv, report.md, accuracy.png

Under `torchrun` (see ensel.distributed) the same run is spread over the ranks: run r of a stage
trains on rank r % world; each rank scores a contiguous shard of the candidates into its own
accumulator (state in acquisition/state/world{W}-rank{r}: a restart on another number of ranks
starts the pass over); the selection is a global top-k with the tie rule of `Scores.top`, so
the subsets are those of a single process. Rank 0 alone holds the lock and writes the shared
files (subsets, scores, metrics, report); what exists is decided by rank 0's view, broadcast, so
every rank takes the same path through the collectives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._fields import DIRECTION
from .._inputs import resolve_device
from ..distributed import Context
from ..scores import outliers_skipped
from ..selection import check_strategy
from . import stages
from .data import load_dataset
from .ensembles import CONFIGS
from .report import write_report, write_table_csv
from .rundir import RunDir
from .stages import Env, shard_dir
from .training import TrainConfig

__all__ = ["Experiment", "ExperimentConfig", "parse_size", "shard_dir", "size_count", "transfer"]

SCHEMES = ("build_up", "pretrain", "compress")
TIES = ("random", "index")


@dataclass
class ExperimentConfig:
    data: str = "digits"
    data_root: str | None = None
    image_size: int = 224
    workers: int = 2  # DataLoader workers for ImageFolder
    pool_size: int | None = None  # fashion-mnist/mnist: a stratified subset of the pool (seeded, fixed)
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
    acquisition: str = "top"  # Scores.top's strategy: top, balanced, power, softmax, softrank
    temperature: float = 1.0  # of the stochastic strategies
    ties: str = "random"  # equal scores at the cut: "random" (a seed per trial and stage) or "index"
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
        if self.ensemble not in CONFIGS:  # else refused when the first acquisition starts, after training
            raise ValueError(f"ensemble={self.ensemble!r}: choose one of {', '.join(CONFIGS)}")
        if not self.sizes:
            raise ValueError("sizes: give at least one subset size")
        self.sizes = tuple(self.sizes)
        for name in ("trials", "runs", "last", "stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be at least 1")
        if not 0.0 <= self.exclude_top < 1.0:
            raise ValueError(f"exclude_top={self.exclude_top!r}: expected a fraction in [0, 1)")
        if self.ties not in TIES:
            raise ValueError(f"ties={self.ties!r}: choose one of {', '.join(TIES)}")
        for m in self.methods:  # the strategy's own refusals (power on margin, a bad temperature), now
            if m != "random":
                check_strategy(self.acquisition, self.temperature, m, torch.Generator())
        # (NaN would also never equal itself in config.json: a new directory would refuse its own run.)
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise ValueError(f"finetune_lr={self.finetune_lr!r}: a learning rate is a positive number")
        if int(self.workers) < 0 or int(self.image_size) < 1:
            raise ValueError(f"workers={self.workers!r}, image_size={self.image_size!r}: expected workers >= 0 "
                             "and image_size >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> float | int:
    """A fraction of the pool in (0, 1], written with a decimal point or % ('0.25', '25%', '1.0'),
    or a count: a whole number >= 1 without a decimal point ('300', '1e3'). The notation decides,
    not the value: '1e3' is 1000 samples, '1.5' and '0' are errors, not 150% or no samples."""
    text = str(text).strip()
    what = f"size {text!r}: expected a fraction (0.25, 25%) or a count (300, 1e3)"
    try:
        value = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        raise ValueError(what) from None
    if text.endswith("%") or "." in text:
        fraction = value / 100 if text.endswith("%") else value
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"{what}; a fraction lies in (0, 1], a percentage in (0%, 100%]")
        return fraction
    if not (value.is_integer() and value >= 1):
        raise ValueError(f"{what}; a count is a whole number of at least 1 (a fraction has a decimal point)")
    return int(value)


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



def _plan(cfg: ExperimentConfig, pool: int) -> tuple[int | None, list[int]]:
    """The sample counts of the random start (build_up; else None) and of the sizes, checked
    against the pool: every acquisition must fit now, not after hours of training."""
    counts = [size_count(s, pool) for s in cfg.sizes]
    if sorted(set(counts)) != counts:
        raise ValueError(f"sizes {cfg.sizes}: expected increasing sizes, got counts {counts}")
    initial = None
    if cfg.scheme == "build_up":
        initial = size_count(cfg.initial, pool)
        if initial >= counts[0]:
            raise ValueError(f"initial={cfg.initial} ({initial} samples) must be smaller than the first size ({counts[0]})")
    # Each acquisition takes count - selected samples from the pool - selected unselected ones,
    # after skipping exclude_top of those (Scores.top).
    if cfg.exclude_top and any(m != "random" for m in cfg.methods):
        steps = zip([initial, *counts[:-1]], counts) if initial is not None else ((0, c) for c in counts)
        for selected, count in steps:
            candidates = pool - selected
            skip = outliers_skipped(cfg.exclude_top, candidates)
            if count - selected > candidates - skip:
                raise ValueError(
                    f"exclude_top={cfg.exclude_top}: acquiring {count - selected} of {candidates} unselected samples "
                    f"leaves too few after skipping the {skip} most uncertain"
                )
    return initial, counts


class Experiment:
    """One experiment in one run directory. `run()` does (or resumes) everything and returns the
    per-trial result rows; `hook(event, **info)` sees every epoch, scored member and stage.
    `ctx` (ensel.distributed.init_from_env()) spreads the work over torch.distributed ranks."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, hook=None, progress: bool = True, log=print,
                 ctx: Context | None = None):
        ctx = ctx or Context()
        if not ctx.is_main:  # one voice and one progress bar per run
            log, progress = (lambda *_: None), False
        self.cfg, self.out, self.ctx = cfg, Path(out), ctx
        # Everything that can be checked is, before anything is written: a typo must not claim
        # the directory (config.json would refuse the corrected command) or start a stage.
        device = resolve_device(cfg.device)
        self.data = load_dataset(cfg.data, cfg.data_root, cfg.image_size, cfg.workers, cfg.pool_size)
        self.pool = self.data.num_train
        self.initial, self.counts = _plan(cfg, self.pool)
        self.rundir = RunDir(self.out, ctx)
        self.env = Env(cfg, self.data, device, self.rundir, hook, log, progress)
        with self.rundir.held():
            self.rundir.claim(cfg.to_dict())

    def run(self) -> list[dict]:
        """Every trial of the scheme, then the report, with the run directory locked throughout."""
        cfg, env = self.cfg, self.env
        rows = []
        with self.rundir.held():
            self.rundir.claim(cfg.to_dict())  # again under this lock: the directory may have changed hands
            for t in range(cfg.trials):
                env.log(f"trial {t + 1}/{cfg.trials}")
                trial_dir = self.out / f"trial{t}"
                perm = np.random.default_rng([cfg.seed, t, 7]).permutation(self.pool)
                full_dir = trial_dir / "full"
                if cfg.full or cfg.scheme != "build_up":
                    everything = self.rundir.subset(full_dir, lambda: np.arange(self.pool))
                    rows.append(stages.evaluate(env, full_dir, everything, t, "full", scores_later=cfg.scheme != "build_up"))
                if cfg.scheme == "build_up":
                    rows += self._build_up(t, trial_dir, perm)
                else:
                    rows += self._single_step(t, trial_dir, perm, full_dir)
            if self.ctx.is_main:
                write_report(self.out, rows, cfg, self.pool)
            self.ctx.barrier()
        return rows

    def _build_up(self, t: int, trial_dir: Path, perm: np.ndarray) -> list[dict]:
        env, subset_at = self.env, self.rundir.subset
        init_dir = trial_dir / "init"
        init = subset_at(init_dir, lambda: perm[: self.initial])
        rows = [stages.evaluate(env, init_dir, init, t, "initial")]
        for method in self.cfg.methods:
            prev_dir, prev = init_dir, init
            for i, count in enumerate(self.counts):
                stage = trial_dir / method / f"size{count}"
                if method == "random":
                    subset = subset_at(stage, lambda: perm[:count])
                else:
                    subset = subset_at(stage, lambda: np.concatenate(
                        [prev, stages.acquire(env, prev_dir, prev, method, count - len(prev))]))
                acquires_next = method != "random" and i + 1 < len(self.counts)
                rows.append(stages.evaluate(env, stage, subset, t, method, scores_later=acquires_next))
                prev_dir, prev = stage, subset
        return rows

    def _single_step(self, t: int, trial_dir: Path, perm: np.ndarray, full_dir: Path) -> list[dict]:
        env, subset_at = self.env, self.rundir.subset
        init_stage = full_dir if self.cfg.scheme == "pretrain" else None
        nothing = np.array([], dtype=np.int64)  # the whole pool is scored
        rows = []
        for method in self.cfg.methods:
            for count in self.counts:
                stage = trial_dir / method / f"size{count}"
                if method == "random":
                    subset = subset_at(stage, lambda: perm[:count])
                else:
                    subset = subset_at(stage, lambda: stages.acquire(env, full_dir, nothing, method, count))
                rows.append(stages.evaluate(env, stage, subset, t, method, init_stage, scores_later=False))
        return rows


def transfer(subset_path: str | Path, cfg: ExperimentConfig, out: str | Path, log=print, hook=None, progress=True) -> list[dict]:
    """Trains `cfg.runs` models of `cfg.train.arch` on a saved subset (paper Table 4), once per
    trial, and evaluates them alone and as an ensemble of their seeds. Writes out/trial{t}/ and
    out/results.csv; returns the per-trial metrics."""
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, cfg.data_root, cfg.image_size, cfg.workers, cfg.pool_size)
    subset = np.load(subset_path)
    if subset.ndim != 1 or len(subset) == 0 or subset.min() < 0 or subset.max() >= data.num_train:
        raise ValueError(f"{subset_path}: expected a 1-D array of pool indices in [0, {data.num_train})")
    if len(np.unique(subset)) != len(subset):
        raise ValueError(f"{subset_path}: the subset repeats indices")
    rundir = RunDir(out)
    env = Env(cfg, data, device, rundir, hook, log, progress)
    with rundir.held():
        # A resumed transfer must train on the same subset and recipe as the interrupted one: the
        # stages it finds done would otherwise be reported for another subset or architecture.
        rundir.claim(cfg.to_dict())
        saved = rundir.subset(rundir.path, lambda: subset)
        if not np.array_equal(saved, np.sort(subset)):
            raise ValueError(f"{out} holds a transfer of another subset than {subset_path}; use another --out")
        rows = [stages.evaluate(env, rundir.path / f"trial{t}", saved, t, cfg.train.arch, scores_later=False)
                for t in range(cfg.trials)]
        write_table_csv(rundir.path / "results.csv", rows)
    return rows
