"""`SDComponents`: the parts of a Stable Diffusion model that DiffusionITM needs, loaded and frozen."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import diffusers
import torch
import transformers

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")


def latent_channels(unet: torch.nn.Module) -> int:
    """Channels of the latents `unet` takes: its ``in_channels`` less the channels a UNet class
    adds to the latent itself (its class attribute ``extra_input_channels``, default 0; e.g. the
    coordinate channels of the ShapesWorld lab's CoordUNet)."""
    return unet.config.in_channels - getattr(type(unet), "extra_input_channels", 0)


@dataclass
class SDComponents:
    """The Stable Diffusion parts DiffusionITM needs (all in eval mode, requires_grad False)."""

    vae: diffusers.AutoencoderKL
    unet: diffusers.UNet2DConditionModel
    text_encoder: transformers.CLIPTextModel
    tokenizer: transformers.PreTrainedTokenizerBase  # CLIP BPE, or any tokenizer saved in the folder
    scheduler: diffusers.DDPMScheduler
    source: str  # folder path, hub id or "builtin:NAME"

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``"epsilon"`` (the noise) or ``"v_prediction"``."""
        return self.scheduler.config.prediction_type

    @property
    def scaling_factor(self) -> float:
        """Multiplier from VAE latent to diffusion latent: ``z0 = vae.encode(x).mean * scaling_factor``."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one latent ``[channels, height, width]`` at the UNet's native resolution."""
        size = self.unet.config.sample_size
        return (latent_channels(self.unet), size, size)

    @property
    def image_size(self) -> int:
        """Native image side in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        """Device of the UNet."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the UNet."""
        return self.unet.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SDComponents:
        """Move the VAE, UNet and text encoder to ``device`` and/or ``dtype``; returns self."""
        with quiet():  # diffusers 0.42 warns on every dtype cast, even with nothing to keep in fp32
            for net in (self.vae, self.unet, self.text_encoder):
                net.to(device=device, dtype=dtype)
        return self


def frozen(components: SDComponents, device: torch.device | str, dtype: torch.dtype) -> SDComponents:
    """Move to ``device``/``dtype``, switch to eval mode and turn off gradients."""
    if components.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"{components.source}: unsupported prediction_type {components.prediction_type!r}; "
            f"expected one of {PREDICTION_TYPES}"
        )
    for net in (components.vae, components.unet, components.text_encoder):
        net.eval().requires_grad_(False)
    return components.to(device, dtype)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence diffusers' and transformers' info/warning logs and progress bars while loading."""
    libraries = (diffusers.utils.logging, transformers.utils.logging)
    levels = [lib.get_verbosity() for lib in libraries]
    bars = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bar in zip(libraries, levels, bars):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()
