"""benchmarks/peers_flows.py: revtrain's spline flow beside zuko's and nflows' (quick path).

Skipped without zuko or nflows (the ``bench`` extra). Checks the side-by-side's own promises:
parameter counts within 20 % of revtrain's ``nsf`` (and a peer far from it refused), the same
loop for every model (revtrain reversible and stored give the same NLL from the same seed),
gaps measured against the optimum, and the JSON with device, versions, command and load.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

pytest.importorskip("zuko")
pytest.importorskip("nflows")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peers(benchmarks_path):
    return importlib.import_module("benchmarks.peers_flows")


def test_peer_widths_match_revtrain_and_a_far_peer_is_refused(peers):
    target = peers.num_params(peers.build("revtrain", 64)[0])
    assert target == 23_132  # nsf's defaults (docs/flows.md)
    # nflows runs revtrain's MLP in its couplings: the same count at the same width
    assert peers.matched_width("nflows", target) == 64
    zuko_width = peers.matched_width("zuko", target)
    count = peers.num_params(peers.build("zuko", zuko_width)[0])
    peers.check_params("zuko", count, target)
    assert abs(count / target - 1) < 0.05
    wide = peers.num_params(peers.build("zuko", 2 * zuko_width)[0])  # about 3x the parameters
    with pytest.raises(ValueError, match=r"zuko: .* parameters, \+\d+\.\d% from revtrain nsf's "
                                         r"23,132; .* within 20%"):
        peers.check_params("zuko", wide, target)


def test_paired_difference_on_points_with_a_known_answer(peers):
    n = 10_000
    shared = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = 3.0 + shared  # the points' own spread (std 1), the same for both models
    d = torch.tensor([0.03, -0.01], dtype=torch.float64).repeat(n // 2)  # mean 0.01 +- 0.02
    b = a - d
    pair = peers.paired_difference(a, b)
    assert pair["test_points"] == n
    assert pair["mean_diff_nats"] == pytest.approx(0.01, abs=1e-12)
    assert pair["stderr_nats"] == pytest.approx(0.02 / math.sqrt(n - 1), rel=1e-9)
    assert pair["z"] == pytest.approx(0.01 / (0.02 / math.sqrt(n - 1)), rel=1e-9)
    assert peers.paired_difference(b, a)["mean_diff_nats"] == pytest.approx(-0.01, abs=1e-12)
    # the unpaired error of either mean is ~50x larger: pairing is what makes 0.01 significant
    unpaired = math.hypot(float(a.std()), float(b.std())) / math.sqrt(n)
    assert unpaired > 30 * pair["stderr_nats"]
    # broken pairing (b on other points) gives the unpaired size, not the known 0.02/sqrt(n-1)
    shuffled = peers.paired_difference(a, b[torch.randperm(n, generator=torch.Generator()
                                                            .manual_seed(1))])
    assert shuffled["stderr_nats"] > 30 * pair["stderr_nats"]
    with pytest.raises(ValueError, match="same test points"):
        peers.paired_difference(a, b[:-1])


@pytest.mark.slow  # about 5 s alone, most of it importing zuko and nflows' modules
def test_quick_path_writes_the_side_by_side(peers, tmp_path):
    out = tmp_path / "peers.json"
    report = peers.main(["--quick", "--steps", "3", "--batch", "32", "--tasks", "checkerboard",
                         "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    env = data["environment"]
    for key in ("device", "torch", "zuko", "nflows", "command", "load_average_at_start",
                "load_average_at_end", "threads"):
        assert env[key] is not None, key
    assert env["threads"] == 1
    assert data["config"]["steps"] == 3 and data["config"]["revtrain_nsf"] == peers.NSF_CONFIG
    rows = data["runs"]
    assert [(r["library"], r["memory"]) for r in rows] == [
        ("revtrain", "reversible"), ("revtrain", "stored"), ("zuko", "stored"),
        ("nflows", "stored")]
    for r in rows:
        assert r["steps_done"] == 3 and r["batch"] == 32 and r["density"] == "checkerboard"
        assert abs(r["params_vs_revtrain"]) <= 0.20
        assert math.isfinite(r["test_nll_nats"]) and r["ms_per_step"] > 0
        assert r["gap_nats"] == pytest.approx(r["test_nll_nats"] - r["optimal_nll_nats"])
        assert r["optimal_nll_nats"] == pytest.approx(math.log(32))
    pairs = data["paired"]
    assert [(p["a"], p["b"]) for p in pairs] == [
        ("revtrain reversible", "revtrain stored"), ("revtrain reversible", "zuko stored"),
        ("revtrain reversible", "nflows stored")]
    for p, r in zip(pairs, rows[1:]):  # the mean of differences is the difference of means
        assert p["mean_diff_nats"] == pytest.approx(
            rows[0]["test_nll_nats"] - r["test_nll_nats"], abs=1e-9)
        assert 0 < p["stderr_nats"] and p["test_points"] == r["test_points"]
    rev, stored = rows[0], rows[1]
    assert rev["test_nll_nats"] == pytest.approx(stored["test_nll_nats"], abs=1e-4)
    assert rev["test_nll_nats"] != rows[2]["test_nll_nats"]  # zuko is another model



@pytest.mark.slow
def test_seed_moves_weights_batches_and_test_points(peers, tmp_path):
    runs = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}.json"
        peers.main(["--quick", "--steps", "2", "--batch", "16", "--tasks", "8gaussians",
                    "--no-stored", "--seed", str(seed), "--out", str(out)])
        data = json.loads(out.read_text())
        assert data["config"]["seed"] == seed
        runs[seed] = {r["library"]: r["test_nll_nats"] for r in data["runs"]}
    for library in ("revtrain", "zuko", "nflows"):
        assert runs[0][library] != runs[1][library], library
