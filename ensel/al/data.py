"""Datasets for the active-learning layer: a labeled pool (the training split) and a validation split.

- `digits`: scikit-learn's 1797 8x8 digits, embedded and offline; a fixed 75/25 split (seed 0).
- `fashion-mnist`, `mnist`: the original IDX files (`train-images-idx3-ubyte` and the three
  others, gzipped or not) from `--data-root`, for Fashion-MNIST by default where Debian's package
  `dataset-fashion-mnist` installs them. The pool is the official training split less a
  validation split of 1/12 of it (5,000 images) held out (stratified by class, seed 0) for choosing
  epochs, as the paper holds one out; the official 10,000-image test split is kept as "test".
- `cifar10`, `cifar100`: torchvision's CIFAR datasets from a local root (the pickled
  `cifar-10-batches-py` / `cifar-100-python` folders); the test batch is the validation split.
- `imagefolder`: torchvision's ImageFolder (ImageNet layout) from `<root>/train` and `<root>/val`.

Training batches are augmented with a random crop (zero padding, then a crop of the original size)
and a horizontal flip; digits get no flip, since a mirrored 2, 3 or 7 is another glyph or none.
Inputs are normalized with the mean and std of the training split (ImageNet's constants for
ImageFolder, whose images are never all in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder")
# Where Debian's package dataset-fashion-mnist puts the original files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Dataset:
    """A labeled pool (`split="train"`) and a validation split, batched for training and inference.

    `train_labels` / `val_labels` are int64 CPU tensors; pool indices always refer to the
    training split in its fixed order.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_labels: torch.Tensor
    val_labels: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    def labels(self, split: str) -> torch.Tensor:
        return {"train": self.train_labels, "val": self.val_labels}[_check_split(split)]

    def train_batches(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator, device):
        """Shuffled, augmented (images, labels) batches over the pool samples `indices`."""
        raise NotImplementedError

    def eval_batches(self, split: str, batch_size: int, device, indices: torch.Tensor | None = None):
        """(start, images) over `split` (or its rows `indices`, in that order), unaugmented."""
        raise NotImplementedError


def _check_split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: expected 'train' or 'val'")
    return split


@dataclass
class _Aug:
    pad: int
    flip: bool


class TensorDataset(Dataset):
    """Images held in memory as an [N, C, H, W] tensor (float or uint8), normalized per batch on
    the device where the batch goes; augmentation is done batch-wise there too, with offsets drawn
    from the caller's generator so that a seed fixes every crop and flip."""

    def __init__(self, name, train_images, train_labels, val_images, val_labels, num_classes, scale, aug: _Aug):
        self.name = name
        self.num_classes = int(num_classes)
        self._images = {"train": train_images, "val": val_images}
        self.train_labels = torch.as_tensor(train_labels, dtype=torch.int64)
        self.val_labels = torch.as_tensor(val_labels, dtype=torch.int64)
        self.in_channels = int(train_images.shape[1])
        self.image_size = int(max(train_images.shape[-2:]))
        self._scale = float(scale)
        x = train_images.float() * self._scale
        self._mean = x.mean(dim=(0, 2, 3))
        self._std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        self._aug = aug
        self._on_device: dict = {}

    def _split_on(self, split: str, device: torch.device) -> torch.Tensor:
        key = (split, str(device))
        if key not in self._on_device:
            self._on_device[key] = self._images[split].to(device)
        return self._on_device[key]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = self._mean.to(x.device)[None, :, None, None]
        std = self._std.to(x.device)[None, :, None, None]
        return (x.float() * self._scale - mean) / std

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self._aug.pad
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy, dx = torch.randint(0, 2 * p + 1, (2, b), generator=generator).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
            x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
            x = x.permute(0, 3, 1, 2)
        if self._aug.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous()

    def train_batches(self, indices, batch_size, generator, device):
        device = torch.device(device)
        images = self._split_on("train", device)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        order = indices[torch.randperm(len(indices), generator=generator)]
        labels = self.train_labels
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = self._augment(self._normalize(images[idx.to(device)]), generator)
            yield x, labels[idx].to(device)

    def eval_batches(self, split, batch_size, device, indices=None):
        device = torch.device(device)
        images = self._split_on(_check_split(split), device)
        n = images.shape[0] if indices is None else len(indices)
        for start in range(0, n, batch_size):
            if indices is None:
                x = images[start : start + batch_size]
            else:
                x = images[torch.as_tensor(indices[start : start + batch_size], dtype=torch.int64).to(device)]
            yield start, self._normalize(x)


