"""pipeline.data: datasets, splits and sharded loaders (no Ray, a few seconds)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data import (
    FASHION_MNIST_DEBIAN_DIR,
    DataError,
    DatasetInfo,
    InMemoryImages,
    build_datasets,
    ensure_fashion_mnist,
    make_loader,
)

DEBIAN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HAVE_DEBIAN = all((Path(FASHION_MNIST_DEBIAN_DIR) / f"{f}.gz").is_file() for f in DEBIAN_FILES)


def synth(**kw) -> DataConfig:
    base = dict(name="synthetic", val_size=256, synthetic_train=1024, synthetic_test=256,
                synthetic_classes=4, synthetic_size=16, synthetic_channels=3)
    base.update(kw)
    return DataConfig(**base)


def all_items(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


# ----------------------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    if not HAVE_DEBIAN:
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("fm")
    mp = pytest.MonkeyPatch()
    mp.setenv("BNNAS_FASHION_MNIST_DIR", FASHION_MNIST_DEBIAN_DIR)
    try:
        yield root, build_datasets(DataConfig(root=str(root), download=False, val_size=5000), seed=0)
    finally:
        mp.undo()


def test_fashion_mnist_from_debian_package(fashion):
    root, s = fashion
    assert s.info == DatasetInfo("fashion_mnist", 1, 10, 28)
    assert len(s.train) + len(s.val) == 60000 and len(s.val) == 5000
    assert len(s.test) == 10000
    x, y = s.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert s.test.labels.min() == 0 and s.test.labels.max() == 9
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [1000] * 10
    # Normalised: roughly zero mean, unit std over the test set.
    xt = s.test.batch(range(2000))[0]
    assert abs(xt.mean().item()) < 0.1 and 0.8 < xt.std().item() < 1.2
    # torchvision's layout: unzipped idx files under ROOT/FashionMNIST/raw, no temp files left.
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(DEBIAN_FILES)


def test_fashion_mnist_reuses_unpacked_files(fashion, monkeypatch, tmp_path):
    root, s = fashion
    monkeypatch.setenv("BNNAS_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    again = build_datasets(DataConfig(root=str(root), download=False, val_size=5000), seed=0)
    assert torch.equal(again.val.images, s.val.images)
    assert torch.equal(again.train.labels, s.train.labels)


def test_fashion_mnist_missing_names_both_ways(tmp_path, monkeypatch):
    empty = tmp_path / "debian"
    empty.mkdir()
    monkeypatch.setenv("BNNAS_FASHION_MNIST_DIR", str(empty))
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(root=str(tmp_path / "root"), download=False), seed=0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg
    assert str(tmp_path / "root") in msg


def test_fashion_mnist_failed_download_is_one_line(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirror: [Errno -3] no network")

    monkeypatch.setattr(FashionMNIST, "download", offline)
    monkeypatch.setenv("BNNAS_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(root=str(tmp_path), download=True), seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "download failed" in msg and "no network" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format, gzipped, as the Debian package ships it."""
    magic = 0x800 | array.ndim  # unsigned byte data
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    d = tmp_path / "debian"
    d.mkdir()
    rng = np.random.default_rng(0)
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
    write_idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    monkeypatch.setenv("BNNAS_FASHION_MNIST_DIR", str(d))
    return d


