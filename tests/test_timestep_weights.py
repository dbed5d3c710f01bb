"""Timestep weights (`itm_engine.timestep_weights`, `itm_engine.fit_timestep_weights`): the curve and
its checks, the weighted score against the reference loop's own weighting, adaptive elimination on
weighted draws, the protocol field through itm-eval, and the fit with its disjoint splits."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from itm_engine import DiffusionITM, cli
from itm_engine.fit_timestep_weights import FitConfig, LabelledDraws, accuracy, fit_weights, split_indices
from itm_engine.models import build_random_components
from itm_engine.protocols import Protocol
from itm_engine.reference import all_pairs, diffusion_classifier_pair_scores, pipeline_pair_scores
from itm_engine.shapesworld.world import write_shapesworld
from itm_engine.timestep_weights import named_knots, read_weights, save_weights, weights_at

from fixtures import datasets
from fixtures.helpers import make_images, max_rel_diff

TEXTS = ["a red box", "a blue circle on noise", "noise"]
KNOTS = ((0.0, 0.2), (0.3, 3.0), (0.7, 0.5), (1.0, 1.5))


@pytest.fixture(scope="module")
def components():
    return build_random_components("tiny", seed=2)


@pytest.fixture(scope="module")
def images():
    return make_images(2, size=(40, 24))


def test_the_curve_is_numpys_linear_interpolation_scaled_to_mean_one():
    u = torch.tensor([0.0, 0.05, 0.3, 0.45, 0.999, 1.0])
    expected = np.interp(u.numpy(), [k[0] for k in KNOTS], [k[1] for k in KNOTS])
    w = weights_at(KNOTS, u)
    np.testing.assert_allclose(w.numpy(), expected / expected.mean(), rtol=1e-12)
    inner = ((0.2, 1.0), (0.8, 3.0))  # constant beyond the first and the last knot
    assert weights_at(inner, torch.tensor([0.0, 0.2, 0.8, 1.0])).tolist() == pytest.approx([0.5, 0.5, 1.5, 1.5])
    assert weights_at(((0.5, 2.0),), torch.tensor([0.1, 0.9])).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="weight 0"):
        weights_at(((0.0, 0.0), (0.5, 0.0), (1.0, 1.0)), torch.tensor([0.1, 0.4]))


def test_logit_normal_is_sd3s_training_density():
    knots = named_knots("logit-normal")
    us = np.array([u for u, _ in knots])
    assert us[0] == 0 and us[-1] == 1 and len(us) == 101
    ws = np.array([w for _, w in knots])
    assert ws.mean() == pytest.approx(1.0) and ws[0] == ws[-1] == 0
    assert us[ws.argmax()] == pytest.approx(0.5)
    # shape of a logit-normal(0, 1) density: the ratio of two points, from its definition
    def density(u):
        return math.exp(-math.log(u / (1 - u)) ** 2 / 2) / (u * (1 - u))
    assert ws[20] / ws[50] == pytest.approx(density(0.2) / density(0.5))


@pytest.mark.parametrize("value, match", [
    (((0.5, 1.0), (0.4, 1.0)), "increase strictly"), (((0.0, 1.0), (1.5, 1.0)), "within"),
    (((0.0, -1.0), (1.0, 1.0)), ">= 0"), (((0.0, 0.0), (1.0, 0.0)), "not all 0"),
    (((0.0, float("nan")), (1.0, 1.0)), "finite"), (((0.0, True), (1.0, 1.0)), "finite"),
    ("no-such-curve", "neither a file nor a named curve"), (5, "must be None"), ([(0.1, 1.0, 2.0)], "must be None"),
])
def test_bad_weightings_are_refused(value, match):
    with pytest.raises(ValueError, match=match):
        Protocol(timestep_weights=value)


def test_weights_files_round_trip_and_bad_files_are_named(tmp_path):
    path = save_weights(tmp_path / "w.json", KNOTS, {"task": "shapes"})
    knots, record = read_weights(path)
    assert knots == KNOTS and record["task"] == "shapes"
    protocol = Protocol(timestep_weights=str(path))
    assert protocol.timestep_weights == KNOTS  # the protocol holds the knots, not the path
    assert Protocol(**json.loads(json.dumps(protocol.as_dict()))) == protocol  # as config.json stores it
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not a JSON weights file"):
        Protocol(timestep_weights=tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"knots": [[0, 1]]}')
    with pytest.raises(ValueError, match="other.json: not a weights file"):
        Protocol(timestep_weights=str(tmp_path / "other.json"))


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_weighted_engine_equals_the_reference_loop_weighting_by_itself(components, images, mode):
    protocol = Protocol(samples=4, timestep_weights=KNOTS)
    scorer = DiffusionITM(components, protocol=protocol, progress=False)
    pairs = all_pairs(len(images), len(TEXTS))
    engine = scorer.score_pairs(images, TEXTS, pairs, mode)
    literal = diffusion_classifier_pair_scores(components, images, TEXTS, pairs, None, mode, protocol)
    scale = diffusion_classifier_pair_scores(components, images, TEXTS, pairs, None, "i2t", protocol).abs().max()
    assert max_rel_diff(engine, literal, scale) <= 1e-5
    pipeline = pipeline_pair_scores(components, images, TEXTS, pairs, None, mode, protocol)
    assert max_rel_diff(engine, pipeline, scale) <= 1e-5
    plain = scorer.score_pairs(images, TEXTS, pairs, mode, protocol=protocol.replace(timestep_weights=None))
    assert (engine - plain).abs().max() > 1e-2 * plain.abs().max()  # the weights change the scores


def test_weighted_scores_are_the_weighted_mean_of_the_plain_draws(components, images):
    scorer = DiffusionITM(components, progress=False)
    bank = scorer.noise_bank(6, seed=4, schedule="uniform")
    pairs = all_pairs(len(images), len(TEXTS))
    plain = scorer.draw_scores(images, TEXTS, pairs, noise=bank)  # [P, S]
    w = np.interp(bank.timesteps.numpy() / 1000, [k[0] for k in KNOTS], [k[1] for k in KNOTS])
    expected = (plain.double() * torch.from_numpy(w)).sum(1) / w.sum()
    weighted = scorer.score_pairs(images, TEXTS, pairs, noise=bank, timestep_weights=KNOTS)
    torch.testing.assert_close(weighted.double(), expected, rtol=1e-5, atol=0)
    flat = scorer.score_pairs(images, TEXTS, pairs, noise=bank, timestep_weights=((0.0, 2.0), (1.0, 2.0)))
    torch.testing.assert_close(flat, plain.mean(1), rtol=1e-6, atol=0)


def test_adaptive_elimination_keeping_every_candidate_equals_the_weighted_scores(components, images):
    scorer = DiffusionITM(components, progress=False)
    bank = scorer.noise_bank(6, seed=1).spread()
    queries, candidates = images, [TEXTS, TEXTS[::-1]]
    full = scorer.score_candidates(queries, candidates, noise=bank, timestep_weights=KNOTS)
    result = scorer.score_adaptive(queries, candidates, [(2, 3), (6, 3)], noise=bank, timestep_weights=KNOTS)
    torch.testing.assert_close(result.scores, full, rtol=0, atol=1e-6 * full.abs().max().item())


def test_itm_eval_records_the_weights_and_a_resume_with_others_is_refused(tmp_path, capsys):
    root = datasets.write_clevr(tmp_path / "data")
    weights = save_weights(tmp_path / "w.json", KNOTS, {})
    out = tmp_path / "out"
    common = ["eval", "--task", "clevr", "--data-root", str(root), "--out", str(out), "--samples", "2",
              "--no-progress"]
    assert cli.main([*common, "--timestep-weights", str(weights)]) == 0
    results = json.loads((out / "diffusion" / "results.json").read_text())
    assert results["protocol"]["timestep_weights"] == [list(k) for k in KNOTS]
    assert cli.main([*common, "--timestep-weights", "logit-normal", "--resume"]) == 2
    assert "changed: protocol.timestep_weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused while parsing the command line
        cli.main([*common, "--timestep-weights", str(tmp_path / "absent.json")])
    assert "neither a file nor a named curve" in capsys.readouterr().err


def test_splits_are_disjoint_deterministic_and_leave_a_test_split():
    train, val, test = split_indices(20, 5, 6, seed=3)
    assert (len(train), len(val), len(test)) == (5, 6, 9)
    assert sorted(train + val + test) == list(range(20))
    assert split_indices(20, 5, 6, seed=3) == (train, val, test) != split_indices(20, 5, 6, seed=4)
    with pytest.raises(ValueError, match="leave no test examples"):
        split_indices(10, 5, 5, seed=0)
    with pytest.raises(ValueError, match="--val must be a positive integer"):
        split_indices(10, 5, 0, seed=0)


def synthetic_draws(n: int, informative: slice, seed: int) -> LabelledDraws:
    """4 candidates, 10 draws: the correct candidate (0) is better only at the `informative` draws,
    every draw carries noise: weighting the informative draws up is what a fit should learn."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, 4, 10, generator=g, dtype=torch.float64) * 2
    scores[:, 0, informative] += 1.5
    return LabelledDraws(scores, torch.ones(n, 4, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                         (torch.arange(10, dtype=torch.float64) * 100 + 50) / 1000, [str(i) for i in range(n)])


def test_the_fit_finds_the_informative_timesteps_and_wins_on_held_out_examples():
    draws = synthetic_draws(600, slice(0, 3), seed=0)
    train, val, test = split_indices(600, 150, 150, seed=0)
    config = FitConfig(out="", train=150, val=150, curves=("per-timestep", "poly2"), l2=(0.01,), steps=300)
    knots, record = fit_weights(draws, train, val, test, config, "strict")
    assert record["chosen"] != "uniform" and record["sizes"] == {"train": 150, "val": 150, "test": 300}
    assert not set(record["ids"]["train"]) & set(record["ids"]["val"])
    w = weights_at(knots, draws.u)
    assert w[:3].min() > w[3:].max()  # the informative draws weigh most
    test_draws = draws.subset(test)
    assert accuracy(test_draws, w, "strict") > accuracy(test_draws, None, "strict") + 0.05
    assert record["accuracy"]["chosen"]["test"] == pytest.approx(accuracy(test_draws, w, "strict"))


def test_the_fit_keeps_uniform_when_no_timestep_is_special():
    draws = synthetic_draws(400, slice(0, 10), seed=1)
    train, val, test = split_indices(400, 100, 100, seed=0)
    config = FitConfig(out="", train=100, val=100, curves=("per-timestep",), l2=(0.0,), steps=200)
    _, record = fit_weights(draws, train, val, test, config, "strict")
    assert {c["weighting"] for c in record["candidates"]} == {"uniform", "per-timestep, l2 0"}
    chosen = next(c for c in record["candidates"] if c["weighting"] == record["chosen"])
    assert all(chosen["val_accuracy"] >= c["val_accuracy"] for c in record["candidates"])


def test_itm_train_timestep_weights_end_to_end(tmp_path, capsys):
    root = write_shapesworld(tmp_path / "data", n=6, size=32, subtasks=("recognition_shape", "spatial"))
    out = tmp_path / "weights.json"
    assert cli.main(["train", "timestep-weights", "--task", "shapes", "--data-root", str(root), "--model", "tiny",
                     "--train", "4", "--val", "4", "--samples", "4", "--steps", "20", "--l2", "0.1",
                     "--curves", "poly2", "--out", str(out), "--device", "cpu"]) == 0
    knots, record = read_weights(out)
    assert record["sizes"] == {"train": 4, "val": 4, "test": 4} and record["task"] == "shapes"
    assert "uniform" in record["accuracy"] and "logit-normal" in record["accuracy"]
    assert "test" in capsys.readouterr().out
    scorer = DiffusionITM.from_pretrained("tiny", timestep_weights=str(out), progress=False)
    assert scorer.protocol.timestep_weights == knots
    # a task whose examples name no correct candidate, and splits that leave nothing to test
    wino = datasets.write_winoground(tmp_path / "wino", n=8)
    assert cli.main(["train", "timestep-weights", "--task", "winoground", "--data-root", str(wino), "--train", "2",
                     "--val", "2", "--samples", "2", "--out", str(tmp_path / "x.json"), "--device", "cpu"]) == 2
    assert "names no correct candidate" in capsys.readouterr().err
    assert cli.main(["train", "timestep-weights", "--task", "shapes", "--data-root", str(root), "--train", "6",
                     "--val", "6", "--out", str(tmp_path / "y.json"), "--device", "cpu"]) == 2
    assert "leave no test examples" in capsys.readouterr().err