class FolderDataset(Dataset):
    """torchvision ImageFolder splits read through DataLoader workers: RandomResizedCrop + flip for
    training, resize + center crop for inference (the standard ImageNet pipeline)."""

    def __init__(self, root: Path, image_size: int = 224, workers: int = 2):
        from torchvision import datasets, transforms as T

        root = Path(root)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ValueError(f"imagefolder: {root / split} is not a directory (expected {root}/train/<class>/<image> and "
                                 f"{root}/val/<class>/<image>, the same class folders in both; nothing is downloaded)")
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        resize = int(round(image_size * 256 / 224))
        self._train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        self._eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        self._sets = {
            "train": datasets.ImageFolder(str(root / "train")),
            "val": datasets.ImageFolder(str(root / "val")),
        }
        if self._sets["train"].classes != self._sets["val"].classes:
            raise ValueError(f"imagefolder: {root}/train and {root}/val have different class folders")
        self.name = "imagefolder"
        self.num_classes = len(self._sets["train"].classes)
        self.in_channels = 3
        self.image_size = int(image_size)
        self.train_labels = torch.tensor(self._sets["train"].targets, dtype=torch.int64)
        self.val_labels = torch.tensor(self._sets["val"].targets, dtype=torch.int64)
        self._workers = workers

    def _loader(self, split, tf, indices, batch_size, sampler_generator=None):
        from torch.utils.data import DataLoader, Subset

        base = self._sets[split]
        view = _Transformed(base, tf)
        if indices is not None:
            view = Subset(view, [int(i) for i in indices])
        return DataLoader(
            view,
            batch_size=batch_size,
            shuffle=sampler_generator is not None,
            generator=sampler_generator,
            num_workers=self._workers,
            persistent_workers=False,
        )

    def train_batches(self, indices, batch_size, generator, device):
        # Workers draw their augmentation from torch's seed, which DataLoader derives from the
        # generator: a fixed generator state fixes the order and the crops. Without workers the
        # transforms draw from this process's global generator: seed it from `generator` too, or
        # a resumed run (whose global generator state was not saved) would crop differently.
        if self._workers == 0:
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        loader = self._loader("train", self._train_tf, indices, batch_size, generator)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def eval_batches(self, split, batch_size, device, indices=None):
        loader = self._loader(_check_split(split), self._eval_tf, indices, batch_size)
        start = 0
        for x, _ in loader:
            yield start, x.to(device, non_blocking=True)
            start += x.shape[0]


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), label