def test_concurrent_unpack_is_safe(tmp_path, fake_debian):
    root = tmp_path / "root"
    errors = []

    def worker():
        try:
            ensure_fashion_mnist(root, download=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(DEBIAN_FILES)  # no leftover temp files
    s = build_datasets(DataConfig(root=str(root), download=False, val_size=10), seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 20)
    assert sorted(s.test.labels.tolist()) == sorted((np.arange(20) % 10).tolist())


def test_unreadable_raw_files_give_data_error(tmp_path, fake_debian):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DEBIAN_FILES:
        (raw / f).write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        build_datasets(DataConfig(root=str(tmp_path / "root"), download=False, val_size=10), seed=0)


# ----------------------------------------------------------------------------- synthetic, splits

def test_synthetic_deterministic_per_seed_and_differs_across_seeds():
    a = build_datasets(synth(), seed=3)
    b = build_datasets(synth(), seed=3)
    c = build_datasets(synth(), seed=4)
    assert a.info == DatasetInfo("synthetic", 3, 4, 16)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (1024 - 256, 3, 16, 16)
    assert torch.bincount(a.test.labels, minlength=4).tolist() == [64] * 4


def test_synthetic_is_learnable():
    torch.manual_seed(0)
    s = build_datasets(synth(), seed=0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 4),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        for x, y in make_loader(s.train, 64, shuffle=True, seed=0, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    x, y = s.test.batch(range(len(s.test)))
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.25


def test_val_split_disjoint_and_reproducible():
    # Identify samples by their pixels: every synthetic image carries its own noise.
    def keys(ds):
        return {bytes(img.numpy()) for img in ds.images}

    a = build_datasets(synth(), seed=0)
    b = build_datasets(synth(), seed=0)
    other = build_datasets(synth(), seed=1)
    ka_train, ka_val = keys(a.train), keys(a.val)
    assert len(ka_train) == 768 and len(ka_val) == 256
    assert not (ka_train & ka_val)
    assert keys(b.val) == ka_val
    assert keys(other.val) != ka_val
    # The validation split is never augmented; synthetic training data has no augmentation.
    assert a.val.augment is False
    torch.manual_seed(0)
    first = a.train[5][0]
    torch.manual_seed(1)
    assert torch.equal(a.train[5][0], first)


def test_val_size_too_large_is_data_error():
    with pytest.raises(DataError, match="data.val_size"):
        build_datasets(synth(val_size=1024), seed=0)


def test_fraction_subsets_every_split_reproducibly():
    full = build_datasets(synth(), seed=0)
    part = build_datasets(synth(fraction=0.25), seed=0)
    again = build_datasets(synth(fraction=0.25), seed=0)
    assert (len(part.train), len(part.val), len(part.test)) == (192, 64, 64)
    assert torch.equal(part.train.images, again.train.images)
    # Subsets of the same split: the validation split does not move with the fraction.
    full_val = {bytes(i.numpy()) for i in full.val.images}
    assert {bytes(i.numpy()) for i in part.val.images} <= full_val
    tiny = build_datasets(synth(fraction=0.0001), seed=0)
    assert (len(tiny.train), len(tiny.val), len(tiny.test)) == (1, 1, 1)


def test_image_size_resizes_in_memory_datasets():
    s = build_datasets(synth(image_size=24), seed=0)
    assert s.info.image_size == 24 and s.train[0][0].shape == (3, 24, 24)


def test_augmentation_is_a_padded_crop_possibly_flipped():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (8, 1, 6, 6), dtype=torch.uint8, generator=g)
    ds = InMemoryImages(imgs, torch.zeros(8, dtype=torch.int64), mean=(0.0,), std=(1 / 255,),
                        augment=True, crop_padding=2, flip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        out, _ = ds.batch(range(8))  # std 1/255, mean 0: values are the raw pixels
        for i in range(8):
            padded = F.pad(imgs[i].float(), (2, 2, 2, 2))
            matches = [
                (dy, dx, fl)
                for dy in range(5) for dx in range(5) for fl in (False, True)
                if torch.equal(out[i], (lambda c: c.flip(-1) if fl else c)(padded[:, dy:dy + 6, dx:dx + 6]))
            ]
            assert matches, "augmented image is not a crop of the padded original"
            seen.update(matches)
    assert any(fl for _, _, fl in seen) and any(not fl for _, _, fl in seen)
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10


# ----------------------------------------------------------------------------- loaders

def loader_labels_and_keys(ds, **kw):
    order = []
    for x, y in make_loader(ds, 32, **kw):
        order += [bytes(img.numpy()) for img in x]
    return order


def test_loader_shards_disjointly_and_covers():
    s = build_datasets(synth(), seed=0)
    ds = s.train  # 768 samples
    r0 = loader_labels_and_keys(ds, shuffle=True, seed=5, epoch=2, rank=0, world_size=2)
    r1 = loader_labels_and_keys(ds, shuffle=True, seed=5, epoch=2, rank=1, world_size=2)
    everything = {bytes(x.numpy()) for x in all_items(ds)[0]}
    assert len(r0) == len(r1) == 384
    assert not (set(r0) & set(r1))
    assert set(r0) | set(r1) == everything


def test_loader_odd_size_pads_equally_or_drops():
    ds = build_datasets(synth(val_size=255), seed=0).train  # 769 samples
    n0 = len(make_loader(ds, 1, shuffle=True, rank=0, world_size=2).sampler)
    n1 = len(list(make_loader(ds, 1, shuffle=True, rank=1, world_size=2)))
    assert n0 == n1 == 385  # one sample repeated so DDP ranks take the same number of steps
    d0 = list(make_loader(ds, 1, shuffle=True, rank=0, world_size=2, drop_last=True).sampler)
    d1 = list(make_loader(ds, 1, shuffle=True, rank=1, world_size=2, drop_last=True).sampler)
    assert len(d0) == len(d1) == 384 and not (set(d0) & set(d1))
    with pytest.raises(ValueError):
        make_loader(ds, 1, shuffle=True, rank=2, world_size=2)


def test_loader_order_reproducible_per_seed_and_epoch():
    ds = build_datasets(synth(), seed=0).train

    def order(**kw):
        return list(make_loader(ds, 32, shuffle=True, **kw).sampler)

    assert order(seed=1, epoch=3) == order(seed=1, epoch=3)
    assert order(seed=1, epoch=3) != order(seed=1, epoch=4)
    assert order(seed=1, epoch=0) != order(seed=0, epoch=1)  # not seed + epoch
    assert list(make_loader(ds, 32, shuffle=False).sampler) == list(range(len(ds)))
    # Batches themselves repeat, not only indices.
    a = loader_labels_and_keys(ds, shuffle=True, seed=1, epoch=3)
    b = loader_labels_and_keys(ds, shuffle=True, seed=1, epoch=3)
    assert a == b


def test_loader_with_worker_processes():
    ds = build_datasets(synth(), seed=0).test
    batches = list(make_loader(ds, 100, shuffle=False, num_workers=2))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [100, 100, 56]
    assert torch.equal(y, ds.labels) and torch.allclose(x, ds.batch(range(len(ds)))[0])


# ----------------------------------------------------------------------------- CIFAR-10

def write_cifar(root: Path, per_batch: int = 10, n_test: int = 20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [(j + i) % 10 for j in range(per_batch)]}, f)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": [j % 10 for j in range(n_test)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)
    return test


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as cifar

    # Our small files cannot match CIFAR-10's checksums; only check they exist.
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_loader_on_small_files(tmp_path, no_md5):
    test_raw = write_cifar(tmp_path)
    s = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False, val_size=10,
                                   augment=True), seed=0)
    assert s.info == DatasetInfo("cifar10", 3, 10, 32)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert s.train.crop_padding == 4 and s.train.augment and not s.val.augment
    # CHW layout: pixel (c, h, w) of the test set is byte c*1024 + h*32 + w of the pickle.
    assert torch.equal(s.test.images[3], torch.from_numpy(test_raw[3].reshape(3, 32, 32)))
    x, y = next(iter(make_loader(s.train, 16, shuffle=True)))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    assert s.test.labels.tolist() == [j % 10 for j in range(20)]


