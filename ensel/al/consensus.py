"""Checkpoint consensus (paper, appendix B and Fig. 2): how many samples the last n checkpoints of a
run all give the same top-1 prediction, for n = 2..M, against the agreement of single consecutive
pairs.

With a_1..a_M the per-sample argmaxes of a run's last M checkpoints (a_M the final epoch):

    all(n)  = #{i : a_{M-n+1,i} = ... = a_{M,i}}     (non-increasing in n)
    pair(n) = #{i : a_{M-n+1,i} = a_{M-n+2,i}}       (the consecutive pair that n adds)

Argmax ties go to the lowest class index, as everywhere in ensel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._inputs import resolve_device
from ..outofcore import as_paths, npy_layout
from .models import build_model
from .training import load_run, load_weights, predict_batches


def consensus_counts(argmaxes) -> dict:
    """`argmaxes`: a sequence of M >= 2 int arrays [N] in epoch order (oldest first).
    Returns {"n": [2..M], "all": [...], "pair": [...], "num_samples": N}."""
    a = [np.asarray(x) for x in argmaxes]
    if len(a) < 2:
        raise ValueError(f"consensus: needs at least 2 checkpoints, got {len(a)}")
    n_samples = a[0].shape[0]
    for i, x in enumerate(a):
        if x.shape != (n_samples,):
            raise ValueError(f"consensus: checkpoint {i} has shape {x.shape}, expected ({n_samples},)")
    m = len(a)
    agree = np.ones(n_samples, dtype=bool)
    out = {"n": [], "all": [], "pair": [], "num_samples": int(n_samples)}
    for n in range(2, m + 1):
        cur, newer = a[m - n], a[m - n + 1]
        agree &= cur == a[m - 1]
        out["n"].append(n)
        out["all"].append(int(agree.sum()))
        out["pair"].append(int((cur == newer).sum()))
    return out


def argmax_of_logits(logits) -> np.ndarray:
    x = torch.from_numpy(np.array(logits, dtype=np.float32))
    return x.argmax(-1).numpy()  # torch.argmax takes the first maximum: the lowest class index


def run_argmaxes(data, run_dir: Path, arch: str, last: int = 20, split: str = "train", indices=None,
                 device="auto", batch_size: int = 512, progress=None) -> list[np.ndarray]:
    """Argmaxes of the last `last` kept checkpoints of a finished run over a split (or its rows
    `indices`), oldest first."""
    device = resolve_device(device)
    summary = load_run(run_dir)
    # Consecutive epochs only, back from the final one: a gap (a pruned epoch below a kept best
    # one) would make "pair" compare checkpoints that are not neighbours.
    kept, final = set(summary["kept_epochs"]), summary["epochs"]
    epochs = []
    for e in range(final, max(0, final - last), -1):
        if e not in kept:
            break
        epochs.insert(0, e)
    if len(epochs) < 2:
        raise ValueError(f"{run_dir}: fewer than 2 consecutive kept checkpoints end the run (kept: {sorted(kept)})")
    model = build_model(arch, data.num_classes, data.in_channels, data.image_size)
    result = []
    for e in epochs:
        load_weights(model, run_dir, e)
        model.to(device)
        parts = [logits.argmax(-1).cpu() for _, logits in predict_batches(model, data, split, device, batch_size, indices)]
        result.append(torch.cat(parts).numpy())
        if progress is not None:
            progress.update(1)
    return result


def open_logit_files(paths) -> list[np.ndarray]:
    """Read-only memory maps of per-member [N, K] logit files (one path or a sequence of them),
    checked to agree in shape. Each header is checked first (ensel.outofcore.npy_layout), so a
    file that is not a .npy of numbers is refused for what it is, and nothing is unpickled."""
    paths = as_paths(paths)
    arrays = []
    for p in paths:
        shape, _, _, _ = npy_layout(p)
        if len(shape) != 2:
            raise ValueError(f"{p}: expected [N, K] logits of one member, got shape {shape}")
        if arrays and shape != arrays[0].shape:
            raise ValueError(f"{p}: shape {shape} differs from {paths[0]}'s {arrays[0].shape}")
        arrays.append(np.load(p, mmap_mode="r"))  # a .npy of numbers: nothing to unpickle
    if not arrays:
        raise ValueError("no logit files given")
    return arrays
