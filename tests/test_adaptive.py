"""Adaptive successive elimination (`itm_engine.adaptive`, `DiffusionITM.score_adaptive`): policies,
equality with the full scorer when nothing is eliminated, analytic UNet counts (draws reused, never
recomputed), the ranking of eliminated candidates, and the confidence rule's early stop."""
from __future__ import annotations

import pytest
import torch

from itm_engine.adaptive import Confidence, check_rounds, parse_policy, score_adaptive
from itm_engine.noise import NoiseBank
from itm_engine.scoring import DiffusionITM
from itm_engine.stats import RunStats

from fixtures.helpers import count_unet_items, make_images

CAPTIONS = ["a red box", "a blue box on noise", "a green square", "noise", "a box", "a yellow thing"]


@pytest.fixture(scope="module")
def scorer() -> DiffusionITM:
    return DiffusionITM.from_pretrained("tiny", progress=False)


@pytest.fixture(scope="module")
def images():
    return make_images(12, seed=3)


def i2t_work(images, n=3, k=4):
    return images[:n], [CAPTIONS[q : q + k] for q in range(n)]


def t2i_work(images, n=3, k=4):
    return CAPTIONS[:n], [images[q * k : (q + 1) * k] for q in range(n)]


def test_policies_parse_and_validate():
    assert parse_policy("2:5,10:1") == [(2, 5), (10, 1)]
    assert parse_policy(" 3 : 4 ") == [(3, 4)]
    assert parse_policy("auto:z=3", samples=12) == Confidence(z=3.0, step=2, samples=12)
    assert parse_policy("auto:z=2.5,step=4", samples=8) == Confidence(z=2.5, step=4, samples=8)
    assert parse_policy("auto") == Confidence()
    for bad in ("2-5", "2:5,x", "auto:q=1", "auto:z"):
        with pytest.raises(ValueError, match="adaptive"):
            parse_policy(bad)
    with pytest.raises(ValueError, match="confidence rule"):
        parse_policy("auto:step=1")
    assert check_rounds([(2, 3), (2, 2), (5, 1)], k=4) == [(2, 3), (2, 2), (5, 1)]
    assert check_rounds([(2, 5), (4, 1)], k=2) == [(2, 2), (4, 1)]  # a query with fewer candidates keeps all
    for rounds in ([], [(3, 2), (2, 1)], [(2, 3), (4, 4)], [(2, 0)], [(0, 2)]):
        with pytest.raises(ValueError, match="adaptive rounds"):
            check_rounds(rounds, k=4)


def test_spread_bank_is_a_permutation_whose_prefixes_cover_t():
    bank = NoiseBank.sample(10, (4, 2, 2), schedule="stratified")
    spread = bank.spread()
    assert sorted(spread.timesteps.tolist()) == bank.timesteps.tolist()
    for s in range(10):  # each draw keeps its own noise
        j = bank.timesteps.tolist().index(spread.timesteps[s].item())
        assert torch.equal(spread.noise[s], bank.noise[j])
    first = spread.timesteps.tolist()
    assert first[0] == bank.timesteps[5].item()  # the median
    assert min(first[:2]) <= 50 and max(first[:3]) >= 950 or max(first[:2]) >= 950 and min(first[:3]) <= 50


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_keeping_every_candidate_equals_the_full_scorer(scorer, images, mode):
    queries, candidates = i2t_work(images) if mode == "i2t" else t2i_work(images)
    bank = scorer.noise_bank(5, seed=1).spread()
    full = scorer.score_candidates(queries, candidates, mode=mode, noise=bank)
    result = scorer.score_adaptive(queries, candidates, [(2, 4), (5, 4)], mode=mode, noise=bank)
    torch.testing.assert_close(result.scores, full, rtol=0, atol=1e-6 * full.abs().max().item())
    assert (result.draws == 5).all()
    assert torch.equal(result.ranking_scores.argsort(1), full.double().argsort(1))
    assert result.unet_items == result.full_items == scorer.last_stats.full_items


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_unet_items_match_the_analytic_count(scorer, images, mode):
    queries, candidates = i2t_work(images) if mode == "i2t" else t2i_work(images)
    rounds = [(2, 2), (5, 1), (8, 1)]  # keep applies after its round: 4 candidates, then 2, then 1
    # pairs: 3 queries x (4 x 2 + 2 x 3 + 1 x 3) draws; T2I adds one null item per alive image per new draw
    analytic = 3 * (4 * 2 + 2 * 3 + 1 * 3) * (2 if mode == "t2i" else 1)
    scorer.clear_cache()
    with count_unet_items(scorer.components.unet) as count:
        result = scorer.score_adaptive(queries, candidates, rounds, mode=mode, seed=0)
    assert result.unet_items == count.items == scorer.last_stats.unet_items == analytic
    assert result.full_items == 3 * 4 * 8 * (2 if mode == "t2i" else 1)
    assert result.savings == pytest.approx(result.full_items / analytic)
    assert sorted(result.draws.flatten().tolist()) == sorted([8] * 3 + [5] * 3 + [2] * 6)
    assert (result.ranking_scores.argmax(1) == (result.draws == 8).int().argmax(1)).all()


