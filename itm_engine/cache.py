"""Image and text inputs, encoded once: the latent cache and the text-embedding cache.

Images are accepted as PIL images (any mode: RGBA, L, P, CMYK, ... are converted to RGB), file
paths, or tensors ([3, H, W] or [1, H, W], float in [0, 1] or uint8 in [0, 255]; a tensor is
turned into an 8-bit RGB image, exactly what an image file would hold).

How an image becomes the model's square input follows the scoring protocol (`protocols.Protocol`):
`resize` "crop" (short side to the side, centre crop: torchvision's `Resize` + `CenterCrop`),
"stretch" (PIL `resize` of both sides) or "pad" (fit inside, edges repeated: diffusers'
`VaeImageProcessor` "fill"), with the `interpolation` filter; transparent images composited on
white or plainly converted (`transparency`); then scaled to [-1, 1].

The latent cache keeps each image's VAE posterior (mean and standard deviation), keyed by image
*content* (a hash of the RGB pixels and size) and the resize conventions, so two equal images share
one entry whatever Python objects hold them; the latent a call uses (the mean, one sample per
image, or one per draw) is made from it. Text embeddings are keyed by the string.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.functional as TF
from diffusers.image_processor import VaeImageProcessor

from itm_engine.models import SDComponents
from itm_engine.protocols import Interpolation, Protocol, Resize, Transparency
from itm_engine.stats import RunStats

ImageInput = Union[PIL.Image.Image, str, os.PathLike, torch.Tensor]
_PIL_FILTERS = {"lanczos": PIL.Image.LANCZOS, "bicubic": PIL.Image.BICUBIC, "bilinear": PIL.Image.BILINEAR}
_TORCHVISION_FILTERS = {"lanczos": TF.InterpolationMode.LANCZOS, "bicubic": TF.InterpolationMode.BICUBIC,
                        "bilinear": TF.InterpolationMode.BILINEAR}


def load_rgb(image: ImageInput, name: str = "image", transparency: Transparency = "composite") -> PIL.Image.Image:
    """Open/convert one image input to an RGB PIL image; errors name the culprit (`name`).
    Transparent images are composited on white ("composite") or plainly converted ("convert");
    with "convert-after-resize" an image keeps its own mode (`resize_image` converts it last)."""
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
    if image.mode == "RGB" or transparency == "convert-after-resize":
        return image
    if transparency == "convert":
        return image.convert("RGB")
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
    """A key that two images share exactly when their pixels (size and mode) are equal."""
    digest = hashlib.sha1(f"{image.width}x{image.height}".encode() if image.mode == "RGB" else
                          f"{image.width}x{image.height}{image.mode}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def query_key(item: ImageInput | str, mode: str, transparency: Transparency = "composite", name: str = "query") -> str:
    """The key of a query's own noise draws (protocol noise "per-query"): its image's content in
    "i2t", its caption in "t2i"."""
    if mode == "t2i":
        return "text:" + item
    return image_query_key(content_key(load_rgb(item, name, transparency)))


def image_query_key(content: str) -> str:
    """The query key of an image whose content key is `content` (see `query_key`)."""
    return "image:" + content


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


def resize_image(image: PIL.Image.Image, size: int, resize: Resize = "crop",
                 interpolation: Interpolation = "lanczos") -> PIL.Image.Image:
    """An image as the model's square RGB input [size x size] (see the module docstring); an image
    in another mode is converted to RGB after the resize."""
    if resize == "stretch":
        out = image.resize((size, size), resample=_PIL_FILTERS[interpolation])
    elif resize == "crop":
        out = TF.center_crop(TF.resize(image, size, interpolation=_TORCHVISION_FILTERS[interpolation]), size)
    elif resize == "pad":
        out = VaeImageProcessor(resample=interpolation).resize(image, size, size, resize_mode="fill")
    else:
        raise ValueError(f"resize must be 'crop', 'stretch' or 'pad', got {resize!r}")
    return out if out.mode == "RGB" else out.convert("RGB")


def preprocess_images(components: SDComponents, images: Sequence[PIL.Image.Image], resize: Resize = "crop",
                      interpolation: Interpolation = "lanczos") -> torch.Tensor:
    """PIL images (RGB, or any mode: converted after the resize) -> pixel tensor [n, 3, R, R] in
    [-1, 1] at the model's resolution R."""
    size = components.image_size
    arrays = [np.asarray(resize_image(image, size, resize, interpolation), dtype=np.float32) / 255.0
              for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2.0 - 1.0


@torch.inference_mode()
def encode_posterior(components: SDComponents, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [n, 3, R, R] -> the VAE posterior's mean and standard deviation, float32 [n, C, h, w]
    each (unscaled)."""
    vae = components.vae
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def posterior_latents(mean: torch.Tensor, std: torch.Tensor, keys: Sequence[str], protocol: Protocol,
                      draws: range, scaling: float) -> torch.Tensor:
    """Latents z0 float32 from the posteriors (mean, std [U, C, h, w]) of the images `keys`, as the
    protocol's `latent` says: [U] for the mean or one sample per image, [U * len(draws)] for a
    sample per draw (row u * len(draws) + s for draw draws[s])."""
    if protocol.latent == "mean":
        return mean * scaling
    if protocol.latent == "sample":
        eps = torch.stack([posterior_noise(sample_seed(key), mean.shape[1:]) for key in keys])
        return (mean + std * eps.to(mean.device)) * scaling
    eps = torch.stack([posterior_noise(sample_seed(key, protocol.seed, s), mean.shape[1:])
                       for key in keys for s in draws]).to(mean.device)
    n = len(draws)
    return (mean.repeat_interleave(n, 0) + std.repeat_interleave(n, 0) * eps) * scaling


def encode_pixels(components: SDComponents, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [n, 3, R, R] -> latents z0 [n, C, h, w] (float32) = posterior mean x scaling factor."""
    return encode_posterior(components, pixels)[0] * components.scaling_factor


def posterior_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The standard-normal draw of one posterior sample, float32 [*shape], from a CPU generator."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def sample_seed(key: str, seed: int | None = None, draw: int | None = None) -> int:
    """The seed of a posterior sample: of the image (its content `key`) for latent "sample"; of
    (protocol seed, image, draw) for "sample-per-draw"."""
    if seed is None:
        return int(key[:15], 16)
    digest = hashlib.sha256(f"{seed}:{key}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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
    """VAE posteriors of images, keyed by content and resize conventions; each image is encoded at
    most once per convention.

    `get(images, protocol=..., draws=S, first_draw=f)` returns `(latents, index)`: row `index[i]`
    of `latents` (float32) belongs to `images[i]`; latents are [U, C, h, w] for the posterior mean
    or one sample per image, and [U * S, C, h, w] for a sample per draw (row `index[i] * S + s` for
    the draw f + s of the bank), with U the distinct images. `get` is `encode` (the distinct
    images' content keys, encoding the new ones) then `latents` (made from their posteriors).
    """

    def __init__(self, components: SDComponents, batch_size: int = 16) -> None:
        self.components = components
        self.batch_size = batch_size
        self._store: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (key, resize, filter) -> (mean, std)

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get(self, images: Sequence[ImageInput], stats: RunStats | None = None, protocol: Protocol | None = None,
            draws: int = 1, first_draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        protocol = protocol or Protocol()
        keys, index = self.encode(images, stats, protocol)
        return self.latents(keys, protocol, draws, first_draw), index

    def encode(self, images: Sequence[ImageInput], stats: RunStats | None = None,
               protocol: Protocol | None = None) -> tuple[list[str], torch.Tensor]:
        """(the content keys of the distinct images, index LongTensor [n_images] into them); the
        images not cached under the protocol's resize conventions are encoded."""
        check_list(images, "images")
        protocol = protocol or Protocol()
        stats = stats if stats is not None else RunStats()
        keys: list[str] = []
        missing: dict[str, PIL.Image.Image] = {}
        with stats.timer("preprocess"):
            for i, image in enumerate(images):
                rgb = load_rgb(image, name=f"images[{i}]", transparency=protocol.transparency)
                key = content_key(rgb)
                keys.append(key)
                if (key, protocol.resize, protocol.interpolation) not in self._store and key not in missing:
                    missing[key] = rgb
        pending = list(missing.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            with stats.timer("preprocess"):
                pixels = preprocess_images(self.components, [rgb for _, rgb in chunk], protocol.resize,
                                           protocol.interpolation)
            with stats.timer("vae", self.components.device):
                mean, std = encode_posterior(self.components, pixels)
            for (key, _), m, sd in zip(chunk, mean, std):
                self._store[(key, protocol.resize, protocol.interpolation)] = (m, sd)
            stats.images_encoded += len(chunk)
        return _unique_index(keys)

    def latents(self, keys: Sequence[str], protocol: Protocol, draws: int = 1, first_draw: int = 0) -> torch.Tensor:
        """The latents of the encoded images `keys` (see the class docstring for the shapes)."""
        posteriors = [self._store[(key, protocol.resize, protocol.interpolation)] for key in keys]
        mean, std = torch.stack([m for m, _ in posteriors]), torch.stack([sd for _, sd in posteriors])
        return posterior_latents(mean, std, keys, protocol, range(first_draw, first_draw + draws),
                                 self.components.scaling_factor)


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


def _unique_index(keys: list[str]) -> tuple[list[str], torch.Tensor]:
    """(the distinct keys, in first-seen order; index LongTensor [len(keys)] of each key among them)."""
    unique = list(dict.fromkeys(keys))
    position = {key: row for row, key in enumerate(unique)}
    return unique, torch.tensor([position[key] for key in keys], dtype=torch.long)


def _gather(store: dict[str, torch.Tensor], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the distinct entries for `keys` -> (rows [U, ...], index LongTensor [len(keys)])."""
    unique, index = _unique_index(keys)
    return torch.stack([store[key] for key in unique]), index
