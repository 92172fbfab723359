"""The active-learning commands of `ensel` (demo, run, transfer, consensus); `ensel.cli` parses
their arguments and calls these. Each needs the `al` extra (`pip install 'ensel[al]'`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .._inputs import resolve_device
from .._io import atomic_write
from ..cli import load_indices
from ..distributed import init_from_env, shutdown
from .consensus import argmax_of_logits, consensus_counts, open_logit_files, run_argmaxes
from .data import load_dataset
from .loop import Experiment, ExperimentConfig, parse_size, transfer
from .report import plot_consensus
from .rundir import LOCK_FILE, lock
from .training import TrainConfig, load_run


def _train_config(a):
    return TrainConfig(arch=a.arch, schedule=a.schedule, epochs=a.epochs, min_steps=a.min_steps, patience=a.patience, max_epochs=a.max_epochs,
                       lr=a.lr, batch_size=a.batch_size, keep=a.keep, validate_last=a.validate_last, amp=not a.no_amp)


def _sizes(text: str, what: str):
    sizes = tuple(parse_size(s) for s in text.split(",") if s.strip())
    if not sizes:
        raise ValueError(f"{what} {text!r}: give at least one size (a fraction 0.25 or 25%, or a count 300)")
    return sizes


def demo_config():
    """`ensel demo`: build-up on digits, 3 trials x 2 seeds of ResNet-10.

    The pool is 1348 images. Each trial trains 2 runs on a shared random start of 135 (10%); their
    8-member combined ensemble (last 4 epochs of both runs) picks the first acquisition for both
    scores; then 2 runs per method at 270 (20%) and 404 (30%), and 2 runs on the whole pool.

    The step schedule runs 5 epochs and at least 90 SGD steps of 32 images (18 epochs on 135
    samples, 10 on 270, 7 on 404): the subset models must fit the hard samples that uncertainty
    picks. With 3 epochs and 50 steps the acquired subsets lost to random ones by 1-3 points;
    with 90 steps they win; with 150 steps and 10 epochs by 1-2 points at both sizes (issue 4's
    note has the tables). That is about 160k training images in all, 0.94 ms each on 2 cores;
    only the last epoch is validated (it is each run's "best"). The learning rate is the paper's
    0.1 for batches of 128 scaled linearly to batches of 32: 0.025 (0.1 at batch 32 left the
    models on 135 samples at 47-74% validation accuracy).
    """
    return ExperimentConfig(
        data="digits", scheme="build_up", methods=("mutual_info", "variation_ratio", "random"),
        sizes=(0.2, 0.3), initial=0.1, trials=3, runs=2, ensemble="combined", last=4,
        train=TrainConfig(arch="resnet10", schedule="step", epochs=5, min_steps=90, batch_size=32, lr=0.025, keep=4,
                          validate_last=1),
    )


def cmd_demo(a) -> int:
    cfg = demo_config()
    out = Path(a.out)
    if a.fresh and out.exists():
        # --fresh deletes a run directory, never a folder that merely has its name (`--out .`),
        # and never one that a running demo is using: under its lock, which refuses then.
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise ValueError(f"--fresh: {out} holds no run (no config.json); not deleting it")
        with lock(out):
            for entry in out.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"ensel demo: {cfg.scheme} on scikit-learn's digits, methods {', '.join(cfg.methods)}; writing {out}/")
    try:
        exp = Experiment(cfg, out, progress=not a.no_progress)
    except ValueError as e:
        if "another configuration" not in str(e):
            raise
        # An older ensel's demo (another recipe) in the same folder: nothing of it can be reused.
        raise ValueError(f"{e}; `ensel demo --fresh` (or `rm -rf {out}`) starts the demo over") from None
    print(f"pool {exp.pool} images, validation {len(exp.data.val_labels)}; sizes {exp.initial} (random start) -> "
          f"{', '.join(map(str, exp.counts))}; {cfg.trials} trials x {cfg.runs} seeds, ResNet-10, "
          f"{cfg.train.epochs} epochs (at least {cfg.train.min_steps} steps of {cfg.train.batch_size})")
    exp.run()
    print()
    print((out / "report.md").read_text())
    _demo_consensus(exp, out)
    print(f"wrote {out}/report.md, results.csv, summary.csv, accuracy.png, consensus.png; "
          f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU in this process")
    return 0


def _demo_consensus(exp, out: Path) -> None:
    stage = out / "trial0" / "init"
    subset = np.load(stage / "subset.npy")
    unselected = torch.from_numpy(np.setdiff1d(np.arange(exp.pool), subset))
    curves = {}
    for r in range(exp.cfg.runs):
        argmaxes = run_argmaxes(exp.data, stage / f"run{r}", exp.cfg.train.arch, last=20, indices=unselected, device=exp.cfg.device)
        curves[f"run {r}"] = consensus_counts(argmaxes)
    plot_consensus(curves, out / "consensus.png", len(unselected))
    c = curves["run 0"]
    print(f"consensus of the last checkpoints of trial0/init/run0 on its {len(unselected)} unselected samples: "
          + ", ".join(f"n={n}: all {al} / pair {p}" for n, al, p in zip(c["n"], c["all"], c["pair"])))


def cmd_run(a) -> int:
    cfg = ExperimentConfig(
        data=a.data, data_root=a.data_root, image_size=a.image_size, workers=a.workers, pool_size=a.pool_size,
        scheme=a.scheme,
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()), sizes=_sizes(a.sizes, "--sizes"),
        initial=_sizes(a.initial, "--initial")[0], trials=a.trials, runs=a.runs, ensemble=a.ensemble, last=a.last,
        stride=a.stride, exclude_top=a.exclude_top, acquisition=a.acquisition, temperature=a.temperature,
        ties=a.ties, full=not a.no_full, seed=a.seed, device=a.device,
        save_logits=a.save_logits, finetune_lr=a.finetune_lr, train=_train_config(a),
    )
    ctx = init_from_env()  # under torchrun: runs, inference and selection spread over the ranks
    try:
        exp = Experiment(cfg, a.out, progress=not a.no_progress, ctx=ctx)
        exp.run()
        if ctx.is_main:
            print((Path(a.out) / "report.md").read_text())
    finally:
        shutdown()
    return 0


def cmd_transfer(a) -> int:
    # The file is read again by `transfer`, which checks it against the pool once the dataset is
    # loaded; a file that is no subset at all is refused here, before the dataset is read.
    if len(load_indices(a.subset, "--subset")) == 0:
        raise ValueError(f"--subset {a.subset}: the subset is empty")
    cfg = ExperimentConfig(data=a.data, data_root=a.data_root, image_size=a.image_size, workers=a.workers,
                           pool_size=a.pool_size, trials=a.trials, runs=a.runs,
                           seed=a.seed, device=a.device, train=_train_config(a))
    rows = transfer(a.subset, cfg, a.out, progress=not a.no_progress)
    ens = np.array([r["ensemble_acc"] for r in rows])
    single = np.array([r["single_acc"] for r in rows])
    print(f"{a.arch} on {rows[0]['size']} samples of {a.data}: single {100 * single.mean():.2f} ± {100 * single.std():.2f}, "
          f"ensemble of {cfg.runs} seeds {100 * ens.mean():.2f} ± {100 * ens.std():.2f} (over {len(rows)} trials); wrote {a.out}/results.csv")
    return 0


def cmd_consensus(a) -> int:
    # Arguments that would be ignored, or compare fewer than 2 checkpoints, are refused before
    # a dataset is read or a checkpoint predicted.
    if a.files and a.run_dir:
        raise ValueError("give logit FILES or --run-dir, not both")
    if a.files and (a.unselected or a.split != "train"):
        raise ValueError("--unselected and --split choose the samples of a --run-dir; logit FILES hold theirs")
    if len(a.files) == 1:
        raise ValueError(f"give at least 2 logit files (consensus compares at least 2 checkpoints); got {a.files[0]}")
    if not a.files and not a.run_dir:
        raise ValueError("give logit FILES or --run-dir")
    if a.unselected and a.split != "train":
        raise ValueError("--unselected picks pool (train) samples; it cannot go with --split val")
    if a.run_dir:
        resolve_device(a.device)  # before the dataset is read
    curves = {}
    if a.files:
        arrays = open_logit_files(a.files)[-a.last :]
        curves["files"] = consensus_counts([argmax_of_logits(x) for x in arrays])
    else:
        data = load_dataset(a.data, a.data_root, a.image_size, a.workers, a.pool_size)
        for run_dir in a.run_dir:
            run_dir = Path(run_dir)
            arch = load_run(run_dir)["config"]["arch"]
            indices = None
            if a.unselected:
                subset = np.load(run_dir.parent / "subset.npy")
                indices = torch.from_numpy(np.setdiff1d(np.arange(data.num_train), subset))
            argmaxes = run_argmaxes(data, run_dir, arch, last=a.last, split=a.split, indices=indices, device=a.device)
            curves[str(run_dir)] = consensus_counts(argmaxes)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["source,n,all,pair"]
    for label, c in curves.items():
        print(f"{label} ({c['num_samples']} samples)")
        print(f"  {'n':>3}{'all agree':>11}{'pair':>8}")
        for n, al, p in zip(c["n"], c["all"], c["pair"]):
            print(f"  {n:>3}{al:>11}{p:>8}")
            lines.append(f"{label},{n},{al},{p}")
    with atomic_write(out / "consensus.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot_consensus(curves, out / "consensus.png", next(iter(curves.values()))["num_samples"])
    with atomic_write(out / "consensus.json") as tmp:
        tmp.write_text(json.dumps(curves, indent=1))
    print(f"wrote {out}/consensus.csv, consensus.json, consensus.png")
    return 0
