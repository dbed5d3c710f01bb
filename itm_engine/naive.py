"""The naive reference loop: the research code's pattern, kept as the oracle and the baseline.

For every (image, text) pair it encodes the image with the VAE and the text with the text encoder
again, then calls the UNet once per noise draw at batch 1; in T2I mode it also re-encodes the null
prompt and re-runs the UNet on it for every pair. Noisy latents and v-targets come from the
diffusers scheduler (`add_noise`, `get_velocity`), not from the engine's fused ops, so the two
paths share only image loading, preprocessing and the text tokenisation.
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


@torch.inference_mode()
def naive_pair_errors(
    components: SDComponents, image: ImageInput, text: str, bank: NoiseBank, resize_mode: ResizeMode = "crop"
) -> torch.Tensor:
    """err(x, w, s) for every draw s of `bank`: float32 [S], one UNet call per draw."""
    unet, scheduler = components.unet, components.scheduler
    pixels = preprocess_images(components, [load_rgb(image)], resize_mode)
    z0 = encode_pixels(components, pixels)  # [1, C, h, w], float32
    cond = encode_texts(components, [text]).to(unet.dtype)  # [1, L, D]
    errors = torch.empty(len(bank))
    for s in range(len(bank)):
        t = bank.timesteps[s : s + 1].to(unet.device)
        eps = bank.noise[s : s + 1].to(unet.device)
        x_t = scheduler.add_noise(z0, eps, t)
        pred = unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond).sample
        if components.prediction_type == "v_prediction":
            target = scheduler.get_velocity(z0, eps, t)
        else:
            target = eps
        errors[s] = F.mse_loss(pred.float(), target.float())
    return errors


def naive_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    bank: NoiseBank,
    mode: str = "i2t",
    resize_mode: ResizeMode = "crop",
) -> torch.Tensor:
    """Scores [n_images, n_texts] by the research loop: 2 * n_img * n_txt * S UNet items in T2I
    mode (the null prompt is re-run for every pair), n_img * n_txt * S in I2T mode."""
    if mode not in ("i2t", "t2i"):
        raise ValueError(f"mode must be 'i2t' or 't2i', got {mode!r}")
    check_list(images, "images")
    check_list(texts, "texts")
    bank.check_fits(components.latent_shape, components.scheduler.config.num_train_timesteps)
    warn_if_truncated(components, texts)
    scores = torch.empty(len(images), len(texts))
    for i, image in enumerate(images):
        for j, text in enumerate(texts):
            err = naive_pair_errors(components, image, text, bank, resize_mode)
            if mode == "t2i":
                err = err - naive_pair_errors(components, image, "", bank, resize_mode)
            scores[i, j] = -err.mean()
    return scores
