"""The active-learning layer's parts: models, schedules, ensemble configurations, consensus, fused
scoring of memory-mapped logit files, and the CIFAR / ImageFolder on-disk formats."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ensel
from ensel.al.consensus import consensus_counts
from ensel.al.ensembles import ensemble_members
from ensel import score_files
from ensel.al.loop import parse_size, size_count
from ensel.al.models import build_model
from ensel.al.training import TrainConfig, _Schedule

# -- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "densenet121"])
def test_models_small_stem_any_channels(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=1, image_size=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 7)
    stem = model.features.conv0 if arch == "densenet121" else model.conv1
    assert (stem.kernel_size, stem.stride, stem.in_channels) == ((3, 3), (1, 1), 1)


def test_resnet10_is_one_basic_block_per_stage_and_large_stem_keeps_7x7():
    model = build_model("resnet10", num_classes=10, in_channels=2, image_size=224)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.in_channels) == ((7, 7), (2, 2), 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    with pytest.raises(ValueError, match="unknown"):
        build_model("vgg11", 10)


@pytest.mark.parametrize("arch, width, blocks", [("resnet10-w16", 16, [1, 1, 1, 1]), ("resnet18-w8", 8, [2, 2, 2, 2]),
                                                  ("resnet50-w16", 16, [3, 4, 6, 3])])  # fmt: skip
def test_resnet_widths(arch, width, blocks):
    """-w<N>: stages of N, 2N, 4N, 8N channels (x4 out of a Bottleneck), torchvision's blocks and
    stems; the parameters of the convolutions scale as (N / 64)^2 against the full width."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=1, image_size=28).eval()
    full = build_model(arch.split("-")[0], num_classes=10, in_channels=1, image_size=28)
    expansion = 4 if arch.startswith("resnet50") else 1
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks
    assert [getattr(model, f"layer{i}")[-1].conv1.out_channels for i in range(1, 5)] == [width * c for c in (1, 2, 4, 8)]
    assert model.conv1.out_channels == width and model.fc.in_features == 8 * width * expansion
    assert (model.conv1.kernel_size, model.conv1.in_channels) == ((3, 3), 1)
    convs = lambda m: sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv2d))  # noqa: E731
    ratio = convs(model) / convs(full)
    assert abs(ratio - (width / 64) ** 2) < 0.02 * (width / 64) ** 2, ratio
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("arch", ["resnet10-w", "resnet10-w0", "resnet10-w016", "densenet121-w16", "resnet10-w16x", "vgg-w8"])
def test_bad_widths_are_refused_in_one_line(arch):
    with pytest.raises(ValueError, match="arch="):
        build_model(arch, 10)
    with pytest.raises(ValueError, match="arch="):
        TrainConfig(arch=arch)


# -- schedules ------------------------------------------------------------------------------------


def test_step_schedule_scales_the_paper_milestones():
    cfg = TrainConfig(epochs=150)
    assert cfg.step_milestones(150) == [70, 130]
    assert cfg.step_milestones(6) == [3, 5]  # 2.8 and 5.2 rounded
    sched = _Schedule(cfg, 0.1, 6)
    lrs = []
    for e in range(1, 7):
        lrs.append(sched.lr)
        stop = sched.after_epoch(e, 0.5)
    assert stop and lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    # min_steps: 100 samples in batches of 32 are 4 steps per epoch; 30 steps need 8 epochs.
    assert TrainConfig(epochs=5, min_steps=30, batch_size=32).run_epochs(100) == 8
    assert TrainConfig(epochs=5, min_steps=30, batch_size=32).run_epochs(1000) == 5