def test_cifar10_missing_is_data_error(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(CIFAR10, "download", offline)
    for download in (False, True):
        with pytest.raises(DataError) as err:
            build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=download), seed=0)
        msg = str(err.value)
        assert "CIFAR-10 not found" in msg and "data.download=true" in msg and "\n" not in msg
    assert "name resolution" in msg


# ----------------------------------------------------------------------------- imagefolder

def write_tree(root: Path, split: str, classes: dict[str, int], color_of) -> None:
    from PIL import Image

    for name, count in classes.items():
        d = root / split / name
        d.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (20, 12), color_of(name)).save(d / f"{i}.png")


def test_imagefolder(tmp_path):
    colors = {"ant": (250, 0, 0), "bee": (0, 250, 0), "cat": (0, 0, 250)}
    write_tree(tmp_path, "train", {"ant": 4, "bee": 4, "cat": 4}, colors.get)
    write_tree(tmp_path, "val", {"bee": 2, "cat": 2}, colors.get)  # a class missing from test
    s = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, val_size=3), seed=0)
    assert s.info == DatasetInfo("imagefolder", 3, 3, 8)
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 4)
    x, y = s.test[0]
    assert type(x) is torch.Tensor and x.shape == (3, 8, 8) and x.dtype == torch.float32
    # Test labels use train's numbering (ant=0, bee=1, cat=2) although val/ lacks ant.
    assert sorted(s.test.targets) == [1, 1, 2, 2]
    # A green image is brightest in channel 1 after normalisation, so labels match content.
    for i in range(len(s.test)):
        x, y = s.test[i]
        assert x.mean(dim=(1, 2)).argmax().item() == y
    xb, yb = next(iter(make_loader(s.train, 9, shuffle=True)))
    assert xb.shape == (9, 3, 8, 8) and sorted(yb.tolist()) == sorted(s.train.targets)


def test_imagefolder_bad_layout(tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, val_size=1)
    with pytest.raises(DataError, match="train"):
        build_datasets(cfg, seed=0)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="imagefolder"):
        build_datasets(cfg, seed=0)  # no class folders
