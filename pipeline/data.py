"""Datasets and loaders for every stage.

``build_datasets(cfg.data, seed=cfg.seed)`` returns train / val / test splits and a
``DatasetInfo`` (channels, classes, image size) that the search space needs to build its
stem and head. ``make_loader`` turns a split into a DataLoader whose order depends only
on (seed, epoch) and which hands each data-parallel rank its own shard.

Datasets:

- ``fashion_mnist`` (default): offline machines read the Debian package
  ``dataset-fashion-mnist``; online ones may use torchvision's download.
- ``cifar10``: torchvision's files (downloaded when allowed).
- ``imagefolder``: ``root/train/<class>/*`` plus ``root/test`` (or ``root/val``).
- ``synthetic``: seeded, learnable images for tests and quick runs.

The validation split is always held out of the *training* set (a seeded permutation), so
search and retraining never look at the test split; the test split is only for the final
numbers.

Small datasets are decoded once into one uint8 tensor and augmented a whole batch at a
time: per-sample torchvision transforms cost ~160 us per image on a 2-core laptop, about
9 s per Fashion-MNIST epoch, longer than a BN-only supernet epoch itself.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import DataConfig
from pipeline.seeding import torch_generator
from pipeline.util import flock, one_line

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A data problem, phrased as one line that says what to do."""

    def __init__(self, message: str):
        # Callers embed messages of torchvision exceptions, which may span lines.
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    image_size: int


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: DatasetInfo


# ----------------------------------------------------------------------------- in-memory images

