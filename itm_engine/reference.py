"""Reference loops: the research codes' own loops, literally (the oracles and the baselines).

- `diffusion_itm_pair_scores`: the DiffusionITM research code (McGill-NLP/diffusion-itm,
  `StableDiffusionImg2ImgPipeline.__call__` of its diffusers fork). For every (image, text) pair and
  every draw k: the image prepared and encoded by the VAE *inside* the draw loop (the protocol's
  latent; "sample-per-draw" is the research code's fresh posterior sample), x_t of that draw,
  one UNet call on the text (I2T) or on [null; text] as one batch of 2 (T2I), the per-draw error
  (the norm ||eps - pred||_2 of the flattened latent under the research code's own protocol), and
  the score -mean_k (err_text - err_null). P * S UNet calls; every image and text re-encoded per pair.
- `diffusion_classifier_pair_scores`: Diffusion Classifier's loop (`eval_prob_adaptive.py`): each
  image encoded once, each prompt's draws batched in one UNet call, the per-draw error reduced
  over C, H, W (`F.mse_loss` / `F.l1_loss` / `F.huber_loss`), the score minus its mean; the null
  prompt (T2I) scored the same way for every pair.
- `pipeline_pair_scores`: for every model family (SD 1.x/2.x, SDXL, SD3, PixArt, Flux), a loop that follows the
  model's own diffusers pipeline and training scheduler: its `encode_prompt`, `scale_noise` /
  `add_noise`, the denoiser called as the pipeline calls it; one call per pair and draw. It shares
  with the engine neither the family adapters (`models.families`) nor the forward process
  (`noise`): the oracle of the engine for the families the research codes never scored. Jeong et
  al.'s SD3 code is this loop under the "jeong2025" protocol.

Both build x_t and the denoising target with the model's forward process, written once in
`noise` (`add_noise`, `denoising_target` on `ForwardProcess.coefficients`), so they serve every
model family. For the variance-preserving models of the research codes that x_t is theirs:
Diffusion Classifier's `latent * abar ** 0.5 + noise * (1 - abar) ** 0.5` to the last bit, and the
DiffusionITM fork's Euler form (z0 + sigma_t eps_k) / sqrt(sigma_t^2 + 1), sigma_t =
sqrt((1 - abar_t) / abar_t), up to float32 rounding.

Both follow a `Protocol` (error, latent, image preparation, draws): given the same protocol and
draws, each equals the engine (a test), so the engine reproduces each research code under its
preset. They share with the engine only image loading, resizing, tokenisation, the making of a
latent from the VAE posterior (`cache.posterior_latents`), the forward process (`noise`) and the
seeding of per-query draws; never the fused ops (`kernels`).
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from itm_engine import protocols
from itm_engine.cache import (
    ImageInput,
    as_list,
    content_key,
    encode_posterior,
    encode_texts,
    load_rgb,
    posterior_latents,
    preprocess_images,
    query_key,
    warn_if_truncated,
)
from itm_engine.models import SDComponents
from itm_engine.models.families import family_of
from itm_engine.noise import ForwardProcess, NoiseBank, add_noise, denoising_target
from itm_engine.protocols import Protocol

PairList = Sequence[tuple[int, int]]


def _pixels(components: SDComponents, image: ImageInput, protocol: Protocol) -> tuple[torch.Tensor, str]:
    """The prepared image [1, 3, R, R] and its content key."""
    rgb = load_rgb(image, transparency=protocol.transparency)
    return preprocess_images(components, [rgb], protocol.resize, protocol.interpolation), content_key(rgb)


def _latents(components: SDComponents, posterior: tuple[torch.Tensor, torch.Tensor], key: str, protocol: Protocol,
             draws: range) -> torch.Tensor:
    """z0 float32 of one image from its posterior (mean, std [1, C, h, w]), as the protocol says:
    [1, C, h, w], or [len(draws), ...] for a sample per draw."""
    return posterior_latents(*posterior, [key], protocol, draws, components.scaling_factor, components.latent_shift)


def _text(components: SDComponents, text: str) -> torch.Tensor:
    """Text embedding [1, L, D] in the UNet's dtype."""
    return encode_texts(components, [text])["context"].to(components.unet.dtype)


