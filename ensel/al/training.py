"""Training runs with the paper's recipe, every epoch's checkpoint kept, resumable after a crash.

SGD with lr 0.1, momentum 0.9, weight decay 1e-4 (paper, appendix A), under one of two schedules:

- `step` (ImageNet): `epochs` epochs, lr x0.1 at 70/150 and 130/150 of them (70 and 130 of 150);
  scaled to any length, e.g. 6 epochs drop at epochs 3 and 5. `min_steps` lengthens the runs of
  small subsets to that many SGD steps (what the patience schedule does adaptively), so that a
  short schedule does not leave them untrained.
- `patience` (CIFAR): lr x0.1 after `patience` epochs without a gain in validation accuracy; stop
  when `2 * patience` epochs after a drop bring no gain; at most `max_epochs` (25 and 400 in the
  paper; `patience=2, max_epochs=20` makes it short).

A run directory holds `epoch_NNN.pt` (the weights after epoch NNN, 1-based: the ensemble members),
`history.json` (validation accuracy and lr per epoch), `resume.pt` while the run is unfinished
(float32 model, optimizer, schedule and generator state after the last finished epoch) and
`done.json` once it has finished. Every file is written to a temporary name and renamed, so a
run killed at any point resumes from its last finished epoch and ends in the same weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .._inputs import resolve_device
from .._io import atomic_write, atomic_write_bytes
from .models import build_model, parse_arch

SCHEDULES = ("step", "patience")

# The float32 resume state (model and optimizer, 4x a half-precision checkpoint) is written at most
# this often: an interruption then loses at most this much training, replayed identically on resume.
RESUME_EVERY_SECONDS = 30.0


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    schedule: str = "step"
    epochs: int = 150  # step schedule: the run's length
    min_steps: int = 0  # step schedule: more epochs for a small subset, until this many SGD steps
    milestones: tuple[float, ...] = (70 / 150, 130 / 150)  # step schedule: fractions of `epochs`
    patience: int = 25  # patience schedule
    max_epochs: int = 400  # patience schedule
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gamma: float = 0.1
    batch_size: int = 128
    eval_batch_size: int = 512
    validate_last: int | None = None  # step schedule: validate only the last n epochs (None: all)
    keep: int | None = None  # None keeps every epoch's checkpoint; n keeps the last n and the best
    checkpoint_dtype: str = "float16"  # ensemble members only need half precision for inference
    amp: bool = True  # bfloat16 autocast on CUDA devices

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        parse_arch(self.arch)  # build_model would only refuse it when the first run starts
        for name in ("epochs", "patience", "max_epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be at least 1")
        if self.validate_last is not None and self.validate_last < 1:
            raise ValueError(f"validate_last={self.validate_last!r}: at least 1, or None for every epoch")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"keep={self.keep!r}: keep at least one checkpoint, or None for all")
        if not (math.isfinite(self.lr) and self.lr > 0):  # torch refuses it only when a run starts
            raise ValueError(f"lr={self.lr!r}: a learning rate is a positive number")
        if self.checkpoint_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"checkpoint_dtype={self.checkpoint_dtype!r}: float16, bfloat16 or float32")
        self.milestones = tuple(float(m) for m in self.milestones)

    def to_dict(self) -> dict:
        return asdict(self)

    def run_epochs(self, num_samples: int) -> int:
        """The step schedule's length for a subset: `epochs`, or more when `min_steps` asks for it."""
        steps_per_epoch = -(-num_samples // self.batch_size)
        return max(self.epochs, -(-self.min_steps // steps_per_epoch))

    def step_milestones(self, epochs: int) -> list[int]:
        """Epoch counts after which the step schedule multiplies lr by `gamma`."""
        return sorted({max(1, round(m * epochs)) for m in self.milestones})


def atomic_json(path: Path, obj) -> None:
    """`obj` as indented JSON, written atomically (ensel._io)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save, written atomically (ensel._io): a pickling error leaves no temporary file."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / f"epoch_{epoch:03d}.pt"


def load_run(run_dir: Path) -> dict:
    """The finished run's summary (done.json): epochs, best_epoch, val_acc per epoch, kept epochs."""
    path = Path(run_dir) / "done.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: the run has not finished (no done.json)")
    return json.loads(path.read_text())


def load_weights(model: nn.Module, run_dir: Path, epoch: int) -> nn.Module:
    state = torch.load(checkpoint_path(run_dir, epoch), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])  # copy_ casts half-precision weights back to float32
    return model


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def predict_batches(model: nn.Module, data, split: str, device, batch_size: int, indices=None, amp: bool = True):
    """Yields (start, float32 logits) over `split` (rows `indices` if given), in eval mode."""
    device = torch.device(device)
    model.eval()
    for start, x in data.eval_batches(split, batch_size, device, indices):
        with autocast(device, amp):
            logits = model(x)
        yield start, logits.float()


def accuracy(model: nn.Module, data, device, batch_size: int, amp: bool = True) -> float:
    labels = data.val_labels.to(device)
    correct = 0
    for start, logits in predict_batches(model, data, "val", device, batch_size, amp=amp):
        correct += int((logits.argmax(-1) == labels[start : start + logits.shape[0]]).sum())
    return correct / max(1, len(labels))


class _Schedule:
    """The lr for the next epoch, and whether to stop, from the epochs done and their val accuracy."""

    def __init__(self, cfg: TrainConfig, lr: float, epochs: int):
        self.cfg, self.lr, self.epochs = cfg, lr, epochs
        self.best, self.since, self.dropped = -1.0, 0, False

    def state(self) -> dict:
        return {"lr": self.lr, "best": self.best, "since": self.since, "dropped": self.dropped}

    def load(self, state: dict) -> None:
        self.lr, self.best, self.since, self.dropped = state["lr"], state["best"], state["since"], state["dropped"]

    def after_epoch(self, epochs_done: int, val_acc: float) -> bool:
        """Updates lr; True when training should stop."""
        cfg = self.cfg
        if cfg.schedule == "step":
            if epochs_done in cfg.step_milestones(self.epochs):
                self.lr *= cfg.gamma
            return epochs_done >= self.epochs
        if val_acc > self.best:
            self.best, self.since, self.dropped = val_acc, 0, False
        else:
            self.since += 1
            if not self.dropped and self.since >= cfg.patience:
                self.lr *= cfg.gamma
                self.dropped, self.since = True, 0
            elif self.dropped and self.since >= 2 * cfg.patience:
                return True
        return epochs_done >= cfg.max_epochs


def train_run(
    data,
    indices: torch.Tensor,
    seed: int,
    cfg: TrainConfig,
    run_dir: str | Path,
    device: str | torch.device = "auto",
    init: tuple[Path, int] | None = None,
    lr: float | None = None,
    hook=None,
    progress=None,
) -> dict:
    """Trains one model on the pool samples `indices`, keeping every epoch's weights in `run_dir`.

    `init=(run_dir, epoch)` starts from that checkpoint (the pretrain scheme's fine-tuning, with
    `lr=1e-3`); otherwise the weights are initialized from `seed`, which also fixes the order of
    batches and the augmentation. `hook(event, **info)` is called after every epoch
    (`"epoch"`). Returns the run summary also written to `done.json`; a finished run is not
    retrained, an interrupted one resumes after its last finished epoch.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "done.json").exists():
        return load_run(run_dir)
    device = resolve_device(device)
    indices = torch.as_tensor(indices, dtype=torch.int64)
    if len(indices) == 0:
        raise ValueError(f"{run_dir}: cannot train on an empty subset")

    torch.manual_seed(seed)
    model = build_model(cfg.arch, data.num_classes, data.in_channels, data.image_size)
    if init is not None:
        load_weights(model, *init)
    model.to(device)
    base_lr = cfg.lr if lr is None else lr
    opt = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    schedule = _Schedule(cfg, base_lr, cfg.run_epochs(len(indices)))
    history: list[dict] = []
    stop = False
    last_resume_save = time.monotonic()

    resume = run_dir / "resume.pt"
    if resume.exists():
        # Tensors, dicts, lists and numbers only: weights_only keeps a planted file from running code.
        state = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        schedule.load(state["schedule"])
        history = state["history"]

    ckpt_dtype = getattr(torch, cfg.checkpoint_dtype)
    while not stop:
        epoch = len(history) + 1
        for group in opt.param_groups:
            group["lr"] = schedule.lr
        model.train()
        loss_sum, seen = 0.0, 0
        for x, y in data.train_batches(indices, cfg.batch_size, generator, device):
            with autocast(device, cfg.amp):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        # A validation pass costs a third of an epoch on small subsets; the step schedule does not
        # need it, and `validate_last` limits it (and so the choice of the best epoch) to the end.
        validate = cfg.schedule == "patience" or cfg.validate_last is None or epoch > schedule.epochs - cfg.validate_last
        val_acc = accuracy(model, data, device, cfg.eval_batch_size, cfg.amp) if validate else None
        history.append({"epoch": epoch, "lr": schedule.lr, "train_loss": loss_sum / seen, "val_acc": val_acc})
        stop = schedule.after_epoch(epoch, -1.0 if val_acc is None else val_acc)

        # An epoch that `keep` would prune at once is never written: on the step schedule one
        # before the last `keep` that was not validated (so it cannot be the best).
        pruned_at_once = (
            cfg.keep is not None and cfg.schedule == "step" and val_acc is None and epoch <= schedule.epochs - cfg.keep
        )
        if not pruned_at_once:
            weights = {k: (v.to(ckpt_dtype) if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
            atomic_torch_save({"model": weights, "epoch": epoch, "val_acc": val_acc}, checkpoint_path(run_dir, epoch))
        _prune(run_dir, history, cfg.keep)
        if not stop and time.monotonic() - last_resume_save >= RESUME_EVERY_SECONDS:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": generator.get_state(),
                    "schedule": schedule.state(),
                    "history": history,
                },
                resume,
            )
            last_resume_save = time.monotonic()
        atomic_json(run_dir / "history.json", history)
        if progress is not None:
            progress.update(1)
            if val_acc is not None:
                progress.set_postfix(val=f"{val_acc:.3f}", refresh=False)
        if stop:
            summary = _summary(run_dir, history, seed, indices, cfg, init)
            atomic_json(run_dir / "done.json", summary)
            resume.unlink(missing_ok=True)
        if hook is not None:
            hook("epoch", run_dir=run_dir, epoch=epoch)
    return load_run(run_dir)


def _best(history: list[dict]) -> dict:
    """The epoch with the highest validation accuracy (the latest of equals) among those validated."""
    return max((h for h in history if h["val_acc"] is not None), key=lambda h: (h["val_acc"], h["epoch"]))


def _summary(run_dir, history, seed, indices, cfg, init) -> dict:
    best = _best(history)
    return {
        "seed": seed,
        "num_samples": int(len(indices)),
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "final_val_acc": history[-1]["val_acc"],
        "val_acc": [h["val_acc"] for h in history],
        "train_loss": [h["train_loss"] for h in history],
        "kept_epochs": sorted(int(p.stem.split("_")[1]) for p in run_dir.glob("epoch_*.pt")),
        "config": cfg.to_dict(),
        "init": None if init is None else [str(init[0]), init[1]],
    }


def _prune(run_dir: Path, history: list[dict], keep: int | None) -> None:
    if keep is None:
        return
    best = _best(history)["epoch"] if any(h["val_acc"] is not None for h in history) else None
    last = len(history)
    for h in history:
        e = h["epoch"]
        if e <= last - keep and e != best:
            checkpoint_path(run_dir, e).unlink(missing_ok=True)
