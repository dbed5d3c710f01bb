"""The DiffusionITM scorer: I2T and null-normalised T2I estimators over the batched engine.

    score_i2t(x, w) = -mean_s err(x, w, s)
    score_t2i(x, w) = -mean_s [err(x, w, s) - err(x, "", s)]

with every candidate of a query evaluated on the same noise draws (a paired comparison), and
err, the draws, the latent and the image preparation as the scoring protocol says
(`itm_engine.protocols`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from itm_engine import extras, fastpath, protocols
from itm_engine.adaptive import AdaptiveResult, Confidence, Policy
from itm_engine.cache import (
    DEFAULT_CACHE_BYTES,
    ImageInput,
    LatentCache,
    TextCache,
    as_list,
    image_query_key,
    query_key,
)
from itm_engine.engine import Executor, check_batch_size, plan_items
from itm_engine.fastpath import Attention
from itm_engine.models import SDComponents, load_components
from itm_engine.models.families import family_of
from itm_engine.noise import ForwardProcess, NoiseBank
from itm_engine.pairs import Mode, PairScorer, as_candidates, check_candidates, check_mode, check_pairs
from itm_engine.protocols import Protocol
from itm_engine.stats import RunStats
from itm_engine.timestep_weights import weights_at

NULL_PROMPT = ""


class DiffusionITM(PairScorer):
    """Stable Diffusion as a zero-shot image-text matcher.

    >>> scorer = DiffusionITM.from_pretrained("tiny")
    >>> scores = scorer(images=[img_a, img_b], texts=["a dog", "a cat"])   # [2, 2], higher = better
    >>> scores = scorer(images, texts, mode="t2i", samples=20, seed=1)     # protocol fields per call

    Every call follows the scorer's protocol (`scorer.protocol`, from `protocol=` and field
    overrides at construction); a call may override fields (`samples=`, `seed=`, `error=`, ...) or
    give another protocol (`protocol=`). The scorer keeps its latent and text caches across calls
    (`clear_cache()` empties them) and reports what the last call did in `last_stats`.
    """

    def __init__(
        self,
        components: SDComponents,
        *,
        protocol: str | Protocol | None = None,
        batch_size: int | str = 64,
        progress: bool | None = None,
        kernels: str | None = None,
        attention: Attention = "sdpa",
        channels_last: bool = False,
        compile: bool = False,
        cuda_graphs: bool = False,
        cache_bytes: int | None = DEFAULT_CACHE_BYTES,
        offload_text_encoders: bool = False,
        text_spill_dir: str | os.PathLike | None = None,
        **protocol_fields: Any,
    ) -> None:
        """
        Args:
            components: the loaded Stable Diffusion parts (see `itm_engine.models`).
            protocol: a preset name of `protocols.PRESETS` or a `Protocol` (default: the engine's);
                `protocol_fields` override its fields (`samples=`, `error=`, `latent=`, ...).
            batch_size: UNet work items per call (any mix of images, texts and timesteps), or
                "auto": the largest that fits on the GPU (64 on the CPU).
            progress: show a progress bar (None: only for long runs on a terminal).
            kernels: fused-op backend, "reference" | "triton" | "ext" | "auto" (None: the
                ITM_KERNELS environment variable, default "auto"); see `itm_engine.kernels`.
            attention: "sdpa" (PyTorch flash / memory-efficient attention), "xformers" or "math".
            channels_last: store the UNet's conv weights NHWC (faster convs on tensor cores).
            compile: `torch.compile` the UNet with fixed batch shapes (the last batch is padded).
            cuda_graphs: replay the compiled UNet as CUDA graphs ("reduce-overhead"; implies compile).
            cache_bytes: the byte budget of each cache (latents, text embeddings): beyond it the
                least recently used entries are evicted (`last_stats.evicted`); None: unbounded.
            offload_text_encoders: keep the text encoders on the CPU and move them to the model's
                device only while a call's new captions are encoded (frees T5-XXL's memory
                between calls; captions already cached cost nothing).
            text_spill_dir: a folder where the text cache writes the captions its budget evicts
                and reads them back from, instead of encoding them again (an fp16 SD3 caption is
                ~2.7 MB: large caption sets of the large families).

        attention and channels_last change `components.denoiser` in place.
        """
        self.protocol = protocols.resolve(protocol, **protocol_fields)
        fastpath.set_attention(components.denoiser, attention)
        if channels_last:
            fastpath.use_channels_last(components.denoiser)
        self.components = components
        self.latent_cache = LatentCache(components, max_bytes=cache_bytes)
        self.text_cache = TextCache(components, max_bytes=cache_bytes, offload_encoders=offload_text_encoders,
                                    spill_dir=text_spill_dir)
        self.executor = Executor(
            components, batch_size=batch_size, progress=progress, kernels=kernels, compile=compile,
            cuda_graphs=cuda_graphs,
        )
        self.last_stats = RunStats()

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        lora: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
        protocol: str | Protocol | None = None,
        **options: Any,
    ) -> DiffusionITM:
        """Load from a diffusers folder, a named model, a hub id in the local HF cache, or a
        built-in architecture ("tiny", "sd15-arch", "sd21-arch"); `options` go to `__init__`
        (scorer options and protocol field overrides).

        dtype: the model dtype (default: the protocol's `dtype` on CUDA, float32 on the CPU).
        lora: a LoRA checkpoint for the UNet (a folder or file: the diffusers format
        `pytorch_lora_weights.safetensors`, or the research code's legacy `pytorch_lora_weights.bin`),
        applied at `lora_scale` (0: the base model, 1: the fine-tuned one); see `itm_engine.models.lora`.
        """
        fields = {k: options.pop(k) for k in list(options) if k in protocols.FIELDS}
        resolved = protocols.resolve(protocol, **fields)
        if dtype is None:
            dtype = getattr(torch, resolved.dtype) if torch.device(device).type == "cuda" else torch.float32
        components = load_components(source, device=device, dtype=dtype)
        if lora is not None:
            extras.require("peft", "scoring with a LoRA")
            from itm_engine.models.lora import load_lora

            load_lora(components.unet, lora, lora_scale)
        return cls(components, protocol=resolved, **options)

    def clear_cache(self) -> None:
        """Forget every cached latent and text embedding."""
        self.latent_cache.clear()
        self.text_cache.clear()

    def call_protocol(self, protocol: str | Protocol | None = None, **overrides: Any) -> Protocol:
        """The protocol of one call: `protocol` (default the scorer's) with `overrides`."""
        return protocols.resolve(self.protocol if protocol is None else protocol, **overrides)

    def noise_bank(self, samples: int | None = None, seed: int | None = None, schedule: str | None = None, *,
                   protocol: Protocol | None = None) -> NoiseBank:
        """The shared draws of the protocol (default the scorer's, with these fields overridden):
        `samples` draws of its `schedule`, reproducible from `seed`."""
        proto = self.call_protocol(protocol, samples=samples, seed=seed, schedule=schedule)
        return self._bank(proto, proto.seed, self.components.process)

    def _bank(self, protocol: Protocol, seed: int, process: ForwardProcess) -> NoiseBank:
        return NoiseBank.for_protocol(protocol, self.components.latent_shape, process, seed)

    def score_pairs(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        pairs: torch.Tensor | Sequence[tuple[int, int]],
        mode: Mode = "i2t",
        *,
        noise: NoiseBank | str | None = None,
        batch_size: int | None = None,
        protocol: str | Protocol | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Scores float32 [P] of (images[i], texts[j]) for each (i, j) of `pairs` ([P, 2]); the
        general form behind `__call__` and `score_candidates`. The mean over draws of `draw_scores`
        (arguments as there)."""
        return self.draw_scores(images, texts, pairs, mode, noise=noise, batch_size=batch_size, protocol=protocol,
                                **overrides).mean(dim=1)

    def score_adaptive(
        self,
        queries: Sequence,
        candidates: Sequence[Sequence],
        policy: str | Policy,
        mode: Mode = "i2t",
        *,
        noise: NoiseBank | str | None = None,
        batch_size: int | None = None,
        protocol: str | Protocol | None = None,
        **overrides: Any,
    ) -> AdaptiveResult:
        """The per-query candidate form (`score_candidates`) with adaptive successive elimination.

        policy: fixed rounds `[(samples_1, keep_1), ...]`, a `Confidence` rule, or their text
            forms "2:5,10:1" / "auto:z=3" (the budget of "auto" is the protocol's `samples`); see
            `itm_engine.adaptive` for the exact rules and the ranking of eliminated candidates.
        noise: the draws, taken in bank order (default: a bank of the policy's budget from the
            protocol's seed and schedule, reordered by `NoiseBank.spread` so every round's draws
            cover t). Adaptive elimination shares one bank by all queries: a protocol with
            `noise="per-query"` is refused.

        Returns an `AdaptiveResult` (scores [n, k], draws [n, k], UNet items used vs the full
        budget); `last_stats` sums the rounds and sets `full_items`.
        """
        from itm_engine.adaptive import budget, check_rounds, parse_policy, score_adaptive

        noise, overrides = _noise_argument(noise, overrides)
        proto = self.call_protocol(protocol, **overrides)
        if proto.noise == "per-query" and noise is None:
            raise ValueError("adaptive elimination shares one noise bank by all queries; the protocol's "
                             "noise='per-query' cannot be followed (pass noise=, or noise='shared')")
        queries, candidates = as_candidates(queries, candidates)
        k = check_candidates(queries, candidates, mode)
        policy = parse_policy(policy, proto.samples) if isinstance(policy, str) else policy
        if not isinstance(policy, Confidence):
            check_rounds(policy, k)
        bank = noise if noise is not None else self._bank(proto.replace(samples=budget(policy)), proto.seed,
                                                                   self.components.process).spread()
        result = score_adaptive(self, queries, candidates, mode, policy, bank, batch_size, proto)
        self.last_stats = result.stats
        return result

    def draw_scores(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        pairs: torch.Tensor | Sequence[tuple[int, int]],
        mode: Mode = "i2t",
        *,
        noise: NoiseBank | str | None = None,
        draws: slice | None = None,
        batch_size: int | None = None,
        protocol: str | Protocol | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Per-draw scores float32 [P, S] of each pair (images[i], texts[j]) of `pairs` ([P, 2]):
        -err ("i2t") or -(err - the image's null-prompt err on the same draw) ("t2i"), each times
        its draw's timestep weight when the protocol has `timestep_weights` (normalised to mean 1
        over the bank, so the mean over the bank's draws is the weighted mean).

        Args:
            mode: "i2t" (compare texts for an image) or "t2i" (compare images for a text).
            noise: the draws, shared by every pair (default: the protocol's: one bank from its seed,
                or with `noise="per-query"` one per query, from the seed and the query's content); a
                string sets the protocol's `noise` field instead.
            draws: score only these draws of the bank(s) (a slice); their indices in the bank
                still key the per-draw posterior samples.
            batch_size: work items per model call for this call, or "auto" (default: the scorer's).
            protocol, overrides: this call's protocol (see `call_protocol`).
        """
        noise, overrides = _noise_argument(noise, overrides)
        proto = self.call_protocol(protocol, **overrides)
        images, texts = as_list(images, "images"), as_list(texts, "texts")
        pairs = check_pairs(images, texts, pairs)
        check_mode(mode)
        if batch_size is not None:
            check_batch_size(batch_size)
        with_null = mode == "t2i"

        stats = RunStats()
        started = time.perf_counter()
        image_keys, image_row = self.latent_cache.encode(images, stats, proto)
        process = self.components.process  # once per call: every bank's grid
        # draws: one bank shared by every pair (block 0), or one bank (block) per query
        if noise is not None or proto.noise == "shared":
            banks = [noise if noise is not None else self._bank(proto, proto.seed, process)]
            block = torch.zeros(len(pairs), dtype=torch.long)
        else:
            if mode == "i2t":
                keys = [image_query_key(image_keys[row]) for row in image_row[pairs[:, 0]].tolist()]
            else:
                keys = [query_key(texts[j], mode) for j in pairs[:, 1].tolist()]
            blocks: dict[str, int] = {}
            block = torch.tensor([blocks.setdefault(key, len(blocks)) for key in keys], dtype=torch.long)
            banks = [self._bank(proto, proto.query_seed(key), process) for key in blocks]
        # per bank: each draw's weight, normalised over the whole bank (also when only `draws` are scored)
        weights = None if proto.timestep_weights is None else torch.stack(
            [weights_at(proto.timestep_weights, b.timesteps.double() / process.num_train_timesteps).float()
             for b in banks])
        first = 0
        if draws is not None:
            first = draws.start or 0
            banks = [NoiseBank.from_tensors(b.timesteps[draws], b.noise[draws]) for b in banks]
            weights = None if weights is None else weights[:, draws]
        banks = [bank.check_fits(self.components.latent_shape, process) for bank in banks]
        S = len(banks[0])
        bank = banks[0] if len(banks) == 1 else NoiseBank(  # the fitted banks' timestep dtype kept
            torch.cat([b.timesteps for b in banks]), torch.cat([b.noise for b in banks]))

        per_draw = proto.latent == "sample-per-draw"
        image_conditioning = {  # e.g. SDXL's time_ids: rows aligned with the latents'
            name: value.repeat_interleave(S, 0) if per_draw else value for name, value in
            family_of(self.components).image_conditioning(
                self.components, self.latent_cache.sizes(image_keys, proto), proto.resize).items()}
        latents = self.latent_cache.latents(image_keys, proto, draws=S, first_draw=first, stats=stats)
        conditioning, text_row = self.text_cache.get(list(texts) + [NULL_PROMPT] * with_null, stats)

        # Distinct (latent row, text row, bank block) triples: duplicates in the input are evaluated once.
        wanted = torch.stack([image_row[pairs[:, 0]], text_row[pairs[:, 1]], block], dim=1)
        if with_null:  # the null prompt's error, once per (image, block) used
            used, null_of = wanted[:, [0, 2]].unique(dim=0, return_inverse=True)
            nulls = torch.stack([used[:, 0], text_row[-1].expand(len(used)), used[:, 1]], dim=1)
            wanted = torch.cat([wanted, nulls])
        unique, inverse = wanted.unique(dim=0, return_inverse=True)

        plan = plan_items(unique, S, per_draw_latents=per_draw)
        errors = self.executor.run(latents, conditioning, bank, plan, stats, batch_size, error=proto.error,
                                   image_conditioning=image_conditioning,
                                   protocol_inputs=family_of(self.components).protocol_inputs(proto))
        pair_err = errors.view(len(unique), S)[inverse].cpu()  # [P (+ nulls), S]
        diff = pair_err[: len(pairs)] - pair_err[len(pairs):][null_of] if with_null else pair_err
        if weights is not None:
            diff = diff * weights[block]
        stats.settle()
        stats.seconds["total"] = time.perf_counter() - started
        self.last_stats = stats
        return -diff


def _noise_argument(noise: NoiseBank | str | None, overrides: dict[str, Any]) -> tuple[NoiseBank | None, dict]:
    """(the given draws, the protocol overrides): a string is the protocol field "noise" ("shared" /
    "per-query"), not draws; anything else but a NoiseBank is a TypeError."""
    if isinstance(noise, str):
        return None, {**overrides, "noise": noise}
    if noise is not None and not isinstance(noise, NoiseBank):
        raise TypeError(f"noise must be a NoiseBank (NoiseBank.from_tensors(timesteps, noise) wraps tensors) or "
                        f"'shared' / 'per-query', got {type(noise).__name__}")
    return noise, overrides
