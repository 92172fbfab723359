"""Fashion-MNIST and MNIST from their IDX files (ensel/al/data.py `load_idx`), on small IDX files
written here byte by byte from the format's definition (big-endian magic 0x00000803 / 0x00000801,
then the dimensions as big-endian int32, then uint8 values). Nothing needs Debian's package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ensel.al.data import load_dataset, load_idx, stratified
from ensel.cli import main


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def make_files(root: Path, n_train=120, n_test=30, compress=False, seed=0):
    """IDX files of n_train / n_test 28x28 images whose first two pixels hold the image's own
    index (i mod 256, i // 256; so a split can be traced back) and labels cycling 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 0, 1] = np.arange(n) // 256
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte", images, 0x803, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, 0x801, compress)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_splits_shapes_and_labels(tmp_path, compress):
    files = make_files(tmp_path, compress=compress)
    d = load_idx("fashion-mnist", tmp_path)
    assert (d.num_train, len(d.val_labels), len(d.test_labels)) == (110, 10, 30)  # 1/12 of 120 held out
    assert (d.in_channels, d.image_size, d.num_classes) == (1, 28, 10)
    # Every training image is in the pool or in val, once; their labels are the files'.
    train_images, train_labels = files["train"]
    pool_ids = d._images["train"][:, 0, 0, 0].long()
    val_ids = d._images["val"][:, 0, 0, 0].long()
    assert sorted(pool_ids.tolist() + val_ids.tolist()) == list(range(120))
    assert torch.equal(d.train_labels, torch.from_numpy(train_labels[pool_ids.numpy()]).long())
    assert torch.equal(d._images["train"][:, 0], torch.from_numpy(train_images[pool_ids.numpy()]))
    assert torch.bincount(d.val_labels, minlength=10).tolist() == [1] * 10  # stratified: 10 classes, 10 held out
    assert torch.equal(d.test_labels, torch.from_numpy(files["t10k"][1]).long())
    assert torch.equal(d.test_images[:, 0], torch.from_numpy(files["t10k"][0]))
    # Fixed: a second load holds out the same images.
    again = load_idx("fashion-mnist", tmp_path)
    assert torch.equal(again._images["val"], d._images["val"])
    x = next(d.eval_batches("val", 4, "cpu"))[1]
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32


def test_pool_size_is_a_stratified_fixed_subset(tmp_path):
    make_files(tmp_path, n_train=600)
    full = load_idx("mnist", tmp_path)
    small = load_dataset("mnist", tmp_path, pool_size=100)
    assert small.num_train == 100 and torch.bincount(small.train_labels, minlength=10).tolist() == [10] * 10
    ids = lambda d: set((d._images["train"][:, 0, 0, 0].long() + 256 * d._images["train"][:, 0, 0, 1].long()).tolist())  # noqa: E731
    assert len(ids(small)) == 100 and ids(small) <= ids(full)
    assert torch.equal(small._images["val"], full._images["val"])  # the validation split does not move
    with pytest.raises(ValueError, match="pool_size=551"):
        load_idx("mnist", tmp_path, pool_size=551)
    with pytest.raises(ValueError, match="only fashion-mnist and mnist"):
        load_dataset("digits", pool_size=10)


def test_stratified_rounds_by_largest_remainders():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    mask = stratified(labels, 9, seed=3)
    assert int(mask.sum()) == 9
    # shares 4.5, 2.7, 1.8: floors 4, 2, 1, and the 2 left to the largest remainders (0.8, 0.7)
    assert torch.bincount(labels[mask], minlength=3).tolist() == [4, 3, 2]
    assert not torch.equal(mask, stratified(labels, 9, seed=4))


def test_missing_files_name_the_path_and_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        load_idx("fashion-mnist", tmp_path)
    with pytest.raises(ValueError, match="needs --data-root"):
        load_idx("mnist", None)
    make_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_idx("mnist", tmp_path)


def test_malformed_files_are_refused_naming_the_file(tmp_path):
    make_files(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    good = path.read_bytes()
    path.write_bytes(struct.pack(">I", 0x803) + good[4:])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: not an IDX file of mnist train labels"):
        load_idx("mnist", tmp_path)
    path.write_bytes(good[:-3])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: 117 bytes of data for shape \(120,\)"):
        load_idx("mnist", tmp_path)
    path.write_bytes(good[:-1] + bytes([12]))
    with pytest.raises(ValueError, match="label 12 outside 0..9"):
        load_idx("mnist", tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: 16 + 28 * 28 * 20])
    path.write_bytes(good)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: 15680 bytes of data for shape \(30, 28, 28\)"):
        load_idx("mnist", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(ValueError, match="not a readable file"):
        load_idx("mnist", tmp_path)


def test_ensel_run_on_fashion_mnist_files(tmp_path, capsys):
    """The real CLI, end to end, on small IDX files: a narrow ResNet, a stratified pool subset."""
    make_files(tmp_path / "data", n_train=240, compress=True)
    out = tmp_path / "run"
    code = main(["run", "--data", "fashion-mnist", "--data-root", str(tmp_path / "data"), "--pool-size", "200",
                 "--arch", "resnet10-w8", "--methods", "variation_ratio,random", "--sizes", "60", "--initial", "40",
                 "--trials", "1", "--runs", "1", "--epochs", "1", "--last", "1", "--batch-size", "32", "--no-full",
                 "--device", "cpu", "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr()
    subset = np.load(out / "trial0" / "variation_ratio" / "size60" / "subset.npy")
    assert len(subset) == 60 and subset.max() < 200
    assert (out / "report.md").is_file()