def test_eliminated_candidates_keep_partial_scores_and_rank_below_survivors(scorer, images):
    queries, candidates = i2t_work(images)
    bank = scorer.noise_bank(6, seed=2).spread()
    result = scorer.score_adaptive(queries, candidates, [(2, 2), (6, 1)], noise=bank)
    prefix = NoiseBank.from_tensors(bank.timesteps[:2], bank.noise[:2])
    on_two = scorer.score_candidates(queries, candidates, noise=prefix)
    full = scorer.score_candidates(queries, candidates, noise=bank)
    for q in range(len(queries)):
        kept_first = set(on_two[q].argsort(descending=True)[:2].tolist())
        assert {c for c in range(4) if result.draws[q, c] >= 6} <= kept_first
        for c in range(4):
            expected = full[q, c] if result.draws[q, c] == 6 else on_two[q, c]
            assert result.scores[q, c].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
        winner = int(result.ranking_scores[q].argmax())
        assert result.draws[q, winner] == 6  # the survivor outranks every eliminated candidate
        order = result.ranking_scores[q].argsort(descending=True).tolist()
        assert [int(result.draws[q, c]) for c in order] == sorted(result.draws[q].tolist(), reverse=True)


class PlantedScorer:
    """draw_scores from a fixed table: per_draw[(query, candidate)] -> a score per draw."""

    def __init__(self, table: dict[tuple[int, int], list[float]], k: int) -> None:
        self.table, self.k, self.last_stats, self.calls = table, k, RunStats(), []

    def draw_scores(self, images, texts, pairs, mode, noise, draws, batch_size=None, protocol=None):
        start, stop = draws.start, draws.stop
        assert noise.timesteps[start] == start  # the test's banks use t = draw index
        rows = [self.table[(int(i), int(j) % self.k)][start:stop] for i, j in pairs]
        self.last_stats = RunStats(unet_items=len(pairs) * (stop - start))
        self.calls.append((len(pairs), stop - start))
        return torch.tensor(rows)


def test_confidence_rule_stops_a_clear_query_after_the_first_round(images):
    gen = torch.Generator().manual_seed(0)
    noise = lambda: (torch.randn(10, generator=gen) * 0.01).tolist()  # noqa: E731
    swing = [(-1.0) ** s for s in range(10)]  # query 1: every candidate's running mean is 0 after each round
    table = {(0, 0): [1 + e for e in noise()], (0, 1): noise(), (0, 2): noise(),  # query 0: a clear winner
             (1, 0): swing, (1, 1): [-v for v in swing], (1, 2): [0.0] * 10}       # query 1: no winner
    bank = NoiseBank.from_tensors(torch.arange(10), torch.zeros(10, 4, 2, 2))
    fake = PlantedScorer(table, k=3)
    result = score_adaptive(fake, images[:2], [["a", "b", "c"]] * 2, "i2t", Confidence(z=3, step=2, samples=10), bank)
    assert result.draws[0].tolist() == [2, 2, 2]
    assert result.draws[1].tolist() == [10, 10, 10]
    assert fake.calls == [(6, 2), (3, 2), (3, 2), (3, 2), (3, 2)]  # both queries in one call, then query 1 alone
    assert result.unet_items == 6 * 2 + 4 * 3 * 2
    assert int(result.ranking_scores[0].argmax()) == 0


def test_confidence_rule_on_the_real_engine_counts_and_ranks(scorer, images):
    queries, candidates = i2t_work(images)
    result = scorer.score_adaptive(queries, candidates, "auto:z=50", samples=6, seed=0)  # never confident
    assert (result.draws == 6).all() and result.unet_items == result.full_items == 3 * 4 * 6
    full = scorer.score_candidates(queries, candidates, noise=scorer.noise_bank(6, seed=0).spread())
    torch.testing.assert_close(result.scores, full, rtol=0, atol=1e-6 * full.abs().max().item())
