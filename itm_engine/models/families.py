"""Model families: how each kind of text-to-image denoiser is conditioned on a caption and called.

The engine's executor is one loop for every family; what differs between them lives here. A
`Family` says, for its diffusers pipeline:

- how captions become conditioning (`encode`): a dict of tensors with one row per caption, exactly
  as the pipeline's own `encode_prompt` pads and stacks them (no text mask where the pipeline
  passes none: the padding is part of the score);
- its null conditioning: `encode` of the empty caption, as the pipeline's unconditional branch
  encodes it (a family whose pipeline zeroes the empty prompt does so in `encode`);
- how the denoiser is called on a batch of noisy latents (`denoise`) and what it returns;

The forward process (noise.ForwardProcess) comes from the family's training scheduler.

Families: "sd" (SD 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, the last hidden state
[n, 77, D]) and "sd3" (SD3 / SD3.5: SD3Transformer2DModel; context = [CLIP-L (+) CLIP-G
penultimate states, zero-padded to the T5 width ; T5 states] [n, 77 + L, J], pooled = CLIP-L (+)
CLIP-G text embeddings [n, P]; flow matching; `StableDiffusion3Pipeline.encode_prompt`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import diffusers
import torch
import transformers

if TYPE_CHECKING:
    from itm_engine.models.components import SDComponents

Conditioning = dict[str, torch.Tensor]  # name -> [n, ...], one row per caption


def select(conditioning: Conditioning, index: torch.Tensor) -> Conditioning:
    """The rows `index` (Long [B]) of every tensor of `conditioning`."""
    return {name: value[index] for name, value in conditioning.items()}


def concat(parts: Sequence[Conditioning]) -> Conditioning:
    """Row-wise concatenation of conditionings with the same names."""
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def to_device(conditioning: Conditioning, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
    """Every tensor on `device`, floating ones in `dtype` (when given)."""
    return {name: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
            for name, value in conditioning.items()}


class Family:
    """SD 1.x / 2.x: one CLIP text encoder, context = its last hidden state [n, 77, D].

    Loading (`models.loading`) reads from a family: its pipeline class (model_index.json's
    `_class_name` decides the family), the denoiser's subfolder and class, the training
    scheduler's class, the text encoders' classes by subfolder (`encoder_classes`), the tokenizer
    subfolders, and which parts a folder must have (`required_parts`).
    """

    name = "sd"
    pipeline_class: type = diffusers.StableDiffusionPipeline
    denoiser_folder = "unet"
    scheduler_class: type = diffusers.DDPMScheduler  # only the training betas and prediction type are read
    tokenizers: tuple[str, ...] = ("tokenizer",)
    required_parts: tuple[str, ...] = ("text_encoder", "tokenizer")

    def denoiser_class(self, config: dict[str, Any]) -> type:
        """The class of the saved denoiser whose config is `config`: for SD 1.x/2.x a UNet class a
        plugin registered (`registry.unet_class`), else diffusers' `UNet2DConditionModel`."""
        from itm_engine.models import registry

        return registry.unet_class(config)

    def encoder_classes(self) -> dict[str, type]:
        """Text encoder subfolder -> its transformers class."""
        return {"text_encoder": transformers.CLIPTextModel}

    def pipeline(self, components: SDComponents) -> Any:
        """The family's diffusers pipeline over `components` (the same modules, no copies)."""
        return self.pipeline_class(**self.pipeline_parts(components))

    def pipeline_parts(self, components: SDComponents) -> dict[str, Any]:
        return dict(vae=components.vae, unet=components.denoiser, text_encoder=components.text_encoder,
                    tokenizer=components.tokenizer, scheduler=components.scheduler, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)

    @torch.inference_mode()
    def encode(self, components: SDComponents, texts: Sequence[str]) -> Conditioning:
        """Captions -> {"context": [n, L, D]}: the text encoder's last hidden state over the captions
        padded to the tokenizer's length L (77 for CLIP), as `StableDiffusionPipeline.encode_prompt`."""
        tokenizer = components.tokenizer
        ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        encoder = components.text_encoder
        return {"context": encoder(ids.to(encoder.device))[0]}

    def denoise(self, components: SDComponents, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, forward: Any = None) -> torch.Tensor:
        """The denoiser's prediction [B, C, h, w] for noisy latents x_t [B, C, h, w] at model
        timesteps [B] under per-item conditioning (rows aligned with x_t); `forward` replaces the
        denoiser module (e.g. a compiled one)."""
        unet = components.denoiser if forward is None else forward
        return unet(x_t, timesteps, encoder_hidden_states=conditioning["context"]).sample

    def conditioning_shapes(self, components: SDComponents) -> dict[str, tuple[int, ...]]:
        """The shape of one caption's row of each conditioning tensor (what `encode` gives)."""
        return {"context": (components.tokenizer.model_max_length, components.denoiser.config.cross_attention_dim)}

    def example_conditioning(self, components: SDComponents, n: int, generator: torch.Generator | None = None
                             ) -> Conditioning:
        """Random conditioning of `n` captions in the denoiser's device and dtype, for probes that
        need only shapes (batch sizing, FLOP counts; on the "meta" device, no values)."""
        device, dtype = components.denoiser.device, components.denoiser.dtype
        if device.type == "meta":
            return {name: torch.empty((n, *shape), device=device, dtype=dtype)
                    for name, shape in self.conditioning_shapes(components).items()}
        return {name: torch.randn((n, *shape), generator=generator, dtype=torch.float32).to(device, dtype)
                for name, shape in self.conditioning_shapes(components).items()}


