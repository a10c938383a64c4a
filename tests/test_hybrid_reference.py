"""benchmarks/hybrid_reference.py: the digits RevNet trained and tested on the hybrid's split."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from revtrain.lightning import DigitsDataModule


@pytest.fixture(scope="module")
def reference(benchmarks_path):
    return importlib.import_module("benchmarks.hybrid_reference")


def test_inputs_are_fed_as_the_digits_data_module_feeds_them(reference):
    """v / 16, standardised with the *training* images' statistics (the test images' own
    would leak): the same values DigitsDataModule gives the quick start's RevNet."""
    grey = torch.randint(0, 17, (40, 1, 8, 8))
    train, test = reference.standardised(grey[:30], grey[30:])
    assert abs(float(train.mean())) < 1e-6 and abs(float(train.std()) - 1) < 1e-6
    x = grey.float() / 16.0
    mean, std = x[:30].mean(), x[:30].std()
    assert torch.allclose(test, (x[30:] - mean) / std)

    data = DigitsDataModule(augment=False)  # the module's formula on its own split
    data.setup("fit")
    images = data.train_set.tensors[0]
    assert abs(float(images.mean())) < 1e-6 and abs(float(images.std()) - 1) < 1e-5


def test_quick_run_trains_on_the_hybrid_split_and_writes_the_targets(reference, tmp_path):
    out = tmp_path / "ref.json"
    record = reference.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == record
    (run,) = record["runs"]
    assert (run["train_images"], run["test_images"]) == (1500, 297)  # the hybrid's split
    assert run["test_accuracy"] == round(100 * run["correct"] / 297, 2)
    assert run["test_accuracy"] > 20  # one epoch already learns (chance: 10 %)
    assert record["summary"]["hybrid_target_per_seed"] == {"0": round(run["test_accuracy"] - 1, 2)}
    assert record["recipe"]["source"] == "configs/digits_revnet.yaml"


def test_recipe_is_the_quick_start_config(reference):
    """The reference trains with configs/digits_revnet.yaml's settings (a change there must
    show here)."""
    import yaml

    config = yaml.safe_load((reference.Path(reference.__file__).parents[1] / "configs"
                             / "digits_revnet.yaml").read_text())
    recipe, model = reference.RECIPE, config["model"]["init_args"]
    assert model["model_name"] == recipe["model"]
    assert model["optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["optimizer"]["init_args"] == {"lr": recipe["lr"], "momentum": recipe["momentum"],
                                               "weight_decay": recipe["weight_decay"],
                                               "nesterov": recipe["nesterov"]}
    assert model["lr_scheduler"]["class_path"].endswith("CosineAnnealingLR")
    assert model["lr_scheduler"]["init_args"]["T_max"] == config["trainer"]["max_epochs"] \
        == recipe["epochs"]
    assert model["scheduler_interval"] == "epoch"
    data = config["data"]["init_args"]
    assert data["batch_size"] == recipe["batch"] and data["augment"] is True
    assert data.get("normalize", True) is True