def test_patience_schedule_drops_then_stops_after_twice_the_patience():
    cfg = TrainConfig(schedule="patience", patience=2, max_epochs=50)
    sched = _Schedule(cfg, 0.1, 0)
    # epochs:        1    2    3    4    5    6    7    8    9    10
    accs = [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    # gains at 1, 2, 5; two epochs without gain after 2 (3, 4) drop lr; 5 gains (lr stays);
    # 6, 7 without gain drop again; then 4 (= 2 x patience) more without gain stop at epoch 11.
    lrs, stops = [], []
    for e, a in enumerate(accs + [0.7], start=1):
        lrs.append(sched.lr)
        stops.append(sched.after_epoch(e, a))
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001])
    assert stops == [False] * 10 + [True]
    capped = _Schedule(TrainConfig(schedule="patience", patience=5, max_epochs=3), 0.1, 0)
    assert [capped.after_epoch(e, e / 10) for e in (1, 2, 3)] == [False, False, True]


# -- ensembles ------------------------------------------------------------------------------------


def _runs():
    return [
        {"epochs": 10, "best_epoch": 7, "kept_epochs": list(range(1, 11))},
        {"epochs": 12, "best_epoch": 12, "kept_epochs": list(range(1, 13))},
        {"epochs": 9, "best_epoch": 4, "kept_epochs": [4, 6, 7, 8, 9]},
    ]


def test_ensemble_configurations_by_hand():
    runs = _runs()
    assert ensemble_members("seeds", runs) == [(0, 7), (1, 12), (2, 4)]
    assert ensemble_members("checkpoints", runs, n=3, run=1) == [(1, 10), (1, 11), (1, 12)]
    # the paper's "5 checkpoints" (epochs 130:5:150) in small: every 5th epoch from the last
    assert ensemble_members("checkpoints", runs, n=2, run=0, stride=5) == [(0, 5), (0, 10)]
    assert ensemble_members("combined", runs, n=2) == [(0, 9), (0, 10), (1, 11), (1, 12), (2, 8), (2, 9)]
    assert ensemble_members("single", runs, run=2) == [(2, 9)]
    with pytest.raises(ValueError, match="run 2 epoch 5 was not kept"):
        ensemble_members("combined", runs, n=5)
    with pytest.raises(ValueError, match="choose one of"):
        ensemble_members("bagging", runs)


# -- consensus ------------------------------------------------------------------------------------


def test_consensus_hand_computed():
    # 4 checkpoints (oldest first) over 4 samples; the last is [0, 2, 2, 0].
    a = [np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0]), np.array([0, 2, 2, 0]), np.array([0, 2, 2, 0])]
    c = consensus_counts(a)
    # n=2: the last two agree everywhere; n=3 adds [0,1,2,0]: sample 1 differs; n=4 adds
    # [0,1,2,3]: sample 3 differs too. Pairs: (3,4) 4, (2,3) 3 (sample 1), (1,2) 3 (sample 3).
    assert c == {"n": [2, 3, 4], "all": [4, 3, 2], "pair": [4, 3, 3], "num_samples": 4}
    with pytest.raises(ValueError, match="at least 2"):
        consensus_counts(a[:1])


def test_consensus_cli_on_logit_files_uses_lowest_index_ties(tmp_path, capsys):
    from ensel.cli import main

    # member logits whose argmaxes are the rows of the hand example above, with a tie in the
    # first member's sample 0 (classes 0 and 3 equal: argmax 0).
    argmaxes = [[0, 1, 2, 3], [0, 1, 2, 0], [0, 2, 2, 0], [0, 2, 2, 0]]
    files = []
    for i, am in enumerate(argmaxes):
        x = np.zeros((4, 4), dtype=np.float16)
        x[np.arange(4), am] = 1.0
        if i == 0:
            x[0, 3] = 1.0
        files.append(str(tmp_path / f"m{i}.npy"))
        np.save(files[-1], x)
    assert main(["consensus", *files, "--out", str(tmp_path / "c")]) == 0
    csv = (tmp_path / "c" / "consensus.csv").read_text().splitlines()
    assert csv[1:] == ["files,2,4,4", "files,3,3,3", "files,4,2,3"]
    assert (tmp_path / "c" / "consensus.png").stat().st_size > 0