class InMemoryImages(Dataset):
    """uint8 images [N, C, H, W] and int64 labels [N], normalised (and augmented) on read.

    Items are ``(float32 tensor [C, H, W], int label)`` like torchvision datasets.
    ``__getitems__`` (used by DataLoader for a whole batch) augments all images of the
    batch in one vectorised gather: random crop with zero padding (``RandomCrop(size,
    padding)``) and horizontal flip, drawn from torch's global RNG, which DataLoader
    workers seed from the loader's generator.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N] with N={images.shape[0]}, got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        # (x / 255 - mean) / std folded into one multiply-add.
        c = images.shape[1]
        std_t = torch.tensor(self.std).view(1, c, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(self.mean).view(1, c, 1, 1) / std_t

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def select(self, indices: Sequence[int] | torch.Tensor, *, augment: bool) -> "InMemoryImages":
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return InMemoryImages(
            self.images.index_select(0, idx), self.labels.index_select(0, idx), mean=self.mean, std=self.std,
            augment=augment, crop_padding=self.crop_padding, flip=self.flip,
        )

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 [B, C, H, W], labels int64 [B]) for these indices."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images.index_select(0, idx)  # much faster than images[idx] here
        if self.augment and (self.crop_padding or self.flip):
            x = _random_crop_flip(x, self.crop_padding, self.flip)
        return x.float() * self._scale + self._shift, self.labels.index_select(0, idx)

    def __getitem__(self, index: int):
        x, y = self.batch([int(index)])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> list:
        # A list of samples keeps DataLoader's default collate (and any other) working.
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.tolist()))


def _random_crop_flip(x: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Per-sample RandomCrop(size, padding) + RandomHorizontalFlip as one gather.

    A flat gather is ~3x faster than 4-D advanced indexing on a 2-core CPU.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h).expand(b, h)
    cols = torch.arange(w).expand(b, w)
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        rows = rows + torch.randint(0, 2 * padding + 1, (b, 1))
        cols = cols + torch.randint(0, 2 * padding + 1, (b, 1))
    if flip:
        # Reading the crop's columns backwards is the flip.
        flipped = torch.rand(b) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    hp, wp = x.shape[-2:]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, hp * wp).gather(2, flat).view(b, c, h, w)


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """The whole uint8 tensor resized once (cheaper than resizing every epoch)."""
    if size <= 0 or (images.shape[-2], images.shape[-1]) == (size, size):
        return images
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, [size, size], antialias=True)


# ----------------------------------------------------------------------------- files

def _gunzip_atomic(src: Path, dst: Path) -> None:
    """Decompress src to dst so that readers only ever see a complete file.

    Each caller writes its own temporary file and renames it over dst; when several Ray
    workers race, the last rename wins and every version is the same, complete file.
    """
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # dataset-fashion-mnist package
FASHION_MNIST_DIR_ENV = "BNNAS_FASHION_MNIST_DIR"
_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = (0.2860,), (0.3530,)


def fashion_mnist_debian_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DEBIAN_DIR).expanduser()


def ensure_fashion_mnist(root: Path, download: bool) -> Path:
    """Make ROOT/FashionMNIST/raw hold the four idx files; return that folder.

    Order: files already there; else the Debian package's .gz files (no network, so
    offline machines never wait on a download); else torchvision's download when
    allowed; else a DataError naming both ways to get the data.
    """
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in _FASHION_MNIST_FILES):
        return raw

    debian = fashion_mnist_debian_dir()
    if all((debian / f"{f}.gz").is_file() for f in _FASHION_MNIST_FILES):
        try:
            raw.mkdir(parents=True, exist_ok=True)
            for f in _FASHION_MNIST_FILES:
                if not (raw / f).is_file():
                    _gunzip_atomic(debian / f"{f}.gz", raw / f)
        except (OSError, EOFError, zlib.error) as e:  # incl. gzip.BadGzipFile
            raise DataError(
                f"could not unpack Fashion-MNIST from {debian} into {raw}: {one_line(e, 160)}; "
                f"make {root} writable (or set data.root) and check the package's files"
            ) from None
        log.info("Fashion-MNIST unpacked from %s into %s", debian, raw)
        return raw

    if not download:
        why = "download is off (data.download=false)"
    else:
        try:
            from torchvision.datasets import FashionMNIST

            with flock(root / ".fashion_mnist.lock"):
                FashionMNIST(str(root), train=True, download=True)
        except Exception as e:  # offline: URLError, socket errors, torchvision's RuntimeError
            why = f"download failed ({one_line(e, 160)})"
        else:
            if all((raw / f).is_file() for f in _FASHION_MNIST_FILES):
                return raw
            why = "the download did not produce the files"
    raise DataError(
        f"Fashion-MNIST not found under {raw} nor in {debian}, and {why}; install the Debian "
        f"package (apt-get install dataset-fashion-mnist) or run on a machine with internet "
        f"(data.download=true)"
    )


def _fashion_mnist(cfg: DataConfig, seed: int):
    from torchvision.datasets import FashionMNIST

    root = Path(cfg.root).expanduser()
    raw = ensure_fashion_mnist(root, cfg.download)
    try:
        train = FashionMNIST(str(root), train=True, download=False)
        test = FashionMNIST(str(root), train=False, download=False)
    except Exception as e:
        raise DataError(f"Fashion-MNIST files under {raw} are unreadable ({one_line(e, 160)}); delete {raw} and rerun") from None
    size = cfg.image_size or 28
    common = dict(mean=_FASHION_MNIST_MEAN, std=_FASHION_MNIST_STD, crop_padding=2, flip=True)
    source = InMemoryImages(_resized(train.data.unsqueeze(1), size), train.targets, **common)
    test_ds = InMemoryImages(_resized(test.data.unsqueeze(1), size), test.targets, **common)
    return source, test_ds, DatasetInfo("fashion_mnist", 1, 10, size)


# ----------------------------------------------------------------------------- CIFAR-10

_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cifar10(cfg: DataConfig, seed: int):
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root).expanduser()
    folder = root / CIFAR10.base_folder

    def load():
        return CIFAR10(str(root), train=True), CIFAR10(str(root), train=False)

    try:
        train, test = load()
    except Exception as first:  # torchvision says "not found or corrupted" for both
        if not cfg.download:
            raise DataError(
                f"CIFAR-10 not found under {folder} ({one_line(first, 80)}) and download is off "
                f"(data.download=false); put the extracted cifar-10-python.tar.gz there or run on a "
                f"machine with internet (data.download=true)"
            ) from None
        try:
            with flock(root / ".cifar10.lock"):
                CIFAR10(str(root), train=True, download=True)
            train, test = load()
        except Exception as e:
            raise DataError(
                f"CIFAR-10 not found under {folder} and download failed ({one_line(e, 160)}); put the "
                f"extracted cifar-10-python.tar.gz there or run on a machine with internet "
                f"(data.download=true)"
            ) from None

    def tensors(ds):
        # torchvision keeps HWC numpy; the model wants CHW.
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    size = cfg.image_size or 32
    common = dict(mean=_CIFAR_MEAN, std=_CIFAR_STD, crop_padding=4, flip=True)
    (xtr, ytr), (xte, yte) = tensors(train), tensors(test)
    source = InMemoryImages(_resized(xtr, size), ytr, **common)
    test_ds = InMemoryImages(_resized(xte, size), yte, **common)
    return source, test_ds, DatasetInfo("cifar10", 3, len(train.classes), size)


# ----------------------------------------------------------------------------- image folder

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FolderImages(Dataset):
    """(path, label) samples decoded per item with torchvision v2 transforms.

    Unlike the small datasets these do not fit in memory, so decoding happens per sample
    (use ``data.num_workers`` to parallelise).
    """

    def __init__(self, samples: list[tuple[str, int]], loader: Callable, train_tf, eval_tf, augment: bool):
        self.samples, self.loader = samples, loader
        self.train_tf, self.eval_tf, self.augment = train_tf, eval_tf, augment

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def select(self, indices: Sequence[int] | torch.Tensor, *, augment: bool) -> "FolderImages":
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        return FolderImages([self.samples[i] for i in idx], self.loader, self.train_tf, self.eval_tf, augment)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        tf = self.train_tf if self.augment else self.eval_tf
        return tf(self.loader(path)), label


def _imagefolder(cfg: DataConfig, seed: int):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    # test/ wins over val/; val/ is ImageNet's reported split, our val comes from train/.
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"imagefolder needs {train_dir}/<class>/<images> and {root}/test (or val)/<class>/<images>; "
            f"point data.root at a folder with that layout"
        )
    try:
        train = ImageFolder(str(train_dir))
        test = ImageFolder(str(test_dir))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"imagefolder at {root}: {one_line(e, 160)}; each class needs a folder with images") from None
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise DataError(f"imagefolder: classes {unknown[:5]} in {test_dir} are not in {train_dir}; use the same class folders")
    # ImageFolder numbers classes per folder; a test set lacking a class must use train's numbers.
    test_samples = [(p, train.class_to_idx[test.classes[y]]) for p, y in test.samples]

    size = cfg.image_size
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(_IMAGENET_MEAN, _IMAGENET_STD), v2.ToPureTensor()]
    train_tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *finish])
    # The usual 0.875 centre crop of ImageNet evaluation.
    eval_tf = v2.Compose([v2.ToImage(), v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size), *finish])
    source = FolderImages(list(train.samples), train.loader, train_tf, eval_tf, augment=False)
    test_ds = FolderImages(test_samples, train.loader, train_tf, eval_tf, augment=False)
    return source, test_ds, DatasetInfo("imagefolder", 3, len(train.classes), size)


# ----------------------------------------------------------------------------- synthetic

def _synthetic(cfg: DataConfig, seed: int):
    """Each class is a fixed smooth random pattern; samples are shifted, noisy copies.

    Low-frequency patterns (a 4x4 grid upsampled) are what convolutions pick up quickly;
    the random shift and the pixel noise keep it from being a lookup, so architectures
    still differ in accuracy.
    """
    k, c, s = cfg.synthetic_classes, cfg.synthetic_channels, cfg.synthetic_size
    g = torch_generator(seed, "synthetic", "patterns")
    coarse = torch.randn(k, c, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False)
    patterns = patterns / patterns.std(dim=(1, 2, 3), keepdim=True)
    max_shift = max(1, s // 8)

    def make(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch_generator(seed, "synthetic", split)
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        # A circular shift per sample, as one gather.
        dy = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=g)
        dx = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=g)
        rows = (torch.arange(s) + dy) % s
        cols = (torch.arange(s) + dx) % s
        x = patterns[labels[:, None, None, None], torch.arange(c)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        # Noise at twice the pattern's scale: a small CNN reaches ~70-90% test accuracy in
        # two epochs (chance 1/classes) and ~97% later, so retrained networks still differ.
        x = x + 2.0 * torch.randn(n, c, s, s, generator=g)
        return (128 + 25 * x).round().clamp(0, 255).to(torch.uint8), labels

    xtr, ytr = make(cfg.synthetic_train, "train")
    xte, yte = make(cfg.synthetic_test, "test")
    size = cfg.image_size or s
    xtr, xte = _resized(xtr, size), _resized(xte, size)
    as_float = xtr.float() / 255
    mean = as_float.mean(dim=(0, 2, 3)).tolist()
    std = as_float.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    source = InMemoryImages(xtr, ytr, mean=mean, std=std)
    test_ds = InMemoryImages(xte, yte, mean=mean, std=std)
    return source, test_ds, DatasetInfo("synthetic", c, k, size)


# ----------------------------------------------------------------------------- splits

_BUILDERS = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def _fraction_of(indices: torch.Tensor, fraction: float, seed: int, split: str) -> torch.Tensor:
    if fraction >= 1.0:
        return indices
    keep = max(1, round(len(indices) * fraction))
    pick = torch.randperm(len(indices), generator=torch_generator(seed, "fraction", split))[:keep]
    return indices[pick.sort().values]


def build_datasets(cfg: DataConfig, *, seed: int) -> Splits:
    """Train (augmented when cfg.augment), val (held out of train) and test splits."""
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise DataError(f"unknown dataset {cfg.name!r}; use one of {', '.join(_BUILDERS)}")
    source, test_source, info = builder(cfg, seed)

    n = len(source)
    if cfg.val_size >= n:
        raise DataError(
            f"data.val_size={cfg.val_size} leaves no training data: {cfg.name} has {n} training "
            f"samples; set data.val_size below {n} (e.g. --set data.val_size={max(1, n // 10)})"
        )
    perm = torch.randperm(n, generator=torch_generator(seed, "val_split"))
    # Sorted so that splits read memory in order; the loader shuffles anyway.
    val_idx = perm[: cfg.val_size].sort().values
    train_idx = perm[cfg.val_size:].sort().values
    test_idx = torch.arange(len(test_source))

    train_idx = _fraction_of(train_idx, cfg.fraction, seed, "train")
    val_idx = _fraction_of(val_idx, cfg.fraction, seed, "val")
    test_idx = _fraction_of(test_idx, cfg.fraction, seed, "test")

    return Splits(
        train=source.select(train_idx, augment=cfg.augment),
        val=source.select(val_idx, augment=False),
        test=test_source.select(test_idx, augment=False),
        info=info,
    )


# ----------------------------------------------------------------------------- loaders

class ShardSampler(Sampler[int]):
    """This rank's share of one (seed, epoch) permutation, as DistributedSampler does.

    All ranks draw the same permutation and take every world_size-th index from their
    rank on, so the shards are disjoint. Without drop_last the permutation is padded by
    repeating its head so that every rank gets the same number of samples (DDP ranks
    must run the same number of steps); with drop_last the tail is cut instead.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int, drop_last: bool):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch_generator(self.seed, "loader", self.epoch)).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        if total > len(order) and order:
            order = (order * math.ceil(total / len(order)))[:total]
        order = order[:total]
        return iter(order[self.rank:total:self.world_size])

    def __len__(self) -> int:
        return self.per_rank


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over this rank's shard; the same (seed, epoch) gives the same batches.

    Build a new loader per epoch (cheap) instead of calling set_epoch. Augmentation
    draws from torch's global RNG: in worker processes that RNG is seeded from the
    loader's generator (fixed by seed, epoch, rank); with num_workers=0 it is the
    caller's, so seed torch in the training loop for repeatable augmentation.
    """
    sampler = ShardSampler(
        len(dataset), shuffle=shuffle, seed=seed, epoch=epoch,
        rank=rank, world_size=world_size, drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch_generator(seed, "workers", epoch, rank),
    )
