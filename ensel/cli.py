"""`ensel`: the command line.

    ensel score FILES... [--labels y.npy] [--top K --by mutual_info]     (the scoring core)
    ensel demo                         build-up on digits: mutual_info and variation_ratio vs random
    ensel run --data cifar10 --data-root DIR --scheme build_up --sizes 0.125,0.25,0.5 ...
    ensel transfer --subset RUN/trial0/mutual_info/size270/subset.npy --arch resnet18 ...
    ensel consensus --run-dir RUN/trial0/init/run0 [--last 20] [--unselected]

`score` runs here; the active-learning commands are in ensel.al.commands (the `al` extra). They
write into a run directory (`--out`) and resume from what is already there.

A user error is one line on stderr, `ensel <command>: error: ...`, and exit status 2, found
before any long pass and before any file is written wherever it can be (see `main`).
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import _fields
from ._inputs import resolve_device
from ._io import atomic_write
from .scores import outliers_skipped
from .selection import STRATEGIES


class UsageError(Exception):
    """A user error that is neither a bad value nor a refused path (a missing extra)."""


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


# -- argument types: checked while parsing, before anything runs -----------------------------------


def _int_at_least(low: int, why: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}{why}")
        return value

    return parse


def _fraction(text: str) -> float:
    """A fraction in [0, 1) (`--exclude-top`)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in [0, 1)")
    return value


def _bytes(text: str) -> int:
    """'4G', '512M', '64K' or a plain number of bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes like 512M or 4G") from None


def _device(text: str) -> str:
    """`score --device`: a device this machine has, checked while parsing (torch refuses a bad or
    absent one only when the first tensor lands there, after the files are read)."""
    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _probe(folder: Path, out: str) -> None:
    """Fails unless this process can create entries in `folder`. Tried, not asked (os.access): root
    passes os.access on read-only mounts, and ACLs or quotas escape it. Nothing is left behind."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ensel-probe-", dir=folder))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{out}: cannot write in {folder} ({e.strerror})") from None


def _out_file(text: str) -> str:
    """An output file (`score --out`, `--top-out`): in an existing, writable folder; not a folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give the name of a file to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} does not exist")
    _probe(path.parent, text)
    return text


def _out_dir(text: str) -> str:
    """An output folder (a run directory, created with its parents): a folder or nothing yet, under
    a folder this process can write in."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    base = path
    while not base.exists():  # the folder that creating `path` writes in ('.' and '/' exist)
        base = base.parent
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {base} is a file, not a directory")
    _probe(base, text)
    return text


# -- user files --------------------------------------------------------------------------------------


def load_array(path: str, what: str):
    """np.load of a file the user named (`--labels`, `--rows`, `--subset`): an unreadable or empty
    file is a ValueError naming it and the option (numpy says only "No data left in file")."""
    try:
        return np.load(path)  # allow_pickle=False: a file of Python objects is refused, not run
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror or e}") from None
    except (ValueError, EOFError) as e:
        # numpy's own message advises loading the file "unsafely using allow_pickle": never say that.
        why = str(e)
        if "allow_pickle" in why:  # a .npy of objects, or no .npy at all (numpy tried it as a pickle)
            with open(path, "rb") as f:
                why = "it holds Python objects" if f.read(6) == b"\x93NUMPY" else "not a .npy or .npz file"
        raise ValueError(f"{what} {path}: not a readable .npy/.npz file of numbers ({why})") from None


def load_indices(path: str, what: str, key: str | None = None):
    """A 1-D integer array: the .npy file `path` (`--subset`), or the `key` array of the .npz
    file `path` (`--rows`, key "indices")."""
    data = load_array(path, what)
    if key is not None:
        if not isinstance(data, np.lib.npyio.NpzFile) or key not in data.files:
            raise ValueError(f"{what} {path}: expected an .npz file holding {key!r}")
        with data:
            data = data[key]
    elif not isinstance(data, np.ndarray):
        raise ValueError(f"{what} {path}: expected an .npy file of indices")
    if data.ndim != 1 or data.dtype.kind not in "iu":
        raise ValueError(f"{what} {path}: expected a 1-D array of integer indices, got {data.dtype} {data.shape}")
    return data


# -- score ----------------------------------------------------------------------------------------------