# -- scoring memory-mapped files ------------------------------------------------------------------


def test_score_files_equals_in_memory_score(tmp_path):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 301, 7, generator=g) * 3).half()
    logits[1, 5] = logits[3, 5]  # ties between members
    labels = torch.randint(0, 7, (301,), generator=g)
    paths = []
    for e in range(5):
        path = tmp_path / f"member{e}.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(301, 7))
        mm[:] = logits[e].numpy()
        mm.flush()
        del mm
        paths.append(path)
    expected = ensel.score(logits, labels=labels)
    got = score_files(paths, labels=labels.numpy(), chunk_samples=64)  # 5 slices, the last partial
    assert got.num_members == 5
    for name, value in expected.to_dict().items():
        assert torch.equal(getattr(got, name), value), name


def test_score_cli_writes_scores_and_selection(tmp_path):
    from ensel.cli import main

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 50, 4, generator=g)
    paths = []
    for e in range(3):
        paths.append(str(tmp_path / f"m{e}.npy"))
        np.save(paths[-1], logits[e].numpy().astype(np.float16))
    out, top = tmp_path / "scores.pt", tmp_path / "top.npy"
    assert main(["score", *paths, "--out", str(out), "--top", "10", "--by", "variation_ratio", "--top-out", str(top)]) == 0
    saved = torch.load(out, weights_only=True)
    expected = ensel.score(logits.half())
    assert torch.equal(saved["fields"]["mutual_info"], expected.mutual_info)
    assert np.array_equal(np.load(top), expected.top(10, by="variation_ratio").numpy())
    # --max-memory: a budget of about 10 samples per chunk gives the same scores bit for bit
    small_out = tmp_path / "small.pt"
    assert main(["score", *paths, "--out", str(small_out), "--max-memory", "4000"]) == 0
    small = torch.load(small_out, weights_only=True)["fields"]
    assert all(torch.equal(small[k], v) for k, v in saved["fields"].items())
    # --backend and --device reach the kernel: the float64 reference agrees within the contract
    ref_out = tmp_path / "ref.pt"
    assert main(["score", *paths, "--out", str(ref_out), "--backend", "reference", "--device", "cpu"]) == 0
    ref = torch.load(ref_out, weights_only=True)["fields"]["mutual_info"]
    assert torch.allclose(ref, expected.mutual_info, atol=1e-5 * (1 + np.log(4)), rtol=0)
    np.save(tmp_path / "bad.npy", np.zeros((49, 4), np.float16))
    assert main(["score", paths[0], str(tmp_path / "bad.npy")]) == 2  # shape mismatch: a clear error


# -- sizes ----------------------------------------------------------------------------------------


def test_sizes_fractions_and_counts():
    assert parse_size("0.25") == 0.25 and parse_size("25%") == 0.25 and parse_size("300") == 300
    assert size_count(0.25, 1348) == 337 and size_count(300, 1348) == 300 and size_count(1.0, 10) == 10
    with pytest.raises(ValueError):
        size_count(2000, 1348)
    with pytest.raises(ValueError):
        parse_size("a lot")


# -- on-disk formats ------------------------------------------------------------------------------


