"""DataModules: digits split, CIFAR pickled batches and an ImageFolder of JPEGs, loaded by the
real torchvision loaders from small files written here in the on-disk formats."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from revtrain.lightning import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageNetDataModule,
)

# --- digits ---------------------------------------------------------------------------------


def _all(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_digits_split_is_deterministic_disjoint_and_stratified():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup("fit")
    b.setup("fit")
    sizes = [len(a.train_set), len(a.val_set), len(a.test_set)]
    assert sum(sizes) == 1797 and min(sizes) > 100
    for split in ("train_set", "val_set", "test_set"):
        xa, ya = getattr(a, split).tensors
        xb, yb = getattr(b, split).tensors
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # every class is in the test split, in proportion (stratified)
    counts = torch.bincount(a.test_set.tensors[1], minlength=10)
    assert counts.min() >= 30
    # train and test share no image (digits has a few exact duplicates, so compare rows)
    train_rows = {tuple(r.tolist()) for r in a.train_set.tensors[0].flatten(1)}
    shared = sum(tuple(r.tolist()) in train_rows for r in a.test_set.tensors[0].flatten(1))
    assert shared <= 3
    c = DigitsDataModule(seed=1)
    c.setup("fit")
    assert not torch.equal(c.test_set.tensors[1], a.test_set.tensors[1])


def test_digits_unnormalized_is_on_the_17_level_grid():
    dm = DigitsDataModule(normalize=False, batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, *dm.input_shape) and dm.num_bins == 17
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x * 16, torch.round(x * 16))
    normalized = DigitsDataModule()
    normalized.setup("fit")
    xt = normalized.train_set.tensors[0]
    assert abs(float(xt.mean())) < 1e-4 and abs(float(xt.std()) - 1) < 1e-3


def test_digits_rejects_bad_fractions():
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=1.5)


# --- CIFAR: the python version's pickled batches ------------------------------------------


def _write_cifar(root, classes: int, per_batch: int = 6, seed: int = 0):
    """Write CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) files in
    the layout of the real archives: pickled dicts with a ``data`` array (N, 3072) uint8 in
    CHW order and ``labels`` (10) / ``fine_labels`` (100)."""
    rng = np.random.default_rng(seed)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
        key = "labels"
    else:
        folder = root / "cifar-100-python"
        names = ["train", "test"]
        meta_name, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
        key = "fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels}, f)
        written[name] = (data, labels)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return written


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision compares the md5 of each file (batches and meta) with the real archive's; a
    small fake cannot match, so the check is reduced to "the file exists" (torchvision's own
    dataset tests patch these checks too). Loading still goes through CIFAR10.__init__, which
    unpickles the batches and the meta file."""
    import os

    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reads_pickled_batches(tmp_path, skip_md5, classes):
    written = _write_cifar(tmp_path, classes)
    cls = CIFAR10DataModule if classes == 10 else CIFAR100DataModule
    dm = cls(root=str(tmp_path), batch_size=4, augment="none", normalize=False, num_workers=0)
    dm.setup("fit")
    train_names = [n for n in written if n not in ("test_batch", "test")]
    assert len(dm.train_set) == 6 * len(train_names) and len(dm.test_set) == 6
    assert dm.val_set is dm.test_set  # val_size=0: validate on the test split
    data, labels = written["test_batch" if classes == 10 else "test"]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and dm.input_shape == (3, 32, 32)
    expected = torch.from_numpy(data[:4].reshape(4, 3, 32, 32)).float() / 255
    assert torch.allclose(x, expected) and y.tolist() == labels[:4]


def test_cifar_augmentation_and_holdout(tmp_path, skip_md5):
    _write_cifar(tmp_path, 10)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=30, val_size=10, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    torch.manual_seed(0)
    x1, _ = next(iter(dm.train_dataloader()))
    val, _ = next(iter(dm.val_dataloader()))
    assert x1.shape == (20, 3, 32, 32) and val.shape == (10, 3, 32, 32)
    # normalised: roughly zero-mean per channel for uniform random pixels
    assert x1.mean().abs() < 0.2
    # validation images are not augmented: the same every time
    assert torch.equal(val, next(iter(dm.val_dataloader()))[0])


def test_cifar_fake_fails_the_real_integrity_check(tmp_path):
    """Without the patch torchvision rejects the fake: the md5 check is what the fixture skips."""
    _write_cifar(tmp_path, 10)
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(RuntimeError, match="corrupted"):
        dm.setup("fit")


def test_cifar_missing_folder_says_where_and_what_to_do(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download"):
        dm.setup("fit")
    dm.prepare_data()  # download=False: prepare_data must not touch the network


# --- ImageNet: an ImageFolder of JPEG files -----------------------------------------------


def _write_image_folder(root, classes=("ant", "bee", "cat"), per_class=3, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG", quality=90)


def test_imagefolder_jpegs(tmp_path):
    _write_image_folder(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), image_size=16, num_classes=3, batch_size=4,
                            num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 9 and dm.test_set is dm.val_set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and dm.input_shape == (3, 16, 16)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 16, 16) and set(yv.tolist()) <= {0, 1, 2}
    assert dm.resize_size == 18  # 16 * 8 // 7


def test_imagefolder_errors(tmp_path):
    _write_image_folder(tmp_path)
    with pytest.raises(ValueError, match="found 3 class folders"):
        ImageNetDataModule(root=str(tmp_path), image_size=16, num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="val"):
        ImageNetDataModule(root=str(tmp_path / "train"), num_workers=0).setup("fit")


# --- DataLoader workers -----------------------------------------------------------------------


def test_workers_fit_the_machine(monkeypatch):
    """Issue 13: 4 or 8 workers on 2 cores made torch and Lightning warn in every run. The
    default is one worker per core but one, capped per data set; digits, in memory, uses none."""
    from revtrain.lightning import data

    for cores, cifar, imagenet in [(2, 1, 1), (8, 4, 7), (64, 4, 8), (1, 0, 0)]:
        monkeypatch.setattr(data, "available_cpus", lambda cores=cores: cores)
        assert CIFAR10DataModule().num_workers == cifar
        assert ImageNetDataModule().num_workers == imagenet
    assert CIFAR10DataModule(num_workers=3).num_workers == 3
    assert DigitsDataModule().num_workers == 0 and DigitsDataModule.in_memory
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        CIFAR10DataModule(num_workers=-1)