def cmd_score(a) -> int:
    from . import backends
    from ._inputs import check_labels
    from .outofcore import describe_files, score_files

    # Everything is checked before the pass (which may read for hours) and before any file is
    # written: N and K come from the files' headers.
    files = describe_files(a.files)
    try:
        backends.resolve(a.backend, torch.device(a.device))
    except RuntimeError as e:  # a backend this installation lacks (not built, no triton)
        raise ValueError(f"--backend {a.backend}: {e}") from None
    n, k = files[0].num_samples, files[0].num_classes
    labels = None
    if a.labels is not None:
        labels = load_array(a.labels, "--labels")
        try:
            labels = check_labels(labels, n, k, torch.device("cpu"))
        except (TypeError, ValueError) as e:  # the core's TypeError of a float label array
            raise ValueError(f"--labels {a.labels}: {str(e).removeprefix('labels: ')}") from None
    rows = rows_path = None
    if a.top:
        if a.by in _fields.LABEL_FIELDS and labels is None:
            raise ValueError(f"--by {a.by} needs --labels")
        skip = outliers_skipped(a.exclude_top, n)
        if a.top > n - skip:
            raise ValueError(f"--top {a.top}: the files hold {n} samples" + (f", {skip} of them excluded by --exclude-top" if skip else ""))
        rows_path = _rows_file(a.files, a.rows)
        if rows_path is not None:
            rows = load_indices(str(rows_path), "--rows", key="indices")
            if rows.shape != (n,):
                raise ValueError(f"--rows {rows_path}: maps {rows.shape[0]} rows, but the files hold {n}")
    elif a.top_out or a.rows:
        raise ValueError(f"{'--top-out' if a.top_out else '--rows'} needs --top")
    if a.out and a.top_out and Path(a.out).resolve() == Path(a.top_out).resolve():
        raise ValueError("--out and --top-out name the same file")
    inputs = {Path(f).resolve(): f for f in [*a.files, *([a.labels] if a.labels else []), *([a.rows] if a.rows else [])]}
    for option, target in (("--out", a.out), ("--top-out", a.top_out)):
        if target and Path(target).resolve() in inputs:
            raise ValueError(f"{option} {target}: that is an input of this command; it would be replaced")

    print(f"scoring {n} samples x {len(files)} members x {k} classes "
          f"({str(files[0].dtype).removeprefix('torch.')}) on {a.device}", flush=True)
    t0 = time.perf_counter()
    s = score_files(a.files, labels=labels, chunk_samples=a.chunk, device=a.device, backend=a.backend,
                    max_memory=a.max_memory)
    print(f"scored {s.num_samples} samples x {s.num_members} members in {time.perf_counter() - t0:.2f} s")
    if s.num_samples:  # (no mean or min of no samples)
        print(f"  {'score':<18}{'mean':>10}{'min':>10}{'max':>10}")
        for name, v in s.to_dict().items():
            v = v.double()
            print(f"  {name:<18}{float(v.mean()):>10.4f}{float(v.min()):>10.4f}{float(v.max()):>10.4f}")
    if a.out:
        with atomic_write(a.out) as tmp:
            torch.save({"num_members": s.num_members, "fields": {k: v.cpu() for k, v in s.to_dict().items()}}, tmp)
        print(f"wrote {a.out}")
    if a.top:
        idx = s.top(a.top, by=a.by, exclude_top=a.exclude_top).cpu().numpy()
        what = "file rows"
        if rows is not None:
            # The files of an acquisition pass cover only the unselected samples: report pool indices.
            idx, what = rows[idx], f"sample indices (file rows mapped by {rows_path})"
        if a.top_out:
            with atomic_write(a.top_out) as tmp, open(tmp, "wb") as f:  # np.save(path) would add .npy
                np.save(f, idx)
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


# -- the parser -------------------------------------------------------------------------------------


def _al_command(name: str):
    """The handler of an active-learning command, imported when that command runs: `ensel score`
    and `ensel --help` never import the active-learning layer (torchvision, matplotlib, ...)."""

    def run(args) -> int:
        try:
            from .al import commands
        except ImportError as e:
            # ensel.al refuses to import without the `al` extra (MissingExtraError, naming the pip
            # command). The class cannot be imported to be named here: importing ensel.al is what
            # failed. Any other ImportError is a broken install or a bug and keeps its traceback.
            if type(e).__name__ != "MissingExtraError":
                raise
            raise UsageError(str(e)) from None
        return getattr(commands, name)(args)

    return run


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like every other user error; the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, a flag's False, an
    empty list) or where the help text says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", choices=("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder"),
                   help="the dataset")
    p.add_argument("--data-root", default=None,
                   help="local folder holding the IDX files (fashion-mnist default: /usr/share/datasets/fashion-mnist, "
                        "Debian's dataset-fashion-mnist), cifar-10-batches-py/, cifar-100-python/, or train/ and val/ "
                        "class folders (nothing is downloaded)")
    p.add_argument("--pool-size", type=_int_at_least(1), default=None,
                   help="fashion-mnist/mnist: train on a stratified subset of the pool of this size (fixed seed)")
    p.add_argument("--image-size", type=int, default=224, help="ImageFolder crop size (32 or less: small-image stem)")
    p.add_argument("--workers", type=int, default=2, help="ImageFolder DataLoader workers")