class SD3Family(Family):
    """SD3 / SD3.5: two CLIP encoders and T5, an MMDiT transformer, flow matching."""

    name = "sd3"
    pipeline_class = diffusers.StableDiffusion3Pipeline
    denoiser_folder = "transformer"
    scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    required_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # T5 is optional in SD3
    max_sequence_length = 256  # the pipeline's default T5 length

    def denoiser_class(self, config: dict[str, Any]) -> type:
        return diffusers.SD3Transformer2DModel

    def encoder_classes(self) -> dict[str, type]:
        return {"text_encoder": transformers.CLIPTextModelWithProjection,
                "text_encoder_2": transformers.CLIPTextModelWithProjection,
                "text_encoder_3": transformers.T5EncoderModel}

    def pipeline_parts(self, components: SDComponents) -> dict[str, Any]:
        return dict(transformer=components.denoiser, scheduler=components.scheduler, vae=components.vae,
                    text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                    text_encoder_2=components.extras["text_encoder_2"], tokenizer_2=components.extras["tokenizer_2"],
                    text_encoder_3=components.extras.get("text_encoder_3"),
                    tokenizer_3=components.extras.get("tokenizer_3"))

    @torch.inference_mode()
    def encode(self, components: SDComponents, texts: Sequence[str]) -> Conditioning:
        """Captions -> {"context": [n, 77 + L, J], "pooled": [n, P]} from the pipeline's own
        `encode_prompt` (L = `max_sequence_length` T5 tokens; without a T5 encoder, zeros)."""
        context, _, pooled, _ = self.pipeline(components).encode_prompt(
            prompt=list(texts), prompt_2=None, prompt_3=None, device=components.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"context": context, "pooled": pooled}

    def denoise(self, components: SDComponents, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, forward: Any = None) -> torch.Tensor:
        transformer = components.denoiser if forward is None else forward
        return transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=conditioning["context"],
                           pooled_projections=conditioning["pooled"]).sample

    def conditioning_shapes(self, components: SDComponents) -> dict[str, tuple[int, ...]]:
        config = components.denoiser.config
        tokens = components.tokenizer.model_max_length + self.max_sequence_length
        return {"context": (tokens, config.joint_attention_dim),
                "pooled": (config.pooled_projection_dim,)}


FAMILIES: dict[str, Family] = {family.name: family for family in (Family(), SD3Family())}
# model_index.json's pipeline class -> family
PIPELINE_FAMILIES: dict[str, str] = {family.pipeline_class.__name__: name for name, family in FAMILIES.items()}


def family_of(components: SDComponents) -> Family:
    """The adapter of `components.family`."""
    return FAMILIES[components.family]
