"""Model families: how each kind of text-to-image denoiser is conditioned on a caption and called.

The engine's executor is one loop for every family; what differs between them lives here. A
`Family` says, for its diffusers pipeline:

- how captions become conditioning (`encode`): a dict of tensors with one row per caption, exactly
  as the pipeline's own `encode_prompt` pads and stacks them (no text mask where the pipeline
  passes none: the padding is part of the score);
- its null conditioning: `encode` of the empty caption, as the pipeline's unconditional branch
  encodes it (a family whose pipeline zeroes the empty prompt does so in `encode`);
- how the denoiser is called on a batch of noisy latents (`denoise`) and what it returns;
- which fields of the scoring protocol reach the denoiser (`protocol_inputs`: FLUX.1-dev's guidance);

The forward process (noise.ForwardProcess) comes from the family's training scheduler.

Families: "sd" (SD 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, the last hidden state
[n, 77, D]) and "sd3" (SD3 / SD3.5: SD3Transformer2DModel; context = [CLIP-L (+) CLIP-G
penultimate states, zero-padded to the T5 width ; T5 states] [n, 77 + L, J], pooled = CLIP-L (+)
CLIP-G text embeddings [n, P]; flow matching; `StableDiffusion3Pipeline.encode_prompt`).
"flux" (FLUX.1-dev / -schnell: FluxTransformer2DModel on packed 2x2 latent patches; context = T5
states [n, 512, J], pooled = CLIP-L pooled output [n, 768]; flow matching shifted by image size;
a guidance value on dev; `FluxPipeline.encode_prompt`).
"pixart" / "pixart-alpha" (PixArt-Sigma / -Alpha: PixArtTransformer2DModel; context = T5 states
[n, L, 4096] with their attention mask Long [n, L], the pipeline's cross-attention mask; DDPM,
epsilon, the eps half of a learned-variance output; `PixArtSigmaPipeline.encode_prompt`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import diffusers
import torch
import transformers

if TYPE_CHECKING:
    from itm_engine.models.components import SDComponents
    from itm_engine.protocols import Protocol

Conditioning = dict[str, torch.Tensor]  # name -> [n, ...], one row per caption


def select(conditioning: Conditioning, index: torch.Tensor) -> Conditioning:
    """The rows `index` (Long [B]) of every tensor of `conditioning`."""
    return {name: value[index] for name, value in conditioning.items()}


def to_device(conditioning: Conditioning, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
    """Every tensor on `device`, floating ones in `dtype` (when given)."""
    return {name: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
            for name, value in conditioning.items()}


class Family:
    """SD 1.x / 2.x: one CLIP text encoder, context = its last hidden state [n, 77, D].

    Loading (`models.loading`) reads from a family: its pipeline class (model_index.json's
    `_class_name` decides the family), the denoiser's subfolder and class, the training
    scheduler's class (`scheduler_class_for`), the text encoders' classes by subfolder
    (`encoder_classes`), the tokenizer subfolders, and which parts a folder must have
    (`required_parts`).
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

    def scheduler_class_for(self, config: dict[str, Any]) -> type:
        """The class the saved training scheduler whose config (scheduler_config.json) is `config`
        loads as: `FlowMatchEulerDiscreteScheduler` when it names that class (a denoiser trained by
        flow matching, such as `itm-shapes pretrain --prediction-type flow`'s UNet; scored with the
        "flow" process), else the family's `scheduler_class`."""
        if config.get("_class_name") == diffusers.FlowMatchEulerDiscreteScheduler.__name__:
            return diffusers.FlowMatchEulerDiscreteScheduler
        return self.scheduler_class

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

    def token_limit(self, components: SDComponents) -> int:
        """Tokens of a caption `encode` keeps (longer captions are truncated): the tokenizer's length."""
        return components.tokenizer.model_max_length

    def image_conditioning(self, components: SDComponents, sizes: torch.Tensor, resize: str) -> Conditioning:
        """Conditioning that comes from the image rather than the caption, one row per image of
        original sizes Long [U, 2] (height, width) prepared by `resize` ("crop", "stretch", "pad"):
        none for most families ({})."""
        return {}

    def protocol_inputs(self, protocol: Protocol) -> dict[str, Any]:
        """Keyword arguments of `denoise` that the scoring protocol sets (FLUX.1-dev's guidance):
        none for most families ({})."""
        return {}

    def denoise(self, components: SDComponents, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, forward: Any = None) -> torch.Tensor:
        """The denoiser's prediction [B, C, h, w] for noisy latents x_t [B, C, h, w] at model
        timesteps [B] under per-item conditioning (the caption's and the image's rows, aligned with
        x_t); `forward` replaces the denoiser module (e.g. a compiled one)."""
        unet = components.denoiser if forward is None else forward
        return unet(x_t, timesteps, encoder_hidden_states=conditioning["context"]).sample

    def conditioning_shapes(self, components: SDComponents) -> dict[str, tuple[int, ...]]:
        """The shape of one caption's row of each conditioning tensor (what `encode` gives)."""
        return {"context": (components.tokenizer.model_max_length, components.denoiser.config.cross_attention_dim)}

    def example_inputs(self, components: SDComponents, n: int) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Arguments of `denoise` for `n` random items in the denoiser's device and dtype, for
        probes that need only shapes (batch sizing, FLOP counts, bare timings; on the "meta"
        device, no values): noisy latents [n, C, h, w], the model timesteps of the middle of the
        training grid [n], and `example_conditioning`."""
        device, dtype = components.denoiser.device, components.denoiser.dtype
        make = torch.empty if device.type == "meta" else torch.randn
        x_t = make(n, *components.latent_shape, device=device, dtype=dtype)
        timesteps = components.process.from_grid(torch.full((n,), components.process.num_train_timesteps // 2))
        return x_t, timesteps.to(device), self.example_conditioning(components, n)

    def example_conditioning(self, components: SDComponents, n: int) -> Conditioning:
        """Random conditioning of `n` captions in the denoiser's device and dtype, for probes that
        need only shapes (batch sizing, FLOP counts; on the "meta" device, no values)."""
        device, dtype = components.denoiser.device, components.denoiser.dtype
        if device.type == "meta":
            return {name: torch.empty((n, *shape), device=device, dtype=dtype)
                    for name, shape in self.conditioning_shapes(components).items()}
        return {name: torch.randn((n, *shape), dtype=torch.float32).to(device, dtype)
                for name, shape in self.conditioning_shapes(components).items()}


class SDXLFamily(Family):
    """SDXL: CLIP-L and OpenCLIP bigG, a UNet with the "text_time" added conditioning.

    context = CLIP-L (+) bigG penultimate states [n, 77, 2048]; text_embeds = bigG's projected
    pooled embedding [n, 1280]; the empty caption is zeros (`force_zeros_for_empty_prompt`, the
    pipeline's unconditional branch); time_ids [6] per image = (original height, width, crop
    top, crop left, R, R) of the engine's resize, as SDXL's training script records them."""

    name = "sdxl"
    pipeline_class = diffusers.StableDiffusionXLPipeline
    tokenizers = ("tokenizer", "tokenizer_2")
    required_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def encoder_classes(self) -> dict[str, type]:
        return {"text_encoder": transformers.CLIPTextModel, "text_encoder_2": transformers.CLIPTextModelWithProjection}

    def pipeline_parts(self, components: SDComponents) -> dict[str, Any]:
        return dict(vae=components.vae, unet=components.denoiser, text_encoder=components.text_encoder,
                    tokenizer=components.tokenizer, text_encoder_2=components.extras["text_encoder_2"],
                    tokenizer_2=components.extras["tokenizer_2"], scheduler=components.scheduler)

    @torch.inference_mode()
    def encode(self, components: SDComponents, texts: Sequence[str]) -> Conditioning:
        """Captions -> {"context": [n, 77, D1 + D2], "text_embeds": [n, P]} from the pipeline's own
        `encode_prompt`; the empty caption gives zeros (the pipeline's zeroed negative prompt)."""
        context, _, pooled, _ = self.pipeline(components).encode_prompt(
            prompt=list(texts), device=components.text_encoder.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        empty = torch.tensor([text == "" for text in texts], device=context.device)
        zero = empty.view(-1, 1, 1)
        return {"context": torch.where(zero, 0.0, context), "text_embeds": torch.where(zero[:, 0], 0.0, pooled)}

    def image_conditioning(self, components: SDComponents, sizes: torch.Tensor, resize: str) -> Conditioning:
        """{"time_ids": float [U, 6]}: (h, w, crop top, crop left, R, R) per image; "crop" is the
        training script's Resize (short side to R) then centre crop, the others crop nothing."""
        R = components.image_size
        rows = []
        for h, w in sizes.tolist():
            top = left = 0
            if resize == "crop":  # torchvision's Resize sizes, the training script's rounded offsets
                rh, rw = (R, int(R * w / h)) if h <= w else (int(R * h / w), R)
                top, left = max(0, int(round((rh - R) / 2.0))), max(0, int(round((rw - R) / 2.0)))
            rows.append([h, w, top, left, R, R])
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def denoise(self, components: SDComponents, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, forward: Any = None) -> torch.Tensor:
        unet = components.denoiser if forward is None else forward
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return unet(x_t, timesteps, encoder_hidden_states=conditioning["context"], added_cond_kwargs=added).sample

    def conditioning_shapes(self, components: SDComponents) -> dict[str, tuple[int, ...]]:
        return {"context": (components.tokenizer.model_max_length, components.denoiser.config.cross_attention_dim),
                "text_embeds": (components.extras["text_encoder_2"].config.projection_dim,), "time_ids": (6,)}


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


class PixArtFamily(Family):
    """PixArt-Sigma: one T5 encoder, a DiT (`PixArtTransformer2DModel`) whose cross-attention is
    masked to the caption's tokens, DDPM epsilon prediction with a learned variance.

    context = T5's last hidden state [n, L, D] over the caption padded to L = `max_sequence_length`
    tokens, mask = its attention mask Long [n, L] (1 on the caption's tokens, kept integer so that
    `to_device` leaves it alone): `encode_prompt` of the pipeline, which lowercases and strips the
    caption (`clean_caption=False`; the pipeline's default caption cleaning needs bs4 and ftfy and
    falls back to this without them). The empty caption with its mask is the null conditioning,
    as the pipeline encodes its negative prompt "". The transformer predicts [eps ; variance]
    (out_channels = 2 x latent channels); `denoise` returns the eps half. The training schedule is
    DDPM (linear betas 1e-4..0.02, 1000 steps, epsilon); released folders ship a DPMSolver
    inference scheduler, read as a DDPMScheduler (only its betas and prediction type are used).
    """

    name = "pixart"
    pipeline_class: type = diffusers.PixArtSigmaPipeline
    denoiser_folder = "transformer"
    max_sequence_length = 300  # T5 tokens: PixArt-Sigma's pipeline default (PixArt-Alpha's: 120)

    def denoiser_class(self, config: dict[str, Any]) -> type:
        return diffusers.PixArtTransformer2DModel

    def encoder_classes(self) -> dict[str, type]:
        return {"text_encoder": transformers.T5EncoderModel}

    def pipeline_parts(self, components: SDComponents) -> dict[str, Any]:
        return dict(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
                    transformer=components.denoiser, scheduler=components.scheduler)

    @torch.inference_mode()
    def encode(self, components: SDComponents, texts: Sequence[str]) -> Conditioning:
        """Captions -> {"context": [n, L, D], "mask": Long [n, L]} from the pipeline's own
        `encode_prompt` (L = `max_sequence_length`, D = T5's width)."""
        context, mask, _, _ = self.pipeline(components).encode_prompt(
            list(texts), do_classifier_free_guidance=False, device=components.text_encoder.device,
            clean_caption=False, max_sequence_length=self.max_sequence_length)
        return {"context": context, "mask": mask}

    def token_limit(self, components: SDComponents) -> int:
        return self.max_sequence_length

    def micro_conditions(self, components: SDComponents, x_t: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The transformer's `added_cond_kwargs` for noisy latents x_t [B, C, h, w], as the pipeline
        passes them: a transformer with `use_additional_conditions` (PixArt-Alpha at 1024 px) takes
        the image's resolution [B, 2] (height, width in pixels) and aspect ratio [B, 1] (height /
        width), in x_t's dtype; any other takes None for both."""
        if not components.denoiser.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        (h, w), B = x_t.shape[-2:], x_t.shape[0]
        scale = components.vae_scale_factor
        resolution = torch.tensor([[h * scale, w * scale]], dtype=x_t.dtype, device=x_t.device).expand(B, 2)
        return {"resolution": resolution, "aspect_ratio": torch.full((B, 1), h / w, dtype=x_t.dtype, device=x_t.device)}

    def denoise(self, components: SDComponents, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, forward: Any = None) -> torch.Tensor:
        """The eps prediction [B, C, h, w]: the first C output channels when the transformer also
        predicts the variance (out_channels = 2C, the pipeline's "learned sigma" split)."""
        transformer = components.denoiser if forward is None else forward
        pred = transformer(x_t, encoder_hidden_states=conditioning["context"],
                           encoder_attention_mask=conditioning["mask"], timestep=timesteps,
                           added_cond_kwargs=self.micro_conditions(components, x_t)).sample
        return pred.chunk(2, dim=1)[0] if components.denoiser.config.out_channels // 2 == x_t.shape[1] else pred

    def conditioning_shapes(self, components: SDComponents) -> dict[str, tuple[int, ...]]:
        return {"context": (self.max_sequence_length, components.denoiser.config.caption_channels),
                "mask": (self.max_sequence_length,)}

    def example_conditioning(self, components: SDComponents, n: int) -> Conditioning:
        """Random states and an all-ones mask (Long: every token attended)."""
        conditioning = super().example_conditioning(components, n)
        mask = conditioning["mask"]
        conditioning["mask"] = torch.ones(mask.shape, dtype=torch.long, device=mask.device)
        return conditioning


class PixArtAlphaFamily(PixArtFamily):
    """PixArt-Alpha: PixArt-Sigma's adapter under `PixArtAlphaPipeline` (the same `encode_prompt`)
    with its 120-token T5 default; its 1024 px transformer takes the resolution micro-conditions
    (`PixArtFamily.micro_conditions`)."""

    name = "pixart-alpha"
    pipeline_class = diffusers.PixArtAlphaPipeline
    max_sequence_length = 120


class FluxFamily(Family):
    """FLUX.1-dev and FLUX.1-schnell: CLIP-L and T5, a rectified-flow transformer on packed latents.

    context = T5's last hidden state [n, 512, J] (the pipeline pads to `max_sequence_length` = 512),
    pooled = CLIP-L's pooled output [n, 768]: the pipeline's own `encode_prompt`; the null
    conditioning is that of "". The transformer takes the latent's 2x2 patches as tokens [B, h/2 *
    w/2, 4C] (`FluxPipeline._pack_latents`), their (0, row, col) position ids and all-zero ids of
    the text tokens, the timestep T sigma / 1000, and on FLUX.1-dev (`guidance_embeds`) a guidance
    value; `denoise` unpacks its velocity back to [B, C, h, w], so the engine's error against the
    flow target eps - z0 is the packed one (packing permutes elements).

    FLUX.1-dev is guidance-distilled: given g it mimics the CFG prediction uncond + g (cond -
    uncond) of its teacher in one pass. The guidance it is called with is the protocol's `guidance`
    (default 1: the plain conditional prediction, the quantity the flow target eps - z0 measures
    and DiffusionITM's "no guidance"; its pipeline samples with 3.5, a guided velocity that
    is no longer the flow target); FLUX.1-schnell has no guidance input and ignores it. FLUX.1-dev's
    scheduler shifts its timesteps by the image's token count (`use_dynamic_shifting`): the
    forward process is that of the native resolution (`SDComponents.process`).
    """

    name = "flux"
    pipeline_class = diffusers.FluxPipeline
    denoiser_folder = "transformer"
    scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler
    tokenizers = ("tokenizer", "tokenizer_2")
    required_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    max_sequence_length = 512  # the pipeline's default T5 length

    def denoiser_class(self, config: dict[str, Any]) -> type:
        return diffusers.FluxTransformer2DModel

    def encoder_classes(self) -> dict[str, type]:
        return {"text_encoder": transformers.CLIPTextModel, "text_encoder_2": transformers.T5EncoderModel}

    def pipeline_parts(self, components: SDComponents) -> dict[str, Any]:
        return dict(scheduler=components.scheduler, vae=components.vae, text_encoder=components.text_encoder,
                    tokenizer=components.tokenizer, text_encoder_2=components.extras["text_encoder_2"],
                    tokenizer_2=components.extras["tokenizer_2"], transformer=components.denoiser)

    @torch.inference_mode()
    def encode(self, components: SDComponents, texts: Sequence[str]) -> Conditioning:
        """Captions -> {"context": [n, 512, J], "pooled": [n, P]} from the pipeline's own
        `encode_prompt` (its text ids are the same for every caption: `denoise` makes them)."""
        context, pooled, _ = self.pipeline(components).encode_prompt(
            prompt=list(texts), prompt_2=None, device=components.text_encoder.device,
            max_sequence_length=self.max_sequence_length)
        return {"context": context, "pooled": pooled}

    def protocol_inputs(self, protocol: Protocol) -> dict[str, Any]:
        return {"guidance": protocol.guidance}

    def denoise(self, components: SDComponents, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, forward: Any = None, guidance: float = 1.0) -> torch.Tensor:
        """The velocity [B, C, h, w] for x_t [B, C, h, w], called as `FluxPipeline.__call__` calls
        the transformer: packed latents [B, h/2 * w/2, 4C], image ids [h/2 * w/2, 3], text ids
        zeros [L, 3], timestep = timesteps [B] / 1000 in x_t's dtype, `guidance` [B] (float32) on
        a transformer with guidance embeddings (FLUX.1-dev), else None."""
        transformer = components.denoiser if forward is None else forward
        pipeline, (B, C, h, w), device = diffusers.FluxPipeline, x_t.shape, x_t.device
        context = conditioning["context"]
        embedded = None
        if components.denoiser.config.guidance_embeds:
            embedded = torch.full([1], guidance, device=device, dtype=torch.float32).expand(B)
        velocity = transformer(
            hidden_states=pipeline._pack_latents(x_t, B, C, h, w), timestep=timesteps.to(x_t.dtype) / 1000,
            guidance=embedded, pooled_projections=conditioning["pooled"], encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=x_t.dtype),
            img_ids=pipeline._prepare_latent_image_ids(B, h // 2, w // 2, device, x_t.dtype)).sample
        scale = components.vae_scale_factor  # `_unpack_latents` takes the image's size in pixels
        return pipeline._unpack_latents(velocity, h * scale, w * scale, scale)

    def conditioning_shapes(self, components: SDComponents) -> dict[str, tuple[int, ...]]:
        config = components.denoiser.config
        return {"context": (self.max_sequence_length, config.joint_attention_dim),
                "pooled": (config.pooled_projection_dim,)}


FAMILIES: dict[str, Family] = {family.name: family for family in (Family(), SDXLFamily(), SD3Family(),
                                                                          PixArtFamily(), PixArtAlphaFamily(),
                                                                          FluxFamily())}
# model_index.json's pipeline class -> family
PIPELINE_FAMILIES: dict[str, str] = {family.pipeline_class.__name__: name for name, family in FAMILIES.items()}


def family_of(components: SDComponents) -> Family:
    """The adapter of `components.family`."""
    return FAMILIES[components.family]
