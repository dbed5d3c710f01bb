"""Scoring protocols: every convention that decides a DiffusionITM score, in one frozen object.

Papers that score image-text pairs with a diffusion model differ in conventions that move
decisions on real models: how a draw's error is reduced, which timesteps are drawn, whether noise
is shared by a whole dataset or drawn per query, which latent the VAE gives, how the image is
resized, and how ties count. A `Protocol` names each of them; `PRESETS` reproduces each reference
code exactly:

- ``"diffusion-itm"``: the DiffusionITM research code (Krojer et al., NeurIPS 2023;
  McGill-NLP/diffusion-itm with its diffusers fork, `StableDiffusionImg2ImgPipeline.__call__`):
  the per-draw L2 norm ||eps - pred||_2 over the flattened latent, timesteps
  `range(10, 990, 1000 // S)`, one noise table for the whole dataset, a fresh VAE posterior sample
  for every draw, the image stretched to the square with PIL bicubic, fp16 on CUDA, argmax ties
  (the ground truth, first, wins).
- ``"diffusion-classifier"``: Diffusion Classifier (Li et al., ICCV 2023;
  diffusion-classifier/diffusion-classifier, `eval_prob_adaptive.py`): the mean squared error,
  timesteps `T // S // 2 + k * (T // S)`, fresh noise per query shared by its candidates, the
  posterior mean, torchvision bicubic resize of the short side and centre crop (then RGB), fp16
  on CUDA.
- ``"jeong2025"``: Jeong, Uselis, Oh and Rohrbach (NeurIPS 2025 D&B; eugene6923/Diffusion-
  Classifiers-Compositionality, `pipeline_stable_diffusion_3_img2img.py` of its diffusers fork and
  `diffusion_itm.py`): 30 fixed timesteps of the scheduler's (shifted) training grid,
  `timesteps[arange(20, 980, 1000 // S)]` (its `sampled_timesteps` at its defaults, strength 0.6 of
  50 steps), one fixed noise table (draw k for timestep k), the L2 norm (`use_normed_classifier`),
  one posterior sample per image (`retrieve_latents` once, presaved), the image stretched to the
  square (PIL's default bicubic `resize`), fp16, argmax ties; no guidance (scale 0).
- ``"engine"``: this project's default (`DEFAULT`): the mean squared error on S stratified
  timesteps (Diffusion Classifier's), one shared table of draws, the posterior mean, the image's
  short side resized (Lanczos) and centre-cropped, transparency composited on white, strict ties;
  chosen by accuracy and its spread over seeds on ShapesWorld (docs/protocols.md).

    DiffusionITM.from_pretrained(source, protocol="diffusion-itm")               # a preset
    DiffusionITM.from_pretrained(source, protocol="diffusion-itm", samples=20)   # a preset, overridden
    scorer(images, texts, error="l1")                                            # one call, overridden
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

from itm_engine.options import option
from itm_engine.timestep_weights import Knots, as_knots, parse_weights

Error = Literal["mse", "l2", "l1", "huber"]
Schedule = Literal["uniform", "stratified", "diffusion-itm", "jeong2025"]
NoiseSharing = Literal["shared", "per-query"]
Latent = Literal["mean", "sample", "sample-per-draw"]
Resize = Literal["crop", "stretch", "pad"]
Interpolation = Literal["lanczos", "bicubic", "bilinear"]
Transparency = Literal["composite", "convert", "convert-after-resize"]
Ties = Literal["strict", "argmax-first"]
Conventions = Literal["engine", "diffusion-itm", "diffusion-classifier"]


@dataclass(frozen=True)
class Protocol:
    """Every convention of a DiffusionITM score (see the module docstring for the presets)."""

    samples: int = option(10, help="noise draws S per pair (the diffusion-itm schedule gives "
                                   "len(range(10, 990, 1000 // S)) draws, e.g. 49 for S = 50)")
    seed: int = option(0, help="seed of the noise draws (and of per-draw posterior samples)")
    schedule: Schedule = option("stratified", help=(
        "training-grid positions of the timesteps: uniform draws from [0, T); stratified: Diffusion "
        "Classifier's midpoints T // S // 2 + k * (T // S); diffusion-itm: range(10, T - 10, T // S); "
        "jeong2025: T - 1 - i for i in range(20, T - 20, T // S) (Jeong et al.'s SD3 img2img pipeline); "
        "for flow-matching models a position is a step of the shifted training grid"))
    noise: NoiseSharing = option("shared", help=(
        "shared: one table of draws from the seed for every query of a run (DiffusionITM's fixed table); "
        "per-query: fresh draws for each query (image in i2t, caption in t2i), shared by its candidates "
        "(Diffusion Classifier)"))
    error: Error = option("mse", help=(
        "the error of one draw: mse (mean of squared elements), l2 (the norm ||eps - pred||_2 of the "
        "flattened latent), l1 (mean absolute), huber (mean Huber, delta 1)"))
    latent: Latent = option("mean", help=(
        "z0: the VAE posterior mean; sample: one posterior sample per image (seeded by its content); "
        "sample-per-draw: a fresh sample for every draw (seeded by seed, image and draw)"))
    resize: Resize = option("crop", help=(
        "to the model's square: crop (short side to the side, centre crop: torchvision's Resize + "
        "CenterCrop), stretch (both sides), pad (fit inside, edges repeated)"))
    interpolation: Interpolation = option("lanczos", help="resampling filter of the resize (PIL's)")
    transparency: Transparency = option("composite", help=(
        "images not in RGB (transparent, palette, ...): composite transparency on white; convert (PIL's "
        "plain .convert('RGB') on load); or convert-after-resize (resized in their own mode, then converted)"))
    guidance: float = option(1.0, help=(
        "the guidance value a guidance-distilled model (FLUX.1-dev) is given: 1 is its plain conditional "
        "prediction, the flow target's own (the distilled model mimics uncond + g (cond - uncond)); its "
        "pipeline samples with 3.5; models without a guidance input ignore it"))
    timestep_weights: Knots | None = option(None, parse=parse_weights, metavar="FILE|NAME", help=(
        "a pair's score as the mean of its draws weighted by w(t / T) (itm_engine/timestep_weights.py): a weights "
        "file of itm-train timestep-weights, a named curve (logit-normal), or the knots ((u, w), ...); none: the "
        "plain mean; the protocol keeps the knots, so results record the weights themselves"))
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", help="model dtype on CUDA (on the CPU the model runs in float32)")
    ties: Ties = option("strict", help=(
        "metrics: strict (a tie never counts as correct) or argmax-first (the first of tied "
        "candidates wins: a ground truth listed first wins its ties)"))
    conventions: Conventions = option("engine", help=(
        "whose task conventions to follow where a benchmark's reference code made a choice "
        "(prompts, split files, standard deviations; docs/protocols.md)"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _ALLOWED.get(f.name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"protocol field {f.name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"protocol field {name} must be an integer, got {value!r}")
        if self.samples < 1:
            raise ValueError(f"protocol field samples must be >= 1, got {self.samples}")
        guidance = self.guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise ValueError(f"protocol field guidance must be a finite number, got {guidance!r}")
        object.__setattr__(self, "guidance", float(guidance))  # recorded as a float whatever number was given
        object.__setattr__(self, "timestep_weights", as_knots(self.timestep_weights))  # a name or file: its knots

    def replace(self, **overrides: Any) -> Protocol:
        """This protocol with some fields changed; an unknown field name is an error."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown protocol field(s) {', '.join(unknown)}; fields: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def query_seed(self, key: str) -> int:
        """The seed of the draws of one query under `noise="per-query"`: from (seed, the query's key)."""
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _literal_values(kind: Any) -> tuple:
    import typing

    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


