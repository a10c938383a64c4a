"""``benchmarks/gin.py``: the JSON of its quick run, the variance-fraction count, the traversals."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from revtrain.models import create


@pytest.fixture(scope="module")
def gin(benchmarks_path):
    return importlib.import_module("benchmarks.gin")


def test_dims_for_fraction_counts_a_constructed_spectrum(gin):
    # variances 9, 4, 1, then 29 entries of 0.01 (sum 0.29): total 14.29
    stds = torch.tensor([3.0, 2.0, 1.0] + [0.1] * 29)
    assert gin.dims_for_fraction(stds, 0.5) == 1   # 9 / 14.29 = 0.63
    assert gin.dims_for_fraction(stds, 0.9) == 2   # 13 / 14.29 = 0.91
    assert gin.dims_for_fraction(stds, 0.95) == 3  # 14 / 14.29 = 0.98
    assert gin.dims_for_fraction(stds, 0.99) == 3 + 15  # 14 + 15 * 0.01 = 14.15 >= 14.147
    assert gin.dims_for_fraction(stds, 1.0) == 32
    assert gin.dims_for_fraction(stds[torch.randperm(32)], 0.9) == 2  # the order does not matter
    # (K, D): the variances are averaged over classes before sorting
    per_class = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # mean variances 2, 2, 0
    assert gin.dims_for_fraction(per_class, 0.6) == 2
    assert gin.dims_for_fraction(per_class, 0.5) == 1
    flat = torch.ones(64)
    assert gin.dims_for_fraction(flat, 0.9) == 58  # ceil(0.9 * 64): no gap, no small count
    with pytest.raises(ValueError, match="fraction"):
        gin.dims_for_fraction(stds, 0.0)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = create("cond_gin_digits", hidden=16, num_layers=4)
    with torch.no_grad():  # away from the identity start, and a spread of stds
        for p in model.flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.mixture.log_stds.copy_(torch.linspace(-4, 0, 64).repeat(10, 1))
        model.mixture.means.mul_(0.2).add_(0.4)
    return model.eval()


def test_traversal_moves_only_the_chosen_latent_dimension(gin):
    model = _model()
    k, d = 3, 63  # largest std: 1
    images = gin.traverse(model, k, d)
    assert images.shape == (len(gin.SIGMAS), 1, 8, 8)
    assert (images[-1] - images[0]).abs().max() > 0.1  # varying the dimension changes the image
    z, _ = model.embed(images)
    mu, sigma = model.mixture.means[k], model.mixture.log_stds[k].exp()
    want = mu.repeat(len(gin.SIGMAS), 1)
    want[:, d] += torch.tensor(gin.SIGMAS) * sigma[d]
    torch.testing.assert_close(z, want, atol=1e-4, rtol=1e-4)  # encodes back: only dim d moved
    wrong = mu.repeat(len(gin.SIGMAS), 1)
    wrong[:, d - 1] += torch.tensor(gin.SIGMAS) * sigma[d]
    assert not torch.allclose(z, wrong, atol=1e-4)
    # a tiny-std dimension changes the decode by about its std, the large one by much more
    small, large = gin.traversal_change(model, [0, 63])
    assert small < 0.02 * large, (small, large)


def test_class_means_decode_and_encode_back(gin):
    model = _model(1)
    assert gin.mean_roundtrip_error(model) < 1e-4
    centre = gin.traverse(model, 5, 10, sigmas=(0.0,))
    z, _ = model.embed(centre)
    torch.testing.assert_close(z[0], model.mixture.means[5], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(z[0], model.mixture.means[4], atol=1e-2)  # another class's mean


def test_quick_run_writes_the_report(gin, tmp_path, one_thread):
    out = tmp_path / "gin.json"
    report = gin.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    run = saved["runs"][0]
    for name in ("reversible", "stored_twin"):
        rec = run[name]
        for key in ("test_bpd_conditional", "test_bpd_marginal"):
            assert 0.0 < rec[key] < 20.0, (name, key, rec[key])
        # log p(x) = logsumexp_y log p(x|y) + log(1/10) <= max_y log p(x|y): the marginal costs at
        # most log2(10) / 64 bits/dim more than the true label's conditional, on the same noise
        assert rec["test_bpd_marginal"] <= rec["test_bpd_conditional"] + 3.33 / 64 + 1e-3
        assert 0.0 <= rec["test_accuracy_posterior"] <= 1.0
        spec = rec["spectrum"]
        assert len(spec["sorted_class_mean_std"]) == 64
        assert spec["sorted_class_mean_std"] == sorted(spec["sorted_class_mean_std"], reverse=True)
        counts = spec["dims_for_variance_fraction"]
        assert 1 <= counts["0.9"] <= counts["0.99"] <= 64
        assert rec["mean_roundtrip_max_abs"] < 1e-3
    assert abs(run["bpd_gap_reversible_minus_stored"]) < 1e-3
    assert "test_bpd_conditional" in run["stored_perturbed"]
    assert saved["pca_reference"]["dims_for_variance_fraction"]["0.9"] < 64
    assert saved["environment"]["command"] and saved["environment"]["total_seconds"] > 0
    assert set(saved["summary"]) >= {"test_bpd_conditional", "test_bpd_marginal", "test_accuracy_posterior",
                                     "dims_for_variance_fraction"}
    for key in ("top", "low", "spectrum"):
        png = tmp_path / f"gin_{key}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert len(saved["figure"]["top_dims"]) == 6 and len(saved["figure"]["low_dims"]) == 3


def test_double_run_keeps_reversible_and_stored_together(gin, tmp_path, one_thread):
    out = tmp_path / "gin64.json"
    report = gin.main(["--quick", "--double", "--epochs", "3", "--out", str(out)])
    assert torch.get_default_dtype() == torch.float32  # restored after the run
    assert report["recipe"]["dtype"] == "torch.float64"
    run = report["runs"][0]
    curves = [run[name]["train_bpd_per_epoch"] for name in ("reversible", "stored_twin")]
    assert curves[0] == curves[1]  # to the 4 decimals recorded, every epoch
    assert abs(run["bpd_gap_reversible_minus_stored"]) < 1e-9
