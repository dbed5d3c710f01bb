"""Adaptive successive elimination: spend the UNet budget on the candidates that are still in doubt.

Most candidates of a query are obviously wrong after a few noise draws (Diffusion Classifier, Li et
al., ICCV 2023). Two policies over the per-query candidate form (`DiffusionITM.score_candidates`):

- **fixed rounds** `[(samples_1, keep_1), (samples_2, keep_2), ...]` (`--adaptive 2:5,10:1`):
  `samples_r` is the number of draws of the shared noise bank a candidate that reaches round r has
  been scored on *in all* (non-decreasing; rounds take the next draws of the same bank, so the draws
  of earlier rounds are reused, never recomputed); after round r each query keeps its `keep_r`
  candidates of highest running mean (`keep` non-increasing, >= 1, capped at the query's number
  of candidates; ties keep the lower index);
- **confidence rule** `Confidence(z, step, samples)` (`--adaptive auto:z=3`): every candidate of a
  query is scored on `step` new draws per round, until the gap between the query's best and
  second-best candidates exceeds `z` standard errors of their paired per-draw difference (the
  shared noise makes that difference's variance small) or `samples` draws are spent.

Every round is one scoring call over the surviving pairs of *all* queries, so batches stay full;
in "t2i" mode the null-prompt errors are computed for the draws actually used only.

Ranking (documented so recall@k stays defined): survivors are ranked by their mean over all their
draws; a candidate eliminated in round r keeps its partial mean and ranks below every candidate
that went further, i.e. candidates are ordered by (draws spent on them, mean score).
`AdaptiveResult.ranking_scores` encodes that order as each candidate's rank, for metrics that take
score matrices.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from itm_engine.noise import NoiseBank
from itm_engine.stats import RunStats

RANK_STEP = 1e6  # orders by draws first: |mean scores| are far below 1e6 (float64 keeps their digits)


@dataclass(frozen=True)
class Confidence:
    """Stop a query once (best - second best) > z standard errors of the paired difference."""

    z: float = 3.0
    step: int = 2  # new draws per round
    samples: int = 10  # the budget: at most this many draws per candidate

    def __post_init__(self) -> None:
        if not (self.z > 0 and self.step >= 2 and self.samples >= self.step):
            raise ValueError(f"confidence rule needs z > 0, step >= 2 and samples >= step, got {self}")


Rounds = Sequence[tuple[int, int]]
Policy = Union[Rounds, Confidence]


@dataclass
class AdaptiveResult:
    """Outcome of an adaptive run over n queries with k candidates each.

    scores: float32 [n, k], each candidate's mean score over the draws it was scored on.
    draws: long [n, k], how many draws of the shared bank each candidate was scored on.
    unet_items: UNet items actually run; full_items: what scoring every candidate on every draw
        of the budget costs (the same counting, null-prompt items included in "t2i").
    """

    scores: torch.Tensor
    draws: torch.Tensor
    unet_items: int
    full_items: int
    stats: RunStats = field(default_factory=RunStats)  # the rounds' statistics summed, full_items set

    @property
    def ranking_scores(self) -> torch.Tensor:
        """float32 [n, k], higher = better: each candidate's dense rank (0 = last) within its query
        by (draws, score), so candidates that went further rank higher and exact ties stay tied.
        Small integers: exact in any float type a metric may convert them to."""
        key = self.draws.double() * RANK_STEP + self.scores.double()
        return torch.stack([row.unique(return_inverse=True)[1] for row in key]).float()

    @property
    def savings(self) -> float:
        """full_items / unet_items."""
        return self.full_items / max(self.unet_items, 1)


def parse_policy(text: str, samples: int = 10) -> Policy:
    """`"2:5,10:1"` -> [(2, 5), (10, 1)]; `"auto:z=3"` (optionally `,step=2`) -> Confidence with
    the budget `samples`. Raises ValueError naming the problem."""
    text = text.strip()
    if text.startswith("auto"):
        options = {}
        for item in filter(None, re.split(r"[:,]", text[len("auto"):])):
            key, _, value = item.partition("=")
            if key not in ("z", "step") or not value:
                raise ValueError(f"adaptive {text!r}: expected auto:z=Z[,step=N], got {item!r}")
            options[key] = float(value) if key == "z" else int(value)
        return Confidence(samples=samples, **options)
    rounds = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", item)
        if not match:
            raise ValueError(f"adaptive {text!r}: expected SAMPLES:KEEP[,SAMPLES:KEEP...] or auto:z=Z, got {item!r}")
        rounds.append((int(match[1]), int(match[2])))
    return rounds


def check_rounds(rounds: Rounds, k: int) -> list[tuple[int, int]]:
    """Validate fixed rounds (samples >= 1 and non-decreasing, keep >= 1 and non-increasing) and
    return them for queries of k candidates: a keep above k keeps all k."""
    rounds = [(int(s), int(keep)) for s, keep in rounds]
    if not rounds:
        raise ValueError("adaptive rounds: need at least one (samples, keep) round")
    for (s0, keep0), (s1, keep1) in zip([(0, rounds[0][1])] + rounds, rounds):
        if s1 < max(s0, 1):
            raise ValueError(f"adaptive rounds {rounds}: samples must be >= 1 and non-decreasing")
        if not 1 <= keep1 <= keep0:
            raise ValueError(f"adaptive rounds {rounds}: keep must be >= 1 and non-increasing")
    return [(s, min(keep, k)) for s, keep in rounds]


def budget(policy: Policy) -> int:
    """The draws a candidate can get at most (the noise bank's size)."""
    return policy.samples if isinstance(policy, Confidence) else max(s for s, _ in policy)


def score_adaptive(scorer, queries: Sequence, candidates: Sequence[Sequence], mode: str, policy: Policy,
                   bank: NoiseBank, batch_size: int | None = None, protocol=None) -> AdaptiveResult:
    """Run `policy` for each query against its k candidates (mode "i2t": image queries, text
    candidates; "t2i": text queries, image candidates); `bank` holds the draws (>= `budget(policy)`).

    `scorer` needs `draw_scores(images, texts, pairs, mode, noise=, draws=, batch_size=, protocol=)
    -> [P, S]` and `last_stats`; `protocol` (the scorer's when None) is passed through.
    """
    n, k = len(queries), len(candidates[0])
    flat = [c for cands in candidates for c in cands]
    if mode == "i2t":
        images, texts = list(queries), flat
    else:
        images, texts = flat, list(queries)
    per_draw = torch.full((n, k, budget(policy)), float("nan"))
    if len(bank) < per_draw.shape[2]:
        raise ValueError(f"the noise bank has {len(bank)} draws; the adaptive policy needs {per_draw.shape[2]}")
    stats, started = RunStats(), time.perf_counter()

    def run(alive: torch.Tensor, start: int, stop: int) -> None:
        """Score the alive (query, candidate) pairs [A, 2] on draws start..stop-1."""
        if len(alive) == 0 or stop <= start:
            return
        cand = alive[:, 0] * k + alive[:, 1]
        pairs = torch.stack([alive[:, 0], cand], 1) if mode == "i2t" else torch.stack([cand, alive[:, 0]], 1)
        per_draw[alive[:, 0], alive[:, 1], start:stop] = scorer.draw_scores(
            images, texts, pairs, mode, noise=bank, draws=slice(start, stop), batch_size=batch_size, protocol=protocol)
        stats.add(scorer.last_stats)

    draws = torch.zeros(n, k, dtype=torch.long)
    if isinstance(policy, Confidence):
        active = torch.ones(n, dtype=torch.bool)
        done = 0
        while done < policy.samples and active.any():
            stop = min(done + policy.step, policy.samples)
            queries_alive = active.nonzero()[:, 0]
            run(torch.cartesian_prod(queries_alive, torch.arange(k)), done, stop)
            draws[queries_alive] = stop
            done = stop
            if k > 1:
                active &= ~_confident(per_draw[:, :, :done], policy.z)
    else:
        alive = torch.ones(n, k, dtype=torch.bool)
        done = 0
        for s, keep in check_rounds(policy, k):
            run(alive.nonzero(), done, s)
            draws[alive] = s
            done = s
            mean = per_draw[:, :, :s].nanmean(2).masked_fill(~alive, -math.inf)
            # top `keep` by running mean; ties keep the lower index (a stable descending sort)
            order = torch.sort(mean, dim=1, descending=True, stable=True).indices[:, :keep]
            alive = torch.zeros_like(alive).scatter_(1, order, True) & alive
    scores = per_draw.nanmean(2)
    stats.full_items = _full_items(images, texts, mode, k, budget(policy))
    stats.settle()
    stats.seconds["total"] = time.perf_counter() - started
    return AdaptiveResult(scores=scores.float(), draws=draws, unet_items=stats.unet_items,
                          full_items=stats.full_items, stats=stats)


def _confident(per_draw: torch.Tensor, z: float) -> torch.Tensor:
    """bool [n]: the best candidate's paired lead over the second exceeds z standard errors."""
    mean = per_draw.mean(2)  # [n, k, S] all defined for the active queries
    top2 = mean.topk(2, dim=1).indices
    rows = torch.arange(len(mean))
    diff = per_draw[rows, top2[:, 0]] - per_draw[rows, top2[:, 1]]  # [n, S]
    if diff.shape[1] < 2:
        return torch.zeros(len(mean), dtype=torch.bool)
    se = diff.std(dim=1) / math.sqrt(diff.shape[1])
    gap = diff.mean(dim=1)
    return (gap > z * se) & (gap > 0)  # False where NaN (queries already stopped)


def _full_items(images: Sequence, texts: Sequence, mode: str, k: int, samples: int) -> int:
    """UNet items of the non-adaptive run as the engine counts them: each distinct (image content,
    caption) pair on every draw, plus, in "t2i", one null-prompt item per distinct image per draw."""
    from itm_engine.cache import content_key, load_rgb

    keys = [content_key(load_rgb(image)) for image in images]
    if mode == "i2t":  # query q is images[q]; its candidates are texts[q * k : (q + 1) * k]
        pairs = {(keys[i // k], text) for i, text in enumerate(texts)}
    else:  # query q is texts[q]; its candidates are images[q * k : (q + 1) * k]
        pairs = {(key, texts[i // k]) for i, key in enumerate(keys)}
    nulls = len({key for key, _ in pairs}) if mode == "t2i" else 0
    return samples * (len(pairs) + nulls)