def _arch(text: str) -> str:
    from .al.models import parse_arch  # torchvision's import only when a command trains

    try:
        parse_arch(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_train(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--arch", default="resnet10", type=_arch,
                   help="the model: resnet10, resnet18, resnet34, resnet50, resnet101 or densenet121; a ResNet "
                        "with -w<N> has base width N instead of 64 ((N / 64)^2 of the convolutions; resnet10-w16 trained 4x faster on 2 cores)")
    p.add_argument("--schedule", default="step", choices=("step", "patience"),
                   help="step: x0.1 at 70/150 and 130/150 of --epochs (ImageNet); patience: the CIFAR schedule")
    p.add_argument("--epochs", type=int, default=epochs, help="step schedule length (paper: 150)")
    p.add_argument("--min-steps", type=int, default=0, help="step schedule: lengthen runs on small subsets to this many SGD steps")
    p.add_argument("--patience", type=int, default=25, help="patience schedule: epochs without a validation gain before lr x0.1")
    p.add_argument("--max-epochs", type=int, default=400, help="patience schedule: the longest run")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--validate-last", type=int, default=None, help="step schedule: validate only the last n epochs (default: all)")
    p.add_argument("--keep", type=int, default=None, help="keep only the last n checkpoints (and the best) of each run; default: all")
    p.add_argument("--runs", type=int, default=2, help="seeds per model")
    p.add_argument("--trials", type=int, default=3, help="repetitions of the whole experiment")
    p.add_argument("--seed", type=int, default=0, help="base of every seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto: CUDA when available")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ensel", description="Ensemble active learning with checkpoint ensembles.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    parser.commands = sub.choices  # main() reports unknown arguments as the subcommand's

    p = add("demo", help="build-up on digits: acquisition by mutual_info and variation_ratio vs random and the full pool")
    p.add_argument("--out", type=_out_dir, default="runs/demo", help="the run directory")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=_al_command("cmd_demo"))

    p = add("run", help="an experiment: a scheme, acquisition methods, subset sizes, trials")
    _add_data(p)
    _add_train(p, epochs=150)
    p.add_argument("--scheme", default="build_up", choices=("build_up", "pretrain", "compress"), help="the selection scheme")
    p.add_argument("--methods", default="mutual_info,variation_ratio,random",
                   help=f"comma-separated: random or scores among {', '.join(sorted(_fields.DIRECTION))}")
    p.add_argument("--sizes", default="0.2,0.4",
                   help="subset sizes: fractions with a decimal point or %% (0.25, 25%%) or counts (300, 1e3)")
    p.add_argument("--initial", default="0.1", help="build_up: size of the random start")
    p.add_argument("--ensemble", default="combined", choices=("seeds", "checkpoints", "combined", "single"),
                   help="the acquisition ensemble: best epoch of each seed, last epochs of one run, of every run, "
                        "or the last epoch of one run")
    p.add_argument("--last", type=int, default=20, help="checkpoints per run in the acquisition ensemble")
    p.add_argument("--stride", type=int, default=1, help="epochs between those checkpoints")
    p.add_argument("--exclude-top", type=float, default=0.0,
                   help="fraction of the most uncertain scored samples skipped as outliers (of the whole pool in "
                        "compress/pretrain, of the unselected samples in build_up)")
    p.add_argument("--acquisition", default="top", choices=STRATEGIES,
                   help="how the scored samples are chosen: top (the most uncertain), balanced (quotas per "
                        "predicted class), or drawn at random with weights score^(1/T) (power), exp(score/T) "
                        "(softmax) or rank^(-1/T) (softrank), Kirsch et al. 2023")
    p.add_argument("--temperature", type=float, default=1.0, help="T of --acquisition power/softmax/softrank")
    p.add_argument("--ties", default="random", choices=("random", "index"),
                   help="equal scores at the cut: in a random order drawn per trial and stage from --seed "
                        "(default), or by lowest pool index (what runs made before this option did)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="pretrain: lr of the fine-tuning")
    p.add_argument("--no-full", action="store_true", help="build_up: skip the whole-pool baseline")
    p.add_argument("--save-logits", action="store_true", help="also write each member's float16 logits (.npy)")
    p.add_argument("--out", type=_out_dir, required=True, help="the run directory (resumed when it holds this run)")
    p.set_defaults(fn=_al_command("cmd_run"))

    p = add("score", help="fused scoring of per-member logit files (.npy [N, K] of float16, float32 or float64)")
    p.add_argument("files", nargs="+",
                   help="one .npy of [N, K] logits per member: float16, float32 or float64 (numpy has no bfloat16; "
                        "ensel.score_files reads raw bfloat16 files)")
    p.add_argument("--labels", default=None, help=".npy of int labels [N] (adds error_count, forgetting, nll)")
    p.add_argument("--chunk", type=_int_at_least(1), default=None,
                   help="samples per fused slice (default: what --max-memory allows)")
    p.add_argument("--max-memory", type=_bytes, default=None,
                   help="memory budget of the out-of-core scoring, e.g. 512M or 4G (default 1G)")
    p.add_argument("--device", type=_device, default="cpu", help="where the fused kernel runs (cpu, cuda, cuda:1, ...)")
    p.add_argument("--backend", default="auto", help="cuda, triton, cpu or reference (default: auto)")
    p.add_argument("--out", type=_out_file, default=None, help="write the scores (torch file)")
    p.add_argument("--top", type=_int_at_least(0), default=0, help="also select this many samples (0: none)")
    p.add_argument("--by", default="mutual_info", choices=sorted(_fields.DIRECTION), help="the score --top selects by")
    p.add_argument("--exclude-top", type=_fraction, default=0.0,
                   help="fraction of the most uncertain samples skipped as outliers before --top")
    p.add_argument("--top-out", type=_out_file, default=None, help="write the selected indices (.npy)")
    p.add_argument("--rows", default=None,
                   help="rows.npz mapping file rows to sample indices (default: the one beside the files, if any)")
    p.set_defaults(fn=cmd_score)

    p = add("transfer", help="train another architecture on a saved subset (paper Table 4)")
    _add_data(p)
    _add_train(p, epochs=150)
    p.add_argument("--subset", required=True, help="subset.npy from a run directory")
    p.add_argument("--out", type=_out_dir, required=True, help="the run directory of the transfer")
    p.set_defaults(fn=_al_command("cmd_transfer"))

    p = add("consensus", help="top-1 agreement of the last n checkpoints, n = 2..20 (paper Fig. 2)")
    _add_data(p)
    p.add_argument("files", nargs="*", help="per-checkpoint logit files, oldest first (instead of --run-dir)")
    p.add_argument("--run-dir", action="append", default=[], help="a finished run (repeatable)")
    p.add_argument("--last", type=_int_at_least(2, " (consensus compares at least 2 checkpoints)"), default=20,
                   help="the last n checkpoints (files) compared")
    p.add_argument("--split", default="train", choices=("train", "val"), help="--run-dir: the samples predicted")
    p.add_argument("--unselected", action="store_true", help="only the pool samples outside the run's subset.npy")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto: CUDA when available")
    p.add_argument("--out", type=_out_dir, default="runs/consensus", help="folder of consensus.csv, .json and .png")
    p.set_defaults(fn=_al_command("cmd_consensus"))
    return parser


# -- main --------------------------------------------------------------------------------------------


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # "x: No such file or directory", not "[Errno 2] ..."
        if e.filename is None:
            text = e.strerror
        else:
            where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
            text = f"{where}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())  # one line


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (the write end polls POLLERR)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), or stdout is no file
        return True


