"""Reference loops: the research code's pattern (the oracle and the baseline) and a batched baseline.

- **naive** (the DiffusionITM research code): for every (image, text) pair it encodes the image
  with the VAE and the text with the text encoder again, then calls the UNet once per noise draw
  at batch 1; in T2I mode it re-encodes the null prompt and re-runs the UNet on it for every pair.
- **batched** (Diffusion Classifier's pattern): each image and text encoded once, the UNet
  batched over the S draws of one pair; no batching across pairs, no null-error sharing, no
  fused ops.

Both build x_t and v with the diffusers scheduler's own `add_noise`/`get_velocity`, not the
engine's fused ops, so they share only image loading, preprocessing and tokenisation with it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from itm_engine.cache import (
    ImageInput,
    ResizeMode,
    check_list,
    encode_pixels,
    encode_texts,
    load_rgb,
    preprocess_images,
    warn_if_truncated,
)
from itm_engine.models import SDComponents
from itm_engine.noise import NoiseBank

PairList = Sequence[tuple[int, int]]


def _encode_image(components: SDComponents, image: ImageInput, resize_mode: ResizeMode) -> torch.Tensor:
    """z0 [1, C, h, w] float32 of one image."""
    return encode_pixels(components, preprocess_images(components, [load_rgb(image)], resize_mode))


def _encode_text(components: SDComponents, text: str) -> torch.Tensor:
    """Text embedding [1, L, D] in the UNet's dtype."""
    return encode_texts(components, [text]).to(components.unet.dtype)


@torch.inference_mode()
def _draw_errors(components: SDComponents, z0: torch.Tensor, cond: torch.Tensor, bank: NoiseBank,
                 draws: slice) -> torch.Tensor:
    """err(z0, cond, s) for the draws s in `draws`, in one UNet call: float32 [len(draws)]."""
    unet, scheduler = components.unet, components.scheduler
    t = bank.timesteps[draws].to(unet.device)
    eps = bank.noise[draws].to(unet.device)
    z0 = z0.expand(len(t), -1, -1, -1)
    x_t = scheduler.add_noise(z0, eps, t)
    pred = unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond.expand(len(t), -1, -1)).sample
    target = scheduler.get_velocity(z0, eps, t) if components.prediction_type == "v_prediction" else eps
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1).cpu()


def _check(components: SDComponents, images, texts, bank: NoiseBank, mode: str) -> None:
    if mode not in ("i2t", "t2i"):
        raise ValueError(f"mode must be 'i2t' or 't2i', got {mode!r}")
    check_list(images, "images")
    check_list(texts, "texts")
    bank.check_fits(components.latent_shape, components.scheduler.config.num_train_timesteps)
    warn_if_truncated(components, texts)


@torch.inference_mode()
def naive_pair_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    pairs: PairList,
    bank: NoiseBank,
    mode: str = "i2t",
    resize_mode: ResizeMode = "crop",
) -> torch.Tensor:
    """Scores [P] of (images[i], texts[j]) for (i, j) in `pairs` by the research loop:
    P * S UNet items at batch 1, twice that in T2I mode."""
    _check(components, images, texts, bank, mode)
    scores = torch.empty(len(pairs))
    for p, (i, j) in enumerate(pairs):
        z0 = _encode_image(components, images[i], resize_mode)
        cond = _encode_text(components, texts[j])
        null = _encode_text(components, "") if mode == "t2i" else None
        errors = torch.empty(len(bank))
        for s in range(len(bank)):
            draw = slice(s, s + 1)
            errors[s] = _draw_errors(components, z0, cond, bank, draw)[0]
            if null is not None:
                errors[s] -= _draw_errors(components, z0, null, bank, draw)[0]
        scores[p] = -errors.mean()
    return scores


@torch.inference_mode()
def batched_pair_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    pairs: PairList,
    bank: NoiseBank,
    mode: str = "i2t",
    resize_mode: ResizeMode = "crop",
) -> torch.Tensor:
    """Scores [P] by the batched baseline: each image/text encoded once, one UNet call of S items
    per pair (and one more for the null prompt in T2I mode)."""
    _check(components, images, texts, bank, mode)
    latents = {i: _encode_image(components, images[i], resize_mode) for i in dict.fromkeys(i for i, _ in pairs)}
    embeddings = {j: _encode_text(components, texts[j]) for j in dict.fromkeys(j for _, j in pairs)}
    null = _encode_text(components, "") if mode == "t2i" else None
    everything = slice(0, len(bank))
    scores = torch.empty(len(pairs))
    for p, (i, j) in enumerate(pairs):
        errors = _draw_errors(components, latents[i], embeddings[j], bank, everything)
        if null is not None:
            errors = errors - _draw_errors(components, latents[i], null, bank, everything)
        scores[p] = -errors.mean()
    return scores


def all_pairs(n_images: int, n_texts: int) -> list[tuple[int, int]]:
    """Every (image, text) pair, image-major: reshapes to [n_images, n_texts]."""
    return [(i, j) for i in range(n_images) for j in range(n_texts)]


def naive_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    bank: NoiseBank,
    mode: str = "i2t",
    resize_mode: ResizeMode = "crop",
) -> torch.Tensor:
    """Scores [n_images, n_texts] by the research loop (see `naive_pair_scores`)."""
    pairs = all_pairs(len(images), len(texts))
    return naive_pair_scores(components, images, texts, pairs, bank, mode, resize_mode).view(len(images), len(texts))