_ALLOWED = {name: _literal_values(kind) for name, kind in
            {"schedule": Schedule, "noise": NoiseSharing, "error": Error, "latent": Latent, "resize": Resize,
             "interpolation": Interpolation, "transparency": Transparency, "ties": Ties,
             "conventions": Conventions, "dtype": Literal["float32", "float16", "bfloat16"]}.items()}
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Protocol))

PRESETS: dict[str, Protocol] = {
    "engine": Protocol(),
    "diffusion-itm": Protocol(schedule="diffusion-itm", noise="shared", error="l2", latent="sample-per-draw",
                              resize="stretch", interpolation="bicubic", transparency="convert", dtype="float16",
                              ties="argmax-first", conventions="diffusion-itm"),
    "diffusion-classifier": Protocol(schedule="stratified", noise="per-query", error="mse", latent="mean",
                                     resize="crop", interpolation="bicubic", transparency="convert-after-resize",
                                     dtype="float16", ties="strict", conventions="diffusion-classifier"),
    "jeong2025": Protocol(samples=30, schedule="jeong2025", noise="shared", error="l2", latent="sample",
                          resize="stretch", interpolation="bicubic", transparency="convert", dtype="float16",
                          ties="argmax-first"),
}
DEFAULT = "engine"


def resolve(protocol: str | Protocol | None = None, **overrides: Any) -> Protocol:
    """A protocol from a preset name (default `DEFAULT`) or a `Protocol`, with field overrides
    (None values are ignored, so optional arguments can be passed through)."""
    if protocol is None:
        protocol = DEFAULT
    if isinstance(protocol, str):
        if protocol not in PRESETS:
            raise ValueError(f"unknown protocol {protocol!r}; presets: {', '.join(PRESETS)}")
        protocol = PRESETS[protocol]
    elif not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be a preset name or a Protocol, got {type(protocol).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return protocol.replace(**given) if given else protocol
