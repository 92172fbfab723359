"""The selection loop end to end on real data with real models: a tiny build-up, every scheme,
resuming after interruptions, transfer, consensus over a run, and the CIFAR / ImageFolder paths
through `ensel run`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ensel
from ensel.al import training
from ensel.cli import main
from ensel.al.loop import Experiment, ExperimentConfig, transfer
from ensel.al.training import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny(**overrides) -> ExperimentConfig:
    base = dict(
        data="digits", methods=("mutual_info", "random"), sizes=(40, 80), initial=20, trials=1, runs=2,
        ensemble="combined", last=2, full=False, device="cpu", save_logits=True,
        train=TrainConfig(arch="resnet10", epochs=2, batch_size=32, validate_last=1),
    )
    base.update(overrides)
    return ExperimentConfig(**base)


class Counter:
    """A hook that counts epochs and scored members, and raises at a chosen event to simulate a
    crash in the middle of a stage."""

    def __init__(self, raise_at=None):
        self.raise_at, self.epochs, self.members, self.events = raise_at, 0, 0, []

    def __call__(self, event, **info):
        if event == "epoch":
            self.epochs += 1
        elif event == "member":
            self.members += 1
        self.events.append((event, info))
        if self.raise_at is not None and self.raise_at(event, info, self):
            raise KeyboardInterrupt("simulated interruption")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("al") / "tiny"
    counter = Counter()
    rows = Experiment(tiny(), out, hook=counter, progress=False, log=lambda *_: None).run()
    return out, rows, counter


def _load_scores(path):
    saved = torch.load(path, weights_only=True)
    return saved["indices"].numpy(), saved


def test_tiny_build_up_end_to_end(reference):
    out, rows, counter = reference
    got = sorted((r["method"], r["size"]) for r in rows)
    assert got == [("initial", 20), ("mutual_info", 40), ("mutual_info", 80), ("random", 40), ("random", 80)]
    for r in rows:
        assert 0.0 <= r["single_acc"] <= 1.0 and 0.0 <= r["ensemble_acc"] <= 1.0 and r["ensemble_members"] == 2
    t = out / "trial0"
    init = np.load(t / "init" / "subset.npy")
    mi40, mi80 = np.load(t / "mutual_info" / "size40" / "subset.npy"), np.load(t / "mutual_info" / "size80" / "subset.npy")
    assert len(init) == 20 and set(init) < set(mi40) < set(mi80) and len(mi80) == len(set(mi80)) == 80
    # the 20 acquired samples are the top mutual information among the samples not yet selected,
    # scored by the combined ensemble of the initial models (last 2 epochs of both runs)
    candidates, saved = _load_scores(t / "init" / "acquisition" / "scores.pt")
    assert np.array_equal(candidates, np.setdiff1d(np.arange(1348), init))
    assert saved["members"] == [[0, 1], [0, 2], [1, 1], [1, 2]] and saved["num_members"] == 4
    mi = saved["fields"]["mutual_info"]
    expected = candidates[torch.sort(mi, descending=True, stable=True).indices[:20].numpy()]
    assert set(mi40) - set(init) == set(expected)
    # random subsets are nested prefixes of one permutation and contain the random start
    r40, r80 = np.load(t / "random" / "size40" / "subset.npy"), np.load(t / "random" / "size80" / "subset.npy")
    assert set(init) < set(r40) < set(r80)
    # the float16 logit files reproduce the streamed scores (up to float16 rounding of the logits)
    files = sorted((t / "init" / "acquisition" / "logits").glob("*.npy"))
    assert [f.name for f in files] == [
        "member0000_run0_epoch001.npy", "member0001_run0_epoch002.npy",
        "member0002_run1_epoch001.npy", "member0003_run1_epoch002.npy",
    ]
    ref = ensel.reference_scores(torch.stack([torch.from_numpy(np.load(f)) for f in files]).double())
    assert torch.allclose(mi.double(), ref["mutual_info"].cpu(), atol=2e-3)
    for name in ("report.md", "results.csv", "summary.csv", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert "| mutual_info |" in (out / "report.md").read_text()
    # every epoch's checkpoint is kept (keep=None)
    assert sorted(p.name for p in (t / "init" / "run0").glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]


def test_score_command_on_the_runs_logit_files_equals_in_memory_score(reference, tmp_path):
    out, _, _ = reference
    files = sorted((out / "trial0" / "init" / "acquisition" / "logits").glob("*.npy"))
    candidates, _ = _load_scores(out / "trial0" / "init" / "acquisition" / "scores.pt")
    labels = ensel_labels()[candidates]
    np.save(tmp_path / "y.npy", labels)
    assert main(["score", *map(str, files), "--labels", str(tmp_path / "y.npy"), "--chunk", "500",
                 "--out", str(tmp_path / "s.pt")]) == 0
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    stacked = np.stack([np.load(f) for f in files])  # float16 [4, 1328, 10] in memory
    expected = ensel.score(stacked, labels=torch.from_numpy(labels))
    assert set(saved["fields"]) == set(expected.to_dict())
    for name, value in expected.to_dict().items():
        assert torch.equal(saved["fields"][name], value), name


def ensel_labels():
    from ensel.al.data import load_digits

    return load_digits().train_labels.numpy()


def test_resume_after_interruptions_recomputes_nothing(reference, tmp_path, monkeypatch):
    ref_out, ref_rows, ref_counter = reference
    monkeypatch.setattr(training, "RESUME_EVERY_SECONDS", 0.0)  # a resume state after every epoch
    out = tmp_path / "resumed"
    # 1) killed in the middle of a training stage: after the first epoch of the second initial run
    first = Counter(raise_at=lambda e, info, c: e == "epoch" and c.epochs == 3)
    with pytest.raises(KeyboardInterrupt):
        Experiment(tiny(), out, hook=first, progress=False, log=lambda *_: None).run()
    assert (out / "trial0" / "init" / "run1" / "resume.pt").exists()
    assert not (out / "trial0" / "init" / "run1" / "done.json").exists()
    # 2) killed in the middle of a scoring pass: after its second member
    second = Counter(raise_at=lambda e, info, c: e == "member" and c.members == 2)
    with pytest.raises(KeyboardInterrupt):
        Experiment(tiny(), out, hook=second, progress=False, log=lambda *_: None).run()
    assert second.epochs == 1  # only the missing epoch of init/run1 was trained
    progress = json.loads((out / "trial0" / "init" / "acquisition" / "state" / "progress.json").read_text())
    assert progress["done"] == 2
    # 3) runs to the end
    third = Counter()
    rows = Experiment(tiny(), out, hook=third, progress=False, log=lambda *_: None).run()
    assert first.epochs + second.epochs + third.epochs == ref_counter.epochs
    assert first.members + second.members + third.members == ref_counter.members
    # the same subsets, the same accuracies: nothing was lost or changed by the interruptions
    key = lambda r: (r["method"], r["size"])  # noqa: E731
    for a, b in zip(sorted(rows, key=key), sorted(ref_rows, key=key)):
        assert (a["method"], a["size"], a["single_accs"], a["ensemble_acc"]) == (b["method"], b["size"], b["single_accs"], b["ensemble_acc"])
    for sub in ("init", "mutual_info/size40", "mutual_info/size80", "random/size80"):
        assert np.array_equal(np.load(out / "trial0" / sub / "subset.npy"), np.load(ref_out / "trial0" / sub / "subset.npy"))
    # a fourth call finds everything done
    fourth = Counter()
    Experiment(tiny(), out, hook=fourth, progress=False, log=lambda *_: None).run()
    assert (fourth.epochs, fourth.members) == (0, 0)
    with pytest.raises(ValueError, match="another configuration"):
        Experiment(tiny(last=1), out, progress=False)


def test_scores_saved_before_vote_entropy_still_resume(reference, tmp_path):
    """A scores.pt written before vote_entropy existed (its fields lack it): a resumed run that
    selects by another score loads it and selects what it selected then, scoring nothing again;
    a selection by vote_entropy from it is refused, naming the file to delete."""
    ref_out, _, _ = reference
    out = tmp_path / "old"
    shutil.copytree(ref_out, out)
    path = out / "trial0" / "init" / "acquisition" / "scores.pt"
    saved = torch.load(path, weights_only=True)
    del saved["fields"]["vote_entropy"]
    torch.save(saved, path)
    (out / "trial0" / "mutual_info" / "size40" / "subset.npy").unlink()  # selected from that file again
    counter = Counter()
    Experiment(tiny(), out, hook=counter, progress=False, log=lambda *_: None).run()
    assert (counter.epochs, counter.members) == (0, 0)  # nothing trained or scored again
    sub = "mutual_info/size40/subset.npy"
    assert np.array_equal(np.load(out / "trial0" / sub), np.load(ref_out / "trial0" / sub))
    # A new run selecting by vote_entropy from a copy of that (old) initial stage.
    new = tmp_path / "new"
    shutil.copytree(out / "trial0" / "init", new / "trial0" / "init")
    cfg = tiny(methods=("vote_entropy",), sizes=(40,), ties="index")  # the expected subset below ranks ties by index
    with pytest.raises(ValueError, match=r"scores\.pt was written before the score 'vote_entropy' existed; delete it"):
        Experiment(cfg, new, progress=False, log=lambda *_: None).run()
    path_new = new / "trial0" / "init" / "acquisition" / "scores.pt"
    path_new.unlink()  # as the message says: the stage is scored again from its checkpoints
    counter = Counter()
    Experiment(cfg, new, hook=counter, progress=False, log=lambda *_: None).run()
    assert counter.members == 4  # the 4 members of the initial ensemble, scored again
    candidates, rescored = _load_scores(path_new)
    ve = rescored["fields"]["vote_entropy"]
    assert ve.dtype == torch.float32 and not torch.isnan(ve).any()
    init = np.load(new / "trial0" / "init" / "subset.npy")
    picked = candidates[torch.sort(ve, descending=True, stable=True).indices[:20].numpy()]
    assert set(np.load(new / "trial0" / "vote_entropy" / "size40" / "subset.npy")) == set(init) | set(picked)


def _acquired(out: Path, method: str, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(new samples of trial0/method/size{size}, the init stage's candidates, its saved scores)."""
    candidates, saved = _load_scores(out / "trial0" / "init" / "acquisition" / "scores.pt")
    init = np.load(out / "trial0" / "init" / "subset.npy")
    new = np.setdiff1d(np.load(out / "trial0" / method / f"size{size}" / "subset.npy"), init)
    return new, candidates, saved["fields"]


