"""`make demo`: an implicit ensemble of real checkpoints scores scikit-learn's digits.

Three short training runs of a torchvision ResNet-10 keep every epoch's weights; the last four
epochs of each run form a 12-member ensemble ("combined" in the paper). Each checkpoint's logits
over the training pool stream straight into an ensel.Accumulator; the scores then pick the
samples to acquire. The demo prints the most uncertain samples and checks that the scores find the
hard ones: the ensemble's error rate among the top-scored samples against a random selection.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ensel
from ensel.models import build_model, predict_logits


def load_digits_split(seed: int = 0, val_fraction: float = 0.25):
    """scikit-learn's digits (1797 8x8 images, 10 classes) as float tensors, a fixed split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    mean, std = images.mean(), images.std()
    images = (images - mean) / std
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad 1) for 8x8 digits; no flips, which would turn digits into other glyphs."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_run(images, labels, seed: int, epochs: int, batch_size: int = 64) -> list[dict]:
    """SGD (momentum 0.9, weight decay 1e-4) with a one-cycle schedule peaking at lr 0.1: the
    paper's optimizer, squeezed into a few epochs. Every epoch's weights are kept: the
    checkpoints are the ensemble."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model("resnet10", num_classes=10, in_channels=1, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = (len(labels) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    checkpoints = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(augment(images[idx], generator)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        checkpoints.append(copy.deepcopy(model.state_dict()))
    return checkpoints


def save_uncertain_grid(images, labels, scores: ensel.Scores, idx, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 8, figsize=(13, 4.6))
    for ax, i in zip(axes.flat, idx.tolist()):
        ax.imshow(images[i, 0].numpy(), cmap="gray_r")
        title = f"#{i} y={int(labels[i])} mode={int(scores.mode[i])}\nMI={float(scores.mutual_info[i]):.2f}"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle("The 16 training digits the ensemble disagrees on most (mutual information)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="training runs (seeds)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run")
    parser.add_argument("--last", type=int, default=4, help="checkpoints kept per run (the last n epochs)")
    parser.add_argument("--acquire", type=float, default=0.1, help="fraction of the pool to acquire")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the plot goes")
    args = parser.parse_args(argv)

    (x_train, y_train), (x_val, y_val) = load_digits_split()
    n, k = len(y_train), 10
    print(f"digits: {n} training images (the pool), {len(y_val)} for validation, {k} classes")

    t0 = time.perf_counter()
    acc = ensel.Accumulator(n, k, labels=y_train)
    val_probs, members = torch.zeros(len(y_val), k), 0
    model = build_model("resnet10", num_classes=k, in_channels=1, image_size=8)
    for run in range(args.runs):
        checkpoints = train_run(x_train, y_train, seed=run, epochs=args.epochs)
        for state in checkpoints[-args.last :]:
            model.load_state_dict(state)
            for start, logits in predict_logits(model, x_train):
                acc.update(logits, start=start)  # streamed: [E, N, K] never exists
            val_probs += torch.cat([l for _, l in predict_logits(model, x_val)]).softmax(-1)
            members += 1
        print(f"  run {run}: trained {args.epochs} epochs, {members} checkpoints scored so far")
    scores = acc.finalize()
    elapsed = time.perf_counter() - t0
    val_acc = float((val_probs.argmax(-1) == y_val).float().mean())
    print(f"ensemble of {scores.num_members} checkpoints ({args.runs} runs x last {args.last} epochs), "
          f"validation accuracy {val_acc:.3f}; {elapsed:.0f} s")

    budget = max(1, int(args.acquire * n))
    wrong = (scores.mode != y_train).float()
    rng = np.random.default_rng(0)
    print(f"\nacquiring {budget} of {n} pool samples; share the ensemble's vote gets wrong:")
    print(f"  {'score':<18}{'misclassified':>14}{'mean error_count':>18}")
    random_idx = torch.as_tensor(rng.choice(n, budget, replace=False))
    rows = [("random", random_idx)]
    rows += [(by, scores.top(budget, by=by)) for by in ("mutual_info", "variation_ratio", "entropy", "margin")]
    for name, idx in rows:
        print(f"  {name:<18}{float(wrong[idx].mean()):>14.3f}{float(scores.error_count[idx].mean()):>18.3f}")

    top = scores.top(16, by="mutual_info")
    print("\nmost uncertain by mutual information (index: label, mode, votes/E, MI, entropy):")
    for i in top[:8].tolist():
        print(f"  #{i:<5} y={int(y_train[i])} mode={int(scores.mode[i])} "
              f"votes={int(scores.mode_votes[i])}/{scores.num_members} "
              f"MI={float(scores.mutual_info[i]):.3f} H={float(scores.entropy[i]):.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "most_uncertain.png"
    save_uncertain_grid(x_train, y_train, scores, top, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
