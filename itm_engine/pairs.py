"""The call surface every image-text scorer shares (DiffusionITM, the CLIP baseline).

A scorer implements `score_pairs(images, texts, pairs, mode, ...) -> [P]`; this base class
derives from it the full matrix (`__call__`) and the per-query candidate form (`score_candidates`),
and checks the arguments the same way for all.
"""
from __future__ import annotations

import abc
from typing import Any, Literal, Sequence

import torch

from itm_engine.cache import as_list

Mode = Literal["i2t", "t2i"]


def check_mode(mode: str) -> None:
    if mode not in ("i2t", "t2i"):
        raise ValueError(f"mode must be 'i2t' or 't2i', got {mode!r}")


def check_pairs(images: Sequence, texts: Sequence, pairs) -> torch.Tensor:
    """`pairs` as LongTensor [P, 2], checked: a non-empty [P, 2] table of integer indices in range of
    the image and text lists (no reshaping, no truncation of fractional indices)."""
    if isinstance(pairs, torch.Tensor):
        table = pairs.detach().cpu()
    else:
        try:
            table = torch.as_tensor(pairs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"pairs must be a [P, 2] table of (image, text) indices ({err})") from None
    if table.numel() == 0:
        raise ValueError("pairs is empty")
    if table.dim() != 2 or table.shape[1] != 2:
        raise ValueError(f"pairs must have shape [P, 2] (image index, text index), got {tuple(table.shape)}")
    if table.dtype == torch.bool or table.is_floating_point() or table.is_complex():
        raise ValueError(f"pairs must hold integer indices, got {table.dtype}")
    pairs = table.long()
    for axis, (what, count) in enumerate((("image", len(images)), ("text", len(texts)))):
        bad = (pairs[:, axis] < 0) | (pairs[:, axis] >= count)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(f"pairs[{row}] names {what} {int(pairs[row, axis])}, but there are {count}")
    return pairs


def as_candidates(queries, candidates) -> tuple[Sequence, list[Sequence]]:
    """The per-query candidate form as sequences (`cache.as_list`: generators are read)."""
    queries = as_list(queries, "queries")
    candidates = [as_list(cands, f"candidates[{q}]") for q, cands in enumerate(as_list(candidates, "candidates"))]
    return queries, candidates


def check_candidates(queries: Sequence, candidates: Sequence[Sequence], mode: str) -> int:
    """Check the per-query candidate form (from `as_candidates`: one non-empty list of k candidates
    per query, the same k for all, a valid mode); returns k."""
    check_mode(mode)
    if len(candidates) != len(queries):
        raise ValueError(f"got {len(queries)} queries but {len(candidates)} candidate lists")
    k = len(candidates[0])
    for q, cands in enumerate(candidates):
        if len(cands) != k:
            raise ValueError(f"candidates[{q}] has {len(cands)} entries, candidates[0] has {k}: all need the same k")
    return k


class PairScorer(abc.ABC):
    """Base of the scorers: implement `score_pairs`; get `__call__` and `score_candidates`.

    `options` of the three calls are the scorer's own (DiffusionITM: `noise=`, `batch_size=`,
    `protocol=` and protocol fields such as `samples=`, `seed=`; the CLIP scorer takes none)."""

    @abc.abstractmethod
    def score_pairs(self, images: Sequence, texts: Sequence[str], pairs: torch.Tensor | Sequence[tuple[int, int]],
                    mode: Mode = "i2t", **options: Any) -> torch.Tensor:
        """Scores float32 [P] of (images[i], texts[j]) for each (i, j) of `pairs` ([P, 2]).

        `images` and `texts` are lists (or any iterable: read once into a list)."""

    def __call__(self, images: Sequence, texts: Sequence[str], mode: Mode = "i2t", **options: Any) -> torch.Tensor:
        """Score every image against every text: float32 Tensor [n_images, n_texts], higher = better.

        mode: "i2t" (compare texts for an image) or "t2i" (compare images for a text).
        """
        images, texts = as_list(images, "images"), as_list(texts, "texts")
        pairs = torch.cartesian_prod(torch.arange(len(images)), torch.arange(len(texts)))
        return self.score_pairs(images, texts, pairs, mode, **options).view(len(images), len(texts))

    def score_candidates(self, queries: Sequence, candidates: Sequence[Sequence], mode: Mode = "i2t",
                         **options: Any) -> torch.Tensor:
        """Score each query against its own k candidates: float32 Tensor [n_queries, k].

        mode "i2t": queries are images, candidates[q] is a list of k texts for image q.
        mode "t2i": queries are texts, candidates[q] is a list of k images for text q.
        Only the listed pairs are scored; a candidate shared between queries is encoded once.
        """
        queries, candidates = as_candidates(queries, candidates)
        k = check_candidates(queries, candidates, mode)
        flat = [c for cands in candidates for c in cands]
        query_idx = torch.arange(len(queries)).repeat_interleave(k)
        flat_idx = torch.arange(len(flat))
        if mode == "i2t":
            images, texts, pairs = queries, flat, torch.stack([query_idx, flat_idx], dim=1)
        else:
            images, texts, pairs = flat, queries, torch.stack([flat_idx, query_idx], dim=1)
        return self.score_pairs(images, texts, pairs, mode, **options).view(len(queries), k)