def test_ties_and_acquisition_strategies_in_a_run(reference, tmp_path):
    """From the reference run's initial stage (4 members: variation_ratio takes 3 values, so the
    cut of 20 falls inside a tie group): ties by index take the group's lowest pool indices;
    random ties (the default) take the same values at the cut but other samples, the same ones
    again in another directory; balanced meets its class quotas; and a run directory from before
    these options existed resumes as what it computed (ties by index) and refuses the rest."""
    ref_out, _, _ = reference
    runs = {}
    for name, options in [("index", dict(ties="index")), ("random", {}), ("again", {}),
                          ("balanced", dict(acquisition="balanced"))]:  # fmt: skip
        out = tmp_path / name
        shutil.copytree(ref_out / "trial0" / "init", out / "trial0" / "init")
        Experiment(tiny(methods=("variation_ratio",), sizes=(40,), **options), out, progress=False,
                   log=lambda *_: None).run()  # fmt: skip
        runs[name] = _acquired(out, "variation_ratio", 40)
    new, candidates, fields = runs["index"]
    vr = fields["variation_ratio"].numpy()
    by_index = candidates[np.lexsort((candidates, -vr))[:20]]  # by value, then pool index
    assert set(new) == set(by_index)
    cut = np.sort(vr)[::-1][19]
    assert (vr > cut).sum() < 20 < (vr >= cut).sum()  # the cut falls inside a tie group
    value_of = dict(zip(candidates, vr))
    random_new = runs["random"][0]
    assert sorted(value_of[i] for i in random_new) == sorted(value_of[i] for i in by_index)
    assert set(random_new) != set(by_index)
    assert np.array_equal(random_new, runs["again"][0])
    mode_of = dict(zip(candidates, fields["mode"].numpy()))
    predicted = np.unique(fields["mode"].numpy())
    quota = 20 // len(predicted)
    got = np.bincount([mode_of[i] for i in runs["balanced"][0]], minlength=10)
    available = np.bincount(fields["mode"].numpy(), minlength=10)
    assert all(got[c] >= min(quota, available[c]) for c in predicted)
    # A directory whose config.json predates the options: what it computed was ties by index.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "index", old)
    config = json.loads((old / "config.json").read_text())
    for key in ("acquisition", "temperature", "ties"):
        del config[key]
    (old / "config.json").write_text(json.dumps(config))
    counter = Counter()
    Experiment(tiny(methods=("variation_ratio",), sizes=(40,), ties="index"), old, hook=counter, progress=False,
               log=lambda *_: None).run()  # fmt: skip
    assert (counter.epochs, counter.members) == (0, 0)
    with pytest.raises(ValueError, match=r"another configuration \(differs in ties\)"):
        Experiment(tiny(methods=("variation_ratio",), sizes=(40,)), old, progress=False).run()


