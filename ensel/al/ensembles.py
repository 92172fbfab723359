"""Ensembles as lists of (run, epoch) checkpoints: the paper's configurations (section 3, Table 3).

- `seeds`: the best epoch (by validation accuracy) of each run, one member per random seed;
- `checkpoints`: the last `n` epochs of one run (`stride` 5 gives the paper's "epochs 130:5:150");
- `combined`: the last `n` epochs of every run (the paper's 100-member configuration);
- `single`: the last epoch of one run.

Members come run-major and in increasing epoch order, the stream order that `forgetting` counts in.
"""

from __future__ import annotations

CONFIGS = ("seeds", "checkpoints", "combined", "single")


def ensemble_members(config: str, runs: list[dict], n: int = 20, run: int = 0, stride: int = 1) -> list[tuple[int, int]]:
    """(run index, epoch) pairs of an ensemble over finished runs.

    `runs[r]` is a run summary (training.load_run): its `epochs`, `best_epoch` and `kept_epochs`.
    Raises if a member's checkpoint was not kept.
    """
    if config not in CONFIGS:
        raise ValueError(f"ensemble={config!r}: choose one of {', '.join(CONFIGS)}")
    if not runs:
        raise ValueError("ensemble: there are no runs")
    if n < 1 or stride < 1:
        raise ValueError(f"ensemble: n={n} and stride={stride} must be at least 1")
    if not 0 <= run < len(runs):
        raise ValueError(f"ensemble: run={run} is outside the {len(runs)} runs")

    def last(r: int) -> list[tuple[int, int]]:
        final = runs[r]["epochs"]
        epochs = [e for e in range(final, 0, -stride)][:n]
        return [(r, e) for e in sorted(epochs)]

    if config == "seeds":
        members = [(r, runs[r]["best_epoch"]) for r in range(len(runs))]
    elif config == "checkpoints":
        members = last(run)
    elif config == "combined":
        members = [m for r in range(len(runs)) for m in last(r)]
    else:
        members = [(run, runs[run]["epochs"])]
    for r, e in members:
        if e not in runs[r]["kept_epochs"]:
            raise ValueError(
                f"ensemble {config}: run {r} epoch {e} was not kept (kept: {runs[r]['kept_epochs']}); "
                "train with keep=None or a larger keep"
            )
    return members
