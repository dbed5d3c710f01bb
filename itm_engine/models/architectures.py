"""Built-in architectures with random weights, for tests and benchmarks that need no checkpoint:
FLOP counts and timings are those of the real models.

- "tiny" (SD 1.x-style, fast on a CPU) and the exact SD 1.5 / SD 2.1-base shapes ("sd15-arch",
  "sd21-arch"), with the real CLIP BPE tokenizer built offline from open_clip's vocabulary and the
  SD 1.x/2.x training noise schedule;
- "tiny-sdxl" (fast on a CPU) and the exact SDXL-base shapes ("sdxl-arch": CLIP-L and OpenCLIP
  bigG, the "text_time" UNet at 1024 px, VAE scaling 0.13025);
- "tiny-sd3" (fast on a CPU) and the exact SD3-medium / SD3.5-medium shapes ("sd3-medium-arch",
  "sd35-medium-arch": CLIP-L, OpenCLIP bigG and T5-XXL text encoders, the 16-channel VAE, the
  MMDiT, flow matching with shift 3.0). T5's SentencePiece tokenizer does not ship offline: these
  use the CLIP BPE tokenizer in its place, padded to the pipeline's T5 length, and T5's embedding
  table has the CLIP vocabulary's 49,408 rows instead of 32,128 (token ids differ from T5's;
  shapes and FLOPs do not). The SD3 "-arch" models hold ~7B parameters: build them on
  the "meta" device to count FLOPs.
- "tiny-pixart" (fast on a CPU) and the exact PixArt-Sigma-XL-2-1024-MS shapes
  ("pixart-sigma-arch": the 28-layer DiT of width 1152 with a learned variance, SDXL's VAE, the
  T5-XXL encoder, PixArt's DDPM training schedule); the same T5 stand-ins as SD3's.
- "tiny-flux" (fast on a CPU: 32 px, guidance embeddings) and the exact FLUX.1-dev / FLUX.1-schnell
  shapes ("flux-dev-arch", "flux-schnell-arch": CLIP-L and T5-XXL, SD3's 16-channel VAE with
  Flux's scaling and shift, the 19 double + 38 single block transformer of width 3072, ~11.9B
  parameters, with guidance embeddings on dev; dev's scheduler shifts by image size, schnell's
  does not); the same T5 stand-ins as SD3's.
"""
from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
import transformers

from itm_engine.models.components import PREDICTION_TYPES, SDComponents, frozen

SDXL_ARCHITECTURES: tuple[str, ...] = ("tiny-sdxl", "sdxl-arch")
SD3_ARCHITECTURES: tuple[str, ...] = ("tiny-sd3", "sd3-medium-arch", "sd35-medium-arch")
PIXART_ARCHITECTURES: tuple[str, ...] = ("tiny-pixart", "pixart-sigma-arch")
FLUX_ARCHITECTURES: tuple[str, ...] = ("tiny-flux", "flux-dev-arch", "flux-schnell-arch")
ARCHITECTURES: tuple[str, ...] = ("tiny", "sd15-arch", "sd21-arch", *SDXL_ARCHITECTURES, *SD3_ARCHITECTURES,
                                 *PIXART_ARCHITECTURES, *FLUX_ARCHITECTURES)


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[str, str]:
    """CLIP's ``vocab.json`` and ``merges.txt`` contents, rebuilt from the BPE file open_clip ships."""
    import open_clip  # here, not at the top: importing it takes seconds and folder loads never need it

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the same slice as open_clip's SimpleTokenizer
    chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = json.dumps({token: i for i, token in enumerate(tokens)})
    return vocab, "#version: 0.2\n" + "\n".join(merges) + "\n"


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> transformers.CLIPTokenizer:
    """The CLIP BPE tokenizer (49408 tokens, bos 49406, eos 49407, 77 tokens), built offline.

    Built from open_clip's vocabulary file, so no download is needed; ids match open_clip's
    tokenizer except where HF's CLIP tokenizer itself differs (HF does not unescape HTML entities
    or apply ftfy fixes such as ligatures). SD 1.x pads with ``"<|endoftext|>"``, SD 2.x with
    ``"!"`` (id 0). Returns a fresh instance on every call, so callers may modify it.
    """
    vocab, merges = _clip_bpe()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(vocab, encoding="utf-8")
        merges_file.write_text(merges, encoding="utf-8")
        return transformers.CLIPTokenizer(
            str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77
        )


