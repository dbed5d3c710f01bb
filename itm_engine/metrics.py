"""GDBench metrics, each defined on score tensors (higher = better match) and labels.

Tie policy, everywhere: a tie never counts as a correct retrieval. A candidate whose score equals
the correct one's counts as ranked ahead of it, so an all-equal score vector is wrong, not right.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


def is_correct(scores: torch.Tensor, label: int, ties: str = "strict") -> bool:
    """True when candidate `label` wins: it scores strictly higher than every other candidate
    (ties "strict": a tie is wrong), or it is the first of the highest ("argmax-first", numpy's
    argmax: a tie with a later candidate is right, with an earlier one wrong).

    scores: [C].
    """
    if ties == "argmax-first":
        return bool((scores[:label] < scores[label]).all() and (scores[label + 1:] <= scores[label]).all())
    if ties != "strict":
        raise ValueError(f"ties must be 'strict' or 'argmax-first', got {ties!r}")
    others = torch.cat([scores[:label], scores[label + 1 :]])
    return bool(others.numel() == 0 or (scores[label] > others).all())


def accuracy(scores: Sequence[torch.Tensor] | torch.Tensor, labels: Sequence[int], ties: str = "strict") -> float:
    """Fraction of examples whose label wins (`is_correct`; ties "strict": mean_n [s_n[y_n] > max_{c != y_n} s_n[c]]).

    scores: [N, C] or N vectors [C_n] (ragged).
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} score vectors but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("accuracy of no examples")
    return sum(is_correct(s, y, ties) for s, y in zip(scores, labels)) / len(labels)


def grouped_accuracy(correct: Sequence[bool], groups: Sequence[str]) -> dict[str, float]:
    """Accuracy per group: {group: mean of `correct` over its examples}, keys sorted."""
    if len(correct) != len(groups):
        raise ValueError(f"{len(correct)} results but {len(groups)} group labels")
    members: dict[str, list[bool]] = defaultdict(list)
    for ok, group in zip(correct, groups):
        members[group].append(bool(ok))
    return {g: sum(v) / len(v) for g, v in sorted(members.items())}


def macro_accuracy(correct: Sequence[bool], groups: Sequence[str]) -> float:
    """Mean over groups of the per-group accuracy (each group weighs the same)."""
    per_group = grouped_accuracy(correct, groups)
    return sum(per_group.values()) / len(per_group)


def accuracy_by_group(correct: Sequence[bool], groups: Sequence[str]) -> dict[str, float]:
    """{"accuracy": over all examples (micro), "accuracy/macro": mean over groups,
    "accuracy/<group>": per group}."""
    if len(correct) == 0:
        raise ValueError("accuracy of no examples")
    per_group = grouped_accuracy(correct, groups)
    out = {"accuracy": sum(map(bool, correct)) / len(correct),
           "accuracy/macro": sum(per_group.values()) / len(per_group)}
    out.update({f"accuracy/{g}": v for g, v in per_group.items()})
    return out


def ranks(scores: torch.Tensor, positives: Sequence[Sequence[int]], ties: str = "strict") -> torch.Tensor:
    """1-based rank of each query's best positive candidate, float64 [Q] (integral values).

    rank = 1 + #{wrong c : s_c >= max over the positives p of s_p}: only wrong candidates count
    ahead, a wrong one that ties the best positive included (ties "strict": a tie never counts as
    retrieved); with ties "argmax-first" a tied wrong candidate counts ahead only when it comes
    before the first best positive (numpy's argmax/argsort order). A query with no positive among
    its candidates gets rank inf (never retrieved at any k).

    scores: [Q, C]; positives: for each query, the indices of its correct candidates.
    """
    if scores.dim() != 2 or scores.shape[0] != len(positives):
        raise ValueError(f"scores must be [Q, C] with Q = {len(positives)}, got {tuple(scores.shape)}")
    out = torch.full((scores.shape[0],), float("inf"), dtype=torch.float64)
    for q, pos in enumerate(positives):
        if not len(pos):
            continue
        wrong = torch.ones(scores.shape[1], dtype=torch.bool)
        wrong[list(pos)] = False
        best = scores[q, list(pos)].max()
        ahead = scores[q] > best
        if ties == "strict":
            ahead |= scores[q] == best
        elif ties == "argmax-first":
            first = min(p for p in pos if scores[q, p] == best)
            ahead[:first] |= scores[q, :first] == best
        else:
            raise ValueError(f"ties must be 'strict' or 'argmax-first', got {ties!r}")
        out[q] = 1 + int((ahead & wrong).sum())
    return out


def recall_at_k(scores: torch.Tensor, positives: Sequence[Sequence[int]],
                ks: Sequence[int] = (1, 5, 10), ties: str = "strict") -> dict[str, float]:
    """R@k = fraction of queries whose best positive has rank <= k (see `ranks`)."""
    r = ranks(scores, positives, ties)
    return {f"R@{k}": float((r <= k).double().mean()) for k in ks}


