"""CLIP (open_clip) embeddings: the top-k candidate prefilter and the CLIP baseline scorer.

    clip = ClipModel.from_name("ViT-B-32", pretrained="laion2b_s34b_b79k")
    idx = clip.topk_texts(images, captions, k=10)     # LongTensor [n_images, 10], best first
    scorer = ClipScorer(clip)                          # same call surface as DiffusionITM
    scores = scorer(images, captions)                  # [n_images, n_texts], cosine similarity

Weights are never downloaded. `pretrained` is an open_clip tag resolved from the local cache
(the Hugging Face hub cache: `HF_HUB_CACHE`, or `HF_HOME/hub`, or `cache_dir`; or open_clip's
URL cache `~/.cache/clip`), or a path to a checkpoint file (a state dict, `.pt`/`.bin`/
`.safetensors`); `None` gives random weights. Missing weights raise FileNotFoundError saying
what to fetch. (Architectures whose text tower or tokenizer comes from Hugging Face
transformers, e.g. SigLIP or `hf_model_name` configs, also need those files in the HF cache;
set HF_HUB_OFFLINE=1 to make transformers fail rather than try the network for them.)

Embeddings are L2-normalised float32 rows, cached like `itm_engine.cache`: images by pixel
content (`content_key`, so equal images share one entry whatever holds them), texts by string.
"""
from __future__ import annotations

import difflib
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import open_clip
import PIL.Image
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from tqdm.auto import tqdm

from itm_engine import kernels
from itm_engine.cache import ImageInput, as_list, check_texts, content_key, load_rgb
from itm_engine.models import registry
from itm_engine.pairs import Mode, PairScorer, check_mode, check_pairs
from itm_engine.stats import RunStats
from itm_engine.tasks.base import StoredImage

ClipImage = Union[ImageInput, StoredImage]
PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
REGISTERED_TAG = "bundled"  # pretrained= value naming the weights a plugin registered for the model
QUERY_CHUNK = 1024  # queries per topk_similarity call: bounds its [chunk, gallery chunk] scratch


