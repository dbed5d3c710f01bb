"""Load the Stable Diffusion parts DiffusionITM needs: VAE, UNet, text encoder, tokenizer, scheduler.

Three kinds of source, all offline (nothing is ever downloaded):

- a built-in architecture with random weights (``"tiny"``, ``"sd15-arch"``, ``"sd21-arch"``), for
  tests and benchmarks without checkpoints, or the bundled trained ShapesWorld model (``"shapes"``);
- a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ...);
- a Hugging Face hub id (``"stabilityai/stable-diffusion-2-1-base"``), resolved only from the local
  HF cache.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import diffusers
import huggingface_hub
import torch
import transformers
from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

from itm_engine import bundled, coord_unet

ARCHITECTURES: tuple[str, ...] = ("tiny", "sd15-arch", "sd21-arch")
_PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
_COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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
        return (coord_unet.latent_channels(self.unet), size, size)

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
        with _quiet():  # diffusers 0.42 warns on every dtype cast, even with nothing to keep in fp32
            for net in (self.vae, self.unet, self.text_encoder):
                net.to(device=device, dtype=dtype)
        return self


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


def _architecture_configs(arch: str) -> dict[str, dict[str, Any]]:
    """Constructor arguments of ``arch``: ``unet``/``vae`` kwargs, ``text_encoder`` CLIPTextConfig
    kwargs and the tokenizer's ``pad_token``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
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


def _scheduler(prediction_type: str) -> diffusers.DDPMScheduler:
    """The SD 1.x/2.x training noise schedule (scaled-linear betas, 1000 steps)."""
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {_PREDICTION_TYPES}")
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )


def _frozen(components: SDComponents, device: torch.device | str, dtype: torch.dtype) -> SDComponents:
    """Move to ``device``/``dtype``, switch to eval mode and turn off gradients."""
    if components.prediction_type not in _PREDICTION_TYPES:
        raise ValueError(
            f"{components.source}: unsupported prediction_type {components.prediction_type!r}; "
            f"expected one of {_PREDICTION_TYPES}"
        )
    for net in (components.vae, components.unet, components.text_encoder):
        net.eval().requires_grad_(False)
    return components.to(device, dtype)


