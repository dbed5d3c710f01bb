"""`SDComponents`: the parts of a text-to-image diffusion model that DiffusionITM needs, loaded and frozen.

One container for every family (`models.families`): the VAE, the denoiser (a UNet for SD 1.x/2.x
and SDXL, a transformer for SD3, Flux and PixArt), the first text encoder and tokenizer, the
training scheduler, and the family's further pipeline components by their diffusers names
(`text_encoder_2`, `tokenizer_2`, `text_encoder_3`, `tokenizer_3`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import diffusers
import torch
import transformers

from itm_engine.noise import ForwardProcess

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow")


def latent_channels(unet: torch.nn.Module) -> int:
    """Channels of the latents `unet` takes: its ``in_channels`` less the channels a UNet class
    adds to the latent itself (its class attribute ``extra_input_channels``, default 0; e.g. the
    coordinate channels of the ShapesWorld lab's CoordUNet)."""
    return unet.config.in_channels - getattr(type(unet), "extra_input_channels", 0)


@dataclass
class SDComponents:
    """The parts of a diffusion model DiffusionITM needs (all in eval mode, requires_grad False)."""

    vae: diffusers.AutoencoderKL
    denoiser: torch.nn.Module  # UNet2DConditionModel (SD 1.x/2.x, SDXL) or the family's transformer
    text_encoder: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase  # CLIP BPE, or any tokenizer saved in the folder
    scheduler: Any  # the training scheduler: DDPMScheduler, or FlowMatchEulerDiscreteScheduler for flow models
    source: str  # folder path, hub id or "builtin:NAME"
    family: str = "sd"  # models.families.FAMILIES
    extras: dict[str, Any] = field(default_factory=dict)  # further pipeline components, by diffusers name

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the name the SD-family code (training, LoRA, grounding) uses."""
        return self.denoiser

    @unet.setter
    def unet(self, module: torch.nn.Module) -> None:
        self.denoiser = module

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every text encoder: `text_encoder`, then the extras' in name order."""
        return [self.text_encoder] + [self.extras[k] for k in sorted(self.extras) if k.startswith("text_encoder")]

    @property
    def networks(self) -> list[torch.nn.Module]:
        """The VAE, the denoiser and every text encoder."""
        return [self.vae, self.denoiser, *self.text_encoders]

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``"epsilon"`` (the noise), ``"v_prediction"`` or ``"flow"``
        (the flow-matching velocity eps - z0, for a flow-matching scheduler)."""
        return getattr(self.scheduler.config, "prediction_type", None) or "flow"

    @property
    def process(self) -> ForwardProcess:
        """The forward process the denoiser was trained with (`noise.ForwardProcess`); a scheduler
        that shifts its timesteps by image size (Flux's) at the native latents' token count, one
        token per 2x2 latent patch."""
        _, h, w = self.latent_shape
        return ForwardProcess.from_scheduler(self.scheduler, image_seq_len=(h // 2) * (w // 2))

    @property
    def scaling_factor(self) -> float:
        """Multiplier from VAE latent to diffusion latent:
        ``z0 = (vae.encode(x).mean - latent_shift) * scaling_factor``."""
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        """Subtracted from the VAE latent before scaling: ``z0 = (mean - latent_shift) * scaling_factor``
        (the VAE config's ``shift_factor``: SD3, Flux; 0 when it has none)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one latent ``[channels, height, width]`` at the denoiser's native resolution: the
        denoiser config's ``sample_size``; for a denoiser without one (Flux's transformer, which
        takes 2x2 latent patches packed into its channels) the VAE's latents of its native image
        size (the VAE config's ``sample_size``)."""
        size = getattr(self.denoiser.config, "sample_size", None)
        if size is None:
            size = self.vae.config.sample_size // self.vae_scale_factor
            return (self.vae.config.latent_channels, size, size)
        return (latent_channels(self.denoiser), size, size)

    @property
    def image_size(self) -> int:
        """Native image side in pixels."""
        return self.latent_shape[1] * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        """Device of the denoiser."""
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the denoiser."""
        return self.denoiser.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SDComponents:
        """Move every network (`networks`) to ``device`` and/or ``dtype``; returns self."""
        with quiet():  # diffusers 0.42 warns on every dtype cast, even with nothing to keep in fp32
            for net in self.networks:
                net.to(device=device, dtype=dtype)
        return self


def frozen(components: SDComponents, device: torch.device | str, dtype: torch.dtype) -> SDComponents:
    """Move to ``device``/``dtype``, switch to eval mode and turn off gradients."""
    if components.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"{components.source}: unsupported prediction_type {components.prediction_type!r}; "
            f"expected one of {PREDICTION_TYPES}"
        )
    for net in components.networks:
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