def _errors(pred: torch.Tensor, target: torch.Tensor, error: str) -> torch.Tensor:
    """Per-item errors float32 [B] of predictions [B, C, h, w] against targets."""
    pred, target = pred.float().flatten(1), target.float().flatten(1)
    if error == "l2":
        return torch.norm(target - pred, p=2, dim=1)
    if error == "mse":
        return F.mse_loss(target, pred, reduction="none").mean(dim=1)
    if error == "l1":
        return F.l1_loss(target, pred, reduction="none").mean(dim=1)
    if error == "huber":
        return F.huber_loss(target, pred, reduction="none").mean(dim=1)
    raise ValueError(f"unknown error {error!r}")


def _noised(process: ForwardProcess, z0: torch.Tensor, eps: torch.Tensor,
            t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) [S, C, h, w] of latents z0 ([1 or S, C, h, w]) under the draws (t [S], eps
    [S, C, h, w]) of the model's forward process."""
    coefficients = process.coefficients(t)
    return add_noise(z0, eps, coefficients), denoising_target(z0, eps, coefficients)


def _over_draws(errors: torch.Tensor, bank: NoiseBank, protocol: Protocol, process: ForwardProcess) -> torch.Tensor:
    """A pair's error from its per-draw errors [S]: their mean, or under the protocol's
    `timestep_weights` their mean weighted by the curve at t / T (numpy's linear interpolation of
    the knots, constant beyond the ends)."""
    if protocol.timestep_weights is None:
        return errors.mean()
    us, ws = zip(*protocol.timestep_weights)
    weights = np.interp(bank.timesteps.double().cpu().numpy() / process.num_train_timesteps, us, ws)
    weights = torch.from_numpy(weights).to(errors)
    return (errors * weights).sum() / weights.sum()


class _Draws:
    """The draws of each pair: one bank shared by all, or (protocol noise "per-query") one per query."""

    def __init__(self, components: SDComponents, images, texts, protocol: Protocol, noise: NoiseBank | None,
                 mode: str) -> None:
        self.components, self.images, self.texts, self.protocol, self.mode = components, images, texts, protocol, mode
        self.process = components.process  # every bank's grid, made once
        self.shared = noise if noise is not None or protocol.noise == "per-query" else self._bank(protocol.seed)
        self.per_query = noise is None and protocol.noise == "per-query"
        self.banks: dict[str, NoiseBank] = {}  # per query, drawn once
        if self.shared is not None:
            self.shared = self.shared.check_fits(components.latent_shape, self.process)

    def _bank(self, seed: int) -> NoiseBank:
        return NoiseBank.for_protocol(self.protocol, self.components.latent_shape, self.process, seed)

    def of(self, i: int, j: int) -> NoiseBank:
        if not self.per_query:
            return self.shared
        item = self.images[i] if self.mode == "i2t" else self.texts[j]
        key = query_key(item, self.mode, self.protocol.transparency)
        if key not in self.banks:
            self.banks[key] = self._bank(self.protocol.query_seed(key))
        return self.banks[key]


def _sd_only(components: SDComponents, loop: str) -> None:
    """The research codes' loops call a UNet on CLIP hidden states: SD 1.x/2.x models only."""
    if components.family != "sd":
        raise ValueError(f"the {loop} loop scores SD 1.x/2.x models; a {components.family!r} model's reference "
                         "loop is pipeline_pair_scores")


def _check(components: SDComponents, images, texts, mode: str) -> tuple[Sequence, Sequence]:
    if mode not in ("i2t", "t2i"):
        raise ValueError(f"mode must be 'i2t' or 't2i', got {mode!r}")
    images, texts = as_list(images, "images"), as_list(texts, "texts")
    warn_if_truncated(components, texts)
    return images, texts


