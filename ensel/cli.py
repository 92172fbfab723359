"""`ensel`: the command line of the active-learning layer.

    ensel demo                         build-up on digits: mutual_info and variation_ratio vs random
    ensel run --data cifar10 --data-root DIR --scheme build_up --sizes 0.125,0.25,0.5 ...
    ensel score FILES... [--labels y.npy] [--top K --by mutual_info]
    ensel transfer --subset RUN/trial0/mutual_info/size270/subset.npy --arch resnet18 ...
    ensel consensus --run-dir RUN/trial0/init/run0 [--last 20] [--unselected]

Every command writes into a run directory (`--out`) and resumes from what is already there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import _fields


def _threads() -> None:
    # torch's default is the physical core count of the machine, which oversubscribes a process
    # confined to fewer cores (containers, taskset); ENSEL_THREADS overrides.
    n = os.environ.get("ENSEL_THREADS")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    # Under torchrun the ranks of one machine share its cores.
    cores = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(max(1, int(n) if n else min(cores, torch.get_num_threads())))


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", choices=("digits", "cifar10", "cifar100", "imagefolder"))
    p.add_argument("--data-root", default=None, help="local folder of CIFAR or ImageFolder data (nothing is downloaded)")
    p.add_argument("--image-size", type=int, default=224, help="ImageFolder crop size (32 or less: small-image stem)")
    p.add_argument("--workers", type=int, default=2, help="ImageFolder DataLoader workers")


def _add_train(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--arch", default="resnet10", choices=("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "densenet121"))
    p.add_argument("--schedule", default="step", choices=("step", "patience"),
                   help="step: x0.1 at 70/150 and 130/150 of --epochs (ImageNet); patience: the CIFAR schedule")
    p.add_argument("--epochs", type=int, default=epochs, help="step schedule length (paper: 150)")
    p.add_argument("--min-steps", type=int, default=0, help="step schedule: lengthen runs on small subsets to this many SGD steps")
    p.add_argument("--patience", type=int, default=25)
    p.add_argument("--max-epochs", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--validate-last", type=int, default=None, help="step schedule: validate only the last n epochs (default: all)")
    p.add_argument("--keep", type=int, default=None, help="keep only the last n checkpoints (and the best) of each run; default: all")
    p.add_argument("--runs", type=int, default=2, help="seeds per model")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true")


def _bytes(text: str) -> int:
    """'4G', '512M', '64K' or a plain number of bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes like 512M or 4G") from None


def cmd_score(a) -> int:
    from .outofcore import score_files

    labels = None if a.labels is None else np.load(a.labels)
    t0 = time.perf_counter()
    s = score_files(a.files, labels=labels, chunk_samples=a.chunk, device=a.device, backend=a.backend,
                    max_memory=a.max_memory)
    print(f"scored {s.num_samples} samples x {s.num_members} members in {time.perf_counter() - t0:.2f} s")
    print(f"  {'score':<18}{'mean':>10}{'min':>10}{'max':>10}")
    for name, v in s.to_dict().items():
        v = v.double()
        print(f"  {name:<18}{float(v.mean()):>10.4f}{float(v.min()):>10.4f}{float(v.max()):>10.4f}")
    if a.out:
        out = Path(a.out)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"num_members": s.num_members, "fields": {k: v.cpu() for k, v in s.to_dict().items()}}, tmp)
        os.replace(tmp, out)
        print(f"wrote {out}")
    if a.top:
        idx = s.top(a.top, by=a.by, exclude_top=a.exclude_top).cpu().numpy()
        what = "file rows"
        rows_path = _rows_file(a.files, a.rows)
        if rows_path is not None:
            # The files of an acquisition pass cover only the unselected samples: report pool indices.
            rows = np.load(rows_path)["indices"]
            if rows.shape != (s.num_samples,):
                raise ValueError(f"{rows_path}: maps {rows.shape[0]} rows, but the files hold {s.num_samples}")
            idx, what = rows[idx], f"sample indices (file rows mapped by {rows_path})"
        if a.top_out:
            np.save(a.top_out, idx)
            print(f"wrote the {a.top} {what} to acquire by {a.by} to {a.top_out}")
        else:
            print(f"top {a.top} by {a.by}, {what}: {idx.tolist()[:50]}{' ...' if a.top > 50 else ''}")
    return 0


