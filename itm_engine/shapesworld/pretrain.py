"""`itm-shapes pretrain`: train ShapesWorld's small latent diffusion model from scratch.

All on the training split of `itm_engine.shapesworld.world` (held-out colour-shape combinations
never shown), one seed, every setting in `PretrainConfig`:

1. **VAE** (`diffusers.AutoencoderKL`, 32x32 RGB -> 8x8x8): reconstruction MSE (object pixels
   weighted `foreground_weight` times the plain background: small shapes are a few pixels) + a
   small KL term on the rendered training scenes; afterwards the latent scaling factor is set to
   1/std of the posterior means, as Stable Diffusion's 0.18215 was.
2. **Text encoder + UNet, jointly** (`transformers.CLIPTextModel` over a word-level tokenizer, a
   UNet with x/y coordinate channels (`coord_unet`), the DDPM scaled-linear schedule, or flow
   matching with `prediction_type="flow"`: `training_scheduler`, `training_timesteps`): the denoising
   loss of latents under one of their true captions (`world.training_captions`, the grammar form
   drawn with `form_weights`), the caption replaced by the empty prompt with probability
   `caption_dropout` so the unconditional prediction exists (T2I normalisation needs it), plus the
   text encoder's layout objective (`layout_weight`) and token grounding of the cross-attention
   (`grounding_weight`, `grounding`). AdamW, cosine schedule with warm-up, an exponential moving
   average of the weights (saved). In **stages** (`Stage`, `PretrainConfig.stages`): each later
   stage starts from the previous one's averaged weights with a fresh optimiser, schedule and
   average, and may change the caption odds, the scenes drawn, the grounding weight and the
   hard-negative ranking term (the same noisy latent under a caption with positions flipped,
   colours/sizes swapped or one object's shape replaced must denoise worse). The default recipe:
   a first stage, a ranking stage and a "polish" stage (docs/shapesworld.md; how it was found:
   docs/shapesworld-recipe.md).
3. **Save**: a diffusers StableDiffusionPipeline folder (`models.save_components`), loadable with
   `DiffusionITM.from_pretrained(out)`, plus `training.json` (the config, wall times, losses and
   the validation accuracies).

Every random choice is derived from (seed, stage, step), so a run killed and restarted with the same
arguments (it resumes from `OUT/checkpoint.pt`, written every `checkpoint_every` steps and at the
end of every stage) ends with the weights of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from tqdm.auto import tqdm

from itm_engine import options, storage
from itm_engine.cache import encode_pixels, preprocess_images
from itm_engine.models import SDComponents, ddpm_scheduler, save_components
from itm_engine.noise import ForwardProcess, add_noise, denoising_target
from itm_engine.options import option
from itm_engine.shapesworld import grounding, report, world
from itm_engine.shapesworld.coord_unet import COORDINATE_CHANNELS, CoordUNet2DConditionModel

NULL_PROMPT = ""
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


@dataclass
class PretrainConfig:
    """Recipe of the bundled ShapesWorld model (saved in `training.json`; a resumed run must match)."""

    seed: int = option(0, help="seed of every random choice: scenes, initial weights, batches, noise, captions")
    render_size: int = option(64, help="scenes are drawn at this side in pixels, then resized to --image-size "
                                       "as the scorer resizes its inputs")
    image_size: int = option(32, help="the model's image side in pixels (latents: a quarter of it)")
    scenes: int = option(40_000, help="training scenes (positives of the training split)")
    varied_share: float = option(0.75, help=(
        "share of the training scenes drawn by the varied renderer (world.varied_style: background grey, colour "
        "shades, object sizes, anti-aliased edges; one style per scene), the rest exactly"))
    vae_steps: int = option(2_000, help="VAE training steps")
    vae_batch: int = option(32, help="VAE batch size")
    vae_lr: float = option(2e-3, help="VAE learning rate (AdamW, cosine schedule)")
    kl_weight: float = option(1e-6, help="weight of the VAE's KL term")
    foreground_weight: float = option(10.0, help="VAE reconstruction weight of object pixels relative to the "
                                                 "background (objects are small)")
    latent_channels: int = option(8, help="VAE latent channels")
    vae_channels: tuple[int, ...] = option((16, 32, 32), help=(
        "VAE level widths, three levels (32 px -> 8x8 latent); the latents are encoded once, so a wider VAE "
        "costs the VAE stage and each scored image's encoding, not the diffusion steps"))
    steps: int = option(4_500, help="steps of the first diffusion stage (later stages: --stages)")
    prediction_type: Literal["epsilon", "v_prediction", "flow"] = option(
        "epsilon", help=("what the UNet learns to predict (and the scorer's error measures): the noise or v under "
                         "the DDPM schedule, or 'flow': the velocity eps - z0 of flow matching "
                         "(FlowMatchEulerDiscreteScheduler, x_t = (1 - sigma) z0 + sigma eps, timestep 1000 sigma, "
                         "sigmas drawn logit-normal as diffusers' SD3 training scripts draw them)"))
    flow_shift: float = option(1.0, help=(
        "with --prediction-type flow: the scheduler's shift S of the sigmas, sigma -> S sigma / (1 + (S - 1) sigma) "
        "(S > 1: more noise). SD3 trains at 1024 px with 3.0: the more pixels, the more noise it takes to destroy "
        "an image, so its paper shifts by sqrt(pixels / 256^2) from a 256 px base trained unshifted (4 at 1024 px; "
        "3.0 was preferred). ShapesWorld's 32 px images lie below that base: 1.0 keeps the base's unshifted "
        "sigmas rather than extrapolating the rule to 1/8, which would train mostly at low noise"))
    batch_size: int = option(64, help="scenes per step of the first diffusion stage (a later stage inherits "
                                      "it unless it sets its own)")
    lr: float = option(1e-3, help="peak learning rate of the first diffusion stage (AdamW, warm-up then cosine)")
    warmup: int = option(200, help="warm-up steps of the first diffusion stage")
    weight_decay: float = option(0.01, help="AdamW weight decay of the diffusion stages")
    ema_decay: float = option(0.999, help="decay of the exponential moving average of the weights (saved)")
    caption_dropout: float = option(0.1, help="probability that a training caption is the empty (null) prompt")
    hard_negatives: int = option(0, help=(
        "first stage: items per batch that get the hard-negative ranking term, captions with place words "
        "first; each is denoised again on the same noisy latent under its world.hard_negative_caption "
        "(positions flipped, else colours or sizes swapped, or one object's shape replaced) and the loss adds "
        "rank_weight * T * softplus((error_true - error_negative) / T), T = rank_temperature"))
    rank_weight: float = option(1.0, help="weight of the ranking term")
    rank_temperature: float = option(0.01, help="T of the ranking term")
    form_weights: dict = option(
        default_factory=lambda: {"recognition": 0.4, "binding": 0.25, "pair": 0.15, "spatial": 0.4, "position": 0.2},
        help="relative odds of the caption forms of a scene (world.training_captions; absent forms skipped), JSON")
    scene_kinds: tuple[str, ...] = option(
        ("recognition_color", "binding_color_shape", "pair_binding_size", "spatial"),
        help="the kinds of training scene, drawn in turn (world.sample_example's subtasks)")
    unet_channels: tuple[int, ...] = option((32, 64, 64), help="UNet level widths at the 8x8, 4x4 and 2x2 latent "
                                                                "levels (one to three levels)")
    attention_levels: int = option(2, help="how many UNet levels, from the finest, have cross-attention in their "
                                           "down and up blocks (the middle block always has)")
    coordinates: bool = option(True, help="feed the UNet x/y coordinate channels (CoordUNet2DConditionModel)")
    stages: tuple = option(
        ({"name": "ranking", "steps": 1000, "lr": 5e-4, "warmup": 50, "hard_negatives": 32, "batch_size": 32,
          "one_object_share": 0.3, "nearest_shape_share": 0.5, "grounding_weight": 0.05,
          "form_weights": {"recognition": 0.4, "binding": 0.25, "pair": 0.3, "spatial": 0.6, "position": 0.6}},
         {"name": "polish", "steps": 4500, "lr": 5e-4, "warmup": 50, "hard_negatives": 32, "batch_size": 32,
          "one_object_share": 0.6, "nearest_shape_share": 0.5, "grounding_weight": 0.0,
          "form_weights": {"recognition": 0.8, "binding": 0.25, "pair": 0.3, "spatial": 0.6, "position": 0.6}}),
        help=("the later diffusion stages in order, a JSON list of objects with the fields of Stage (name and steps "
              "required; the others default to the first stage's); each starts from the previous stage's "
              "averaged weights with a fresh optimiser, schedule and average; '[]': the first stage only"))
    text_width: int = option(64, help="text encoder width")
    text_layers: int = option(2, help="text encoder layers")
    layout_weight: float = option(1.0, help=(
        "weight of the text encoder's layout objective: in a spatial caption 'a X REL a Y' a linear head (not "
        "saved) reads where Y is relative to X from the states of Y's colour and shape words and of the end "
        "token (world.later_object_side; 4 classes, cross-entropy)"))
    grounding_weight: float = option(0.02, help=(
        "first stage: weight of token grounding (TokenCompose's token loss): the cross-attention maps of the "
        "words naming an object (its colour and its shape) at the 8x8 and 4x4 levels pulled onto the object's "
        "mask from the renderer"))
    checkpoint_every: int = option(500, help="write OUT/checkpoint.pt every N diffusion steps")
    eval_every: int = option(2_000, help="validate every N diffusion steps (0: only at the end)")
    eval_examples: int = option(24, help="validation examples per subtask")
    eval_samples: int = option(10, help="noise draws per pair in validation")

    def __post_init__(self) -> None:
        # JSON and the command line give lists; the recipe keeps tuples
        self.scene_kinds, self.unet_channels, self.vae_channels, self.stages = (
            tuple(self.scene_kinds), tuple(self.unet_channels), tuple(self.vae_channels), tuple(self.stages))
        if not 1 <= len(self.unet_channels) <= 3:
            raise ValueError(f"unet_channels takes one to three widths, got {self.unet_channels}")
        if len(self.vae_channels) != 3 or any(w < 8 or w % 8 for w in self.vae_channels):
            raise ValueError(f"vae_channels takes three widths, each a multiple of 8 (its norm's 8 groups), "
                             f"got {self.vae_channels}")

    def stage_list(self) -> list[Stage]:
        """The diffusion stages: the first from the top-level fields, then `stages` over it."""
        first = Stage("base", self.steps, self.lr, self.warmup, self.hard_negatives, self.rank_weight,
                      dict(self.form_weights), self.batch_size, layout_weight=self.layout_weight,
                      grounding_weight=self.grounding_weight)
        out = [first]
        for spec in self.stages:
            unknown = set(spec) - set(Stage.__dataclass_fields__)
            if unknown or not {"name", "steps"} <= set(spec):
                raise ValueError(f"a stage takes the fields {', '.join(Stage.__dataclass_fields__)} "
                                 f"(name and steps required); got {sorted(spec)}")
            out.append(replace(first, **{"objects": 0, **spec}))
        for stage in out:
            if (stage.steps < 1 or stage.batch_size < 1 or stage.objects not in (0, 1, 2)
                    or not 0 <= stage.one_object_share <= 1 or not 0 <= stage.nearest_shape_share <= 1):
                raise ValueError(f"stage {stage.name!r}: steps and batch_size must be >= 1, objects 0, 1 or 2 "
                                 "and one_object_share and nearest_shape_share in [0, 1]")
        return out

    @property
    def total_steps(self) -> int:
        """Diffusion steps over all stages."""
        return sum(stage.steps for stage in self.stage_list())


@dataclass(frozen=True)
class Stage:
    """One stage of the diffusion training: `steps` AdamW steps at peak learning rate `lr` (linear
    warm-up over `warmup` steps, then cosine), the hard-negative ranking term on up to
    `hard_negatives` items per batch weighted `rank_weight`, captions drawn with `form_weights`,
    batches of `batch_size` scenes (a later stage: the first stage's unless set) from scenes with
    `objects` objects (0: all scenes), except a share `one_object_share` of each batch drawn from
    the one-object scenes (0: none set apart), a share `nearest_shape_share` of the shape-swapped
    negatives naming the true shape's `world.NEAREST_SHAPE` (the rest any other shape), the text
    encoder's layout objective weighted `layout_weight` and the token grounding term weighted
    `grounding_weight` (see `PretrainConfig`)."""

    name: str
    steps: int
    lr: float
    warmup: int
    hard_negatives: int
    rank_weight: float
    form_weights: dict
    batch_size: int
    objects: int = 0
    one_object_share: float = 0.0
    nearest_shape_share: float = 0.0
    layout_weight: float = 0.0
    grounding_weight: float = 0.0


# -- architecture ------------------------------------------------------------------------------

def word_tokenizer(max_length: int = 16) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over ShapesWorld's vocabulary (`world.VOCABULARY`), CLIP-style:
    lower-cased, "<|startoftext|> words <|endoftext|>", padded with "<|endoftext|>"; unknown
    words map to "<unk>". Saved and loaded like any Hugging Face tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + world.VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL_TOKENS[:2]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>",
        model_max_length=max_length)


def training_scheduler(config: PretrainConfig) -> diffusers.SchedulerMixin:
    """The training noise schedule of `config`: the SD 1.x/2.x DDPM one (`ddpm_scheduler`), or for
    `prediction_type="flow"` diffusers' `FlowMatchEulerDiscreteScheduler` (1000 steps, shift
    `flow_shift`), as SD3's."""
    if config.prediction_type == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.flow_shift)
    return ddpm_scheduler(config.prediction_type)


