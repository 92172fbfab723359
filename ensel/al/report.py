"""The report of an experiment: per-trial CSV, a mean/std summary as markdown and CSV, and plots
(accuracy against subset size per method, as the paper's Fig. 1; consensus curves, Fig. 2)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .._io import atomic_write, atomic_write_bytes

_COLUMNS = ("trial", "method", "size", "fraction", "single_acc", "ensemble_acc", "ensemble_members", "epochs", "seconds")


def write_table_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "epochs": " ".join(map(str, r.get("epochs", [])))})
    atomic_write_bytes(path, buf.getvalue().encode())


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std (over trials, ddof 0) of the single-model and ensemble accuracy per (method, size)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["size"]), []).append(r)
    out = []
    for (method, size), rs in groups.items():
        ens = np.array([r["ensemble_acc"] for r in rs])
        single = np.array([r["single_acc"] for r in rs])
        out.append({
            "method": method, "size": size, "fraction": rs[0]["fraction"], "trials": len(rs),
            "ensemble_mean": float(ens.mean()), "ensemble_std": float(ens.std()),
            "single_mean": float(single.mean()), "single_std": float(single.std()),
        })
    return out


def _order(methods_in_config, summary) -> list[str]:
    present = {s["method"] for s in summary}
    order = [m for m in ("initial",) if m in present]
    order += [m for m in methods_in_config if m in present]
    order += sorted(present - set(order) - {"full"})
    return order + (["full"] if "full" in present else [])


def markdown_table(summary: list[dict], methods_in_config, pool: int, key: str = "ensemble") -> str:
    sizes = sorted({s["size"] for s in summary})
    cell = {(s["method"], s["size"]): s for s in summary}
    head = "| method | " + " | ".join(f"{n} ({100 * n / pool:.0f}%)" for n in sizes) + " |"
    lines = [head, "|" + " --- |" * (len(sizes) + 1)]
    for m in _order(methods_in_config, summary):
        vals = []
        for n in sizes:
            s = cell.get((m, n))
            vals.append("" if s is None else f"{100 * s[key + '_mean']:.2f} ± {100 * s[key + '_std']:.2f}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], cfg, pool: int) -> str:
    """Writes results.csv, summary.csv, report.md and accuracy.png under `out`; returns the
    markdown (what `ensel run` prints)."""
    out = Path(out)
    write_table_csv(out / "results.csv", rows)
    summary = summarize(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(summary[0]))
    w.writeheader()
    w.writerows(summary)
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())
    trials = max(s["trials"] for s in summary)
    t = cfg.train
    sched = f"step schedule, {t.epochs} epochs" if t.schedule == "step" else f"patience {t.patience}, at most {t.max_epochs} epochs"
    text = (
        f"# {cfg.scheme} on {cfg.data} ({pool} pool samples), {t.arch}\n\n"
        f"Top-1 validation accuracy (%) of each subset model's ensemble of its {cfg.runs} seeds "
        + (
            "(the last epoch of each run: only it is validated)"
            if t.validate_last == 1
            else "(the best epoch of each run, chosen on this same validation split, as in the paper: "
            "slightly optimistic)"
        )
        + f", mean ± std over {trials} trials. Acquisition model: "
        f"{cfg.ensemble} (last {cfg.last} epochs{' of every run' if cfg.ensemble == 'combined' else ''}), "
        f"{sched}, batch {t.batch_size}"
        + (f", the top {100 * cfg.exclude_top:g}% excluded as outliers" if cfg.exclude_top else "")
        + ".\n\n"
        + markdown_table(summary, cfg.methods, pool, "ensemble")
        + "\n\nSingle models (mean over the seeds, then mean ± std over trials):\n\n"
        + markdown_table(summary, cfg.methods, pool, "single")
        + "\n\n![accuracy against subset size](accuracy.png)\n"
    )
    atomic_write_bytes(out / "report.md", text.encode())
    plot_accuracy(summary, cfg.methods, pool, out / "accuracy.png", f"{cfg.scheme} on {cfg.data}")
    return text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(summary: list[dict], methods_in_config, pool: int, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    initial = [s for s in summary if s["method"] == "initial"]
    full = [s for s in summary if s["method"] == "full"]
    for m in _order(methods_in_config, summary):
        if m in ("initial", "full"):
            continue
        pts = sorted(initial + [s for s in summary if s["method"] == m], key=lambda s: s["size"])
        x = [100 * s["size"] / pool for s in pts]
        ax.errorbar(x, [100 * s["ensemble_mean"] for s in pts], yerr=[100 * s["ensemble_std"] for s in pts],
                    marker="o", capsize=3, label=m)
    if full:
        f = full[0]
        ax.axhline(100 * f["ensemble_mean"], color="k", ls="--", lw=1, label="full dataset")
        ax.axhspan(100 * (f["ensemble_mean"] - f["ensemble_std"]), 100 * (f["ensemble_mean"] + f["ensemble_std"]),
                   color="k", alpha=0.08)
    ax.set_xlabel("subset size (% of the pool)")
    ax.set_ylabel("top-1 validation accuracy (%), ensemble of seeds")
    ax.set_title(title)
    _finish(plt, fig, ax, path)


def _finish(plt, fig, ax, path: Path) -> None:
    """Grid, legend, layout, and an atomic write of the PNG."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(path, suffix=".png") as tmp:  # savefig picks the format by the extension
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def plot_consensus(curves: dict[str, dict], path: Path, num_samples: int) -> None:
    """`curves[label] = {"n": [...], "all": [...], "pair": [...]}` (see consensus.consensus_counts)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, c in curves.items():
        ax.plot(c["n"], c["pair"], marker=".", label=f"{label}: consecutive pair")
        ax.plot(c["n"], c["all"], marker=".", label=f"{label}: all of the last n")
    ax.set_xlabel("number of checkpoints n")
    ax.set_ylabel(f"samples with the same top-1 prediction (of {num_samples})")
    ax.set_title("checkpoint consensus")
    _finish(plt, fig, ax, path)
