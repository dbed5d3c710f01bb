"""`itm-shapes bundle`: install trained ShapesWorld models as the package's bundled models, with a model card.

    itm-shapes bundle --run runs/shapes-ldm --clip runs/shapes-clip [--accuracy benchmarks/results/shapes-accuracy.json]
    itm-shapes bundle --accuracy benchmarks/results/shapes-accuracy.json     # rewrite the installed card only

Copies RUN/model (from `itm-shapes pretrain`) and RUN/training.json to
itm_engine/shapesworld/assets/shapes/, the CLIP files (from `itm-shapes pretrain-clip`) to
itm_engine/shapesworld/assets/shapes-clip/, and writes the model card assets/shapes/README.md from
the recipe and, when given, the measured accuracy (`itm-shapes report`'s JSON).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from itm_engine.options import option
from itm_engine.shapesworld import ASSETS, CLIP, MODEL
from itm_engine.shapesworld.grounding import GROUNDING_RESOLUTIONS
from itm_engine.shapesworld.pretrain import PretrainConfig
from itm_engine.shapesworld.report import SPLIT_TITLES


def _count(folder: Path) -> dict[str, int]:
    """Parameters of each network in a diffusers folder."""
    from safetensors.torch import load_file

    return {part: sum(t.numel() for t in load_file(next((folder / part).glob("*.safetensors"))).values())
            for part in ("vae", "text_encoder", "unet")}


def attention_text(unet_config: dict) -> str:
    """Where a UNet has cross-attention, read from its diffusers config (`unet/config.json`)."""
    side = unet_config["sample_size"]
    attends = ["CrossAttn" in kind for kind in unet_config["down_block_types"]]
    sides = [f"{side >> level}x{side >> level}" for level, on in enumerate(attends) if on]
    middle = "CrossAttn" in (unet_config.get("mid_block_type") or "")
    if all(attends):
        return "cross-attention at every level" + (" and in the middle block" if middle else "")
    if not sides:
        return "cross-attention in the middle block only" if middle else "no cross-attention"
    return f"cross-attention at the {' and '.join(sides)} levels" + (" and in the middle block" if middle else "")


def model_card(training: dict, clip_training: dict, unet_config: dict, counts: dict[str, int], size_mb: float,
               accuracy: dict | None) -> str:
    c = training["config"]
    recipe = PretrainConfig(**c)
    stages = recipe.stage_list()
    grounded = any(st.grounding_weight for st in stages)
    val = training["validation"][-1] if training["validation"] else {}
    side, latent, diffusion = c["image_size"], c["image_size"] // 4, training["diffusion"]
    lines = [
        "# shapes: a small latent diffusion model of ShapesWorld",
        "",
        "Trained from scratch by itm-engine (`itm-shapes pretrain`) on the training split of",
        "ShapesWorld (`itm_engine/shapesworld/world.py`): one- and two-object scenes of 6 colours x 5 shapes "
        "x 2 sizes",
        "with grammar captions; the held-out colour-shape combinations never appear in training. It exists",
        "so the engine can be checked end to end on a model whose answers mean something, offline.",
        "Load it with `DiffusionITM.from_pretrained(\"shapes\")` (or this folder's path).",
        "",
        "## Architecture (diffusers / transformers classes, safetensors weights)",
        "",
        f"- VAE: `AutoencoderKL`, {side}x{side} RGB -> {c['latent_channels']}x{latent}x{latent}, "
        f"channels {recipe.vae_channels}, {counts['vae']:,} parameters, "
        f"scaling factor {training['vae']['scaling_factor']:.4f}",
        f"- text encoder: `CLIPTextModel`, {c['text_layers']} layers, width {c['text_width']}, "
        f"{counts['text_encoder']:,} parameters, over a word-level tokenizer (`tokenizer/`, 16 tokens, CLIP-style "
        "start/end tokens)",
        ("- UNet: `itm_engine.shapesworld.coord_unet.CoordUNet2DConditionModel` (a `UNet2DConditionModel` whose "
         "input is the noisy latent plus two x/y coordinate channels, so it can tell left from right)"
         if c.get("coordinates")
         else "- UNet: `UNet2DConditionModel`")
        + f", channels {tuple(c['unet_channels'])}, {attention_text(unet_config)}, {counts['unet']:,} parameters",
        "- noise schedule: DDPM, 1000 steps, scaled-linear betas 0.00085-0.012 (Stable Diffusion's), "
        f"{c.get('prediction_type', 'epsilon').replace('_', '-')} prediction",
        f"- {size_mb:.1f} MB in all (float32)",
        "",
        "## Recipe (seed " + str(c["seed"]) + "; `training.json` holds every setting)",
        "",
        f"1. {c['scenes']:,} training scenes drawn at {c['render_size']} px and resized to {side} px as the "
        "scorer resizes its inputs"
        + (f"; {c['varied_share']:.0%} of them by the varied renderer (each its own background grey, colour shades "
           "within 25 per channel, object sizes within 12% and anti-aliased edges: `world.Style`), the rest exactly"
           if c.get("varied_share") else "") + ".",
        f"2. VAE: {c['vae_steps']:,} steps at batch {c['vae_batch']}, AdamW lr {c['vae_lr']}, MSE with object pixels "
        f"weighted {c['foreground_weight']}x, KL weight {c['kl_weight']}: {training['vae']['seconds']:.0f} s.",
        f"3. Text encoder + UNet jointly: {c['steps']:,} steps at batch {c['batch_size']}, AdamW lr {c['lr']} "
        f"(cosine, {c['warmup']} warm-up steps), EMA {c['ema_decay']}, caption dropout {c['caption_dropout']} "
        f"(the null prompt), caption forms drawn with odds {c['form_weights']}"
        + (f", ranking term on {c['hard_negatives']} items per batch" if c.get("hard_negatives") else "") + ".",
        *[f"   Then stage \"{st.name}\", from the averaged weights with a fresh optimiser and average: {st.steps:,} "
          f"steps at batch {st.batch_size}, lr {st.lr} ({st.warmup} warm-up steps)"
          + (f", {'one' if st.objects == 1 else 'two'}-object scenes only" if st.objects else "")
          + (f", {st.one_object_share:.0%} of each batch from one-object scenes" if st.one_object_share else "")
          + f", caption odds {st.form_weights}"
          + (f", ranking term on up to {st.hard_negatives} items per batch" if st.hard_negatives else "")
          + (f" ({st.nearest_shape_share:.0%} of the shape-swapped negatives name the shape nearest the true one in "
             "pixels, `world.NEAREST_SHAPE`)" if st.hard_negatives and st.nearest_shape_share else "")
          + (f", token grounding weight {st.grounding_weight}" if grounded else "") + "."
          for st in stages[1:]],
        f"   All diffusion stages: {diffusion['steps']:,} steps, {diffusion['seconds'] / 60:.1f} min.",
        "   Captions: the evaluation grammar (recognition, binding, pair, spatial and its converse) plus absolute",
        "   places for training only (\"a small red circle on the left\").",
        *(["   Hard-negative ranking term: the same noisy latent is denoised again under a false caption "
           "(`world.hard_negative_caption`: every position word flipped, or the two colours or two sizes swapped, "
           "or one object's shape replaced), "
           f"and the loss adds {c['rank_weight']} x T x softplus((error_true - error_false) / T), "
           f"T = {c['rank_temperature']}. Note that these negatives are of the kinds the recognition_shape, binding "
           "and spatial subtasks test (on held-out scenes, never with a held-out colour-shape combination)."]
          if any(st.hard_negatives for st in stages) else []),
        *(["   Layout objective for the text encoder (weight " + str(c["layout_weight"]) + "): in a spatial caption "
           "\"a X REL a Y\", a linear head (not saved) classifies from the states of Y's colour and shape words and "
           "of the end token where Y is relative to X; a function of the words only (`world.later_object_side`)."]
          if c.get("layout_weight") else []),
        *(["   Token grounding (weight " + str(c["grounding_weight"]) + " in the first stage, later ones as above; "
           "TokenCompose's token loss, "
           "`itm_engine.shapesworld.grounding`): the UNet's cross-attention maps, at the "
           + " and ".join(f"{r}x{r}" for r in GROUNDING_RESOLUTIONS) + " levels, of each word that "
           "names an object (its colour, and its shape right after) are pulled onto that object's mask from the "
           "renderer: the loss adds 1 - (attention inside the mask) / (all its attention)."]
          if grounded else []),
        f"4. Final training loss (running average; with the extra terms where they are on) {diffusion['loss']:.4f}.",
        "",
        f"Wall times on a 2-core CPU (torch threads 2), "
        f"{(training['vae']['seconds'] + diffusion['seconds']) / 60:.1f} min for the VAE and diffusion stages"
        + (f", {training['seconds'] / 60:.1f} min for the whole run (scenes, VAE, diffusion, validation, save). "
           if "seconds" in training else ". ") +
        "Reproduce: `itm-shapes pretrain --out DIR`.",
        "",
        "Validation (image->text, " + str(c["eval_examples"]) + " validation examples per subtask, "
        + str(c["eval_samples"]) + " draws): "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in val.items() if k != "step"),
        "",
        "## CLIP baseline (`../shapes-clip/`)",
        "",
        f"A tiny open_clip CLIP (`itm-shapes pretrain-clip`): {clip_training['architecture']}; "
        f"{clip_training['config']['steps']:,} steps at batch {clip_training['config']['batch_size']}, "
        f"{clip_training['seconds'] / 60:.1f} min, final loss {clip_training['final_loss']:.3f}. "
        "Same scenes and captions"
        + (f", {clip_training['config']['varied_share']:.0%} of them by the varied renderer"
           if clip_training["config"].get("varied_share") else "") + ".",
    ]
    if accuracy:
        lines += ["", "## Measured accuracy", "",
                  f"`itm-shapes report` ({accuracy['n']} examples per subtask, {accuracy['samples']} stratified "
                  "draws per pair, seed " + str(accuracy["seed"])
                  + ("; the HardNeg columns: the LoRA of `benchmarks/shapes_hardneg.sh`"
                     if accuracy.get("lora") else "")
                  + "); the true candidate must score strictly highest.", ""]
        for split, table in accuracy["accuracy"].items():
            headers = list(table)
            lines += [f"{SPLIT_TITLES.get(split, split + ' split')}:", "", "| subtask | " + " | ".join(headers) + " |",
                      "|---" * (len(headers) + 1) + "|"]
            for row in table[headers[0]]:
                lines.append(f"| {row} | " + " | ".join(f"{100 * table[h][row]:.1f}%" if row in table[h] else ""
                                                        for h in headers) + " |")
            lines.append("")
        i2t = accuracy["accuracy"]["test"]["I2T"]
        weak = {k: v for k, v in i2t.items() if v < 0.9}
        if weak:
            lines += ["## Limitations", "",
                      "Image->text below 90% on the test split: "
                      + ", ".join(f"{k} {100 * v:.0f}%" for k, v in weak.items()) + ".", ""]
            if "spatial" in weak:
                lines += ["Spatial relations at chance: the model does not bind two objects to two places. What was "
                          "tried, with figures: `docs/shapesworld-recipe.md` in the repository.", ""]
    return "\n".join(lines) + "\n"


@dataclass
class BundleConfig:
    """Options of `itm-shapes bundle`."""

    run: str | None = option(None, help="an itm-shapes pretrain output folder to install (with --clip; omit both "
                                        "to rewrite the installed model's card only)")
    clip: str | None = option(None, help="an itm-shapes pretrain-clip output folder to install")
    accuracy: str | None = option(None, help="an itm-shapes report JSON to put in the card")


def bundle(config: BundleConfig) -> Path:
    """Install `config.run` and `config.clip` (when given) and write the model card; returns the model folder."""
    target, clip_target = ASSETS / MODEL, ASSETS / CLIP
    if (config.run is None) != (config.clip is None):
        raise ValueError("give both --run and --clip (to install a trained pair), or neither (to rewrite the card)")
    if config.run is not None:
        run, clip = Path(config.run), Path(config.clip)
        for folder in (target, clip_target):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(run / "model", target)
        shutil.copy(run / "training.json", target / "training.json")
        clip_target.mkdir(parents=True)
        for name in (f"{CLIP}.json", f"{CLIP}.safetensors", "clip-training.json"):
            shutil.copy(clip / name, clip_target / name)
    training = json.loads((target / "training.json").read_text())
    clip_training = json.loads((clip_target / "clip-training.json").read_text())
    clip_training.pop("log", None)
    (clip_target / "clip-training.json").write_text(json.dumps(clip_training, indent=1) + "\n")
    accuracy = json.loads(Path(config.accuracy).read_text()) if config.accuracy else None
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and p.name != "README.md") / 2**20
    unet_config = json.loads((target / "unet" / "config.json").read_text())
    card = model_card(training, clip_training, unet_config, _count(target), size, accuracy)
    (target / "README.md").write_text(card)
    print(f"bundled {target} ({size:.1f} MB) and {clip_target}")
    return target
