"""The DiffusionITM scorer: I2T and null-normalised T2I estimators over the batched engine.

    score_i2t(x, w) = -mean_s err(x, w, s)
    score_t2i(x, w) = -mean_s [err(x, w, s) - err(x, "", s)]

with every candidate of a call evaluated on the same noise bank (a paired comparison).
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from itm_engine import extras, fastpath
from itm_engine.adaptive import AdaptiveResult, Confidence, Policy
from itm_engine.cache import ImageInput, LatentCache, LatentMode, ResizeMode, TextCache
from itm_engine.engine import Executor, plan_pairs
from itm_engine.fastpath import Attention
from itm_engine.models import SDComponents, load_components
from itm_engine.noise import NoiseBank, Schedule
from itm_engine.pairs import Mode, PairScorer, check_candidates, check_mode, check_pairs
from itm_engine.stats import RunStats

NULL_PROMPT = ""


class DiffusionITM(PairScorer):
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
            components, batch_size=batch_size, progress=progress, kernels=kernels, compile=compile,
            cuda_graphs=cuda_graphs,
        )
        self.last_stats = RunStats()

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        lora: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
        **options,
    ) -> "DiffusionITM":
        """Load from a diffusers folder, a hub id in the local HF cache, or a built-in
        architecture ("tiny", "sd15-arch", "sd21-arch"); `options` go to `__init__`.

        lora: a LoRA checkpoint for the UNet (a folder or file: the diffusers format
        `pytorch_lora_weights.safetensors`, or the research code's legacy `pytorch_lora_weights.bin`),
        applied at `lora_scale` (0: the base model, 1: the fine-tuned one); see `itm_engine.models.lora`.
        """
        components = load_components(source, device=device, dtype=dtype)
        if lora is not None:
            extras.require("peft", "scoring with a LoRA")
            from itm_engine.models.lora import load_lora

            load_lora(components.unet, lora, lora_scale)
        return cls(components, **options)

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
        under one shared noise bank; the general form behind `__call__` and `score_candidates`.

        mode "i2t": raw errors; "t2i": errors minus each image's null-prompt error (per draw).
        The mean over draws of `draw_scores`.
        """
        return self.draw_scores(images, texts, pairs, mode, samples, seed, noise, batch_size, schedule).mean(dim=1)

    def score_adaptive(
        self,
        queries: Sequence,
        candidates: Sequence[Sequence],
        policy: str | Policy,
        mode: Mode = "i2t",
        samples: int = 10,
        seed: int = 0,
        noise: NoiseBank | None = None,
        batch_size: int | None = None,
        schedule: Schedule = "uniform",
    ) -> AdaptiveResult:
        """The per-query candidate form (`score_candidates`) with adaptive successive elimination.

        policy: fixed rounds `[(samples_1, keep_1), ...]`, a `Confidence` rule, or their text
            forms "2:5,10:1" / "auto:z=3" (the budget of "auto" is `samples`); see
            `itm_engine.adaptive` for the exact rules and the ranking of eliminated candidates.
        noise: the draws, taken in bank order (default: a bank of the policy's budget from
            `seed`/`schedule`, reordered by `NoiseBank.spread` so every round's draws cover t).

        Returns an `AdaptiveResult` (scores [n, k], draws [n, k], UNet items used vs the full
        budget); `last_stats` sums the rounds and sets `full_items`.
        """
        from itm_engine.adaptive import budget, check_rounds, parse_policy, score_adaptive

        k = check_candidates(queries, candidates, mode)
        policy = parse_policy(policy, samples) if isinstance(policy, str) else policy
        if not isinstance(policy, Confidence):
            check_rounds(policy, k)
        bank = noise if noise is not None else self.noise_bank(budget(policy), seed, schedule).spread()
        result = score_adaptive(self, queries, candidates, mode, policy, bank, batch_size)
        self.last_stats = result.stats
        return result

    def draw_scores(
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
        """Per-draw scores float32 [P, S] of each pair under each of the bank's S draws:
        -err ("i2t") or -(err - the image's null-prompt err) ("t2i"). Arguments as `score_pairs`.
        """
        pairs = check_pairs(images, texts, pairs)
        check_mode(mode)
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
        return -diff
