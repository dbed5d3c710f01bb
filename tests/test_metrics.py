"""Metrics against hand-computed cases, ties included (a tie is never a correct retrieval)."""
import math

import pytest
import torch

from itm_engine import metrics


def test_is_correct_is_strict():
    assert metrics.is_correct(torch.tensor([0.3, 0.1, 0.2]), 0)
    assert not metrics.is_correct(torch.tensor([0.3, 0.3, 0.2]), 0)  # tie
    assert not metrics.is_correct(torch.tensor([0.1, 0.3]), 0)
    assert metrics.is_correct(torch.tensor([5.0]), 0)


def test_accuracy_ragged_and_errors():
    scores = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1.0, 1.0])]
    assert metrics.accuracy(scores, [0, 1, 0]) == pytest.approx(2 / 3)
    assert metrics.accuracy(torch.tensor([[1.0, 2.0], [3.0, 1.0]]), [1, 1]) == 0.5
    with pytest.raises(ValueError):
        metrics.accuracy(scores, [0])


def test_grouped_and_macro_accuracy():
    correct, groups = [True, False, True, True], ["on", "on", "under", "under"]
    assert metrics.grouped_accuracy(correct, groups) == {"on": 0.5, "under": 1.0}
    assert metrics.macro_accuracy(correct, groups) == 0.75
    assert metrics.macro_accuracy([True, True, True, False], ["a", "a", "a", "b"]) == 0.5  # micro would be 0.75


def test_ranks_and_recall_with_ties_and_multiple_positives():
    scores = torch.tensor([
        [0.9, 0.5, 0.1, 0.3],   # positive 0 is first -> rank 1
        [0.9, 0.5, 0.5, 0.3],   # positive 2 ties with candidate 1 -> rank 3 (tie counts ahead)
        [0.2, 0.9, 0.8, 0.1],   # positives {2, 3}: best is 2 -> rank 2
        [0.4, 0.4, 0.4, 0.4],   # all tied: rank 4
    ])
    positives = [[0], [2], [3, 2], [1]]
    assert metrics.ranks(scores, positives).tolist() == [1, 3, 2, 4]
    assert metrics.recall_at_k(scores, positives, ks=(1, 2, 3)) == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75}
    # only wrong candidates count ahead: two correct ones tying first is a hit; a wrong one tying is not
    tied = torch.tensor([[0.7, 0.7, 0.1], [0.7, 0.7, 0.1], [0.2, 0.7, 0.7]])
    assert metrics.ranks(tied, [[0, 1], [0], [1, 2]]).tolist() == [1, 2, 1]
    assert metrics.ranks(scores[:1], [[]]).tolist() == [float("inf")]  # positive not among candidates
    assert metrics.recall_at_k(scores[:1, :2], [[]], ks=(1, 10)) == {"R@1": 0.0, "R@10": 0.0}  # even for k > C


def test_winoground_text_image_group():
    # example 0: both right; example 1: text right, image wrong; example 2: a tie in the text score
    i2t = torch.tensor([[[2.0, 1.0], [0.0, 3.0]], [[2.0, 1.0], [0.0, 3.0]], [[1.0, 1.0], [0.0, 3.0]]])
    t2i = torch.tensor([[[2.0, 0.0], [1.0, 3.0]], [[2.0, 5.0], [3.0, 3.0]], [[2.0, 0.0], [1.0, 3.0]]])
    result = metrics.winoground(i2t, t2i)
    assert result["text"].tolist() == [True, True, False]
    assert result["image"].tolist() == [True, False, True]
    assert result["group"].tolist() == [True, False, False]


def test_bias_effect_size_by_hand():
    scores = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    phi = metrics.bias_phi(scores, n_a=1)  # A = column 0, B = columns 1-2
    assert phi.tolist() == [2.5, 0.5, 0.5, -1.0]
    d = metrics.effect_size(phi[:2], phi[2:])
    union = [2.5, 0.5, 0.5, -1.0]
    mean = sum(union) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in union) / 3)
    assert d == pytest.approx(((2.5 + 0.5) / 2 - (0.5 - 1.0) / 2) / std)


def test_bias_phi_keeps_float64_precision_of_a_small_difference_of_large_means():
    # scores of the size of denoising errors, differing in the 7th digit: float32 means lose it
    base = 1000.0
    scores = torch.tensor([[base + 0.001, base + 0.003, base, base + 0.001]], dtype=torch.float64)
    phi = metrics.bias_phi(scores.float(), n_a=2)
    exact = (scores.float().double()[0, :2].mean() - scores.float().double()[0, 2:].mean()).item()
    assert phi.dtype == torch.float64 and phi.item() == pytest.approx(exact, rel=1e-12)


def test_permutation_p_value():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, generator=gen) + 2.0, torch.randn(30, generator=gen)
    assert metrics.permutation_p_value(x, y, permutations=2000) < 0.01
    assert metrics.permutation_p_value(y, x, permutations=2000) > 0.99
    same = torch.randn(40, generator=gen)
    assert 0.05 < metrics.permutation_p_value(same[:20], same[20:], permutations=2000) < 0.95
    assert metrics.permutation_p_value(x, y, 500, seed=1) == metrics.permutation_p_value(x, y, 500, seed=1)


def test_accuracy_by_group_micro_macro_and_per_group():
    result = metrics.accuracy_by_group([True, True, True, False], ["a", "a", "a", "b"])
    assert result == {"accuracy": 0.75, "accuracy/macro": 0.5, "accuracy/a": 1.0, "accuracy/b": 0.0}
    with pytest.raises(ValueError):
        metrics.accuracy_by_group([], [])