def build_random_components(arch: str, seed: int = 0, prediction_type: str = "epsilon") -> SDComponents:
    """Randomly initialised components of a built-in architecture (one of ``ARCHITECTURES``).

    The weights depend only on ``seed``; the global torch RNG is left untouched. ``tiny`` takes
    32x32 images (4x16x16 latents) and runs fast on a CPU; ``sd15-arch``/``sd21-arch`` have the
    exact shapes of Stable Diffusion 1.5 / 2.1-base (512x512 images, 4x64x64 latents).
    """
    configs = _architecture_configs(arch)
    scheduler = _scheduler(prediction_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = SDComponents(
            vae=diffusers.AutoencoderKL(**configs["vae"]),
            unet=diffusers.UNet2DConditionModel(**configs["unet"]),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
            tokenizer=clip_tokenizer(configs["pad_token"]),
            scheduler=scheduler,
            source=f"builtin:{arch}",
        )
    return _frozen(components, "cpu", torch.float32)


def save_random_model(
    arch: str, path: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Write ``build_random_components(arch, seed, prediction_type)`` as a complete diffusers
    StableDiffusionPipeline folder (safetensors weights); returns the folder's path."""
    return save_components(build_random_components(arch, seed, prediction_type), path)


def save_components(components: SDComponents, path: str | os.PathLike) -> Path:
    """Write ``components`` as a complete diffusers StableDiffusionPipeline folder (safetensors
    weights, no safety checker); returns the folder's path."""
    path = Path(path)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
        **{name: [None, None] for name in ("safety_checker", "feature_extractor", "image_encoder")},
    }
    with _quiet():
        for name in _COMPONENTS:
            part = getattr(components, name)
            part.save_pretrained(path / name)
            index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


def _load_folder(folder: Path, source: str) -> SDComponents:
    """Load every component from the subfolders of a diffusers folder (the UNet as the class its
    config names: `coord_unet.CoordUNet2DConditionModel` or diffusers' `UNet2DConditionModel`)."""
    missing = [name for name in _COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete diffusers folder: missing subfolder(s) {', '.join(missing)}"
        )

    def weights(cls: Any, name: str) -> Any:
        use_safetensors = any((folder / name).glob("*.safetensors"))
        return cls.from_pretrained(folder, subfolder=name, use_safetensors=use_safetensors)

    unet_config_file = folder / "unet" / "config.json"
    unet_config = json.loads(unet_config_file.read_text()) if unet_config_file.is_file() else {}
    with _quiet():
        return SDComponents(
            vae=weights(diffusers.AutoencoderKL, "vae"),
            unet=weights(coord_unet.unet_class(unet_config), "unet"),
            text_encoder=weights(transformers.CLIPTextModel, "text_encoder"),
            tokenizer=transformers.AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            scheduler=diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
            source=source,
        )


def _cached_snapshot(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    """The folder of ``repo_id`` in the local Hugging Face cache; FileNotFoundError when absent."""
    cache = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE).expanduser()
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except IncompleteSnapshotError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is only partly downloaded in the Hugging Face cache at {cache}: {err}"
        ) from None
    except HFValidationError:
        raise FileNotFoundError(
            f"cannot load {repo_id!r}: not a local folder, a built-in architecture {ARCHITECTURES} "
            "or a hub id"
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"cannot load {repo_id!r}: it is not a local folder, not a built-in architecture "
            f"{ARCHITECTURES}, and not in the Hugging Face cache at {cache}. Nothing is downloaded at "
            f"run time. To get it, run `hf download {repo_id}` on a machine with network access and "
            f"point HF_HOME (or HF_HUB_CACHE) at that cache, or pass the path of a local diffusers folder."
        ) from None


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be paths, never ``name`` or ``org/name`` hub ids."""
    return source.startswith((".", "~", os.sep)) or source.count("/") > 1 or "\\" in source


def load_components(
    source: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> SDComponents:
    """Load Stable Diffusion components from a built-in architecture, a folder or a cached hub id.

    ``source`` is tried as, in order:

    1. one of ``ARCHITECTURES``: random weights from ``build_random_components(source)``; or
       ``"shapes"``, the trained ShapesWorld model shipped in the package (`itm_engine.bundled`);
    2. an existing local diffusers folder with ``unet/``, ``vae/``, ``text_encoder/``,
       ``tokenizer/`` and ``scheduler/`` subfolders. Weights are read from ``*.safetensors`` when
       a subfolder has them, else from PyTorch ``.bin`` files, which diffusers 0.42 and
       transformers 5.x open with ``torch.load(weights_only=True)`` (no arbitrary code runs).
       The scheduler is read as a ``DDPMScheduler`` whatever class the folder names (only its
       betas and prediction_type are used);
    3. a hub id such as ``"stabilityai/stable-diffusion-2-1-base"``, looked up only in the local
       Hugging Face cache (``cache_dir``, default ``HF_HUB_CACHE``/``HF_HOME``), then loaded as 2.

    Raises FileNotFoundError when the source cannot be found (the message says how to get it)
    or a folder lacks a component, and ValueError for a prediction type other than
    ``"epsilon"``/``"v_prediction"``. The result is on ``device``/``dtype``, in eval mode,
    with gradients off.
    """
    name = os.fspath(source)
    if name in ARCHITECTURES:
        return _frozen(build_random_components(name), device, dtype)
    if name in bundled.MODELS:
        return _frozen(_load_folder(bundled.model_folder(name), f"builtin:{name}"), device, dtype)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _frozen(_load_folder(folder, name), device, dtype)
    if isinstance(source, os.PathLike) or _looks_like_path(name):
        raise FileNotFoundError(f"no such folder: {folder}")
    return _frozen(_load_folder(_cached_snapshot(name, cache_dir), name), device, dtype)
