"""The DiffusionITM scorer: I2T and null-normalised T2I estimators over the batched engine.

    score_i2t(x, w) = -mean_s err(x, w, s)
    score_t2i(x, w) = -mean_s [err(x, w, s) - err(x, "", s)]

with every candidate of a call evaluated on the same noise bank (a paired comparison).
"""
from __future__ import annotations

import os
import time
from typing import Literal, Sequence

import torch

from itm_engine import fastpath
from itm_engine.cache import ImageInput, LatentCache, LatentMode, ResizeMode, TextCache, check_list
from itm_engine.engine import Executor, plan_pairs
from itm_engine.fastpath import Attention
from itm_engine.models import SDComponents, load_components
from itm_engine.noise import NoiseBank, Schedule
from itm_engine.stats import RunStats

Mode = Literal["i2t", "t2i"]
NULL_PROMPT = ""


class DiffusionITM:
    """Stable Diffusion as a zero-shot image-text matcher.

    >>> scorer = DiffusionITM.from_pretrained("tiny")
    >>> scores = scorer(images=[img_a, img_b], texts=["a dog", "a cat"])   # [2, 2], higher = better

    The scorer keeps its latent and text caches across calls (`clear_cache()` empties them) and
    reports what the last call did in `last_stats`.
    """

    def __init__(
        self,
        components: SDComponents,
        *,
        batch_size: int | str = 64,
        latent: LatentMode = "mean",
        resize_mode: ResizeMode = "crop",
        progress: bool | None = None,
        kernels: str | None = None,
        attention: Attention = "sdpa",
        channels_last: bool = False,
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        """
        Args:
            components: the loaded Stable Diffusion parts (see `itm_engine.models`).
            batch_size: UNet work items per call (any mix of images, texts and timesteps), or
                "auto": the largest that fits on the GPU (64 on the CPU).
            latent: "mean" (deterministic posterior mean, the default) or "sample" (a draw
                seeded by the image content).
            resize_mode: image resize policy, see `itm_engine.cache`.
            progress: show a progress bar (None: only for long runs on a terminal).
            kernels: fused-op backend, "reference" | "triton" | "ext" | "auto" (None: the
                ITM_KERNELS environment variable, default "auto"); see `itm_engine.kernels`.
            attention: "sdpa" (PyTorch flash / memory-efficient attention), "xformers" or "math".
            channels_last: store the UNet's conv weights NHWC (faster convs on tensor cores).
            compile: `torch.compile` the UNet with fixed batch shapes (the last batch is padded).
            cuda_graphs: replay the compiled UNet as CUDA graphs ("reduce-overhead"; implies compile).

        attention and channels_last change `components.unet` in place.
        """
        fastpath.set_attention(components.unet, attention)
        if channels_last:
            fastpath.use_channels_last(components.unet)
        self.components = components
        self.latent_cache = LatentCache(components, latent=latent, resize_mode=resize_mode)
        self.text_cache = TextCache(components)
        self.executor = Executor(
            components, batch_size=batch_size, progress=progress, kernels=kernels, compile=compile, cuda_graphs=cuda_graphs
        )
        self.last_stats = RunStats()

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **options,
    ) -> "DiffusionITM":
        """Load from a diffusers folder, a hub id in the local HF cache, or a built-in
        architecture ("tiny", "sd15-arch", "sd21-arch"); `options` go to `__init__`."""
        return cls(load_components(source, device=device, dtype=dtype), **options)

    def clear_cache(self) -> None:
        """Forget every cached latent and text embedding."""
        self.latent_cache.clear()
        self.text_cache.clear()

    def noise_bank(self, samples: int = 10, seed: int = 0, schedule: Schedule = "uniform") -> NoiseBank:
        """A bank of `samples` draws for this model's latents, reproducible from `seed`."""
        return NoiseBank.sample(
            samples,
            self.components.latent_shape,
            seed=seed,
            schedule=schedule,
            num_train_timesteps=self.components.scheduler.config.num_train_timesteps,
        )

    def __call__(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        mode: Mode = "i2t",
        samples: int = 10,
        seed: int = 0,
        noise: NoiseBank | None = None,
        batch_size: int | None = None,
        schedule: Schedule = "uniform",
    ) -> torch.Tensor:
        """Score every image against every text: float32 Tensor [n_images, n_texts], higher = better.

        Args:
            mode: "i2t" (raw errors; compare texts for an image) or "t2i" (errors minus the
                image's null-prompt error; compare images for a text).
            samples, seed, schedule: the noise bank to draw; `noise` gives one and overrides them.
            batch_size: UNet items per call for this call (default: the scorer's).
        """
        check_list(images, "images")
        check_list(texts, "texts")
        pairs = torch.cartesian_prod(torch.arange(len(images)), torch.arange(len(texts)))
        scores = self.score_pairs(images, texts, pairs, mode, samples, seed, noise, batch_size, schedule)
        return scores.view(len(images), len(texts))

    def score_candidates(
        self,
        queries: Sequence,
        candidates: Sequence[Sequence],
        mode: Mode = "i2t",
        samples: int = 10,
        seed: int = 0,
        noise: NoiseBank | None = None,
        batch_size: int | None = None,
        schedule: Schedule = "uniform",
    ) -> torch.Tensor:
        """Score each query against its own k candidates: float32 Tensor [n_queries, k].

        mode "i2t": queries are images, candidates[q] is a list of k texts for image q.
        mode "t2i": queries are texts, candidates[q] is a list of k images for text q
        (null-normalised). Only the listed pairs reach the UNet; a candidate shared between
        queries is encoded and evaluated once.
        """
        check_list(queries, "queries")
        if len(candidates) != len(queries):
            raise ValueError(f"got {len(queries)} queries but {len(candidates)} candidate lists")
        k = len(candidates[0])
        for q, cands in enumerate(candidates):
            check_list(cands, f"candidates[{q}]")
            if len(cands) != k:
                raise ValueError(f"candidates[{q}] has {len(cands)} entries, candidates[0] has {k}: all need the same k")
        flat = [c for cands in candidates for c in cands]
        query_idx = torch.arange(len(queries)).repeat_interleave(k)
        flat_idx = torch.arange(len(flat))
        if mode == "i2t":
            images, texts, pairs = queries, flat, torch.stack([query_idx, flat_idx], dim=1)
        elif mode == "t2i":
            images, texts, pairs = flat, queries, torch.stack([flat_idx, query_idx], dim=1)
        else:
            raise ValueError(f"mode must be 'i2t' or 't2i', got {mode!r}")
        scores = self.score_pairs(images, texts, pairs, mode, samples, seed, noise, batch_size, schedule)
        return scores.view(len(queries), k)

    def score_pairs(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        pairs: torch.Tensor | Sequence[tuple[int, int]],
        mode: Mode = "i2t",
        samples: int = 10,
        seed: int = 0,
        noise: NoiseBank | None = None,
        batch_size: int | None = None,
        schedule: Schedule = "uniform",
    ) -> torch.Tensor:
        """Scores float32 [P] of (images[i], texts[j]) for each (i, j) of `pairs` ([P, 2]), all
        under one shared noise bank; the general form behind `__call__` and `score_candidates`."""
        check_list(images, "images")
        check_list(texts, "texts")
        pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
        if len(pairs) == 0:
            raise ValueError("pairs is empty")
        for axis, (what, count) in enumerate((("image", len(images)), ("text", len(texts)))):
            bad = (pairs[:, axis] < 0) | (pairs[:, axis] >= count)
            if bad.any():
                row = int(bad.nonzero()[0])
                raise ValueError(f"pairs[{row}] names {what} {int(pairs[row, axis])}, but there are {count}")
        if mode not in ("i2t", "t2i"):
            raise ValueError(f"mode must be 'i2t' or 't2i', got {mode!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bank = noise if noise is not None else self.noise_bank(samples, seed, schedule)
        bank.check_fits(self.components.latent_shape, self.components.scheduler.config.num_train_timesteps)

        stats = RunStats()
        started = time.perf_counter()
        latents, image_row = self.latent_cache.get(images, stats)
        with_null = mode == "t2i"
        embeddings, text_row = self.text_cache.get(list(texts) + [NULL_PROMPT] * with_null, stats)

        # Distinct (latent row, text row) pairs: duplicates in the input are evaluated once.
        wanted = torch.stack([image_row[pairs[:, 0]], text_row[pairs[:, 1]]], dim=1)
        if with_null:
            null_row = text_row[-1]
            used_latents = wanted[:, 0].unique()
            wanted = torch.cat([wanted, torch.stack([used_latents, null_row.expand_as(used_latents)], 1)])
        unique_pairs, inverse = wanted.unique(dim=0, return_inverse=True)

        errors = self.executor.run(latents, embeddings, bank, plan_pairs(unique_pairs, len(bank)), stats, batch_size)
        pair_err = errors.view(len(unique_pairs), len(bank))[inverse].cpu()  # [P (+ nulls), S]
        if with_null:
            null_err = pair_err[len(pairs):]  # one per used latent, in used_latents order
            null_of = torch.empty(len(latents), dtype=torch.long)
            null_of[used_latents] = torch.arange(len(used_latents))
            diff = pair_err[: len(pairs)] - null_err[null_of[wanted[: len(pairs), 0]]]
        else:
            diff = pair_err
        stats.seconds["total"] = time.perf_counter() - started
        self.last_stats = stats
        return -diff.mean(dim=1)