def _write_cifar(root, num_classes, per_batch=6, test=8):
    rng = np.random.default_rng(0)

    def batch(n, label_key):
        labels = rng.integers(0, num_classes, n).tolist()
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: labels}, labels

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        labels = []
        for i in range(1, 6):
            b, ls = batch(per_batch, "labels")
            labels += ls
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(b))
        t, _ = batch(test, "labels")
        (folder / "test_batch").write_bytes(pickle.dumps(t))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
        first = b  # noqa: F841
        return labels
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    b, labels = batch(5 * per_batch, "fine_labels")
    (folder / "train").write_bytes(pickle.dumps(b))
    t, _ = batch(test, "fine_labels")
    (folder / "test").write_bytes(pickle.dumps(t))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return labels


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_from_the_pickled_layout(tmp_path, num_classes):
    from ensel.al.data import load_dataset

    labels = _write_cifar(tmp_path, num_classes)
    data = load_dataset(f"cifar{num_classes}", tmp_path)
    assert (data.num_train, len(data.val_labels), data.num_classes) == (30, 8, num_classes)
    assert (data.in_channels, data.image_size) == (3, 32)
    assert data.train_labels.tolist() == labels
    # training batches: random crop (pad 4) and flip keep the shape; the pixels are normalized
    g = torch.Generator().manual_seed(0)
    batches = list(data.train_batches(torch.arange(30), 16, g, "cpu"))
    assert [tuple(x.shape) for x, _ in batches] == [(16, 3, 32, 32), (14, 3, 32, 32)]
    (_, x), = list(data.eval_batches("train", 64, "cpu"))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    with pytest.raises(ValueError, match="no readable dataset"):
        load_dataset(f"cifar{num_classes}", tmp_path / "missing")


def test_imagefolder_from_class_folders_of_pngs(tmp_path):
    from PIL import Image

    from ensel.al.data import load_dataset

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog", "fox"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(d / f"{i}.png")
    data = load_dataset("imagefolder", tmp_path, image_size=32, workers=0)
    assert (data.num_train, len(data.val_labels), data.num_classes, data.image_size) == (12, 6, 3, 32)
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    g = torch.Generator().manual_seed(0)
    (x, y), = list(data.train_batches(torch.tensor([0, 5, 11]), 8, g, "cpu"))
    assert x.shape == (3, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 2]
    # the generator alone fixes order and crops, also without workers (as after a resume, when
    # the process's global generator is in another state)
    epochs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        epochs.append(list(data.train_batches(torch.arange(12), 5, torch.Generator().manual_seed(7), "cpu")))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*epochs))
    starts = [(s, tuple(x.shape)) for s, x in data.eval_batches("val", 4, "cpu")]
    assert starts == [(0, (4, 3, 32, 32)), (4, (2, 3, 32, 32))]


# -- resume state, streamed scoring, consensus over kept checkpoints, transfer -------------------