def load_digits(seed: int = 0, val_fraction: float = 0.25) -> TensorDataset:
    """scikit-learn's digits: 1348 pool images and 449 validation images, split once by `seed`."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None]  # [1797, 1, 8, 8], 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset("digits", images[train], labels[train], images[val], labels[val], 10, 1 / 16, _Aug(pad=1, flip=False))


def load_cifar(root: str | Path, num_classes: int = 10) -> TensorDataset:
    """CIFAR-10/100 from `root` (which holds `cifar-10-batches-py` or `cifar-100-python`);
    nothing is downloaded."""
    from torchvision import datasets

    base = {10: datasets.CIFAR10, 100: datasets.CIFAR100}[num_classes]

    class cls(base):
        # torchvision compares each file's md5 with the official release; the files only need to
        # exist here (its own loader still reads them), so that re-packed copies load too.
        def _check_integrity(self):
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self):
            import pickle

            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"{path} is missing")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        train = cls(str(root), train=True, download=False)
        val = cls(str(root), train=False, download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted. You can use download=True ..."
        # Say which files go where: ensel never downloads, so torchvision's hint does not apply.
        folder = Path(root) / base.base_folder
        names = [name for name, _ in base.train_list + base.test_list] + [base.meta["filename"]]
        missing = [name for name in names if not (folder / name).is_file()]
        raise ValueError(
            f"cifar{num_classes}: no readable dataset under {root}: expected {folder}/ holding {', '.join(names)} "
            f"(the python version, {base.filename} from https://www.cs.toronto.edu/~kriz/cifar.html, extracted "
            f"into {root}; nothing is downloaded)" + (f"; missing: {', '.join(missing)}" if missing else "")
        ) from None

    def nchw(data):
        return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()

    return TensorDataset(
        f"cifar{num_classes}", nchw(train.data), train.targets, nchw(val.data), val.targets,
        num_classes, 1 / 255, _Aug(pad=4, flip=True),
    )


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """An IDX array (uint8 images [n, rows, cols] for magic 0x803, labels [n] for 0x801) from
    `path` or `path` + ".gz"; ValueError naming the file for anything malformed."""
    import gzip

    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            break
    else:
        raise FileNotFoundError(f"{what}: {path} (or {path.name}.gz) is missing")
    opener = gzip.open if candidate.suffix == ".gz" else open
    try:
        with opener(candidate, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise ValueError(f"{candidate}: not a readable file ({e})") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ValueError(f"{candidate}: not an IDX file of {what} (magic {found}, expected {magic:08x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{candidate}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise ValueError(f"{candidate}: {len(raw) - header} bytes of data for shape {tuple(dims)} ({size} expected)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def stratified(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A boolean mask of `count` of `labels`' samples, each class giving count / N of its own
    (rounded by largest remainders), drawn at random by `seed`."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    counts = torch.bincount(labels).double()
    share = counts * count / len(labels)
    take = share.floor().long()
    take[torch.argsort(share - share.floor(), descending=True, stable=True)[: count - int(take.sum())]] += 1
    shuffled = labels[order]
    rank_in_class = torch.empty_like(order)
    for c in range(len(counts)):
        members = (shuffled == c).nonzero()[:, 0]
        rank_in_class[members] = torch.arange(len(members))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[order] = rank_in_class < take[shuffled]
    return mask


def load_idx(name: str, root: str | Path | None = None, seed: int = 0, pool_size: int | None = None) -> TensorDataset:
    """Fashion-MNIST or MNIST from their IDX files under `root` (for Fashion-MNIST by default
    FASHION_MNIST_ROOT): the pool and a stratified validation split of 1/12 of the training
    images (5,000 of the official 60,000) held out of them, and the official test split as "test". `pool_size`: a stratified
    subset of the pool that size (seed + 1), for machines that cannot train on all of it."""
    if root is None:
        if name != "fashion-mnist":
            raise ValueError(f"data={name!r} needs --data-root, the folder of its IDX files (nothing is downloaded)")
        root = FASHION_MNIST_ROOT
    root = Path(root)
    splits = {}
    try:
        for split, (images_file, labels_file) in IDX_FILES.items():
            images = read_idx(root / images_file, 0x803, f"{name} {split} images")
            labels = read_idx(root / labels_file, 0x801, f"{name} {split} labels")
            if len(images) != len(labels):
                raise ValueError(f"{root / images_file} holds {len(images)} images but {root / labels_file} "
                                 f"{len(labels)} labels")
            if labels.size and int(labels.max()) > 9:
                raise ValueError(f"{root / labels_file}: label {int(labels.max())} outside 0..9")
            splits[split] = (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))
    except FileNotFoundError as e:
        hint = " (install Debian's package: apt-get install dataset-fashion-mnist, or pass --data-root)" if name == "fashion-mnist" else " (pass --data-root)"
        raise FileNotFoundError(f"{e}{hint}") from None
    images, labels = splits["train"]
    val_count = round(len(labels) / 12)
    if not 0 < val_count < len(labels):
        raise ValueError(f"{root}: {len(labels)} training images are too few to hold out a validation split")
    is_val = stratified(labels, val_count, seed)
    val, pool = is_val.nonzero()[:, 0], (~is_val).nonzero()[:, 0]
    if pool_size is not None:
        if not 0 < pool_size <= len(pool):
            raise ValueError(f"pool_size={pool_size}: expected 1..{len(pool)} (the {name} pool)")
        pool = pool[stratified(labels[pool], pool_size, seed + 1)]
    data = TensorDataset(name, images[pool], labels[pool], images[val], labels[val], 10, 1 / 255, _Aug(pad=2, flip=False))
    data.test_images, data.test_labels = splits["test"]
    return data


def load_dataset(name: str, data_root: str | Path | None = None, image_size: int = 224, workers: int = 2,
                 pool_size: int | None = None) -> Dataset:
    if name in ("fashion-mnist", "mnist"):
        return load_idx(name, data_root, pool_size=pool_size)
    if pool_size is not None:
        raise ValueError(f"pool_size: only fashion-mnist and mnist draw a pool subset, not {name}")
    if name == "digits":
        return load_digits()
    if name in ("cifar10", "cifar100", "imagefolder") and data_root is None:
        raise ValueError(f"data={name!r} needs --data-root (nothing is downloaded)")
    if name == "cifar10":
        return load_cifar(data_root, 10)
    if name == "cifar100":
        return load_cifar(data_root, 100)
    if name == "imagefolder":
        return FolderDataset(Path(data_root), image_size=image_size, workers=workers)
    raise ValueError(f"data={name!r}: unknown; choose one of {', '.join(DATASETS)}")