def training_timesteps(process: ForwardProcess, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Model timesteps [batch] of one training batch: uniform DDPM steps (Long) for the
    variance-preserving kinds; for flow matching, as diffusers' SD3 training scripts draw them:
    u = sigmoid(N(0, 1)) (`compute_density_for_timestep_sampling("logit_normal")`), index
    floor(u T) into the scheduler's descending (shifted) timesteps, i.e. grid position T - 1 - index
    (float64 T sigma)."""
    T = process.num_train_timesteps
    if process.discrete:
        return torch.randint(0, T, (batch,), generator=generator)
    u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0,
                                              generator=generator)
    return process.from_grid(T - 1 - (u * T).long())


def build_components(config: PretrainConfig) -> SDComponents:
    """Freshly initialised (seeded) VAE, text encoder, UNet, tokenizer and training schedule
    (`training_scheduler`)."""
    tokenizer = word_tokenizer()
    latent = config.image_size // 4
    width = config.text_width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vae = diffusers.AutoencoderKL(
            sample_size=config.image_size, in_channels=3, out_channels=3, latent_channels=config.latent_channels,
            block_out_channels=config.vae_channels, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
            scaling_factor=1.0)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
            num_hidden_layers=config.text_layers, num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length, projection_dim=width, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        widths = tuple(config.unet_channels)
        if config.attention_levels < 0:
            raise ValueError(f"attention_levels must be >= 0, got {config.attention_levels}")
        attention = [level < config.attention_levels for level in range(len(widths))]
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
        unet_cls = CoordUNet2DConditionModel if config.coordinates else diffusers.UNet2DConditionModel
        extra = COORDINATE_CHANNELS if config.coordinates else 0
        unet = unet_cls(
            sample_size=latent, in_channels=config.latent_channels + extra, out_channels=config.latent_channels,
            block_out_channels=widths,
            down_block_types=down, up_block_types=up,
            layers_per_block=1, cross_attention_dim=width, norm_num_groups=16,
            attention_head_dim=tuple(w // 16 for w in widths))  # diffusers' name for the head count: 16-wide heads
    return SDComponents(vae=vae, denoiser=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                        scheduler=training_scheduler(config), source="shapes-pretrain")


# -- data --------------------------------------------------------------------------------------

@dataclass
class SceneSet:
    """The training scenes: pixels [N, 3, R, R] in [-1, 1], per scene its captions by form, its
    number of objects [N] (int64), its objects' colours, its background pixel [N, 3, 1, 1] (as
    preprocessed) and, for token grounding, its objects' masks [N, 2, h, w] at latent resolution
    (`grounding.object_masks`; None when no stage grounds)."""

    pixels: torch.Tensor
    captions: list[dict[str, list[str]]]
    objects: torch.Tensor
    colors: list[tuple[str, ...]]
    backgrounds: torch.Tensor
    masks: torch.Tensor | None = None


def scene_list(n: int, seed: int, kinds: Sequence[str], size: int) -> list[world.Scene]:
    """`n` positive scenes of the training split (the scene kinds in turn), reproducible from `seed`."""
    rng = random.Random(world.SPLIT_SEEDS["train"] + seed)
    return [world.sample_example(rng, kinds[i % len(kinds)], "train", size)[0] for i in range(n)]


def scene_styles(n: int, seed: int, varied_share: float) -> list[world.Style]:
    """The renderer style of each of `n` training scenes: a share `varied_share` varied (each its own
    draw), the rest exact; reproducible from `seed`."""
    rng = random.Random(f"styles:{seed}")
    return [world.style_for("varied", f"train:{seed}:{i}") if rng.random() < varied_share else world.EXACT
            for i in range(n)]


def training_scenes(config: PretrainConfig, components: SDComponents) -> SceneSet:
    """`config.scenes` training scenes (`scene_list`) in their styles (`scene_styles`), rendered and
    resized exactly as the scorer resizes its inputs (`cache.preprocess_images`)."""
    scenes = scene_list(config.scenes, config.seed, config.scene_kinds, config.render_size)
    styles = scene_styles(len(scenes), config.seed, config.varied_share)
    drawn = list(zip(scenes, styles))
    pixels = torch.cat([preprocess_images(components, [world.render(s, config.render_size, style)
                                                       for s, style in chunk])
                        for chunk in _chunks(drawn, 1024)])
    greys = sorted({style.background for style in styles})
    background = dict(zip(greys, preprocess_images(  # each grey as the scorer sees it: [3, 1, 1]
        components, [world.render((), config.render_size, world.Style(background=g)) for g in greys])[:, :, :1, :1]))
    masks = None
    if any(stage.grounding_weight for stage in config.stage_list()):
        masks = torch.stack([grounding.object_masks(s, config.render_size, config.image_size // 4, style=style)
                             for s, style in drawn])
    return SceneSet(pixels, [world.training_captions(s, config.render_size) for s in scenes],
                    torch.tensor([len(s) for s in scenes]), [tuple(o.color for o in s) for s in scenes],
                    torch.stack([background[style.background] for style in styles]), masks)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def step_rng(config: PretrainConfig, stage: int, step: int) -> tuple[torch.Generator, random.Random]:
    """The generators of one step: everything random in it comes from (seed, stage, step).
    Stages: 1 VAE, 2 text encoder + UNet, 3 the CLIP of `pretrain_clip`."""
    key = (config.seed * 1_000_003 + stage) * 10_000_019 + step
    return torch.Generator().manual_seed(key), random.Random(key)


def draw_captions(config: PretrainConfig, scene_captions: Sequence[dict[str, list[str]]], rng: random.Random,
                  form_weights: dict[str, float] | None = None) -> list[str]:
    """One caption per scene: a grammar form drawn with `form_weights` (default the config's), then
    one of its captions; the empty (null) prompt with probability `config.caption_dropout`."""
    form_weights = config.form_weights if form_weights is None else form_weights
    out = []
    for forms in scene_captions:
        if rng.random() < config.caption_dropout:
            out.append(NULL_PROMPT)
            continue
        names = list(forms)
        weights = [form_weights.get(n, 1.0) for n in names]
        out.append(rng.choice(forms[rng.choices(names, weights)[0]]))
    return out


# -- training ----------------------------------------------------------------------------------

class Pretrainer:
    """Runs the stages of the module docstring into `out`, resuming from `out/checkpoint.pt`."""

    def __init__(self, config: PretrainConfig, out: str | os.PathLike, progress: bool | None = None) -> None:
        self.config, self.out, self.progress = config, Path(out), progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.components = build_components(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            # the layout objective's head (`PretrainConfig.layout_weight`): text state -> side, 4 classes
            self.layout_head = torch.nn.Linear(config.text_width, len(world.RELATIONS))
        self.recorder = grounding.AttentionRecorder(self.components.unet)  # installs itself on first use
        self.report: dict = {"config": asdict(config), "vae": {}, "diffusion": {}, "validation": []}
        self.step = 0  # diffusion steps done
        self.vae_done = False
        self._started = time.perf_counter()  # reset by `run`
        self.latents: torch.Tensor | None = None  # [N, C, h, w] the training scenes encoded, once the VAE is trained

    # stage 1
    def train_vae(self, data: SceneSet) -> None:
        c, vae = self.config, self.components.vae
        vae.train().requires_grad_(True)
        optimiser = torch.optim.AdamW(vae.parameters(), lr=c.vae_lr, fused=True)
        schedule = get_scheduler("cosine", optimiser, num_warmup_steps=100, num_training_steps=c.vae_steps)
        start, bar = time.perf_counter(), tqdm(range(c.vae_steps), desc="VAE", disable=self._quiet())
        for step in bar:
            gen, _ = step_rng(c, 1, step)
            pick = torch.randint(len(data.pixels), (c.vae_batch,), generator=gen)
            x, background = data.pixels[pick], data.backgrounds[pick]
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            squared = (vae.decode(z).sample - x).square()
            weight = 1 + (c.foreground_weight - 1) * (x != background).any(1, keepdim=True)
            recon = (weight * squared).mean() / weight.mean()
            loss = recon + c.kl_weight * posterior.kl().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(mse=f"{recon.item():.4f}")
                self._log({"stage": "vae", "step": step, "mse": recon.item()})
        vae.eval().requires_grad_(False)
        means = self._encode_scenes(data)
        vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        self.latents = means * self.components.scaling_factor  # = encode_pixels now: not encoded twice
        self.report["vae"] = {"seconds": round(time.perf_counter() - start, 1), "final_mse": recon.item(),
                              "scaling_factor": vae.config.scaling_factor}
        self.vae_done = True

    # stage 2
    def train_diffusion(self, data: SceneSet) -> None:
        """The diffusion stages in turn (`PretrainConfig.stage_list`), from `self.step` on."""
        comp = self.components
        latents = self.latents if self.latents is not None else self._encode_scenes(data)  # None: resumed
        params = list(comp.unet.parameters()) + list(comp.text_encoder.parameters())
        if any(stage.layout_weight for stage in self.config.stage_list()):
            params += list(self.layout_head.parameters())
        for net in (comp.unet, comp.text_encoder):
            net.train().requires_grad_(True)
        begin = 0
        for stage in self.config.stage_list():
            if self.step < begin + stage.steps:
                self._train_stage(stage, begin, latents, data, params)
            begin += stage.steps
        for net in (comp.unet, comp.text_encoder):
            net.eval().requires_grad_(False)

    def _train_stage(self, stage: Stage, begin: int, latents: torch.Tensor, data: SceneSet,
                     params: list[torch.nn.Parameter]) -> None:
        """Global steps [begin, begin + stage.steps) of `stage` on `latents` [N, C, h, w] (the
        encoded training scenes); ends with the stage's averaged weights in `params` and a
        checkpoint of them, from which a resumed run starts the next stage."""
        c, comp = self.config, self.components
        end, total = begin + stage.steps, c.total_steps
        # fused (one kernel over all parameters) and foreach: the same updates as the per-parameter
        # loops, ~20 ms a step less with ~440 small tensors
        optimiser = torch.optim.AdamW(params, lr=stage.lr, weight_decay=c.weight_decay, fused=True)
        schedule = get_scheduler("cosine", optimiser, num_warmup_steps=stage.warmup, num_training_steps=stage.steps)
        ema = EMAModel(params, decay=c.ema_decay, foreach=True)
        if self.step > begin:
            state = torch.load(self.out / "checkpoint.pt", map_location="cpu", weights_only=True)
            optimiser.load_state_dict(state["optimiser"])
            schedule.load_state_dict(state["schedule"])
            ema.load_state_dict(state["ema"])
        pool = torch.arange(len(latents)) if not stage.objects else (data.objects == stage.objects).nonzero()[:, 0]
        ones = (data.objects == 1).nonzero()[:, 0]
        share = round(stage.one_object_share * stage.batch_size)  # batch items drawn from the one-object scenes
        if not len(pool) or (share and not len(ones)):
            raise ValueError(f"stage {stage.name!r}: no training scene has {stage.objects or 1} object(s)")
        process = comp.process
        start = time.perf_counter() - self.report["diffusion"].get("seconds", 0.0)
        bar = tqdm(range(self.step, end), desc=f"UNet + text ({stage.name})", disable=self._quiet(),
                   initial=self.step - begin, total=stage.steps)
        running = self.report["diffusion"].get("loss", 0.0)
        for step in bar:
            gen, rng = step_rng(c, 2, step)
            idx = pool[torch.randint(len(pool), (stage.batch_size - share,), generator=gen)]
            if share:
                idx = torch.cat([ones[torch.randint(len(ones), (share,), generator=gen)], idx])
            texts = draw_captions(c, [data.captions[i] for i in idx.tolist()], rng, stage.form_weights)
            z0 = latents[idx]
            noise = torch.randn(z0.shape, generator=gen)
            t = training_timesteps(process, stage.batch_size, gen)
            coefficients = process.coefficients(t)
            zt = add_noise(z0, noise, coefficients)
            # the ranking term's items, again under their hard negatives: one UNet call over both
            negatives = self._hard_negatives(stage, texts, rng)
            rows = torch.tensor([i for i, _ in negatives], dtype=torch.long)
            states = self._encode(texts + [caption for _, caption in negatives])
            with self.recorder.record() if stage.grounding_weight else contextlib.nullcontext() as maps:
                pred = comp.unet(torch.cat([zt, zt[rows]]), torch.cat([t, t[rows]]),
                                 encoder_hidden_states=states).sample
            target = denoising_target(z0, noise, coefficients)
            batch = len(texts)
            loss = (F.mse_loss(pred[:batch], target) + self._ranking_loss(stage, rows, pred, target)
                    + self._layout_loss(stage, texts, states[:batch])
                    + self._grounding_loss(stage, texts, idx, data, maps))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            ema.step(params)
            running = loss.item() if step == 0 else 0.99 * running + 0.01 * loss.item()
            self.step = step + 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
            if step % 100 == 0 or step == begin:
                self._log({"stage": "diffusion", "name": stage.name, "step": step, "loss": running,
                           "lr": schedule.get_last_lr()[0]})
            self.report["diffusion"].update(seconds=round(time.perf_counter() - start, 1), loss=running,
                                            steps=self.step)
            if c.eval_every and self.step % c.eval_every == 0 and self.step != total:
                with _ema_weights(ema, params):
                    self.report["validation"].append({"step": self.step, **self.validate()})
                self._log({"stage": "validation", **self.report["validation"][-1]})
            if self.step % c.checkpoint_every == 0 and self.step != end:
                self._save_checkpoint(optimiser, schedule, ema)
        ema.copy_to(params)
        self._save_checkpoint()

    def _encode_scenes(self, data: SceneSet) -> torch.Tensor:
        """Latents [N, C, h, w] of the training scenes (`encode_pixels`: posterior means x the VAE's
        current scaling factor), in chunks of 1,024."""
        with torch.no_grad():
            return torch.cat([encode_pixels(self.components, chunk) for chunk in data.pixels.split(1024)])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Text encoder states [len(texts), 16, width] of `texts` (with gradients)."""
        tok = self.components.tokenizer
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.components.text_encoder(ids)[0]

    def _hard_negatives(self, stage: Stage, texts: list[str], rng: random.Random) -> list[tuple[int, str]]:
        """The items of the hard-negative ranking term of `stage` (see `PretrainConfig.hard_negatives`):
        (row in `texts`, its `world.hard_negative_caption`) for up to `stage.hard_negatives` rows whose
        caption has one, those with place words first, then in batch order; [] when the stage does not rank."""
        if not stage.hard_negatives:
            return []
        negatives = [(i, world.hard_negative_caption(text, rng, stage.nearest_shape_share))
                     for i, text in enumerate(texts)]
        pairs = [(i, negative) for i, negative in negatives if negative is not None]
        pairs.sort(key=lambda pair: not world.has_place_words(texts[pair[0]]))  # stable: batch order within
        return pairs[:stage.hard_negatives]

    def _ranking_loss(self, stage: Stage, rows: torch.Tensor, pred: torch.Tensor,
                      target: torch.Tensor) -> torch.Tensor | float:
        """The hard-negative ranking term of `stage`: `target` [B, C, h, w]; `pred` [B + n, C, h, w]
        the UNet's predictions of the batch under its true captions, then of the batch rows `rows`
        [n] again (same noisy latent and timestep) under their hard negatives (`_hard_negatives`). A
        true caption whose error is not below its negative's is penalised:
        T * softplus((error_true - error_negative) / T), T = `rank_temperature`."""
        if not len(rows):
            return 0.0
        batch = len(target)
        error_true = (pred[rows] - target[rows]).square().mean((1, 2, 3))
        error_negative = (pred[batch:] - target[rows]).square().mean((1, 2, 3))
        temperature = self.config.rank_temperature
        return stage.rank_weight * temperature * F.softplus((error_true - error_negative) / temperature).mean()

    def _layout_loss(self, stage: Stage, texts: list[str], states: torch.Tensor) -> torch.Tensor | float:
        """The text encoder's layout objective of `stage` (see `PretrainConfig.layout_weight`) on the
        spatial captions among `texts`; `states` [len(texts), 16, width] their encoder states."""
        if not stage.layout_weight:
            return 0.0
        rows, columns, labels = [], [], []
        for i, text in enumerate(texts):
            found = world.later_object_side(text)
            if found is None:
                continue
            positions, side = found
            end = len(text.split()) + 1  # the end token, after the start token and the words
            for column in [p + 1 for p in positions] + [end]:
                rows.append(i), columns.append(column), labels.append(side)
        if not rows:
            return 0.0
        logits = self.layout_head(states[torch.tensor(rows), torch.tensor(columns)])  # [n, 4]
        return stage.layout_weight * F.cross_entropy(logits, torch.tensor(labels))

    def _grounding_loss(self, stage: Stage, texts: list[str], idx: torch.Tensor, data: SceneSet,
                        maps: list[torch.Tensor] | None) -> torch.Tensor | float:
        """The token grounding term of `stage` (see `PretrainConfig.grounding_weight`): `maps` the
        UNet's recorded cross-attention maps for `texts`, captions of the scenes `idx` [B] of `data`."""
        if not stage.grounding_weight:
            return 0.0
        items = [(row, position + 1, data.masks[scene, k])  # + 1: the start token
                 for row, (text, scene) in enumerate(zip(texts, idx.tolist()))
                 for position, k in grounding.word_objects(text, data.colors[scene])]
        return stage.grounding_weight * grounding.grounding_loss(maps, items) if items else 0.0

    def validate(self) -> dict[str, float]:
        """Image->text accuracy per subtask on `eval_examples` validation examples each."""
        from itm_engine.scoring import DiffusionITM

        nets = (self.components.unet, self.components.text_encoder)
        modes = [net.training for net in nets]
        for net in nets:
            net.eval()
        try:
            c = self.config
            draw = world.Draw("val", c.eval_examples, size=c.render_size, subtasks=world.SUBTASKS)
            with torch.no_grad():
                scorer = DiffusionITM(self.components, progress=False, protocol=report.lab_protocol(c.eval_samples))
                scores = report.accuracy(scorer, draw, "i2t")
            return {k: round(v, 4) for k, v in scores.items()}
        finally:
            for net, mode in zip(nets, modes):
                net.train(mode)

    def run(self, resume: bool = False) -> Path:
        """All stages (with `resume`, from where a previous run stopped); returns the model folder."""
        if resume:
            self._resume()
        elif (self.out / "checkpoint.pt").exists():
            raise FileExistsError(f"{self.out} already holds checkpoint.pt: pass --resume or choose another --out")
        # the wall time of the whole run (scenes, VAE, diffusion, validation, save), carried across resumes
        # up to the last checkpoint, in training.json as "seconds"
        self._started = time.perf_counter() - self.report.get("seconds", 0.0)
        data = training_scenes(self.config, self.components)
        if not self.vae_done:
            self.train_vae(data)
            self._save_checkpoint()
        self.train_diffusion(data)
        self.report["validation"].append({"step": self.step, **self.validate()})
        model = save_components(self.components, self.out / "model")
        self.report["seconds"] = round(time.perf_counter() - self._started, 1)
        storage.atomic_write_text(self.out / "training.json", json.dumps(self.report, indent=1) + "\n")
        return model

    def _log(self, row: dict) -> None:
        """Append `row` (with the wall clock) to OUT/log.jsonl: progress readable from another shell."""
        with open(self.out / "log.jsonl", "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 1), **row}) + "\n")

    def _quiet(self) -> bool | None:
        return None if self.progress is None else not self.progress

    def _save_checkpoint(self, optimiser=None, schedule=None, ema=None) -> None:
        comp = self.components
        self.report["seconds"] = round(time.perf_counter() - self._started, 1)
        state = {"config": json.dumps(options.identity(self.config)), "report": json.dumps(self.report),
                 "step": self.step, "vae": comp.vae.state_dict(), "unet": comp.unet.state_dict(),
                 "text_encoder": comp.text_encoder.state_dict(), "layout_head": self.layout_head.state_dict(),
                 "scaling_factor": float(comp.vae.config.scaling_factor)}
        if optimiser is not None:
            state.update(optimiser=optimiser.state_dict(), schedule=schedule.state_dict(), ema=ema.state_dict())
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")

    def _resume(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        stored = options.with_added_fields(json.loads(state["config"]), PretrainConfig)
        options.check_same_config(stored, options.identity(self.config), path)
        comp = self.components
        comp.vae.load_state_dict(state["vae"])
        comp.vae.register_to_config(scaling_factor=state["scaling_factor"])
        comp.unet.load_state_dict(state["unet"])
        comp.text_encoder.load_state_dict(state["text_encoder"])
        self.layout_head.load_state_dict(state["layout_head"])
        comp.vae.eval().requires_grad_(False)
        self.report, self.step, self.vae_done = json.loads(state["report"]), state["step"], True
        print(f"resuming from {path} at diffusion step {self.step}", file=sys.stderr)


class _ema_weights:
    """Context manager: the EMA weights in `params` inside, the training weights restored after."""

    def __init__(self, ema: EMAModel, params: list[torch.nn.Parameter]) -> None:
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        self.ema.store(self.params)
        self.ema.copy_to(self.params)

    def __exit__(self, *exc) -> None:
        self.ema.restore(self.params)


@dataclass
class PretrainRun:
    """Where and how `itm-shapes pretrain` runs (not part of the recipe)."""

    out: str = option(help="run folder: checkpoint.pt, log.jsonl, training.json, model/", identity=False)
    resume: bool = option(False, help="continue from OUT/checkpoint.pt", identity=False)
    threads: int | None = option(None, help="torch CPU threads (default: torch's)", identity=False)


def pretrain_command(config: PretrainConfig, run: PretrainRun) -> int:
    """`itm-shapes pretrain`: train into `run.out` (resuming with `run.resume`); the exit code."""
    try:
        if run.threads:
            torch.set_num_threads(run.threads)
        config.stage_list()  # a bad --stages fails here, before any work
        with storage.folder_lock(run.out, "itm-shapes pretrain"):
            model = Pretrainer(config, run.out).run(resume=run.resume)
    except Exception as err:
        code = storage.report_failure("itm-shapes pretrain", err, run.out)
        if code is None:
            raise
        return code
    print(f"model written to {model}")
    return 0
