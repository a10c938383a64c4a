"""``benchmarks/ood.py``: AUROC and typicality helpers on scores with a known answer, a smoke run."""

from __future__ import annotations

import importlib
import json

import pytest
import torch


@pytest.fixture(scope="module")
def ood(benchmarks_path):
    pytest.importorskip("sklearn")
    return importlib.import_module("benchmarks.ood")


def test_auroc_known_answers(ood):
    a = torch.arange(10.0)
    assert ood.auroc(a, a + 100) == 1.0          # every OOD score above every in-score
    assert ood.auroc(a, a - 100) == 0.0          # every OOD score below: raw likelihood fails
    assert ood.auroc(a, a.clone()) == 0.5        # identical sets: chance
    assert ood.auroc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])) == 0.75


def test_typicality_catches_too_likely_sets_that_likelihood_misses(ood):
    gen = torch.Generator().manual_seed(0)
    train_mean = 3.0
    inliers = train_mean + 0.5 * torch.randn(300, generator=gen)
    too_likely = train_mean - 2.0 + 0.1 * torch.randn(300, generator=gen)  # higher likelihood
    # raw likelihood (score = NLL) ranks the too-likely set as *more* in-distribution: it fails
    assert ood.auroc(inliers, too_likely) < 0.01
    # the typicality statistic flags it, already for one image and better for batches of 10
    t1 = ood.auroc(ood.typicality_scores(inliers, train_mean, 1, 200, gen),
                   ood.typicality_scores(too_likely, train_mean, 1, 200, gen))
    t10 = ood.auroc(ood.typicality_scores(inliers, train_mean, 10, 200, gen),
                    ood.typicality_scores(too_likely, train_mean, 10, 200, gen))
    assert 0.99 < t1 <= t10 == 1.0


def test_typicality_fails_when_the_ood_set_has_the_same_mean_nll(ood):
    # same mean NLL, only a narrower spread: batches of 10 look typical, so M = 10 cannot tell
    gen = torch.Generator().manual_seed(1)
    inliers = 3.0 + 0.5 * torch.randn(300, generator=gen)
    narrow = 3.0 + 0.05 * torch.randn(300, generator=gen)
    t10 = ood.auroc(ood.typicality_scores(inliers, 3.0, 10, 300, gen),
                    ood.typicality_scores(narrow, 3.0, 10, 300, gen))
    assert t10 < 0.1  # the narrow set is *more* typical than the inliers: the test fails


def test_batch_means_and_ood_sets(ood):
    gen = torch.Generator().manual_seed(0)
    v = torch.arange(20.0)
    assert torch.equal(ood.batch_means(v, 1, 5, gen), v)
    assert torch.allclose(ood.batch_means(v, 20, 3, gen), torch.full((3,), v.mean()))
    with pytest.raises(ValueError, match="exceeds"):
        ood.batch_means(v, 21, 3, gen)
    test = torch.randint(0, 17, (30, 1, 8, 8), generator=gen)
    sets = ood.ood_sets(test)
    for x in sets.values():
        assert x.shape == test.shape and x.min() >= 0 and x.max() <= 16
    assert torch.equal(sets["inverted"], 16 - test)
    assert (sets["constant"].flatten(1).amax(1) == sets["constant"].flatten(1).amin(1)).all()


def test_quick_run_writes_json_and_png(ood, tmp_path):
    out = tmp_path / "ood.json"
    report = ood.main(["--quick", "--out", str(out), "--threads", str(torch.get_num_threads())])
    saved = json.loads(out.read_text())
    assert (tmp_path / "ood.png").stat().st_size > 0
    assert {r["set"] for r in saved["ood"]} == {"inverted", "noise", "constant", "flipped", "rot90"}
    for row in report["ood"]:
        for key in ("auroc_likelihood", "auroc_typicality_M1", "auroc_typicality_M10"):
            assert 0.0 <= row[key] <= 1.0
    assert saved["environment"]["torch"] == torch.__version__


def test_quick_run_over_two_seeds_reports_the_spread(ood, tmp_path):
    out = tmp_path / "ood.json"
    report = ood.main(["--quick", "--seeds", "2", "--out", str(out), "--batches", "20",
                       "--threads", str(torch.get_num_threads())])
    seeds = json.loads(out.read_text())["seeds"]
    assert seeds["n"] == 2 and len(seeds["test_mean_bpd"]) == 2
    for set_name, cols in seeds["ood"].items():
        row = next(r for r in report["ood"] if r["set"] == set_name)
        for key, col in cols.items():
            assert len(col["per_seed"]) == 2 and col["min"] <= col["mean"] <= col["max"]
            assert col["per_seed"][0] == round(row[key], 4)  # the top level is seed 0's
            assert col["std"] >= 0.0
    # two different trainings: the flows differ, so do their test likelihoods
    assert seeds["test_mean_bpd"][0] != seeds["test_mean_bpd"][1]


def test_seed_summary_statistics(ood):
    runs = [{"rows": [{"set": "a", "x": v}]} for v in (1.0, 2.0, 4.0)]
    col = ood.seed_summary(runs, ["x"])["a"]["x"]
    assert col["mean"] == round(7 / 3, 4) and col["min"] == 1.0 and col["max"] == 4.0
    assert col["std"] == round(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) ** 0.5 / 2 ** 0.5, 4)
    assert ood.seed_summary(runs[:1], ["x"])["a"]["x"]["std"] is None
    with pytest.raises(SystemExit):
        ood.main(["--quick", "--seeds", "0"])
