"""Streaming inference: each checkpoint's logits over the pool go straight into an Accumulator.

The accumulator lives on the device that runs the model, so logits never leave it: batch by
batch, one member at a time (the checkpoint-major order of docs/contract.md section 8). Optionally each
member's logits are also written as a float16 `.npy` file ([N, K], memory-mapped while written),
for later fused scoring with `score_files` (`ensel score FILES...`); `rows.npz` beside them maps
each file row to its sample (pool index), since a pass usually covers only the unselected samples.

A scoring pass over hundreds of checkpoints can be interrupted: with `state_dir` the accumulator
is saved after every member and a restarted pass skips the members already counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .._inputs import resolve_device
from .._io import atomic_write
from ..accumulator import Accumulator
from ..outofcore import ROWS_FILE
from ..scores import Scores
from .models import build_model
from .training import atomic_json, load_weights, predict_batches


def member_file_name(position: int, run: int, epoch: int) -> str:
    return f"member{position:04d}_run{run}_epoch{epoch:03d}.npy"


def score_members(
    data,
    run_dirs: list[Path],
    members: list[tuple[int, int]],
    arch: str,
    indices: torch.Tensor | None = None,
    split: str = "train",
    device="auto",
    with_labels: bool = True,
    logits_dir: Path | None = None,
    state_dir: Path | None = None,
    batch_size: int = 512,
    amp: bool = True,
    progress=None,
    hook=None,
) -> Scores:
    """Scores of `split`'s samples (the rows `indices`, in that order) under the ensemble `members`,
    a list of (run, epoch) over `run_dirs`. Sample i of the result is row indices[i]."""
    device = resolve_device(device)
    all_labels = data.labels(split)
    n = len(all_labels) if indices is None else len(indices)
    if n == 0:
        raise ValueError("score_members: no samples to score")
    if not members:
        raise ValueError("score_members: the ensemble has no members")
    labels = None
    if with_labels:
        labels = all_labels if indices is None else all_labels[torch.as_tensor(indices, dtype=torch.int64)]
    done = 0
    acc = None
    if state_dir is not None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        marker = state_dir / "progress.json"
        if (state_dir / "accumulator.pt").exists():
            # The accumulator's own member count says what it holds: a crash between writing
            # progress.json (first) and the accumulator (second) leaves progress.json one member
            # ahead, never behind, so no member is counted twice or lost.
            acc = Accumulator.load(state_dir / "accumulator.pt", device=device)
            counts = acc.members
            done = int(counts.max())
            saved = json.loads(marker.read_text()) if marker.exists() else {"members": []}
            used = [tuple(m) for m in saved["members"]][:done]
            if int(counts.min()) != done or acc.num_samples != n or len(used) != done or used != [tuple(m) for m in members[:done]]:
                raise ValueError(f"{state_dir}: the saved scoring pass used other members or samples; delete it to start over")
    if acc is None:
        acc = Accumulator(n, data.num_classes, labels=labels, device=device, num_members=len(members))
    if logits_dir is not None:
        logits_dir = Path(logits_dir)
        logits_dir.mkdir(parents=True, exist_ok=True)
        # Row i of every member file is sample rows[i] of `split`: without this map, indices
        # selected from the files (`ensel score --top`) could not be told apart from pool indices.
        rows = np.arange(n, dtype=np.int64) if indices is None else torch.as_tensor(indices, dtype=torch.int64).numpy()
        with atomic_write(logits_dir / ROWS_FILE, suffix=".npz") as tmp:  # savez adds .npz to other names
            np.savez(tmp, indices=rows, split=np.array(split))

    model = build_model(arch, data.num_classes, data.in_channels, data.image_size)
    for position in range(done, len(members)):
        run, epoch = members[position]
        load_weights(model, run_dirs[run], epoch)
        model.to(device)
        batches = predict_batches(model, data, split, device, batch_size, indices, amp)
        if logits_dir is None:
            _stream(acc, batches)
        else:  # under a temporary name: an interrupted member leaves no half-written file
            with atomic_write(logits_dir / member_file_name(position, run, epoch)) as tmp:
                _stream(acc, batches, np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, data.num_classes)))
        if state_dir is not None:
            atomic_json(state_dir / "progress.json", {"done": position + 1, "members": [list(m) for m in members[: position + 1]]})
            acc.save(state_dir / "accumulator.pt")
        if progress is not None:
            progress.update(1)
        if hook is not None:
            hook("member", position=position, run=run, epoch=epoch)
    return acc.finalize()


def _stream(acc: Accumulator, batches, out: np.memmap | None = None) -> None:
    """Adds each batch of (start, logits) to `acc` and, if given, to the float16 file `out`."""
    for start, logits in batches:
        acc.update(logits, start=start)
        if out is not None:
            out[start : start + logits.shape[0]] = logits.cpu().numpy().astype(np.float16)
    if out is not None:
        out.flush()  # every page is in the file before it is renamed into place


def ensemble_val_accuracy(data, run_dirs, members, arch: str, device="auto", batch_size: int = 512, amp: bool = True) -> float:
    """Top-1 validation accuracy of the members' averaged softmax (the paper's ensemble output)."""
    device = resolve_device(device)
    model = build_model(arch, data.num_classes, data.in_channels, data.image_size)
    probs = torch.zeros(len(data.val_labels), data.num_classes, device=device)
    for run, epoch in members:
        load_weights(model, run_dirs[run], epoch)
        model.to(device)
        for start, logits in predict_batches(model, data, "val", device, batch_size, amp=amp):
            probs[start : start + logits.shape[0]] += logits.softmax(-1)
    return float((probs.argmax(-1).cpu() == data.val_labels).float().mean())
