"""Lightning DataModules: scikit-learn digits (built in), CIFAR-10/100 and ImageNet.

Every DataModule exposes what a model must accept, before any batch is drawn:

* ``input_shape``: ``(C, H, W)`` of one image as the model receives it;
* ``num_classes``: number of labels.

Images come as float tensors. With ``normalize=True`` (classifiers) they are standardised
per channel; with ``normalize=False`` (flows) they stay in ``[0, 1]`` on a grid of
``num_bins`` levels (``x = k / (num_bins - 1)``) so that a flow can dequantize them.

Downloads happen only in ``prepare_data`` and only when ``download=True``; a missing data
directory raises :class:`FileNotFoundError` that says where the files were looked for.

The CIFAR and ImageNet DataModules also take the DeiT / Rev-ViT augmentations of the
training split, all off by default: ``randaugment`` (torchvision's ``RandAugment``),
``color_jitter`` (``ColorJitter``) and ``random_erasing`` (``RandomErasing``). The training
pipeline is crop / flip, then RandAugment and colour jitter on the PIL image, then
``ToTensor`` / ``Normalize``, then random erasing on the standardised tensor (timm's order);
validation and test images never see them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
]


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def auto_workers(limit: int) -> int:
    """DataLoader workers for a machine: one core is left to the training process, and at
    most ``limit`` workers (``auto_workers(4)`` is 1 on 2 cores, 4 on 8)."""
    return max(0, min(limit, available_cpus() - 1))


class _ImageDataModule(pl.LightningDataModule):
    """Loaders shared by the DataModules below; subclasses fill ``self.train_set`` etc."""

    num_classes: int
    input_shape: tuple[int, int, int]
    num_bins: int = 256
    #: the whole data set is a tensor in memory: DataLoader workers would only add overhead
    in_memory: bool = False
    #: at most this many workers when ``num_workers`` is ``None``
    max_auto_workers: int = 4

    def __init__(self, batch_size: int, num_workers: int | None,
                 eval_batch_size: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None (automatic), got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = auto_workers(self.max_auto_workers) if num_workers is None \
            else num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _init_augmentation(self, randaugment, randaugment_bins: int, color_jitter: float,
                           random_erasing: float) -> None:
        """Check and keep the RandAugment / colour jitter / random erasing options (after
        ``self.normalize`` is set)."""
        self.randaugment = _check_augmentation(type(self).__name__, randaugment, randaugment_bins,
                                               color_jitter, random_erasing, self.normalize)
        self.randaugment_bins = randaugment_bins
        self.color_jitter = color_jitter
        self.random_erasing = random_erasing

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class DigitsDataModule(_ImageDataModule):
    """The 1,797 8x8 handwritten digits shipped with scikit-learn (no download).

    The split is deterministic: ``test_fraction`` of the images (stratified by label, with
    ``seed``) form the test split, ``val_fraction`` of the rest the validation split.
    Pixel values are 0..16 (17 levels).

    Args:
        batch_size: training batch size.
        val_fraction: share of the non-test images held out for validation.
        test_fraction: share of all images held out for testing.
        seed: seed of the split (the split does not touch the global RNG).
        normalize: standardise with the training split's mean and std; ``False`` keeps
            ``x = v / 16`` in ``[0, 1]`` (for flows).
        augment: random shifts of up to one pixel in training.
        num_workers: DataLoader workers (the whole set is a few hundred KiB in memory: 0 is
            fastest).
        eval_batch_size: batch size of validation / test (default: ``batch_size``).
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    num_bins = 17
    in_memory = True

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        normalize: bool = True,
        augment: bool = False,
        num_workers: int = 0,
        eval_batch_size: int | None = 256,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"DigitsDataModule: {name} must lie in (0, 1), got {value}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.normalize = normalize
        self.augment = augment

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        y = torch.tensor(digits.target, dtype=torch.long)
        index = torch.arange(len(y)).numpy()
        rest, test = train_test_split(index, test_size=self.test_fraction,
                                      random_state=self.seed, stratify=y.numpy())
        train, val = train_test_split(rest, test_size=self.val_fraction,
                                      random_state=self.seed, stratify=y.numpy()[rest])
        if self.normalize:
            mean, std = x[train].mean(), x[train].std()
            x = (x - mean) / std
        self.train_set = _ShiftAugment(TensorDataset(x[train], y[train])) if self.augment \
            else TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])


