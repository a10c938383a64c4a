"""RandAugment, colour jitter and random erasing of the CIFAR and ImageNet DataModules (the
DeiT / Rev-ViT recipe): off by default, and then the previous pipeline to the bit; on, they
change training images only, reproducibly under a seed; bad values fail at construction; the
Rev-ViT configs set them. Data: small files in the real on-disk formats, written by the helpers
of tests/test_data.py and read by torchvision's loaders."""

from __future__ import annotations

import pytest
import test_data
import torch
from PIL import Image
from test_cli import EXPERIMENTS, _args, _printed
from torchvision import transforms as T

from revtrain.cli import cli
from revtrain.lightning import CIFAR10DataModule, ImageNetDataModule
from revtrain.lightning.data import _CIFAR_STATS, _IMAGENET_STATS

skip_md5 = test_data.skip_md5  # fixture: torchvision's md5 check reduced to "the file exists"

ALL_ON = {"randaugment": (2, 9), "color_jitter": 0.4, "random_erasing": 0.25}
EACH = [{"randaugment": (2, 9)}, {"randaugment": (2, 9), "randaugment_bins": 11},
        {"color_jitter": 0.4}, {"random_erasing": 0.25}, ALL_ON]


def _cifar(root, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(root=str(root), batch_size=8, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def _imagenet(root, **kwargs) -> ImageNetDataModule:
    dm = ImageNetDataModule(root=str(root), image_size=16, num_classes=3, batch_size=4,
                            num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def _draw(dataset, seed: int) -> torch.Tensor:
    """Every image of ``dataset`` once, in order, after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.fixture
def cifar_root(tmp_path, skip_md5):
    test_data._write_cifar(tmp_path, 10)  # 5 x 6 training images, 6 test images
    return tmp_path


@pytest.fixture
def imagenet_root(tmp_path):
    test_data._write_image_folder(tmp_path)  # 3 classes x 3 JPEGs in train/ and val/
    return tmp_path


# --- off: the previous pipeline, to the bit ---------------------------------------------------


def test_cifar_defaults_are_the_previous_pipeline_to_the_bit(cifar_root):
    """The pipeline before these options, written out; same seed, same tensors, for the
    defaults and for the options given explicitly as off."""
    previous = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(*_CIFAR_STATS[10])])
    for dm in (_cifar(cifar_root), _cifar(cifar_root, randaugment=None, color_jitter=0.0,
                                          random_erasing=0.0, randaugment_bins=11)):
        assert repr(dm.train_set.transform) == repr(previous)
        pil = [Image.fromarray(a) for a in dm.train_set.data]
        torch.manual_seed(3)
        expected = torch.stack([previous(im) for im in pil])
        assert torch.equal(_draw(dm.train_set, 3), expected)
    # the comparison can fail: one option on and the same seed gives other tensors
    assert not torch.equal(_draw(_cifar(cifar_root, color_jitter=0.4).train_set, 3), expected)


def test_imagenet_defaults_are_the_previous_pipeline_to_the_bit(imagenet_root):
    previous = T.Compose([T.RandomResizedCrop(16), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(*_IMAGENET_STATS)])
    dm = _imagenet(imagenet_root)
    assert repr(dm.train_set.transform) == repr(previous)
    torch.manual_seed(5)
    expected = torch.stack([previous(dm.train_set.loader(path))
                            for path, _ in dm.train_set.samples])
    assert torch.equal(_draw(dm.train_set, 5), expected)
    assert not torch.equal(_draw(_imagenet(imagenet_root, **ALL_ON).train_set, 5), expected)


# --- on: where they sit, what they change ----------------------------------------------------


def test_order_pil_ops_before_to_tensor_erasing_after_normalize(cifar_root, imagenet_root):
    cifar = _cifar(cifar_root, **ALL_ON)._transforms(train=True).transforms
    assert [type(t) for t in cifar] == [T.RandomCrop, T.RandomHorizontalFlip, T.RandAugment,
                                        T.ColorJitter, T.ToTensor, T.Normalize, T.RandomErasing]
    imagenet = _imagenet(imagenet_root, **ALL_ON)._transforms(train=True).transforms
    assert [type(t) for t in imagenet] == [T.RandomResizedCrop, T.RandomHorizontalFlip,
                                           T.RandAugment, T.ColorJitter, T.ToTensor,
                                           T.Normalize, T.RandomErasing]
    randaugment, jitter, erasing = cifar[2], cifar[3], cifar[6]
    assert (randaugment.num_ops, randaugment.magnitude) == (2, 9)
    assert randaugment.num_magnitude_bins == 31  # torchvision's default
    assert randaugment.fill == [round(255 * m) for m in _CIFAR_STATS[10][0]]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
    assert jitter.hue is None
    assert erasing.p == 0.25 and erasing.value == "random"


@pytest.mark.parametrize("options", EACH, ids=lambda o: ",".join(o))
def test_cifar_options_change_train_images_reproducibly(cifar_root, options):
    """augment="none" leaves the plain images; each option changes them; the same seed gives
    the same images again, another seed other images."""
    plain = _draw(_cifar(cifar_root, augment="none").train_set, 0)
    train = _cifar(cifar_root, augment="none", **options).train_set
    a, b, c = _draw(train, 0), _draw(train, 0), _draw(train, 1)
    assert a.shape == plain.shape == (30, 3, 32, 32)
    changed = (a != plain).flatten(1).any(1)
    assert changed.sum() >= (5 if options == {"random_erasing": 0.25} else 25), changed
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_imagenet_options_change_train_images_reproducibly(imagenet_root):
    train = _imagenet(imagenet_root, **ALL_ON).train_set
    plain = _imagenet(imagenet_root).train_set
    a, b, c = _draw(train, 0), _draw(train, 0), _draw(train, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, _draw(plain, 0))


def test_random_erasing_replaces_one_rectangle_by_standard_noise(cifar_root):
    """p=1: in every image one axis-aligned rectangle (all channels) differs from the plain
    standardised image and nothing else does; inside it is N(0, 1) noise, i.e. drawn after
    ``Normalize`` (before it, the noise would come out with std ~4)."""
    plain = _draw(_cifar(cifar_root, augment="none").train_set, 0)
    erased = _draw(_cifar(cifar_root, augment="none", random_erasing=1.0).train_set, 0)
    noise = []
    for x, x0 in zip(erased, plain, strict=True):
        mask = (x != x0).any(0)  # (H, W)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) and len(cols), "an image was not erased"
        box = torch.zeros_like(mask)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(mask, box)  # one filled rectangle, nothing changed outside it
        assert 0.02 * 1024 - 1 <= int(box.sum()) <= 0.33 * 1024 + 1  # torchvision's scale
        assert (x[:, box] != x0[:, box]).all()  # every channel replaced
        noise.append(x[:, box].flatten())
    noise = torch.cat(noise)
    assert noise.numel() > 3000
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1


# --- validation and test: untouched -----------------------------------------------------------


def test_cifar_validation_and_test_are_untouched(cifar_root):
    plain = _cifar(cifar_root)
    augmented = _cifar(cifar_root, **ALL_ON, randaugment_bins=11)
    for split in ("val_set", "test_set"):
        assert torch.equal(_draw(getattr(augmented, split), 0), _draw(getattr(plain, split), 1))
    data = torch.from_numpy(plain.test_set.data).permute(0, 3, 1, 2).float() / 255  # (N, C, H, W)
    expected = T.Normalize(*_CIFAR_STATS[10])(data)
    assert torch.allclose(_draw(augmented.test_set, 2), expected, atol=1e-6)
    # the training hold-out (val_size > 0) is read without augmentation too
    plain = _cifar(cifar_root, val_size=10)
    augmented = _cifar(cifar_root, val_size=10, **ALL_ON)
    assert augmented.val_set.indices == plain.val_set.indices
    assert torch.equal(_draw(augmented.val_set, 0), _draw(plain.val_set, 1))
    assert repr(augmented.val_set.dataset.transform) == repr(plain.test_set.transform)


def test_imagenet_validation_is_untouched(imagenet_root):
    plain, augmented = _imagenet(imagenet_root), _imagenet(imagenet_root, **ALL_ON)
    assert augmented.test_set is augmented.val_set
    assert torch.equal(_draw(augmented.val_set, 0), _draw(plain.val_set, 1))
    assert repr(augmented.val_set.transform) == repr(plain.val_set.transform)


# --- bad values -------------------------------------------------------------------------------

BAD = [
    ({"random_erasing": -0.1}, r"random_erasing is a probability and must lie in \[0, 1\]"),
    ({"random_erasing": 1.5}, r"random_erasing .* \[0, 1\].* got 1.5"),
    ({"random_erasing": float("nan")}, r"random_erasing"),
    ({"random_erasing": 0.25, "normalize": False}, r"set normalize true or random_erasing 0"),
    ({"color_jitter": -0.4}, r"color_jitter must be >= 0"),
    ({"color_jitter": float("inf")}, r"color_jitter must be >= 0"),
    ({"randaugment": (2, 31)}, r"magnitude must lie in 0\.\.30 .* got 31"),
    ({"randaugment": (2, 11), "randaugment_bins": 11}, r"magnitude must lie in 0\.\.10"),
    ({"randaugment": (2, -1)}, r"magnitude must lie in 0\.\.30"),
    ({"randaugment": (0, 9)}, r"num_ops must be >= 1.*randaugment: null"),
    ({"randaugment": (2, 9, 1)}, r"randaugment must be \[num_ops, magnitude\]"),
    ({"randaugment": (2.0, 9)}, r"two integers"),
    ({"randaugment": 9}, r"randaugment must be \[num_ops, magnitude\]"),
    ({"randaugment_bins": 1}, r"randaugment_bins must be an integer >= 2"),
]


@pytest.mark.parametrize("cls", [CIFAR10DataModule, ImageNetDataModule])
@pytest.mark.parametrize(("options", "message"), BAD, ids=[str(o) for o, _ in BAD])
def test_bad_values_fail_at_construction_saying_what_to_change(cls, options, message):
    with pytest.raises(ValueError, match=message) as error:
        cls(num_workers=0, **options)
    assert str(error.value).startswith(f"{cls.__name__}: ")
    assert len(str(error.value)) < 250


def test_the_limits_themselves_are_accepted():
    dm = CIFAR10DataModule(num_workers=0, randaugment=[1, 30], color_jitter=0.0,
                           random_erasing=1.0)
    assert dm.randaugment == (1, 30)  # a list from Python becomes the tuple
    ImageNetDataModule(num_workers=0, randaugment=(2, 10), randaugment_bins=11,
                       random_erasing=0.0, normalize=False)


# --- the Rev-ViT configs ----------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """As tests/test_cli.py: runs/ under tmp_path, pytest's argv hidden, no leaked seed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["revtrain"])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


RECIPE = {  # (num_ops, magnitude), bins, colour jitter, random erasing
    "cifar10_rev_vit_small": ([2, 9], 11, 0.0, 0.25),  # DeiT's rand-m9
    "imagenet_rev_vit_small": ([2, 7], 11, 0.0, 0.25),  # SlowFast REV_VIT_S.yaml rand-m7
    "imagenet_rev_vit_base": ([2, 7], 11, 0.0, 0.25),  # (REV_VIT_B's m6-n5 is not set)
}


@pytest.mark.parametrize("name", list(RECIPE))
def test_vit_configs_parse_with_the_recipe(name, capsys, cli_env):
    data = _printed(EXPERIMENTS[name], capsys=capsys)["data"]["init_args"]
    assert tuple(data[k] for k in ("randaugment", "randaugment_bins", "color_jitter",
                                   "random_erasing")) == RECIPE[name]
    # the base configs' other data settings survive the composition
    assert data["batch_size"] == (128 if name.startswith("cifar") else 64)


@pytest.mark.parametrize("name", ["cifar10_rev_vit_small", "imagenet_rev_vit_small"])
def test_vit_configs_build_data_modules_with_the_options(name, cli_env):
    torch.set_num_threads(1)
    run = cli([*_args(EXPERIMENTS[name]), "--trainer.accelerator", "cpu"], run=False)
    dm = run.datamodule
    (num_ops, magnitude), bins, jitter, erasing = RECIPE[name]
    assert (dm.randaugment, dm.randaugment_bins, dm.color_jitter, dm.random_erasing) == (
        (num_ops, magnitude), bins, jitter, erasing)
    steps = dm._transforms(train=True).transforms
    (randaugment,) = [t for t in steps if isinstance(t, T.RandAugment)]
    assert (randaugment.num_ops, randaugment.magnitude, randaugment.num_magnitude_bins) == (
        num_ops, magnitude, bins)
    assert not any(isinstance(t, T.ColorJitter) for t in steps)
    assert isinstance(steps[-1], T.RandomErasing) and steps[-1].p == erasing
    assert not any(isinstance(t, (T.RandAugment, T.RandomErasing))
                   for t in dm._transforms(train=False).transforms)


@pytest.mark.parametrize("name", ["cifar10_revnet38", "imagenet_revnet104"])
def test_other_configs_keep_the_augmentations_off(name, capsys, cli_env):
    data = _printed(EXPERIMENTS[name], capsys=capsys)["data"]["init_args"]
    assert (data["randaugment"], data["randaugment_bins"], data["color_jitter"],
            data["random_erasing"]) == (None, 31, 0.0, 0.0)