class _Planted:
    """A pickle that runs code when unpickled: touches `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_resume_state_is_never_unpickled_as_code(tmp_path):
    from ensel.al.data import load_digits
    from ensel.al.training import train_run

    run_dir, marker = tmp_path / "run", tmp_path / "code_ran"
    run_dir.mkdir()
    torch.save({"model": _Planted(marker)}, run_dir / "resume.pt")
    with pytest.raises(pickle.UnpicklingError):
        train_run(load_digits(), torch.arange(20), 0, TrainConfig(arch="resnet10", epochs=1), run_dir, "cpu")
    assert not marker.exists()


def _fake_runs(root, epochs=(1, 2), runs=2):
    """Run directories holding random resnet10 checkpoints for digits (no training)."""
    from ensel.al.training import checkpoint_path

    dirs = []
    for r in range(runs):
        d = root / f"run{r}"
        d.mkdir(parents=True)
        for e in epochs:
            torch.manual_seed(100 * r + e)
            model = build_model("resnet10", 10, 1, 8)
            torch.save({"model": model.state_dict(), "epoch": e, "val_acc": None}, checkpoint_path(d, e))
        dirs.append(d)
    return dirs


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_in", ["progress", "accumulator"])
def test_streamed_scoring_resumes_without_counting_a_member_twice(tmp_path, monkeypatch, crash_in):
    from ensel.al import inference
    from ensel.accumulator import Accumulator
    from ensel.al.data import load_digits

    data = load_digits()
    dirs = _fake_runs(tmp_path)
    members = [(0, 1), (0, 2), (1, 1), (1, 2)]
    rows = torch.arange(3, 1348, 27)  # 50 pool samples, not starting at 0
    kw = dict(indices=rows, device="cpu", batch_size=16, amp=False)
    expected = inference.score_members(data, dirs, members, "resnet10", **kw)

    # a crash while saving the state after the second member, in either of its two files
    calls = {"n": 0}
    target = (inference, "atomic_json") if crash_in == "progress" else (Accumulator, "save")
    original = getattr(*target)

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(*target, crashing)
    state, logits = tmp_path / "state", tmp_path / "logits"
    with pytest.raises(_Crash):
        inference.score_members(data, dirs, members, "resnet10", state_dir=state, logits_dir=logits, **kw)
    monkeypatch.undo()
    got = inference.score_members(data, dirs, members, "resnet10", state_dir=state, logits_dir=logits, **kw)
    assert got.num_members == 4
    for name, value in expected.to_dict().items():
        assert torch.equal(getattr(got, name), value), name
    # the logit files say which pool sample each of their rows is
    assert np.array_equal(np.load(logits / "rows.npz")["indices"], rows.numpy())
    with pytest.raises(ValueError, match="other members"):
        inference.score_members(data, dirs, members[::-1], "resnet10", state_dir=state, **kw)


def test_score_cli_reports_pool_indices_of_a_partial_pass(tmp_path, capsys):
    from ensel.cli import main

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 40, 5, generator=g)
    paths = []
    for e in range(3):
        paths.append(str(tmp_path / f"member{e:04d}.npy"))
        np.save(paths[-1], logits[e].numpy().astype(np.float16))
    pool_rows = np.arange(1000, 1040)[::-1].copy()  # file row i is pool sample 1039 - i
    np.savez(tmp_path / "rows.npz", indices=pool_rows, split=np.array("train"))
    top = tmp_path / "top.npy"
    assert main(["score", *paths, "--top", "6", "--by", "entropy", "--top-out", str(top)]) == 0
    expected_rows = ensel.score(logits.half()).top(6, by="entropy").numpy()
    assert np.array_equal(np.load(top), pool_rows[expected_rows])
    assert "rows.npz" in capsys.readouterr().out


def test_consensus_of_a_run_uses_only_its_consecutive_final_checkpoints(tmp_path):
    import json

    from ensel.al.consensus import run_argmaxes
    from ensel.al.data import load_digits

    (run,) = _fake_runs(tmp_path, epochs=(1, 3, 4), runs=1)  # epoch 2 pruned, 1 kept as the best
    (run / "done.json").write_text(json.dumps({"epochs": 4, "best_epoch": 1, "kept_epochs": [1, 3, 4]}))
    got = run_argmaxes(load_digits(), run, "resnet10", last=20, indices=torch.arange(30), device="cpu")
    assert len(got) == 2  # epochs 3 and 4; epoch 1 is no neighbour of 3
    (run / "done.json").write_text(json.dumps({"epochs": 4, "best_epoch": 1, "kept_epochs": [1, 2, 4]}))
    with pytest.raises(ValueError, match="consecutive"):
        run_argmaxes(load_digits(), run, "resnet10", last=20, indices=torch.arange(30), device="cpu")


def test_transfer_refuses_an_output_directory_of_another_subset(tmp_path):
    from ensel.al.loop import ExperimentConfig, transfer

    a, b, out = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "t"
    np.save(a, np.arange(0, 40))
    np.save(b, np.arange(40, 80))
    out.mkdir()
    np.save(out / "subset.npy", np.arange(0, 40))  # what an interrupted transfer of a.npy left
    cfg = ExperimentConfig(trials=1, runs=1, device="cpu", train=TrainConfig(arch="resnet10", epochs=1))
    with pytest.raises(ValueError, match="another subset"):
        transfer(b, cfg, out, log=lambda *_: None, progress=False)


def test_exclude_top_too_large_for_a_size_is_refused_before_any_training(tmp_path):
    from ensel.al.loop import Experiment, ExperimentConfig

    train = TrainConfig(arch="resnet10", epochs=1)
    # compress: 1000 of the 1348 pool samples after skipping int(0.5 * 1348) = 674 cannot be had
    with pytest.raises(ValueError, match="exclude_top=0.5"):
        Experiment(ExperimentConfig(scheme="compress", sizes=(1000,), exclude_top=0.5, train=train), tmp_path / "c", progress=False)
    # build_up: 40 -> 1300 acquires 1260 of the 1308 unselected, but skips int(0.1 * 1308) = 130 first
    with pytest.raises(ValueError, match="1260 of 1308"):
        Experiment(ExperimentConfig(sizes=(40, 1300), initial=20, exclude_top=0.1, train=train), tmp_path / "b", progress=False)
    # the largest acquisition that fits: 40 -> 1218 takes 1178 = 1308 - 130
    Experiment(ExperimentConfig(sizes=(40, 1218), initial=20, exclude_top=0.1, train=train), tmp_path / "ok", progress=False)


def test_a_refused_configuration_does_not_claim_its_output_directory(tmp_path):
    from ensel.al.loop import Experiment, ExperimentConfig

    train = TrainConfig(arch="resnet10", epochs=1)
    with pytest.raises(ValueError, match="the pool has 1348"):
        Experiment(ExperimentConfig(sizes=(0.2, 5000), train=train), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()
    Experiment(ExperimentConfig(sizes=(0.2, 500), train=train), tmp_path, progress=False)  # the corrected command
    with pytest.raises(ValueError, match="another configuration"):
        Experiment(ExperimentConfig(sizes=(0.2, 600), train=train), tmp_path, progress=False)


def test_a_run_may_resume_on_another_device_but_not_with_another_recipe(tmp_path):
    from ensel.al.loop import Experiment, ExperimentConfig

    train = TrainConfig(arch="resnet10", epochs=1)
    Experiment(ExperimentConfig(sizes=(0.2,), train=train, device="cpu", workers=2), tmp_path, progress=False)
    Experiment(ExperimentConfig(sizes=(0.2,), train=train, device="auto", workers=0), tmp_path, progress=False)
    with pytest.raises(ValueError, match="differs in train"):
        Experiment(ExperimentConfig(sizes=(0.2,), train=TrainConfig(arch="resnet10", epochs=2)), tmp_path, progress=False)


# -- atomic writes: a failed write leaves the old file and no temporary one -----------------------


def test_a_failed_torch_save_leaves_the_old_file_and_no_temporary_file(tmp_path):
    from ensel.al.training import atomic_torch_save

    path = tmp_path / "scores.pt"
    atomic_torch_save({"x": torch.arange(3)}, path)
    with pytest.raises(Exception, match="pickle"):
        atomic_torch_save({"x": torch.arange(5), "f": lambda: 0}, path)  # a lambda does not pickle
    assert [p.name for p in tmp_path.iterdir()] == ["scores.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))


def test_a_member_interrupted_mid_pass_leaves_no_partial_logit_file(tmp_path, monkeypatch):
    from ensel.al import inference
    from ensel.al.data import load_digits

    dirs = _fake_runs(tmp_path)
    real = inference.predict_batches

    def one_batch_then_crash(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise _Crash

    monkeypatch.setattr(inference, "predict_batches", one_batch_then_crash)
    logits = tmp_path / "logits"
    with pytest.raises(_Crash):
        inference.score_members(load_digits(), dirs, [(0, 1)], "resnet10", indices=torch.arange(40), device="cpu",
                                batch_size=16, amp=False, logits_dir=logits)
    assert [p.name for p in logits.iterdir()] == ["rows.npz"]


def test_a_failed_plot_leaves_the_old_png_and_no_temporary_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from ensel.al.report import plot_consensus

    curves = {"run 0": {"n": [2, 3], "all": [5, 4], "pair": [5, 4]}}
    path = tmp_path / "consensus.png"
    plot_consensus(curves, path, 5)
    before = path.read_bytes()

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise _Crash

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(_Crash):
        plot_consensus(curves, path, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["consensus.png"] and path.read_bytes() == before