@torch.inference_mode()
def diffusion_itm_pair_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    pairs: PairList,
    bank: NoiseBank | None = None,
    mode: str = "i2t",
    protocol: str | Protocol | None = "diffusion-itm",
) -> torch.Tensor:
    """Scores [P] of (images[i], texts[j]) for (i, j) in `pairs` by the DiffusionITM research loop
    (module docstring) under `protocol` (default its own preset), on the draws `bank` (default the
    protocol's). P * S UNet calls of 1 item (I2T) or 2 (T2I)."""
    protocol = protocols.resolve(protocol)
    _sd_only(components, "DiffusionITM research")
    images, texts = _check(components, images, texts, mode)
    unet = components.unet
    draws = _Draws(components, images, texts, protocol, bank, mode)
    process = components.process
    scores = torch.empty(len(pairs))
    for p, (i, j) in enumerate(pairs):
        pixels, key = _pixels(components, images[i], protocol)
        cond = _text(components, texts[j])
        if mode == "t2i":
            cond = torch.cat([_text(components, ""), cond])  # [null; text]: one batch of 2
        pair_bank = draws.of(i, j)
        dists = torch.empty(len(pair_bank))
        for k in range(len(pair_bank)):
            posterior = encode_posterior(components, pixels)  # the VAE inside the draw loop
            z0 = _latents(components, posterior, key, protocol, range(k, k + 1))
            t = pair_bank.timesteps[k : k + 1].to(unet.device)
            eps = pair_bank.noise[k : k + 1].to(unet.device)
            x_t, target = _noised(process, z0, eps, t)
            x_in = x_t.expand(len(cond), -1, -1, -1).to(unet.dtype)
            pred = unet(x_in, t.expand(len(cond)), encoder_hidden_states=cond).sample
            dist = _errors(pred, target.expand(len(cond), -1, -1, -1), protocol.error)
            dists[k] = dist[-1] - dist[0] if mode == "t2i" else dist[0]
        scores[p] = -_over_draws(dists, pair_bank, protocol, process)
    return scores


@torch.inference_mode()
def diffusion_classifier_pair_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    pairs: PairList,
    bank: NoiseBank | None = None,
    mode: str = "i2t",
    protocol: str | Protocol | None = "diffusion-classifier",
) -> torch.Tensor:
    """Scores [P] by Diffusion Classifier's loop (module docstring) under `protocol` (default its
    own preset), on the draws `bank` (default the protocol's): each image and text encoded once,
    one UNet call of S items per pair (and one more for the null prompt in T2I)."""
    protocol = protocols.resolve(protocol)
    _sd_only(components, "Diffusion Classifier")
    images, texts = _check(components, images, texts, mode)
    unet, process = components.unet, components.process
    draws = _Draws(components, images, texts, protocol, bank, mode)
    prepared = {i: _pixels(components, images[i], protocol) for i in dict.fromkeys(i for i, _ in pairs)}
    posteriors = {i: encode_posterior(components, pixels) for i, (pixels, _) in prepared.items()}  # once each
    embeddings = {j: _text(components, texts[j]) for j in dict.fromkeys(j for _, j in pairs)}
    null = _text(components, "") if mode == "t2i" else None

    def errors(latent: torch.Tensor, cond: torch.Tensor, pair_bank: NoiseBank) -> torch.Tensor:
        t = pair_bank.timesteps.to(unet.device)
        noised, target = _noised(process, latent, pair_bank.noise.to(unet.device), t)
        pred = unet(noised.to(unet.dtype), t, encoder_hidden_states=cond.expand(len(t), -1, -1)).sample
        return _errors(pred, target, protocol.error)

    scores = torch.empty(len(pairs))
    for p, (i, j) in enumerate(pairs):
        pair_bank = draws.of(i, j)
        latent = _latents(components, posteriors[i], prepared[i][1], protocol, range(len(pair_bank)))
        err = errors(latent, embeddings[j], pair_bank)
        if null is not None:
            err = err - errors(latent, null, pair_bank)
        scores[p] = -_over_draws(err, pair_bank, protocol, process)
    return scores


def all_pairs(n_images: int, n_texts: int) -> list[tuple[int, int]]:
    """Every (image, text) pair, image-major: reshapes to [n_images, n_texts]."""
    return [(i, j) for i in range(n_images) for j in range(n_texts)]