def matched_pairs(scores: torch.Tensor, ties: str = "strict") -> torch.Tensor:
    """Per 2 x 2 matrix s (rows the queries, columns their candidates): does each query pick its own
    candidate, query 0 candidate 0 and query 1 candidate 1 (`is_correct` on each row under `ties`;
    "strict": s[0,0] > s[0,1] and s[1,1] > s[1,0])? BoolTensor [N].

    scores: [N, 2, 2].
    """
    if scores.dim() != 3 or scores.shape[1:] != (2, 2):
        raise ValueError(f"scores must be [N, 2, 2], got {tuple(scores.shape)}")
    return torch.tensor([is_correct(s[0], 0, ties) and is_correct(s[1], 1, ties) for s in scores], dtype=torch.bool)


def winoground(i2t: torch.Tensor, t2i: torch.Tensor, ties: str = "strict") -> dict[str, torch.Tensor]:
    """Winoground's text, image and group scores per example, BoolTensors [N].

    With s[i, j] = score(image i, caption j) for each example's 2 x 2 matrix:
        text  = s[0,0] > s[0,1] and s[1,1] > s[1,0]   (on the I2T matrices: pick the caption)
        image = s[0,0] > s[1,0] and s[1,1] > s[0,1]   (on the T2I matrices: pick the image)
        group = text and image
    (ties "strict"; under "argmax-first" a tie goes to the first candidate, `matched_pairs`).
    i2t, t2i: [N, 2, 2].
    """
    for name, s in (("i2t", i2t), ("t2i", t2i)):
        if s.dim() != 3 or s.shape[1:] != (2, 2):
            raise ValueError(f"{name} scores must be [N, 2, 2], got {tuple(s.shape)}")
    text = matched_pairs(i2t, ties)
    image = matched_pairs(t2i.transpose(1, 2), ties)
    return {"text": text, "image": image, "group": text & image}


def winoground_by_group(i2t: torch.Tensor, t2i: torch.Tensor, groups: Sequence[str],
                        ties: str = "strict") -> dict[str, float]:
    """Winoground's scores as fractions: "text|image|group/overall" over all examples and
    "text|image|group/<group>" over each group's (`winoground`, `grouped_accuracy`).

    i2t, t2i: [N, 2, 2]; groups: N group names.
    """
    out: dict[str, float] = {}
    for kind, correct in winoground(i2t, t2i, ties).items():
        out[f"{kind}/overall"] = float(correct.double().mean())
        out.update({f"{kind}/{g}": v for g, v in grouped_accuracy(correct.tolist(), groups).items()})
    return out


def bias_phi(scores: torch.Tensor, n_a: int) -> torch.Tensor:
    """Per image: phi = mean score over attribute set A (the first n_a columns) minus mean over B,
    in float64 (phi is a small difference of large means).

    scores: [N, A + B] -> float64 [N].
    """
    if not 0 < n_a < scores.shape[1]:
        raise ValueError(f"n_a must split the {scores.shape[1]} columns into two non-empty sets, got {n_a}")
    return scores[:, :n_a].double().mean(dim=1) - scores[:, n_a:].double().mean(dim=1)


def effect_size(phi_x: torch.Tensor, phi_y: torch.Tensor, ddof: int = 1) -> float:
    """(mean phi_X - mean phi_Y) / std(phi_X ∪ phi_Y), with the sample std (ddof = 1) or the
    population std (ddof = 0, numpy's `.std()`, the DiffusionITM research code's)."""
    if len(phi_x) == 0 or len(phi_y) == 0 or len(phi_x) + len(phi_y) < 3:
        raise ValueError("effect_size needs both groups non-empty and at least 3 values in all")
    union = torch.cat([phi_x, phi_y]).double()
    return float((phi_x.double().mean() - phi_y.double().mean()) / union.std(correction=ddof))


def permutation_p_value(phi_x: torch.Tensor, phi_y: torch.Tensor, permutations: int = 10000, seed: int = 0,
                        ddof: int = 1) -> float:
    """One-sided p-value of `effect_size(phi_x, phi_y)` under random relabelling of the union:
    (1 + #{permutations with effect size >= observed}) / (1 + permutations)."""
    observed = effect_size(phi_x, phi_y, ddof)
    union = torch.cat([phi_x, phi_y]).double()
    n_x = len(phi_x)
    gen = torch.Generator().manual_seed(seed)
    std = union.std(correction=ddof)  # invariant under relabelling
    order = torch.argsort(torch.rand(permutations, len(union), generator=gen), dim=1)
    shuffled = union[order]
    effects = (shuffled[:, :n_x].mean(dim=1) - shuffled[:, n_x:].mean(dim=1)) / std
    return float((1 + (effects >= observed - 1e-12).sum()) / (1 + permutations))
