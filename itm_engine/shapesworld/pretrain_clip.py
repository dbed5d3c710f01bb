"""`itm-shapes pretrain-clip`: a tiny open_clip CLIP trained contrastively on ShapesWorld.

The CLIP baseline of the bundled ShapesWorld model: the same training scenes and captions as the
diffusion model (`pretrain.scene_list`, `pretrain.draw_captions` without dropout), open_clip's
symmetric InfoNCE loss (`open_clip.ClipLoss`) over in-batch negatives, AdamW with a cosine schedule.
No augmentation: a flip or crop would change what a caption says (left of / right of, sizes).

Architecture (`CLIP_CONFIG`, registered with open_clip as "shapes-clip"): a 2-layer ViT on 32x32
images (4x4 patches) and a 2-layer text transformer over open_clip's own BPE tokenizer (16 tokens),
64-d joint embedding. Output: `OUT/shapes-clip.json` (the config) and `OUT/shapes-clip.safetensors`
(fp16 weights), loadable with `ClipModel.from_name("shapes-clip", pretrained=..., model_config=...)`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file
from tqdm.auto import tqdm

from itm_engine import storage
from itm_engine.options import option
from itm_engine.shapesworld import world
from itm_engine.shapesworld.pretrain import PretrainConfig, draw_captions, scene_list, scene_styles, step_rng

CLIP_NAME = "shapes-clip"
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@dataclass
class ClipPretrainConfig:
    """Recipe of the bundled ShapesWorld CLIP (saved in `clip-training.json`)."""

    seed: int = option(0, help="seed of the scenes, the initial weights and the batches")
    scenes: int = option(40_000, help="training scenes (the diffusion model's, `pretrain.scene_list`)")
    varied_share: float = option(0.75, help="share of the scenes drawn by the varied renderer, as for the diffusion "
                                            "model (`pretrain.scene_styles`)")
    steps: int = option(2_000, help="training steps")
    batch_size: int = option(256, help="image-caption pairs per step (in-batch negatives)")
    lr: float = option(1e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    warmup: int = option(100, help="warm-up steps")
    weight_decay: float = option(0.1, help="AdamW weight decay")


@dataclass
class ClipPretrainRun:
    """Where and how `itm-shapes pretrain-clip` runs."""

    out: str = option(help="folder for shapes-clip.json and shapes-clip.safetensors", identity=False)
    threads: int | None = option(None, help="torch CPU threads (default: torch's)", identity=False)


def train_clip(config: ClipPretrainConfig, out: str | Path, progress: bool | None = None) -> Path:
    """Train the ShapesWorld CLIP into `out`; returns the checkpoint path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / f"{CLIP_NAME}.json"
    config_file.write_text(json.dumps(CLIP_CONFIG, indent=1) + "\n")
    open_clip.add_model_config(config_file)
    recipe = PretrainConfig(seed=config.seed, caption_dropout=0.0)  # the LDM's scenes and captions, no null prompt
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(CLIP_NAME, pretrained_image=False,
                                                                      pretrained_text=False)
    tokenizer = open_clip.get_tokenizer(CLIP_NAME)
    scenes = scene_list(config.scenes, config.seed, recipe.scene_kinds, recipe.render_size)
    styles = scene_styles(len(scenes), config.seed, config.varied_share)
    pixels = torch.stack([preprocess(world.render(s, recipe.render_size, style)) for s, style in zip(scenes, styles)])
    captions = [world.training_captions(s, recipe.render_size) for s in scenes]
    loss_fn = open_clip.ClipLoss()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_scheduler("cosine", optimiser, num_warmup_steps=config.warmup, num_training_steps=config.steps)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="CLIP", disable=None if progress is None else not progress)
    log = []
    for step in bar:
        gen, rng = step_rng(recipe, 3, step)
        idx = torch.randint(len(scenes), (config.batch_size,), generator=gen)
        texts = draw_captions(recipe, [captions[i] for i in idx.tolist()], rng)
        image_features, text_features, logit_scale = model(pixels[idx], tokenizer(texts))
        loss = loss_fn(image_features, text_features, logit_scale)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.append({"step": step, "loss": loss.item()})
    model.eval()
    weights = out / f"{CLIP_NAME}.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, weights)
    report = {"config": asdict(config), "architecture": CLIP_CONFIG, "seconds": round(time.perf_counter() - start, 1),
              "final_loss": loss.item(), "log": log}
    storage.atomic_write_text(out / "clip-training.json", json.dumps(report, indent=1) + "\n")
    return weights


def clip_command(config: ClipPretrainConfig, run: ClipPretrainRun) -> int:
    """`itm-shapes pretrain-clip`: train into `run.out`; the exit code."""
    if run.threads:
        torch.set_num_threads(run.threads)
    print(f"CLIP written to {train_clip(config, run.out)}")
    return 0
