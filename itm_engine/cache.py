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
image, or one per draw) is made from it. Text embeddings are keyed by the string. Both caches hold
at most a byte budget (`DEFAULT_CACHE_BYTES`; None: unbounded) and evict the least recently used
entries beyond it, never one the current call uses.

Hostile inputs get a clear error naming the input, never a silent wrong score: non-finite or
out-of-range pixels, decompression bombs, captions that are not valid Unicode. Integer images of
more than 8 bits (16-bit PNG, 32-bit TIFF) are scaled by their bit depth, not clipped. "crop"
never makes an intermediate larger than `EXACT_ASPECT` times the output: a longer image is
resampled straight from its centre window (the same geometry as resize-then-crop, pixels equal
to within the resampling's rounding).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import PIL.Image
import safetensors
import safetensors.torch
import torch
import torchvision.transforms.functional as TF
from diffusers.image_processor import VaeImageProcessor

from itm_engine.models import SDComponents
from itm_engine.models.families import Conditioning, family_of
from itm_engine.protocols import Interpolation, Protocol, Resize, Transparency
from itm_engine.stats import RunStats

ImageInput = Union[PIL.Image.Image, str, os.PathLike, torch.Tensor]
_PIL_FILTERS = {"lanczos": PIL.Image.LANCZOS, "bicubic": PIL.Image.BICUBIC, "bilinear": PIL.Image.BILINEAR}
_TORCHVISION_FILTERS = {"lanczos": TF.InterpolationMode.LANCZOS, "bicubic": TF.InterpolationMode.BICUBIC,
                        "bilinear": TF.InterpolationMode.BILINEAR}
# integer modes of more than 8 bits -> the largest value of their bit depth ("I": signed 32-bit)
_HIGH_BIT_DEPTH = {"I;16": 2**16 - 1, "I;16L": 2**16 - 1, "I;16B": 2**16 - 1, "I;16N": 2**16 - 1, "I": 2**31 - 1}
EXACT_ASPECT = 16  # "crop": up to this long/short side ratio, exactly torchvision's Resize + CenterCrop
DEFAULT_CACHE_BYTES = 2 * 2**30  # each cache's budget by default


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
        except PIL.Image.DecompressionBombError as err:
            raise ValueError(f"{name}: {str(path)!r} refused as a decompression bomb ({err})") from None
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
    image = _to_8_bit(image, name)
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


def _to_8_bit(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """An image of more than 8 bits per sample as 8-bit greyscale ("L"), scaled by its bit depth
    (PIL's own conversion clips at 255); a float image ("F") must lie in [0, 1]. Other modes as given."""
    if image.mode not in _HIGH_BIT_DEPTH and image.mode != "F":
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        _check_unit_range(values, name, "float images")
        scaled = values * 255
    else:
        scaled = np.clip(values, 0, None) * (255 / _HIGH_BIT_DEPTH[image.mode])
    return PIL.Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _check_unit_range(values: np.ndarray, name: str, what: str) -> None:
    """Raise ValueError unless every value is finite and in [0, 1] (NaN fails both comparisons, so
    finiteness is checked first)."""
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: {what} hold NaN or infinite values")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"{name}: {what} must lie in [0, 1]")


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
        t = t.float()
        _check_unit_range(t.numpy(), name, "float image tensors")
        t = (t * 255).round().to(torch.uint8)
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


def as_list(values: Iterable, what: str) -> Sequence:
    """`values` as a non-empty sequence: a list, tuple or [N, ...] tensor as given, any other
    iterable (a generator) read into a list; ValueError for a single item (a bare string, image
    or [3, H, W] tensor is the usual mistake), TypeError for a non-iterable, ValueError when empty."""
    if isinstance(values, (str, bytes, PIL.Image.Image)) or (
        isinstance(values, torch.Tensor) and values.dim() != 4
    ):
        raise ValueError(f"{what} must be a list; wrap a single item in a list")
    if not isinstance(values, (Sequence, torch.Tensor)):
        if not isinstance(values, Iterable):
            raise TypeError(f"{what} must be a list, got {type(values).__name__}")
        values = list(values)
    if len(values) == 0:
        raise ValueError(f"{what} is empty: give at least one")
    return values


def check_texts(texts: Iterable[str]) -> Sequence[str]:
    """`texts` as a non-empty sequence of strings (`as_list`); ValueError naming the culprit for a
    non-string or a string that is not valid Unicode (a lone surrogate cannot be tokenised)."""
    texts = as_list(texts, "texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is a {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"texts[{i}] is not valid Unicode: {err.reason} at position {err.start}") from None
    return texts


def resize_image(image: PIL.Image.Image, size: int, resize: Resize = "crop",
                 interpolation: Interpolation = "lanczos") -> PIL.Image.Image:
    """An image as the model's square RGB input [size x size] (see the module docstring); an image
    in another mode is converted to RGB after the resize."""
    if resize == "stretch":
        out = image.resize((size, size), resample=_PIL_FILTERS[interpolation])
    elif resize == "crop":
        if max(image.size) > EXACT_ASPECT * min(image.size):
            out = _centre_window(image, size, interpolation)
        else:
            out = TF.center_crop(TF.resize(image, size, interpolation=_TORCHVISION_FILTERS[interpolation]), size)
    elif resize == "pad":
        if min(image.size) * size < max(image.size):
            raise ValueError(f"an image of {image.width} x {image.height} px is too thin to fit into "
                             f"{size} x {size} (resize 'pad'): crop it, or score it with resize 'crop'")
        out = VaeImageProcessor(resample=interpolation).resize(image, size, size, resize_mode="fill")
    else:
        raise ValueError(f"resize must be 'crop', 'stretch' or 'pad', got {resize!r}")
    return out if out.mode == "RGB" else out.convert("RGB")


def _centre_window(image: PIL.Image.Image, size: int, interpolation: Interpolation) -> PIL.Image.Image:
    """"crop" of an image longer than `EXACT_ASPECT`: the window that torchvision's Resize (short
    side to `size`) + CenterCrop would keep, resampled straight from the source to [size x size]
    (PIL's `resize(box=)`): no intermediate larger than the output."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    resized_long = int(size * long / short)  # torchvision's size of the resized long side
    offset = int(round((resized_long - size) / 2.0))  # and CenterCrop's offset along it
    scale = long / resized_long
    first, last = offset * scale, (offset + size) * scale
    box = (0, first, w, last) if h > w else (first, 0, last, h)
    return image.resize((size, size), _PIL_FILTERS[interpolation], box=box)


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
                      draws: range, scaling: float, shift: float = 0.0) -> torch.Tensor:
    """Latents z0 = (x - shift) * scaling, float32, from the posteriors (mean, std [U, C, h, w]) of
    the images `keys`, x as the protocol's `latent` says: [U] for the mean or one sample per image,
    [U * len(draws)] for a sample per draw (row u * len(draws) + s for draw draws[s]). `shift` is
    the VAE's shift factor (SD3, Flux; 0 for SD 1.x/2.x)."""
    if protocol.latent == "mean":
        return (mean - shift) * scaling
    if protocol.latent == "sample":
        eps = torch.stack([posterior_noise(sample_seed(key), mean.shape[1:]) for key in keys])
        return (mean + std * eps.to(mean.device) - shift) * scaling
    eps = torch.stack([posterior_noise(sample_seed(key, protocol.seed, s), mean.shape[1:])
                       for key in keys for s in draws]).to(mean.device)
    n = len(draws)
    return (mean.repeat_interleave(n, 0) + std.repeat_interleave(n, 0) * eps - shift) * scaling


def encode_pixels(components: SDComponents, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [n, 3, R, R] -> latents z0 [n, C, h, w] (float32) = (posterior mean - shift factor) x
    scaling factor."""
    return (encode_posterior(components, pixels)[0] - components.latent_shift) * components.scaling_factor


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


def encode_texts(components: SDComponents, texts: Sequence[str]) -> Conditioning:
    """Captions -> the model family's conditioning (`models.families`): {"context": [n, L, D]} for
    SD 1.x/2.x (L = the tokenizer's length, 77 for CLIP), context and pooled embeddings for SD3.

    Captions longer than the tokenizer's limit are truncated (see `warn_if_truncated`).
    """
    return family_of(components).encode(components, texts)


def warn_if_truncated(components: SDComponents, texts: Sequence[str]) -> None:
    """Issue one warning if any caption exceeds the family's token limit (it will be truncated)."""
    tokenizer = components.tokenizer
    limit = family_of(components).token_limit(components)
    too_long = [t for t in texts if len(tokenizer(t).input_ids) > limit]
    if too_long:
        warnings.warn(
            f"{len(too_long)} caption(s) exceed the tokenizer's {limit}-token limit and are "
            f"truncated to it, e.g. {too_long[0][:60]!r}...",
            stacklevel=3,
        )


class BoundedStore:
    """A dict of tensors (or tuples or dicts of tensors) with a byte budget: `shrink` evicts the least
    recently used entries (`get` and `put` count as use) until the store fits `max_bytes`, never
    the keys of the call in progress (`keep`), handing each to `on_evict` when given. `max_bytes`
    None: unbounded."""

    def __init__(self, max_bytes: int | None, on_evict: Callable[[Any, Any], None] | None = None) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"a cache budget must be a number of bytes >= 0 or None, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.on_evict = on_evict  # called with (key, value) of each evicted entry
        self.bytes = 0
        self._entries: OrderedDict[Any, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def get(self, key: Any) -> Any:
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: Any, value: Any) -> None:
        if key in self._entries:
            self.bytes -= _nbytes(self._entries[key])
        self._entries[key] = value
        self._entries.move_to_end(key)
        self.bytes += _nbytes(value)

    def shrink(self, keep: Iterable[Any] = ()) -> int:
        """Evict least recently used entries not in `keep` until the budget holds; returns how many."""
        if self.max_bytes is None or self.bytes <= self.max_bytes:
            return 0
        keep = set(keep)
        evicted = 0
        for key in [k for k in self._entries if k not in keep]:
            if self.bytes <= self.max_bytes:
                break
            value = self._entries.pop(key)
            self.bytes -= _nbytes(value)
            if self.on_evict is not None:
                self.on_evict(key, value)
            evicted += 1
        return evicted

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _nbytes(value: torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]) -> int:
    tensors = tuple(value.values()) if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)


class LatentCache:
    """VAE posteriors of images, keyed by content and resize conventions; each image is encoded at
    most once per convention while it stays in the cache (at most `max_bytes`, least recently used
    evicted first; None: unbounded).

    `get(images, protocol=..., draws=S, first_draw=f)` returns `(latents, index)`: row `index[i]`
    of `latents` (float32) belongs to `images[i]`; latents are [U, C, h, w] for the posterior mean
    or one sample per image, and [U * S, C, h, w] for a sample per draw (row `index[i] * S + s` for
    the draw f + s of the bank), with U the distinct images. `get` is `encode` (the distinct
    images' content keys, encoding the new ones) then `latents` (made from their posteriors).
    """

    def __init__(self, components: SDComponents, batch_size: int = 16,
                 max_bytes: int | None = DEFAULT_CACHE_BYTES) -> None:
        self.components = components
        self.batch_size = batch_size
        self._store = BoundedStore(max_bytes)  # (key, resize, filter) -> (mean, std, original (h, w))

    def __len__(self) -> int:
        return len(self._store)

    @property
    def bytes(self) -> int:
        return self._store.bytes

    def clear(self) -> None:
        self._store.clear()

    def get(self, images: Sequence[ImageInput], stats: RunStats | None = None, protocol: Protocol | None = None,
            draws: int = 1, first_draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        protocol = protocol or Protocol()
        keys, index = self.encode(images, stats, protocol)
        return self.latents(keys, protocol, draws, first_draw, stats), index

    def encode(self, images: Sequence[ImageInput], stats: RunStats | None = None,
               protocol: Protocol | None = None) -> tuple[list[str], torch.Tensor]:
        """(the content keys of the distinct images, index LongTensor [n_images] into them); the
        images not cached under the protocol's resize conventions are encoded. Entries beyond the
        budget are evicted afterwards, never those of `images` (`latents` reads them next)."""
        images = as_list(images, "images")
        protocol = protocol or Protocol()
        stats = stats if stats is not None else RunStats()
        keys: list[str] = []
        missing: dict[str, PIL.Image.Image] = {}
        with stats.timer("preprocess"):
            for i, image in enumerate(images):
                rgb = load_rgb(image, name=f"images[{i}]", transparency=protocol.transparency)
                key = content_key(rgb)
                keys.append(key)
                if self._key(key, protocol) not in self._store and key not in missing:
                    missing[key] = rgb
        pending = list(missing.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            with stats.timer("preprocess"):
                pixels = preprocess_images(self.components, [rgb for _, rgb in chunk], protocol.resize,
                                           protocol.interpolation)
            with stats.timer("vae", self.components.device):
                mean, std = encode_posterior(self.components, pixels)
            for (key, rgb), m, sd in zip(chunk, mean, std):  # own storage: evictable
                size = torch.tensor([rgb.height, rgb.width])
                self._store.put(self._key(key, protocol), (m.clone(), sd.clone(), size))
            stats.images_encoded += len(chunk)
        stats.evicted += self._store.shrink(self._key(key, protocol) for key in keys)
        stats.cache_bytes["latent"] = self._store.bytes
        return _unique_index(keys)

    def latents(self, keys: Sequence[str], protocol: Protocol, draws: int = 1, first_draw: int = 0,
                stats: RunStats | None = None) -> torch.Tensor:
        """The latents of the encoded images `keys` (see the class docstring for the shapes); then
        the budget holds again (a call whose own images exceed it keeps them only until here)."""
        posteriors = [self._store.get(self._key(key, protocol)) for key in keys]
        mean, std = torch.stack([m for m, _, _ in posteriors]), torch.stack([sd for _, sd, _ in posteriors])
        evicted = self._store.shrink()
        if stats is not None:
            stats.evicted += evicted
            stats.cache_bytes["latent"] = self._store.bytes
        return posterior_latents(mean, std, keys, protocol, range(first_draw, first_draw + draws),
                                 self.components.scaling_factor, self.components.latent_shift)

    def sizes(self, keys: Sequence[str], protocol: Protocol) -> torch.Tensor:
        """The original (height, width) of the encoded images `keys`, Long [U, 2] (read before
        `latents`, which may evict them)."""
        return torch.stack([self._store.get(self._key(key, protocol))[2] for key in keys])

    @staticmethod
    def _key(key: str, protocol: Protocol) -> tuple[str, str, str]:
        return key, protocol.resize, protocol.interpolation


class TextCache:
    """Each caption's conditioning (its family's tensors, one row each: `models.families`), keyed by
    the caption string; each caption is encoded once while it stays in the cache (at most
    `max_bytes`, least recently used evicted first; None: unbounded). Rows are kept exactly as the
    pipeline pads them (SD3's 77 + 256 tokens, no text mask).

    `get(texts)` returns `(conditioning {name: [V, ...]} of the V distinct texts, index LongTensor
    [n_texts])`. The empty string is a valid caption: the null prompt of T2I normalisation.
    With `offload_encoders` the text encoders live on the CPU and visit the denoiser's device only
    while a call's new captions are encoded (T5-XXL alone is 4.8B parameters). With `spill_dir`
    the captions evicted by the budget are written there (one safetensors file each, named by a
    hash of the caption, recording the caption and the model's source) and read back instead of
    re-encoded; a file of another caption or model is never used.
    """

    def __init__(self, components: SDComponents, batch_size: int = 64,
                 max_bytes: int | None = DEFAULT_CACHE_BYTES, offload_encoders: bool = False,
                 spill_dir: str | os.PathLike | None = None) -> None:
        self.components = components
        self.batch_size = batch_size
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._store = BoundedStore(max_bytes, on_evict=self._spill if self.spill_dir is not None else None)
        self.offload_encoders = offload_encoders
        if offload_encoders:
            self._move_encoders("cpu")

    def __len__(self) -> int:
        return len(self._store)

    @property
    def bytes(self) -> int:
        return self._store.bytes

    def clear(self) -> None:
        self._store.clear()

    def get(self, texts: Sequence[str], stats: RunStats | None = None) -> tuple[Conditioning, torch.Tensor]:
        texts = check_texts(texts)
        stats = stats if stats is not None else RunStats()
        missing = [t for t in dict.fromkeys(t for t in texts if t not in self._store) if not self._reload(t, stats)]
        warn_if_truncated(self.components, missing)
        if missing and self.offload_encoders:  # on the accelerator only while this call's captions encode
            self._move_encoders(self.components.device)
        try:
            self._encode(missing, stats)
        finally:
            if missing and self.offload_encoders:
                self._move_encoders("cpu")
        unique, index = _unique_index(list(texts))
        rows = [self._store.get(text) for text in unique]  # {name: row} each
        conditioning = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        stats.evicted += self._store.shrink()
        stats.cache_bytes["text"] = self._store.bytes
        return conditioning, index

    def _encode(self, missing: Sequence[str], stats: RunStats) -> None:
        """Encode the captions `missing` in chunks of `batch_size` into the store (on the denoiser's
        device: the rows the executor reads)."""
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with stats.timer("text_encoder", self.components.device):
                encoded = encode_texts(self.components, chunk)
            for row, text in enumerate(chunk):  # own storage: evictable
                self._store.put(text, {name: value[row].clone() for name, value in encoded.items()})
            stats.texts_encoded += len(chunk)

    def _spill_file(self, text: str) -> Path:
        return self.spill_dir / f"{hashlib.sha256(text.encode('utf-8')).hexdigest()}.safetensors"

    def _spill(self, text: str, rows: dict[str, torch.Tensor]) -> None:
        """Write an evicted caption's rows to the spill folder (atomically: a temporary file, renamed)."""
        file = self._spill_file(text)
        temporary = file.with_suffix(".tmp")
        safetensors.torch.save_file({name: row.contiguous().cpu() for name, row in rows.items()}, temporary,
                                    metadata={"text": text, "model": self.components.source})
        os.replace(temporary, file)

    def _reload(self, text: str, stats: RunStats) -> bool:
        """Put a spilled caption back in the store; False when it was never spilled (by this model)."""
        file = None if self.spill_dir is None else self._spill_file(text)
        if file is None or not file.is_file():
            return False
        with safetensors.safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("text") != text or metadata.get("model") != self.components.source:
                return False
            rows = {name: handle.get_tensor(name).to(self.components.device) for name in handle.keys()}
        self._store.put(text, rows)
        stats.texts_reloaded += 1
        return True

    def _move_encoders(self, device: torch.device | str) -> None:
        for encoder in self.components.text_encoders:
            encoder.to(device)


def _unique_index(keys: list[str]) -> tuple[list[str], torch.Tensor]:
    """(the distinct keys, in first-seen order; index LongTensor [len(keys)] of each key among them)."""
    unique = list(dict.fromkeys(keys))
    position = {key: row for row, key in enumerate(unique)}
    return unique, torch.tensor([position[key] for key in keys], dtype=torch.long)