class ClipModel:
    """An open_clip model with cached, batched, L2-normalised image and text embeddings.

    Build it with `from_name`. Embeddings live on the model's device as float32; `clear_cache()`
    forgets them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[PIL.Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        name: str = "",
        pretrained: str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        progress: bool | None = None,
    ) -> None:
        """
        Args:
            model: an open_clip CLIP model (`encode_image`, `encode_text`), in eval mode.
            preprocess: open_clip's evaluation transform, RGB PIL image -> [3, S, S].
            tokenizer: open_clip's tokenizer for the model, list of strings -> LongTensor [n, L].
            dtype: the dtype pixels are given to the image tower in (the model's precision).
            batch_size: images or texts per forward call.
            progress: show a progress bar (None: only for runs of several batches on a terminal).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.progress = progress
        self.device = next(model.parameters()).device
        self.dtype = dtype
        self._images: dict[str, torch.Tensor] = {}
        self._texts: dict[str, torch.Tensor] = {}

    @classmethod
    def from_name(
        cls,
        name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        *,
        model_config: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool | None = None,
    ) -> "ClipModel":
        """Build open_clip model `name`, offline.

        Args:
            name: an open_clip architecture ("ViT-B-32", ...; see `open_clip.list_models()`),
                or one defined by `model_config`.
            pretrained: a pretrained tag of `name` ("laion2b_s34b_b79k", "openai", ...) found in
                the local cache, a checkpoint file path, or None for random weights (warns).
                A CLIP a plugin registered (`itm_engine.models.registry.register_clip`), such
                as the bundled ShapesWorld CLIP: name "shapes-clip", pretrained "bundled"
                (its config is added automatically).
            dtype: float32, float16 or bfloat16 (open_clip's "fp32" / "fp16" / "bf16" precision).
            model_config: a JSON model config file, or a folder of them, registered with
                `open_clip.add_model_config` (the file name without ".json" is the model name).
            cache_dir: where cached weights are looked for (default: the Hugging Face hub cache
                for hub-hosted tags, ~/.cache/clip for URL-hosted ones).

        Raises:
            FileNotFoundError: the tag's weights are not cached, or the checkpoint file is missing.
            ValueError: unknown model name, unknown tag, unsupported dtype.
        """
        if dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {list(PRECISIONS)}, got {dtype}")
        registered = registry.clip_files(name) if name not in open_clip.list_models() else None
        if model_config is None and registered is not None:
            model_config = registered[0]
        if model_config is not None:
            config_path = Path(model_config).expanduser()
            if not config_path.exists():
                raise FileNotFoundError(f"model_config: no such file or folder: {str(config_path)!r}")
            open_clip.add_model_config(config_path)
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
            raise ValueError(
                f"unknown open_clip model {name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + " (open_clip.list_models() lists them; model_config= adds your own; 'hf-hub:' and "
                "'local-dir:' names are not supported: use a name with a cached tag or a checkpoint path)"
            )
        checkpoint, options = _resolve_pretrained(name, pretrained, cache_dir)
        if checkpoint is None:
            warnings.warn(
                f"CLIP model {name!r} has random weights (pretrained=None): its scores are "
                "meaningless except for testing",
                stacklevel=2,
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=checkpoint,
            precision=PRECISIONS[dtype],
            device=device,
            pretrained_image=False,
            pretrained_text=False,  # never fetch tower weights: a checkpoint or random init
            cache_dir=None if cache_dir is None else str(cache_dir),
            **options,
        )
        tokenizer = open_clip.get_tokenizer(name)
        label = None if pretrained is None else str(pretrained)
        return cls(
            model, preprocess, tokenizer, name=name, pretrained=label, dtype=dtype, batch_size=batch_size,
            progress=progress,
        )

    def scorer(self) -> "ClipScorer":
        """The CLIP baseline scorer over this model (sharing its embedding caches)."""
        return ClipScorer(self)

    def clear_cache(self) -> None:
        """Forget every cached image and text embedding."""
        self._images.clear()
        self._texts.clear()

    @torch.inference_mode()
    def embed_images(self, images: Sequence[ClipImage], stats: RunStats | None = None) -> torch.Tensor:
        """Images (PIL, path, [3|1, H, W] tensor, or `StoredImage`) -> float32 [n_images, D], unit rows.

        Images are decoded and embedded in a stream of batches (memory stays bounded for large
        galleries); an image whose content is already cached is not embedded again.
        """
        images = as_list(images, "images")
        stats = stats if stats is not None else RunStats()
        keys: list[str] = []
        pending: dict[str, PIL.Image.Image] = {}
        bar = tqdm(total=len(images), desc="CLIP images", unit="img", disable=self._bar_disabled(len(images)))
        for i, image in enumerate(images):
            with stats.timer("preprocess"):
                rgb = _load(image, f"images[{i}]")
                key = content_key(rgb)
            keys.append(key)
            if key not in self._images and key not in pending:
                pending[key] = rgb
                if len(pending) == self.batch_size:
                    self._embed_image_batch(pending, stats)
                    pending = {}
            bar.update(1)
        if pending:
            self._embed_image_batch(pending, stats)
        bar.close()
        return torch.stack([self._images[key] for key in keys])

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], stats: RunStats | None = None) -> torch.Tensor:
        """Captions -> float32 [n_texts, D], unit rows (longer than the context: truncated)."""
        texts = check_texts(texts)
        stats = stats if stats is not None else RunStats()
        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        with tqdm(total=len(missing), desc="CLIP texts", unit="text", disable=self._bar_disabled(len(missing))) as bar:
            for chunk in _chunks(missing, self.batch_size):
                with stats.timer("text_encoder", self.device):
                    tokens = self.tokenizer(chunk).to(self.device)
                    rows = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
                self._texts.update(zip(chunk, rows))
                stats.texts_encoded += len(chunk)
                bar.update(len(chunk))
        return torch.stack([self._texts[t] for t in texts])

    def similarity(self, images: Sequence[ClipImage], texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity, float32 [n_images, n_texts] (on the model's device)."""
        return self.embed_images(images) @ self.embed_texts(texts).T

    def topk_texts(self, images: Sequence[ClipImage], texts: Sequence[str], k: int) -> torch.Tensor:
        """For each image, the indices into `texts` of its k most similar texts: LongTensor
        [n_images, k] (CPU), best first; equal similarity: the lower index first."""
        _check_k(k, texts, "texts")
        return self._topk(self.embed_images(images), self.embed_texts(texts), k)

    def topk_images(self, texts: Sequence[str], images: Sequence[ClipImage], k: int) -> torch.Tensor:
        """For each text, the indices into `images` of its k most similar images: LongTensor
        [n_texts, k] (CPU), best first; equal similarity: the lower index first."""
        _check_k(k, images, "images")
        return self._topk(self.embed_texts(texts), self.embed_images(images), k)

    # -- internals ----------------------------------------------------------------------------

    def _embed_image_batch(self, batch: dict[str, PIL.Image.Image], stats: RunStats) -> None:
        with stats.timer("preprocess"):
            pixels = torch.stack([self.preprocess(rgb) for rgb in batch.values()])
        with stats.timer("image_encoder", self.device):
            pixels = pixels.to(device=self.device, dtype=self.dtype)
            rows = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        self._images.update(zip(batch, rows))
        stats.images_encoded += len(batch)

    def _topk(self, queries: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
        """Indices LongTensor [Q, k] of the top-k gallery rows per query, via the streaming op."""
        parts = [kernels.topk_similarity(q, gallery, k)[1].cpu() for q in queries.split(QUERY_CHUNK)]
        return torch.cat(parts)

    def _bar_disabled(self, n_items: int) -> bool | None:
        if n_items == 0 or self.progress is not None:
            return n_items == 0 or not self.progress
        return True if n_items <= 4 * self.batch_size else None  # None: tqdm shows it on a terminal


class ClipScorer(PairScorer):
    """The CLIP baseline with DiffusionITM's call surface: score = cosine similarity.

    CLIP similarity is symmetric and deterministic, so `mode` ("i2t" / "t2i") gives the same
    scores in both directions, and the diffusion options (samples, seed, noise, batch_size,
    schedule) are accepted for compatibility and ignored. `last_stats` counts the embeddings
    computed by the last call (unet_items is always 0).
    """

    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip
        self.last_stats = RunStats()

    @classmethod
    def from_pretrained(
        cls,
        name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **options,
    ) -> "ClipScorer":
        """`ClipModel.from_name(name, pretrained, device, dtype, **options)` as a scorer."""
        return cls(ClipModel.from_name(name, pretrained, device=device, dtype=dtype, **options))

    def clear_cache(self) -> None:
        """Forget every cached embedding."""
        self.clip.clear_cache()

    def score_pairs(
        self,
        images: Sequence[ClipImage],
        texts: Sequence[str],
        pairs: torch.Tensor | Sequence[tuple[int, int]],
        mode: Mode = "i2t",
    ) -> torch.Tensor:
        """Cosine similarity float32 [P] (CPU) of (images[i], texts[j]) for each (i, j) of
        `pairs` ([P, 2]); the same in both modes (CLIP draws no noise: it takes no options)."""
        images, texts = as_list(images, "images"), as_list(texts, "texts")
        pairs = check_pairs(images, texts, pairs)
        check_mode(mode)
        stats = RunStats(batch_size=self.clip.batch_size)
        started = time.perf_counter()
        image_rows = self.clip.embed_images(images, stats)
        text_rows = self.clip.embed_texts(texts, stats)
        pairs = pairs.to(image_rows.device)
        scores = (image_rows[pairs[:, 0]] * text_rows[pairs[:, 1]]).sum(dim=1).cpu()
        stats.settle()
        stats.seconds["total"] = time.perf_counter() - started
        self.last_stats = stats
        return scores


# -- loading ------------------------------------------------------------------------------------


def _resolve_pretrained(
    name: str, pretrained: str | os.PathLike | None, cache_dir: str | os.PathLike | None
) -> tuple[str | None, dict]:
    """`pretrained` -> (checkpoint file or None, extra create_model_and_transforms options).

    A known tag resolves to its cached file, with the tag's preprocessing and QuickGELU setting
    passed on (what open_clip does for tags it downloads itself); anything else must be a file.
    """
    if pretrained is None:
        return None, {}
    if str(pretrained) == REGISTERED_TAG:
        registered = registry.clip_files(name)
        if registered is None:
            raise ValueError(f"pretrained={REGISTERED_TAG!r} names the weights a plugin registered for the model, "
                             f"and none is registered for {name!r}")
        return str(registered[1]), {}
    tag_cfg = open_clip.get_pretrained_cfg(name, str(pretrained))
    if tag_cfg:
        options = {
            "image_mean": tag_cfg.get("mean"),
            "image_std": tag_cfg.get("std"),
            "image_interpolation": tag_cfg.get("interpolation"),
            "image_resize_mode": tag_cfg.get("resize_mode"),
            # open_clip 3 only warns on a QuickGELU mismatch; the weights need the activation
            # they were trained with, so follow the tag.
            "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
        }
        return _cached_tag_file(name, str(pretrained), tag_cfg, cache_dir), options
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    if path.suffix in CHECKPOINT_SUFFIXES or os.sep in str(pretrained):
        raise FileNotFoundError(f"pretrained: no such checkpoint file: {str(path)!r}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ValueError(
        f"pretrained={str(pretrained)!r} is neither a pretrained tag of {name!r} nor a checkpoint file; "
        f"tags of {name!r}: {', '.join(tags) if tags else 'none'}"
    )


def _cached_tag_file(name: str, tag: str, tag_cfg: dict, cache_dir: str | os.PathLike | None) -> str:
    """The local file of a pretrained tag, looked up without any network access."""
    looked: list[str] = []
    hint = ""
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(hub)  # "org/repo/file", or "org/repo/" for the default file
        filename = filename or HF_WEIGHTS_NAME
        hub_cache = str(cache_dir) if cache_dir is not None else _hf_hub_cache()
        for candidate in _safetensors_first(filename):
            try:
                return hf_hub_download(repo, candidate, cache_dir=hub_cache, local_files_only=True)
            except (OSError, ValueError):  # LocalEntryNotFoundError is both
                looked.append(f"{repo}/{candidate} in the Hugging Face cache {hub_cache}")
        hint = f"`hf download {repo} {filename}` (or copy a Hugging Face cache holding it to {hub_cache})"
    url = tag_cfg.get("url", "")
    if url:
        target = Path(cache_dir if cache_dir is not None else "~/.cache/clip").expanduser() / os.path.basename(url)
        if target.is_file():
            return str(target)
        looked.append(str(target))
        hint = hint or f"download {url} to {target}"
    raise FileNotFoundError(
        f"CLIP weights for {name!r} pretrained={tag!r} are not cached locally and nothing is downloaded. "
        f"Looked for: {'; '.join(looked)}. To get them, on a machine with network access run {hint}, "
        "or pass pretrained=PATH to a local checkpoint file."
    )


def _safetensors_first(filename: str) -> Iterator[str]:
    """The .safetensors alternatives open_clip prefers for a hub file, then the file itself."""
    if filename == HF_WEIGHTS_NAME:
        yield HF_SAFE_WEIGHTS_NAME
    elif filename.endswith((".bin", ".pth")):
        yield filename[:-4] + ".safetensors"
    yield filename


def _hf_hub_cache() -> str:
    """The Hugging Face hub cache folder, from the environment as it is now (HF_HUB_CACHE,
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


# -- inputs -------------------------------------------------------------------------------------


def _load(image: ClipImage, name: str) -> PIL.Image.Image:
    """One image input (as in `itm_engine.cache`, or a `StoredImage`: a crop, a zip member) -> RGB PIL image."""
    if isinstance(image, StoredImage):
        if not Path(image.path).is_file():
            raise FileNotFoundError(f"{name}: no such image file: {image.path!r}")
        return load_rgb(image.load(), name)
    return load_rgb(image, name)


def _check_k(k: int, candidates: Sequence, what: str) -> None:
    """Raise ValueError unless 1 <= k <= len(candidates) (checked before any embedding)."""
    if not isinstance(k, int) or not 1 <= k <= len(candidates):
        raise ValueError(f"k must be between 1 and the number of candidate {what} ({len(candidates)}), got k={k}")


def _chunks(items: list, size: int) -> Iterable[list]:
    return (items[start : start + size] for start in range(0, len(items), size))