def diffusion_itm_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    bank: NoiseBank | None = None,
    mode: str = "i2t",
    protocol: str | Protocol | None = "diffusion-itm",
) -> torch.Tensor:
    """Scores [n_images, n_texts] by the DiffusionITM research loop (see `diffusion_itm_pair_scores`)."""
    pairs = all_pairs(len(images), len(texts))
    return diffusion_itm_pair_scores(components, images, texts, pairs, bank, mode, protocol).view(len(images),
                                                                                                  len(texts))


@torch.inference_mode()
def pipeline_pair_scores(
    components: SDComponents,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    pairs: PairList,
    bank: NoiseBank | None = None,
    mode: str = "i2t",
    protocol: str | Protocol | None = None,
) -> torch.Tensor:
    """Scores [P] by a loop that follows the model's own diffusers pipeline step by step, for every
    family: the pipeline's `encode_prompt` (the empty prompt as its unconditional branch), the VAE
    latent as its img2img `prepare_latents` makes it ((x - shift_factor) * scaling_factor), the
    training scheduler's own forward process (`scale_noise` for flow matching, `add_noise` for DDPM)
    and target (eps - z0 as diffusers' SD3 training script; eps; `get_velocity`), and one denoiser
    call per draw in the pipeline's argument form (PixArt: its "learned sigma" split of the output
    to the eps half; Flux: its packed latents, image and text ids, the protocol's guidance on a
    guidance-distilled transformer, the output unpacked, and FLUX.1-dev's timesteps shifted by the
    image's token count as `FluxPipeline.__call__` sets them); the error, latent, image preparation
    and draws of `protocol` (default: the engine's). P * S denoiser calls of 1 item (I2T) or 2 (T2I)."""
    protocol = protocols.resolve(protocol)
    images, texts = _check(components, images, texts, mode)
    family = family_of(components)
    pipe, scheduler, denoiser = family.pipeline(components), components.scheduler, components.denoiser
    device, dtype = denoiser.device, denoiser.dtype
    draws = _Draws(components, images, texts, protocol, bank, mode)
    if family.name == "flux" and scheduler.config.use_dynamic_shifting:
        # FluxPipeline's timesteps for T steps: sigmas linspace(1, 1 / T, T) shifted by mu of the image's tokens
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = components.latent_shape
        T, config = scheduler.config.num_train_timesteps, scheduler.config
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=calculate_shift(
            (h // 2) * (w // 2), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15)))

    def prompt(text: str, null: bool = False) -> dict[str, torch.Tensor]:
        """The pipeline's conditioning of `text`; with `null`, of its unconditional branch."""
        if family.name == "flux":  # no unconditional branch of its own: the empty prompt's encoding
            context, pooled, text_ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                                           max_sequence_length=family.max_sequence_length)
            return {"context": context.to(dtype), "pooled": pooled.to(dtype), "text_ids": text_ids}
        if family.name == "sd3":
            context, _, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=family.max_sequence_length)
            return {"context": context.to(dtype), "pooled": pooled.to(dtype)}
        if family.name == "sdxl":  # the unconditional branch: the pipeline's zeroed negative prompt
            context, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=null)
            context, pooled = (negative, negative_pooled) if null else (context, pooled)
            return {"context": context.to(dtype), "text_embeds": pooled.to(dtype)}
        if family.name in ("pixart", "pixart-alpha"):  # the unconditional branch: its negative prompt ""
            context, mask, negative, negative_mask = pipe.encode_prompt(
                text, do_classifier_free_guidance=null, negative_prompt="", device=device, clean_caption=False,
                max_sequence_length=family.max_sequence_length)
            context, mask = (negative, negative_mask) if null else (context, mask)
            return {"context": context.to(dtype), "mask": mask}
        context, _ = pipe.encode_prompt(text, device, 1, False)
        return {"context": context.to(dtype)}

    def time_ids(image: ImageInput) -> torch.Tensor:
        """SDXL's added time ids of an image as its training script records them: the original
        (height, width), the top-left of the centre crop after Resize(R) ("crop"; else (0, 0)), (R, R)."""
        rgb = load_rgb(image, transparency=protocol.transparency)
        R = components.image_size
        top_left = (0, 0)
        if protocol.resize == "crop":
            resized = TF.resize(rgb, R)
            top_left = (max(0, int(round((resized.height - R) / 2.0))), max(0, int(round((resized.width - R) / 2.0))))
        return pipe._get_add_time_ids((rgb.height, rgb.width), top_left, (R, R), dtype,
                                      pipe.text_encoder_2.config.projection_dim).to(device)

    def predict(x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if family.name == "flux":
            B, C, h, w = x_t.shape
            scale = pipe.vae_scale_factor
            guidance = None
            if denoiser.config.guidance_embeds:
                guidance = torch.full([1], protocol.guidance, device=device, dtype=torch.float32).expand(B)
            timestep = t.expand(B).to(x_t.dtype)
            packed = denoiser(hidden_states=pipe._pack_latents(x_t, B, C, h, w), timestep=timestep / 1000,
                              guidance=guidance, pooled_projections=cond["pooled"],
                              encoder_hidden_states=cond["context"], txt_ids=cond["text_ids"],
                              img_ids=pipe._prepare_latent_image_ids(B, h // 2, w // 2, device, x_t.dtype)).sample
            return pipe._unpack_latents(packed, h * scale, w * scale, scale)
        if family.name == "sd3":
            return denoiser(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["context"],
                            pooled_projections=cond["pooled"]).sample
        if family.name == "sdxl":
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            return denoiser(x_t, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added).sample
        if family.name in ("pixart", "pixart-alpha"):
            # the micro-conditions of PixArt-Alpha's 1024 px pipeline, as it makes them for an R x R image
            R, added = components.image_size, {"resolution": None, "aspect_ratio": None}
            if denoiser.use_additional_conditions:
                added = {"resolution": torch.tensor([R, R]).repeat(len(x_t), 1),
                         "aspect_ratio": torch.tensor([float(R / R)]).repeat(len(x_t), 1)}
                added = {name: value.to(dtype=dtype, device=device) for name, value in added.items()}
            pred = denoiser(x_t, encoder_hidden_states=cond["context"], encoder_attention_mask=cond["mask"],
                            timestep=t.expand(len(x_t)), added_cond_kwargs=added).sample
            return pred.chunk(2, dim=1)[0] if denoiser.config.out_channels // 2 == denoiser.config.in_channels else pred
        return denoiser(x_t, t, encoder_hidden_states=cond["context"]).sample

    def forward(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if components.prediction_type == "flow":
            return scheduler.scale_noise(z0, t, eps), eps - z0
        target = eps if components.prediction_type == "epsilon" else scheduler.get_velocity(z0, eps, t)
        return scheduler.add_noise(z0, eps, t), target

    null = prompt("", null=True) if mode == "t2i" else None
    scores = torch.empty(len(pairs))
    for p, (i, j) in enumerate(pairs):
        pixels, key = _pixels(components, images[i], protocol)
        posterior = encode_posterior(components, pixels)
        image_cond = {"time_ids": time_ids(images[i])} if family.name == "sdxl" else {}
        cond = {**prompt(texts[j]), **image_cond}
        pair_bank = draws.of(i, j)
        dists = torch.empty(len(pair_bank))
        for k in range(len(pair_bank)):
            z0 = _latents(components, posterior, key, protocol, range(k, k + 1)).to(device)
            t = pair_bank.timesteps[k : k + 1].to(device)
            x_t, target = forward(z0, pair_bank.noise[k : k + 1].to(device), t)
            dist = _errors(predict(x_t.to(dtype), t, cond), target, protocol.error)
            if null is not None:
                dist = dist - _errors(predict(x_t.to(dtype), t, {**null, **image_cond}), target, protocol.error)
            dists[k] = dist[0]
        scores[p] = -_over_draws(dists, pair_bank, protocol, draws.process)
    return scores