def architecture_configs(arch: str) -> dict[str, dict[str, Any]]:
    """Constructor arguments of ``arch``: ``unet``/``vae`` kwargs, ``text_encoder`` CLIPTextConfig
    kwargs and the tokenizer's ``pad_token``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    if arch in SD3_ARCHITECTURES:
        return _sd3_configs(arch)
    if arch in SDXL_ARCHITECTURES:
        return _sdxl_configs(arch)
    if arch in PIXART_ARCHITECTURES:
        return _pixart_configs(arch)
    if arch in FLUX_ARCHITECTURES:
        return _flux_configs(arch)
    if arch == "tiny":
        return {
            "unet": dict(
                sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=1, attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8,
            ),
            "vae": dict(
                sample_size=32, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
            ),
            "text_encoder": dict(
                vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            ),
            "pad_token": "<|endoftext|>",
        }
    sd15 = arch == "sd15-arch"
    return {  # runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1-base
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
            attention_head_dim=8 if sd15 else (5, 10, 20, 20),
            cross_attention_dim=768 if sd15 else 1024,
            use_linear_projection=not sd15,
        ),
        "vae": dict(
            sample_size=512, in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215,
        ),
        "text_encoder": dict(  # CLIP ViT-L/14 (SD 1.5) or OpenCLIP ViT-H/14 (SD 2.1) text tower
            vocab_size=49408, max_position_embeddings=77,
            hidden_size=768 if sd15 else 1024,
            intermediate_size=3072 if sd15 else 4096,
            num_hidden_layers=12 if sd15 else 23,
            num_attention_heads=12 if sd15 else 16,
            projection_dim=768 if sd15 else 512,
            hidden_act="quick_gelu" if sd15 else "gelu",
        ),
        "pad_token": "<|endoftext|>" if sd15 else "!",
    }


# the text towers of SDXL and SD3: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with their projections)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32, hidden_act="gelu")


def _sdxl_configs(arch: str) -> dict[str, dict[str, Any]]:
    """`architecture_configs` of SDXL: unet (with the "text_time" added conditioning), vae,
    text_encoder (CLIP-L) and text_encoder_2 (OpenCLIP bigG with projection)."""
    if arch == "tiny-sdxl":
        clip = TINY_CLIP
        return {
            "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                         transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
                         cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=32 + 6 * 8),
            "vae": dict(architecture_configs("tiny")["vae"], scaling_factor=0.13025),
            "text_encoder": clip, "text_encoder_2": clip,
        }
    return {  # stabilityai/stable-diffusion-xl-base-1.0
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                     layers_per_block=2,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                     use_linear_projection=True,
                     norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, cross_attention_dim=2048,
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
        "vae": dict(architecture_configs("sd15-arch")["vae"], sample_size=1024, scaling_factor=0.13025),
        "text_encoder": CLIP_L,
        "text_encoder_2": CLIP_BIGG,
    }


def _sd3_configs(arch: str) -> dict[str, dict[str, Any]]:
    """`architecture_configs` of the SD3 family: transformer, vae, text_encoder (CLIP-L),
    text_encoder_2 (CLIP-G), text_encoder_3 (T5 encoder) and the scheduler's shift."""
    if arch == "tiny-sd3":
        clip = TINY_CLIP
        return {
            "transformer": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16),
            "vae": dict(sample_size=32, in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False),
            "text_encoder": clip, "text_encoder_2": clip,
            "text_encoder_3": dict(vocab_size=49408, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"),
            "scheduler": dict(num_train_timesteps=1000, shift=3.0),
        }
    sd35 = arch == "sd35-medium-arch"
    return {  # stabilityai/stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-medium
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384 if sd35 else 192,
                            dual_attention_layers=tuple(range(13)) if sd35 else (),
                            qk_norm="rms_norm" if sd35 else None),
        "vae": dict(sample_size=1024, in_channels=3, out_channels=3, latent_channels=16,
                    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": CLIP_L,
        "text_encoder_2": CLIP_BIGG,
        "text_encoder_3": dict(vocab_size=49408, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    }


def ddpm_scheduler(prediction_type: str) -> diffusers.DDPMScheduler:
    """The SD 1.x/2.x training noise schedule (scaled-linear betas, 1000 steps)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )


def build_random_components(arch: str, seed: int = 0, prediction_type: str = "epsilon",
                            device: str = "cpu", image_size: int | None = None) -> SDComponents:
    """Randomly initialised components of a built-in architecture (one of ``ARCHITECTURES``).

    The weights depend only on ``seed``; the global torch RNG is left untouched. ``tiny`` takes
    32x32 images (4x16x16 latents) and runs fast on a CPU; ``sd15-arch``/``sd21-arch`` have the
    exact shapes of Stable Diffusion 1.5 / 2.1-base (512x512 images, 4x64x64 latents). The SD3 and Flux
    architectures ignore `prediction_type` (flow matching). On `device` "meta" no memory is
    allocated (for counting FLOPs of the large architectures). `image_size` sets another native
    image side in pixels (e.g. SD3-medium at 512 px: 16 x 64 x 64 latents; `at_image_size`).
    """
    configs = architecture_configs(arch)
    if image_size is not None:
        configs = at_image_size(configs, image_size)
    family, scheduler, make = _makers(arch, configs, prediction_type)
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = SDComponents(scheduler=scheduler, source=f"builtin:{arch}", family=family, **make())
    return frozen(components, device, torch.float32)


def _pixart_configs(arch: str) -> dict[str, dict[str, Any]]:
    """`architecture_configs` of PixArt-Sigma: transformer, vae (SDXL's), text_encoder (a T5
    encoder: SD3's T5 configs) and the DDPM training schedule (linear betas 1e-4..0.02)."""
    dit = dict(patch_size=2, in_channels=4, out_channels=8, norm_type="ada_norm_single", norm_elementwise_affine=False,
               norm_eps=1e-6, num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True,
               use_additional_conditions=False)
    scheduler = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    if arch == "tiny-pixart":
        t5 = _sd3_configs("tiny-sd3")["text_encoder_3"]
        return {
            # width 48: a multiple of 3, as the resolution micro-conditions of PixArt-Alpha need
            "transformer": dict(dit, sample_size=16, num_layers=2, num_attention_heads=4, attention_head_dim=12,
                                cross_attention_dim=48, caption_channels=t5["d_model"]),
            "vae": architecture_configs("tiny-sdxl")["vae"],
            "text_encoder": t5,
            "scheduler": scheduler,
        }
    return {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS
        "transformer": dict(dit, sample_size=128, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                            cross_attention_dim=1152, caption_channels=4096, interpolation_scale=2),
        "vae": architecture_configs("sdxl-arch")["vae"],
        "text_encoder": _sd3_configs("sd3-medium-arch")["text_encoder_3"],
        "scheduler": scheduler,
    }


def _flux_configs(arch: str) -> dict[str, dict[str, Any]]:
    """`architecture_configs` of the Flux family: transformer, vae (SD3's shapes with Flux's scaling
    and shift), text_encoder (CLIP-L: SD3's), text_encoder_2 (T5: SD3's) and the scheduler
    (black-forest-labs/FLUX.1-dev's: shifted by the image's token count; FLUX.1-schnell's: shift 1)."""
    sd3 = _sd3_configs("tiny-sd3" if arch == "tiny-flux" else "sd3-medium-arch")
    transformer = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=arch != "flux-schnell-arch", axes_dims_rope=(16, 56, 56))
    if arch == "tiny-flux":  # 16 latent channels packed 2x2: in_channels 64 still
        transformer.update(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
                           joint_attention_dim=sd3["text_encoder_3"]["d_model"],
                           pooled_projection_dim=sd3["text_encoder"]["hidden_size"], axes_dims_rope=(2, 2, 4))
    dev_scheduler = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {
        "transformer": transformer,
        "vae": dict(sd3["vae"], scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": sd3["text_encoder"],
        "text_encoder_2": sd3["text_encoder_3"],
        "scheduler": (dict(dev_scheduler, shift=1.0, use_dynamic_shifting=False) if arch == "flux-schnell-arch"
                      else dev_scheduler),
    }


def _clip(config: dict[str, Any], projection: bool = False) -> transformers.PreTrainedModel:
    """A CLIP text encoder of `config` (with the text projection, as SDXL's bigG and SD3's use)."""
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(transformers.CLIPTextConfig(**config))


def _t5(config: dict[str, Any]) -> transformers.T5EncoderModel:
    return transformers.T5EncoderModel(transformers.T5Config(**config))


def at_image_size(configs: dict[str, dict[str, Any]], image_size: int) -> dict[str, dict[str, Any]]:
    """`configs` with native images of `image_size` px: the VAE's sample size, and the denoiser's
    latent sample size (image_size / the VAE's downsampling) where its config has one (Flux's
    transformer has none: its resolution is the VAE's)."""
    vae = configs["vae"]
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % factor:
        raise ValueError(f"image_size must be a positive multiple of the VAE's downsampling {factor}, "
                         f"got {image_size!r}")
    out = {**configs, "vae": dict(vae, sample_size=image_size)}
    for name in ("unet", "transformer"):
        if name in configs and "sample_size" in configs[name]:
            out[name] = dict(configs[name], sample_size=image_size // factor)
    return out


def _makers(arch: str, configs: dict[str, Any], prediction_type: str) -> tuple[str, Any, Callable[[], dict]]:
    """(family, training scheduler, a function making the networks and tokenizers) of `arch`. The
    scheduler is made here, on the CPU whatever the device: its tables are data, not weights. The
    CLIP BPE tokenizer stands in for T5's ("!" pads with id 0, as T5 does)."""
    def vae() -> diffusers.AutoencoderKL:
        return diffusers.AutoencoderKL(**configs["vae"])

    if arch in SDXL_ARCHITECTURES:
        return "sdxl", ddpm_scheduler("epsilon"), lambda: dict(
            vae=vae(), denoiser=diffusers.UNet2DConditionModel(**configs["unet"]),
            text_encoder=_clip(configs["text_encoder"]), tokenizer=clip_tokenizer("<|endoftext|>"),
            extras={"text_encoder_2": _clip(configs["text_encoder_2"], projection=True),
                    "tokenizer_2": clip_tokenizer("!")})
    if arch in SD3_ARCHITECTURES:
        return "sd3", diffusers.FlowMatchEulerDiscreteScheduler(**configs["scheduler"]), lambda: dict(
            vae=vae(), denoiser=diffusers.SD3Transformer2DModel(**configs["transformer"]),
            text_encoder=_clip(configs["text_encoder"], projection=True), tokenizer=clip_tokenizer("<|endoftext|>"),
            extras={"text_encoder_2": _clip(configs["text_encoder_2"], projection=True),
                    "tokenizer_2": clip_tokenizer("!"), "text_encoder_3": _t5(configs["text_encoder_3"]),
                    "tokenizer_3": clip_tokenizer("!")})
    if arch in PIXART_ARCHITECTURES:  # IDDPM's schedule: the learned-range variance of the second half
        scheduler = diffusers.DDPMScheduler(**configs["scheduler"], prediction_type=prediction_type,
                                            variance_type="learned_range", clip_sample=False)
        return "pixart", scheduler, lambda: dict(
            vae=vae(), denoiser=diffusers.PixArtTransformer2DModel(**configs["transformer"]),
            text_encoder=_t5(configs["text_encoder"]), tokenizer=clip_tokenizer("!"))
    if arch in FLUX_ARCHITECTURES:
        return "flux", diffusers.FlowMatchEulerDiscreteScheduler(**configs["scheduler"]), lambda: dict(
            vae=vae(), denoiser=diffusers.FluxTransformer2DModel(**configs["transformer"]),
            text_encoder=_clip(configs["text_encoder"]), tokenizer=clip_tokenizer("<|endoftext|>"),
            extras={"text_encoder_2": _t5(configs["text_encoder_2"]), "tokenizer_2": clip_tokenizer("!")})
    return "sd", ddpm_scheduler(prediction_type), lambda: dict(
        vae=vae(), denoiser=diffusers.UNet2DConditionModel(**configs["unet"]),
        text_encoder=_clip(configs["text_encoder"]), tokenizer=clip_tokenizer(configs["pad_token"]))