def main(argv=None) -> int:
    # Argument errors (argparse types check --device, --out, counts) exit 2 here, in one line.
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # parse_args would name the top parser, `ensel: error:`
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    where = f"ensel {args.command}"
    try:
        _threads()
        status = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, inside this try, and not at interpreter exit
        return status
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe (a worker, a socket) broke: not the reader of our output leaving
        # The reader of the output left (`ensel score ... | head`): end quietly. stdout points at
        # devnull so that the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a writer that a closed pipe ended
    # The boundary between a user error and a bug. The commands check their arguments and
    # files before any work (above in parse_args, then in cmd_*), and the library answers
    # invalid input with ValueError (docs/contract.md); OSError is the system refusing a path or
    # device the user named (missing, existing, a folder, no permission, disk full); EOFError a
    # user's file that ends early; UsageError a missing extra. These are one line. Everything
    # else (TypeError, IndexError, RuntimeError, ...) is a bug, or a failure of torch or the
    # machine, and keeps its traceback: user data that the core would refuse with a TypeError
    # (float labels) is converted where it is checked, not here. ENSEL_TRACEBACK=1 shows the
    # traceback of a one-line error too, for a ValueError that is a bug after all.
    except (ValueError, OSError, EOFError, UsageError) as e:
        if os.environ.get("ENSEL_TRACEBACK"):
            raise
        print(f"{where}: error: {_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