class _ShiftAugment(Dataset):
    """Shift an image by -1, 0 or +1 pixel in each direction (zero fill after ``roll``)."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        dy, dx = torch.randint(-1, 2, (2,)).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        if dy:
            x[:, 0 if dy > 0 else -1, :] = x.min()
        if dx:
            x[:, :, 0 if dx > 0 else -1] = x.min()
        return x, y


def _check_augmentation(owner: str, randaugment, randaugment_bins: int, color_jitter: float,
                        random_erasing: float, normalize: bool) -> tuple[int, int] | None:
    """Check the RandAugment / colour jitter / random erasing arguments of ``owner``; returns
    ``randaugment`` as a ``(num_ops, magnitude)`` tuple, or ``None`` (off)."""
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(randaugment_bins) or randaugment_bins < 2:
        raise ValueError(f"{owner}: randaugment_bins must be an integer >= 2 (torchvision's "
                         f"default 31; 11 puts magnitudes on timm's 0..10 scale), "
                         f"got {randaugment_bins!r}")
    if randaugment is not None:
        if not isinstance(randaugment, (tuple, list)) or len(randaugment) != 2 \
                or not all(integer(v) for v in randaugment):
            raise ValueError(f"{owner}: randaugment must be [num_ops, magnitude], two integers "
                             f"(e.g. [2, 9]), or null (off); got {randaugment!r}")
        num_ops, magnitude = randaugment
        if num_ops < 1:
            raise ValueError(f"{owner}: randaugment num_ops must be >= 1, got {num_ops}; "
                             "set randaugment: null to turn RandAugment off")
        if not 0 <= magnitude < randaugment_bins:
            raise ValueError(
                f"{owner}: randaugment magnitude must lie in 0..{randaugment_bins - 1} (the "
                f"magnitude bins of RandAugment, randaugment_bins={randaugment_bins}), got "
                f"{magnitude}; choose a magnitude in that range or raise randaugment_bins")
        randaugment = (num_ops, magnitude)
    if not (math.isfinite(color_jitter) and color_jitter >= 0):
        raise ValueError(f"{owner}: color_jitter must be >= 0 (0 is off, DeiT's is 0.4), "
                         f"got {color_jitter}")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"{owner}: random_erasing is a probability and must lie in [0, 1] "
                         f"(0 is off, DeiT's is 0.25), got {random_erasing}")
    if random_erasing and not normalize:
        raise ValueError(f"{owner}: random_erasing fills with N(0, 1) noise, i.e. standardised "
                         "pixels, but normalize is false; set normalize true or random_erasing 0")
    return randaugment


def _color_steps(randaugment: tuple[int, int] | None, randaugment_bins: int,
                 color_jitter: float, mean: tuple[float, ...]) -> list:
    """The PIL-space training steps after crop / flip: RandAugment, then colour jitter
    (brightness, contrast and saturation, no hue, as timm's scalar ``color_jitter``). Pixels
    that RandAugment's geometric ops uncover are filled with the data set's mean colour (timm's
    ``img_mean``), resampled bicubically (DeiT's interpolation)."""
    from torchvision import transforms as T

    steps = []
    if randaugment is not None:
        num_ops, magnitude = randaugment
        steps.append(T.RandAugment(num_ops, magnitude, randaugment_bins,
                                   interpolation=T.InterpolationMode.BICUBIC,
                                   fill=[round(255 * m) for m in mean]))
    if color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return steps


def _erasing_steps(random_erasing: float) -> list:
    """The tensor-space training step after ``Normalize``: with probability ``random_erasing``
    one rectangle (2-33 % of the area, aspect 0.3-3.3) is replaced by N(0, 1) noise per pixel
    (timm's ``re_mode="pixel"``, ``re_count=1``)."""
    from torchvision import transforms as T

    return [T.RandomErasing(p=random_erasing, value="random")] if random_erasing else []


_CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class _CIFARDataModule(_ImageDataModule):
    """CIFAR through torchvision; see :class:`CIFAR10DataModule`."""

    input_shape = (3, 32, 32)
    folder: str

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 0,
        augment: Literal["crop_flip", "flip", "none"] = "crop_flip",
        normalize: bool = True,
        seed: int = 0,
        num_workers: int | None = None,
        eval_batch_size: int | None = None,
        randaugment: tuple[int, int] | None = None,
        randaugment_bins: int = 31,
        color_jitter: float = 0.0,
        random_erasing: float = 0.0,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.root = os.path.expanduser(root)
        self.download = download
        self.val_size = val_size
        self.augment = augment
        self.normalize = normalize
        self.seed = seed
        self._init_augmentation(randaugment, randaugment_bins, color_jitter, random_erasing)

    def _dataset_class(self):
        from torchvision import datasets

        return datasets.CIFAR10 if self.num_classes == 10 else datasets.CIFAR100

    def prepare_data(self) -> None:
        if self.download:
            cls = self._dataset_class()
            cls(self.root, train=True, download=True)
            cls(self.root, train=False, download=True)

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        steps = []
        if train and self.augment == "crop_flip":
            steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        elif train and self.augment == "flip":
            steps.append(T.RandomHorizontalFlip())
        elif self.augment not in ("crop_flip", "flip", "none"):
            raise ValueError(f"augment must be 'crop_flip', 'flip' or 'none', got {self.augment!r}")
        mean, std = _CIFAR_STATS[self.num_classes]
        if train:
            steps += _color_steps(self.randaugment, self.randaugment_bins, self.color_jitter, mean)
        steps.append(T.ToTensor())
        if self.normalize:
            steps.append(T.Normalize(mean, std))
        if train:
            steps += _erasing_steps(self.random_erasing)
        return T.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folder = Path(self.root) / self.folder
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: no CIFAR-{self.num_classes} data at {folder}; point "
                f"--data.root at the folder that contains {self.folder}/ (the python version "
                "from https://www.cs.toronto.edu/~kriz/cifar.html), or pass --data.download true"
            )
        cls = self._dataset_class()
        train = cls(self.root, train=True, transform=self._transforms(train=True))
        test = cls(self.root, train=False, transform=self._transforms(train=False))
        if self.val_size:
            if self.val_size >= len(train):
                raise ValueError(f"val_size={self.val_size} leaves no training images "
                                 f"(the training split has {len(train)})")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
            val_index, train_index = order[: self.val_size], order[self.val_size:]
            plain = cls(self.root, train=True, transform=self._transforms(train=False))
            self.train_set = Subset(train, train_index.tolist())
            self.val_set = Subset(plain, val_index.tolist())
        else:  # the papers report the test split; validate on it
            self.train_set, self.val_set = train, test
        self.test_set = test


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 through :class:`torchvision.datasets.CIFAR10` (pickled batches on disk).

    Standard augmentation in training: 4-pixel zero padding with a random 32x32 crop and a
    random horizontal flip; RandAugment, colour jitter and random erasing (the DeiT / Rev-ViT
    recipe) are off unless asked for. With ``val_size=0`` (default) validation runs on the test
    split, as the RevNet and i-RevNet papers report it; ``val_size=N`` holds out N training
    images (chosen with ``seed``) instead; neither is augmented.

    Args:
        root: folder that holds ``cifar-10-batches-py/``.
        download: download into ``root`` in ``prepare_data`` when missing (off by default).
        batch_size: training batch size.
        val_size: number of training images held out for validation (0: use the test split).
        augment: ``"crop_flip"`` (random crop and flip), ``"flip"`` (flows: no zero
            borders) or ``"none"``.
        normalize: standardise per channel; ``False`` keeps ``[0, 1]`` (for flows).
        seed: seed of the validation hold-out.
        num_workers: DataLoader workers; ``None``: one per core but one, at most 4.
        eval_batch_size: batch size of validation / test (default: ``batch_size``).
        randaugment: ``(num_ops, magnitude)`` of torchvision's ``RandAugment`` after crop /
            flip (DeiT: ``(2, 9)``), or ``None`` (default: off). ``magnitude`` is a bin in
            ``0..randaugment_bins - 1``.
        randaugment_bins: number of RandAugment magnitude levels: torchvision's 31 (default)
            or 11, which makes ``magnitude`` timm's ``m`` (each op at ``m / 10`` of its range).
        color_jitter: brightness, contrast and saturation jitter of ``ColorJitter`` (DeiT's
            ``--color-jitter`` 0.4; 0, the default, is off).
        random_erasing: probability that ``RandomErasing`` replaces one rectangle of the
            standardised image by N(0, 1) noise (DeiT: 0.25; default 0, off; needs
            ``normalize``).
    """

    num_classes = 10
    folder = "cifar-10-batches-py"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels); arguments as :class:`CIFAR10DataModule`, ``root`` holds
    ``cifar-100-python/``."""

    num_classes = 100
    folder = "cifar-100-python"


_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ImageNetDataModule(_ImageDataModule):
    """ImageNet (or any image-classification set) from an ``ImageFolder`` layout.

    ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (validation images moved
    into class folders, e.g. with the usual ``valprep.sh``). Training: random resized crop to
    ``image_size`` and horizontal flip, then RandAugment, colour jitter and random erasing when
    asked for (off by default; as :class:`CIFAR10DataModule`); evaluation: resize to
    ``resize_size``, centre crop. The test split is the validation split.

    Args:
        root: folder with ``train/`` and ``val/``.
        image_size: side of the square crops the model receives.
        resize_size: shorter side before the evaluation centre crop (default
            ``image_size * 8 // 7``, i.e. 256 for 224).
        num_classes: expected number of class folders (checked in ``setup``).
        batch_size: training batch size.
        normalize: standardise with the ImageNet mean / std.
        num_workers: DataLoader workers; ``None``: one per core but one, at most 8.
        eval_batch_size: batch size of validation / test (default: ``batch_size``).
        randaugment, randaugment_bins, color_jitter, random_erasing: training augmentations
            as in :class:`CIFAR10DataModule` (all off by default).
    """

    max_auto_workers = 8

    def __init__(
        self,
        root: str = "data/imagenet",
        image_size: int = 224,
        resize_size: int | None = None,
        num_classes: int = 1000,
        batch_size: int = 256,
        normalize: bool = True,
        num_workers: int | None = None,
        eval_batch_size: int | None = None,
        randaugment: tuple[int, int] | None = None,
        randaugment_bins: int = 31,
        color_jitter: float = 0.0,
        random_erasing: float = 0.0,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.root = os.path.expanduser(root)
        self.image_size = image_size
        self.resize_size = resize_size or image_size * 8 // 7
        self.num_classes = num_classes
        self.input_shape = (3, image_size, image_size)
        self.normalize = normalize
        self._init_augmentation(randaugment, randaugment_bins, color_jitter, random_erasing)

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        mean, std = _IMAGENET_STATS
        if train:
            steps = [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()]
            steps += _color_steps(self.randaugment, self.randaugment_bins, self.color_jitter, mean)
        else:
            steps = [T.Resize(self.resize_size), T.CenterCrop(self.image_size)]
        steps.append(T.ToTensor())
        if self.normalize:
            steps.append(T.Normalize(mean, std))
        if train:
            steps += _erasing_steps(self.random_erasing)
        return T.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision.datasets import ImageFolder

        root = Path(self.root)
        missing = [str(root / s) for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ImageNetDataModule: missing {', '.join(missing)}; --data.root must hold "
                "train/<class>/*.JPEG and val/<class>/*.JPEG (ImageFolder layout)"
            )
        train = ImageFolder(str(root / "train"), transform=self._transforms(train=True))
        val = ImageFolder(str(root / "val"), transform=self._transforms(train=False))
        if train.classes != val.classes:
            raise ValueError(f"ImageNetDataModule: train/ has {len(train.classes)} class folders, "
                             f"val/ has {len(val.classes)}; they must be the same classes")
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"ImageNetDataModule: found {len(train.classes)} class folders in {root / 'train'}"
                f" but num_classes={self.num_classes}; set --data.num_classes (and the model's)"
                f" to {len(train.classes)}"
            )
        self.train_set, self.val_set, self.test_set = train, val, val