def _rows_file(files, given):
    """`--rows`, else the rows.npz that a scoring pass wrote beside all of `files`, else None."""
    from .outofcore import ROWS_FILE

    if given:
        return Path(given)
    folders = {Path(f).resolve().parent for f in files}
    if len(folders) == 1 and (folders.pop() / ROWS_FILE).is_file():
        return Path(files[0]).parent / ROWS_FILE
    return None


def _al_command(name: str):
    """The handler of an active-learning command, imported when that command runs: `ensel score`
    and `ensel --help` never import the active-learning layer (torchvision, matplotlib, ...)."""

    def run(args) -> int:
        from .al import commands

        return getattr(commands, name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensel", description="Ensemble active learning with checkpoint ensembles.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build-up on digits: acquisition by mutual_info and variation_ratio vs random and the full pool")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_al_command("cmd_demo"))

    p = sub.add_parser("run", help="an experiment: a scheme, acquisition methods, subset sizes, trials")
    _add_data(p)
    _add_train(p, epochs=150)
    p.add_argument("--scheme", default="build_up", choices=("build_up", "pretrain", "compress"))
    p.add_argument("--methods", default="mutual_info,variation_ratio,random",
                   help=f"comma-separated: random or scores among {', '.join(sorted(_fields.DIRECTION))}")
    p.add_argument("--sizes", default="0.2,0.4", help="subset sizes: fractions (0.25 or 25%%) or counts (300)")
    p.add_argument("--initial", default="0.1", help="build_up: size of the random start")
    p.add_argument("--ensemble", default="combined", choices=("seeds", "checkpoints", "combined", "single"))
    p.add_argument("--last", type=int, default=20, help="checkpoints per run in the acquisition ensemble")
    p.add_argument("--stride", type=int, default=1, help="epochs between those checkpoints")
    p.add_argument("--exclude-top", type=float, default=0.0,
                   help="fraction of the most uncertain scored samples skipped as outliers (of the whole pool in "
                        "compress/pretrain, of the unselected samples in build_up)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="pretrain: lr of the fine-tuning")
    p.add_argument("--no-full", action="store_true", help="build_up: skip the whole-pool baseline")
    p.add_argument("--save-logits", action="store_true", help="also write each member's float16 logits (.npy)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_al_command("cmd_run"))

    p = sub.add_parser("score", help="fused scoring of per-member float16/float32 logit files (.npy, [N, K])")
    p.add_argument("files", nargs="+")
    p.add_argument("--labels", default=None, help=".npy of int labels [N] (adds error_count, forgetting, nll)")
    p.add_argument("--chunk", type=int, default=None, help="samples per fused slice (default: what --max-memory allows)")
    p.add_argument("--max-memory", type=_bytes, default=None,
                   help="memory budget of the out-of-core scoring, e.g. 512M or 4G (default 1G)")
    p.add_argument("--device", default="cpu", help="where the fused kernel runs (cpu, cuda, cuda:1, ...)")
    p.add_argument("--backend", default="auto", help="cuda, triton, cpu or reference (default: auto)")
    p.add_argument("--out", default=None, help="write the scores (torch file)")
    p.add_argument("--top", type=int, default=0, help="also select this many samples")
    p.add_argument("--by", default="mutual_info", choices=sorted(_fields.DIRECTION))
    p.add_argument("--exclude-top", type=float, default=0.0)
    p.add_argument("--top-out", default=None, help="write the selected indices (.npy)")
    p.add_argument("--rows", default=None,
                   help="rows.npz mapping file rows to sample indices (default: the one beside the files, if any)")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("transfer", help="train another architecture on a saved subset (paper Table 4)")
    _add_data(p)
    _add_train(p, epochs=150)
    p.add_argument("--subset", required=True, help="subset.npy from a run directory")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_al_command("cmd_transfer"))

    p = sub.add_parser("consensus", help="top-1 agreement of the last n checkpoints, n = 2..20 (paper Fig. 2)")
    _add_data(p)
    p.add_argument("files", nargs="*", help="per-checkpoint logit files, oldest first (instead of --run-dir)")
    p.add_argument("--run-dir", action="append", default=[], help="a finished run (repeatable)")
    p.add_argument("--last", type=int, default=20)
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--unselected", action="store_true", help="only the pool samples outside the run's subset.npy")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/consensus")
    p.set_defaults(fn=_al_command("cmd_consensus"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _threads()
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ensel {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
