"""Image and text inputs, encoded once: the latent cache and the text-embedding cache.

Images are accepted as PIL images (any mode: RGBA, L, P, CMYK, ... are converted to RGB), file
paths, or tensors ([3, H, W] or [1, H, W], float in [0, 1] or uint8 in [0, 255]; a tensor is
turned into an 8-bit RGB image, exactly what an image file would hold).

Resize/crop policy: every image is resized, keeping its aspect ratio, so that it covers the
model's square resolution (`SDComponents.image_size`, 512 for SD), then centre-cropped to it
(diffusers' `VaeImageProcessor(resize_mode="crop")`, Lanczos resampling), and scaled to [-1, 1].
`resize_mode="default"` stretches instead; `"fill"` pads by repeating the edges.

Latents are keyed by image *content* (a hash of the RGB pixels and size), so two equal images
share one entry whatever Python objects hold them; text embeddings are keyed by the string.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Literal, Sequence, Union

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from itm_engine.models import SDComponents
from itm_engine.stats import RunStats

ImageInput = Union[PIL.Image.Image, str, os.PathLike, torch.Tensor]
LatentMode = Literal["mean", "sample"]
ResizeMode = Literal["crop", "default", "fill"]


def load_rgb(image: ImageInput, name: str = "image") -> PIL.Image.Image:
    """Open/convert one image input to an RGB PIL image; errors name the culprit (`name`)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such image file: {str(path)!r}")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (PIL.UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{name}: cannot read {str(path)!r} as an image ({err})") from None
    elif isinstance(image, torch.Tensor):
        image = _tensor_to_pil(image, name)
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"{name}: expected a PIL image, a file path or a tensor, got {type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name}: image has zero size {image.size}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent images on white rather than letting transparent pixels go black.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _tensor_to_pil(tensor: torch.Tensor, name: str) -> PIL.Image.Image:
    """[3|1, H, W] (or [H, W]) float in [0, 1] or uint8 -> RGB PIL image (8-bit)."""
    t = tensor.detach().cpu()
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"{name}: image tensors must be [3, H, W] or [1, H, W], got {tuple(tensor.shape)}")
    if t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise ValueError(f"{name}: image tensors must be float in [0, 1] or uint8, got {t.dtype}")
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(f"{name}: float image tensors must lie in [0, 1]")
        t = (t.float() * 255).round().to(torch.uint8)
    t = t.expand(3, -1, -1)
    return PIL.Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def content_key(image: PIL.Image.Image) -> str:
    """A key that two RGB images share exactly when their pixels (and size) are equal."""
    digest = hashlib.sha1(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def check_list(values: Sequence, what: str) -> None:
    """Raise ValueError for an empty or non-list input (a bare string is the usual mistake)."""
    if isinstance(values, (str, bytes, PIL.Image.Image)) or (
        isinstance(values, torch.Tensor) and values.dim() != 4
    ):
        raise ValueError(f"{what} must be a list; wrap a single item in a list")
    if len(values) == 0:
        raise ValueError(f"{what} is empty: give at least one")


def check_texts(texts: Sequence[str]) -> None:
    """Raise ValueError unless `texts` is a non-empty list of strings (naming the culprit)."""
    check_list(texts, "texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is a {type(text).__name__}, not a string")


def preprocess_images(
    components: SDComponents, images: Sequence[PIL.Image.Image], resize_mode: ResizeMode = "crop"
) -> torch.Tensor:
    """RGB PIL images -> pixel tensor [n, 3, R, R] in [-1, 1] at the model's resolution R."""
    processor = VaeImageProcessor(vae_scale_factor=components.vae_scale_factor)
    size = components.image_size
    return processor.preprocess(list(images), height=size, width=size, resize_mode=resize_mode)


@torch.inference_mode()
def encode_pixels(
    components: SDComponents,
    pixels: torch.Tensor,
    latent: LatentMode = "mean",
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pixels [n, 3, R, R] -> latents z0 [n, C, h, w] (float32) = posterior mean (or a sample) x scaling.

    `generators` (CPU, one per image) make `latent="sample"` reproducible.
    """
    vae = components.vae
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    if latent == "mean":
        z = posterior.mean
    elif latent == "sample":
        std = posterior.std
        eps = torch.stack([torch.randn(std.shape[1:], generator=g) for g in generators])
        z = posterior.mean + std * eps.to(device=std.device, dtype=std.dtype)
    else:
        raise ValueError(f"latent must be 'mean' or 'sample', got {latent!r}")
    return z.float() * components.scaling_factor


@torch.inference_mode()
def encode_texts(components: SDComponents, texts: Sequence[str]) -> torch.Tensor:
    """Captions -> text-encoder hidden states [n, L, D] (L = tokenizer max length, 77 for CLIP).

    Captions longer than the tokenizer's limit are truncated (see `warn_if_truncated`).
    """
    tokenizer = components.tokenizer
    limit = tokenizer.model_max_length
    ids = tokenizer(
        list(texts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
    ).input_ids
    encoder = components.text_encoder
    return encoder(ids.to(encoder.device))[0]


def warn_if_truncated(components: SDComponents, texts: Sequence[str]) -> None:
    """Issue one warning if any caption exceeds the tokenizer's limit (it will be truncated)."""
    tokenizer = components.tokenizer
    limit = tokenizer.model_max_length
    too_long = [t for t in texts if len(tokenizer(t).input_ids) > limit]
    if too_long:
        warnings.warn(
            f"{len(too_long)} caption(s) exceed the tokenizer's {limit}-token limit and are "
            f"truncated to it, e.g. {too_long[0][:60]!r}...",
            stacklevel=3,
        )


class LatentCache:
    """VAE latents of images, keyed by content; each image is encoded at most once.

    `get(images)` returns `(latents [U, C, h, w] float32, index LongTensor [n_images])`, where
    row `index[i]` of `latents` belongs to `images[i]` and U counts the distinct images.
    """

    def __init__(
        self,
        components: SDComponents,
        latent: LatentMode = "mean",
        resize_mode: ResizeMode = "crop",
        batch_size: int = 16,
    ) -> None:
        if latent not in ("mean", "sample"):
            raise ValueError(f"latent must be 'mean' or 'sample', got {latent!r}")
        if resize_mode not in ("crop", "default", "fill"):
            raise ValueError(f"resize_mode must be 'crop', 'default' or 'fill', got {resize_mode!r}")
        self.components = components
        self.latent = latent
        self.resize_mode = resize_mode
        self.batch_size = batch_size
        self._store: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get(self, images: Sequence[ImageInput], stats: RunStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_list(images, "images")
        stats = stats if stats is not None else RunStats()
        keys: list[str] = []
        missing: dict[str, PIL.Image.Image] = {}
        with stats.timer("preprocess"):
            for i, image in enumerate(images):
                rgb = load_rgb(image, name=f"images[{i}]")
                key = content_key(rgb)
                keys.append(key)
                if key not in self._store and key not in missing:
                    missing[key] = rgb
        pending = list(missing.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            with stats.timer("preprocess"):
                pixels = preprocess_images(self.components, [rgb for _, rgb in chunk], self.resize_mode)
            with stats.timer("vae", self.components.device):
                generators = [torch.Generator().manual_seed(int(key[:15], 16)) for key, _ in chunk]
                latents = encode_pixels(self.components, pixels, self.latent, generators)
            for (key, _), z in zip(chunk, latents):
                self._store[key] = z
            stats.images_encoded += len(chunk)
        return _gather(self._store, keys)


class TextCache:
    """Text-encoder hidden states, keyed by the caption string; each caption is encoded once.

    `get(texts)` returns `(embeddings [V, L, D] in the model dtype, index LongTensor [n_texts])`.
    The empty string is a valid caption: the null prompt of T2I normalisation.
    """

    def __init__(self, components: SDComponents, batch_size: int = 64) -> None:
        self.components = components
        self.batch_size = batch_size
        self._store: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get(self, texts: Sequence[str], stats: RunStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_texts(texts)
        stats = stats if stats is not None else RunStats()
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        warn_if_truncated(self.components, missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with stats.timer("text_encoder", self.components.device):
                embeddings = encode_texts(self.components, chunk)
            for text, emb in zip(chunk, embeddings):
                self._store[text] = emb
            stats.texts_encoded += len(chunk)
        return _gather(self._store, list(texts))


def _gather(store: dict[str, torch.Tensor], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the distinct entries for `keys` -> (rows [U, ...], index LongTensor [len(keys)])."""
    unique = list(dict.fromkeys(keys))
    position = {key: row for row, key in enumerate(unique)}
    rows = torch.stack([store[key] for key in unique])
    index = torch.tensor([position[key] for key in keys], dtype=torch.long)
    return rows, index