def test_compress_and_pretrain_schemes(tmp_path):
    # ties by index: the expected subsets below are the stable sort's (random ties: test_selection.py)
    common = dict(methods=("variation_ratio", "random"), sizes=(60,), full=True, save_logits=False, ties="index",
                  train=TrainConfig(arch="resnet10", epochs=1, batch_size=64, validate_last=1))
    comp_out, pre_out, excl_out = tmp_path / "compress", tmp_path / "pretrain", tmp_path / "exclude"
    comp = Experiment(tiny(scheme="compress", **common), comp_out, progress=False, log=lambda *_: None).run()
    # the whole-pool models (and their acquisition scores) are the same for every scheme: reuse them
    for other in (pre_out, excl_out):
        shutil.copytree(comp_out / "trial0" / "full", other / "trial0" / "full")
    counter = Counter()
    pre = Experiment(tiny(scheme="pretrain", **common), pre_out, hook=counter, progress=False, log=lambda *_: None).run()
    assert counter.members == 0 and counter.epochs == 4  # 2 runs x (variation_ratio, random), 1 epoch
    assert {(r["method"], r["size"]) for r in comp} == {(r["method"], r["size"]) for r in pre} == {
        ("full", 1348), ("variation_ratio", 60), ("random", 60)}

    candidates, saved = _load_scores(comp_out / "trial0" / "full" / "acquisition" / "scores.pt")
    assert np.array_equal(candidates, np.arange(1348))  # compress scores the whole pool
    vr = saved["fields"]["variation_ratio"]
    top = torch.sort(vr, descending=True, stable=True).indices
    for out in (comp_out, pre_out):
        assert np.array_equal(np.load(out / "trial0" / "variation_ratio" / "size60" / "subset.npy"), np.sort(top[:60].numpy()))
    # compress trains from scratch; pretrain fine-tunes run r of the whole-pool model at lr 1e-3
    assert json.loads((comp_out / "trial0" / "variation_ratio" / "size60" / "run1" / "done.json").read_text())["init"] is None
    done = json.loads((pre_out / "trial0" / "variation_ratio" / "size60" / "run1" / "done.json").read_text())
    assert done["init"] == [str(pre_out / "trial0" / "full" / "run1"), 1]
    history = json.loads((pre_out / "trial0" / "variation_ratio" / "size60" / "run1" / "history.json").read_text())
    assert history[0]["lr"] == pytest.approx(1e-3)
    # exclude_top skips floor(0.25 * 1348) = 337 of the most uncertain first (paper Table 5)
    Experiment(tiny(scheme="compress", exclude_top=0.25, **{**common, "methods": ("variation_ratio",)}), excl_out,
               progress=False, log=lambda *_: None).run()
    assert np.array_equal(np.load(excl_out / "trial0" / "variation_ratio" / "size60" / "subset.npy"), np.sort(top[337:397].numpy()))


def test_transfer_trains_another_architecture_on_a_saved_subset(reference, tmp_path):
    out, _, _ = reference
    subset = out / "trial0" / "mutual_info" / "size40" / "subset.npy"
    cfg = ExperimentConfig(trials=1, runs=2, device="cpu", train=TrainConfig(arch="resnet18", epochs=1, batch_size=32, validate_last=1))
    rows = transfer(subset, cfg, tmp_path / "t", log=lambda *_: None, progress=False)
    assert len(rows) == 1 and rows[0]["size"] == 40 and rows[0]["method"] == "resnet18"
    done = json.loads((tmp_path / "t" / "trial0" / "run0" / "done.json").read_text())
    assert done["config"]["arch"] == "resnet18" and done["num_samples"] == 40
    assert (tmp_path / "t" / "results.csv").read_text().count("\n") == 2


def test_consensus_over_a_run_matches_direct_predictions(reference, tmp_path):
    from ensel.al.data import load_digits
    from ensel.al.models import build_model

    out, _, _ = reference
    run = out / "trial0" / "init" / "run0"
    assert main(["consensus", "--run-dir", str(run), "--unselected", "--device", "cpu", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "consensus.csv").read_text().splitlines()
    assert len(lines) == 2  # 2 epochs: n = 2 only
    _, n, all_agree, pair = lines[1].split(",")
    data = load_digits()
    pool = torch.from_numpy(np.setdiff1d(np.arange(1348), np.load(run.parent / "subset.npy")))
    x = torch.cat([b for _, b in data.eval_batches("train", 4096, "cpu", pool)])
    preds = []
    for epoch in (1, 2):
        model = build_model("resnet10", 10, 1, 8)
        state = torch.load(run / f"epoch_{epoch:03d}.pt", weights_only=True)["model"]
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        with torch.no_grad():
            preds.append(model.eval()(x).argmax(-1))
    agree = int((preds[0] == preds[1]).sum())
    assert (int(n), int(all_agree), int(pair)) == (2, agree, agree)


def _cifar(root: Path):
    import pickle

    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": rng.integers(0, 3, 6).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def _imagefolder(root: Path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (34, 34, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("kind", ["cifar10", "imagefolder"])
def test_run_command_on_generated_on_disk_datasets(tmp_path, kind, capsys):
    root = tmp_path / "data"
    (_cifar if kind == "cifar10" else _imagefolder)(root)
    out = tmp_path / "run"
    args = ["run", "--data", kind, "--data-root", str(root), "--image-size", "32", "--workers", "0",
            "--sizes", "12", "--initial", "6", "--methods", "entropy", "--epochs", "1", "--runs", "2", "--no-full",
            "--trials", "1", "--last", "1", "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "| entropy |" in report and "| initial |" in report
    printed = capsys.readouterr().out
    assert "| entropy |" in printed
    sub = np.load(out / "trial0" / "entropy" / "size12" / "subset.npy")
    assert len(sub) == 12 and sub.max() < (30 if kind == "cifar10" else 24)
    assert set(np.load(out / "trial0" / "init" / "subset.npy")) < set(sub)


def test_module_entry_point_reports_bad_input(tmp_path):
    missing = tmp_path / "nope.npy"
    proc = subprocess.run([sys.executable, "-m", "ensel", "score", str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.npy" in proc.stderr
