"""How much of a small shape the ShapesWorld VAE keeps, under the exact and the varied renderer:
VAE training settings compared without training a UNet on each.

    python benchmarks/vae_shapes.py --out benchmarks/results/vae-shapes \
        --variants '{"1,000 steps": {"vae_steps": 1000}, "2,000 steps": {"vae_steps": 2000}}'

Each variant is a set of `PretrainConfig` fields over the recipe's defaults. Its VAE is trained by
the VAE stage of `itm-shapes pretrain` alone (`Pretrainer.train_vae`) on the recipe's training
scenes, rendered once for all variants (variants must not change the scenes). `--model DIR` adds
the VAE of a trained model folder (e.g. the bundled one) as a row, and how well the whole model
tells the two shapes apart on the same images ("told apart", below).

Measured per shape pair (`PAIRS`: the two pairs of shapes nearest each other in a small object's
pixels at 32 px), on `--pairs` small one-object scenes under each renderer (one colour, place and
style per scene, drawn once as each shape of the pair), as the scorer sees them
(`cache.preprocess_images`, `cache.encode_pixels`):

- "latent distance": median L2 distance between the two shapes' latents, [C, h, w] scaled to unit
  variance (the scale the UNet's denoising errors are measured in);
- "kept": the share of reconstructions (decoded posterior means) nearer, in pixels, to their own
  shape's image than to the other shape's, the first shape of the pair; 50% is a coin toss;
- "told apart" (`--model` rows): the share of the images of both shapes whose own recognition
  caption ("a small red cross") the model scores strictly above the other shape's, image->text
  under the report's protocol (`report.lab_protocol`); 50% is a coin toss.

Writes OUT.json (every figure, with command, date, machine and versions) and OUT.md (the table).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from itm_engine.cache import encode_pixels, preprocess_images
from itm_engine.evaluate import versions
from itm_engine.models.loading import SDComponents
from itm_engine.scoring import DiffusionITM
from itm_engine.shapesworld import world
from itm_engine.shapesworld.pretrain import PretrainConfig, Pretrainer, training_scenes
from itm_engine.shapesworld.report import lab_protocol
from itm_engine.storage import output_file

PAIRS = (("cross", "diamond"), ("square", "circle"))
STYLES = ("exact", "varied")


def shape_pairs(n: int, style: str, pair: tuple[str, str], seed: int = 0) -> dict[str, list]:
    """`n` small one-object scenes drawn as each shape of `pair` by renderer `style`: {shape: [(scene,
    image)]}, the k-th scenes of both shapes sharing colour, place and style."""
    rng = random.Random(f"vae-shapes:{seed}:{style}:{pair}")
    drawn: dict[str, list] = {shape: [] for shape in pair}
    for k in range(n):
        color, x, y = rng.choice(list(world.COLORS)), rng.randint(12, 52), rng.randint(12, 52)
        look = world.style_for(style, f"vae-shapes:{seed}:{pair}:{k}")
        for shape in pair:
            scene = (world.Obj(color, shape, "small", x, y),)
            drawn[shape].append((scene, world.render(scene, 64, look)))
    return drawn


def shape_sets(n: int) -> dict[str, tuple[tuple[str, str], dict[str, list]]]:
    """{"STYLE A/B": ((A, B), `shape_pairs(n, STYLE, (A, B))`)} for every renderer and pair: the
    images every row is measured on, drawn once."""
    return {f"{style} {a}/{b}": ((a, b), shape_pairs(n, style, (a, b))) for style in STYLES for a, b in PAIRS}


@torch.inference_mode()
def keeps_shapes(components: SDComponents, sets: dict) -> dict[str, dict[str, float]]:
    """{"STYLE A/B": {"latent_distance", "kept"}} of `components`' VAE on `sets` (`shape_sets`; see
    the module docstring)."""
    out = {}
    for key, (pair, drawn) in sets.items():
        pixels = {shape: preprocess_images(components, [image for _, image in drawn[shape]]) for shape in pair}
        latents = {shape: encode_pixels(components, pixels[shape]) for shape in pair}
        a, b = pair
        recon = components.vae.decode(latents[a] / components.scaling_factor).sample
        own = (recon - pixels[a]).flatten(1).norm(dim=1)
        other = (recon - pixels[b]).flatten(1).norm(dim=1)
        out[key] = {
            "latent_distance": float((latents[a] - latents[b]).flatten(1).norm(dim=1).median()),
            "kept": float((own < other).float().mean())}
    return out


@torch.inference_mode()
def tells_apart(scorer: DiffusionITM, sets: dict) -> dict[str, float]:
    """{"STYLE A/B": accuracy} on `sets` (`shape_sets`): the share of the pairs' images (both shapes)
    whose own recognition caption ("a small red cross") the whole model scores strictly above the
    other shape's, image->text."""
    out = {}
    for key, (pair, drawn) in sets.items():
        items = [item for first, second in zip(drawn[pair[0]], drawn[pair[1]]) for item in (first, second)]
        texts = [world.caption(scene, "recognition_shape") for scene, _ in items]
        # image 2k is shape a, 2k + 1 shape b; each against both captions of its scene
        pairs = torch.tensor([(i, j) for i in range(len(items)) for j in (i - i % 2, i - i % 2 + 1)])
        scores = scorer.score_pairs([image for _, image in items], texts, pairs).view(-1, 2)
        own = torch.arange(len(items)) % 2
        out[key] = float(
            (scores.gather(1, own[:, None]) > scores.gather(1, 1 - own[:, None])).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="{}", help="JSON {name: {PretrainConfig field: value}}")
    parser.add_argument("--model", action="append", default=[], help="a trained model folder to measure too")
    parser.add_argument("--pairs", type=int, default=150, help="scenes per shape pair and renderer")
    parser.add_argument("--out", required=True, help="output path without suffix (.json, .md)")
    args = parser.parse_args(argv)
    variants = json.loads(args.variants)

    started = time.perf_counter()
    report: dict = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                    "versions": versions(), "pairs": args.pairs, "rows": {}}
    sets = shape_sets(args.pairs)
    for folder in args.model:
        scorer = DiffusionITM.from_pretrained(folder, progress=False, protocol=lab_protocol())
        report["rows"][folder] = {"measures": keeps_shapes(scorer.components, sets),
                                  "told_apart": tells_apart(scorer, sets)}
        print(folder, report["rows"][folder], flush=True)
    data = None
    for name, fields in variants.items():
        config = dataclasses.replace(PretrainConfig(), **fields)
        with tempfile.TemporaryDirectory() as scratch:
            trainer = Pretrainer(config, scratch, progress=False)
            if data is None:
                data = training_scenes(config, trainer.components)
            trainer.train_vae(data)
        vae = trainer.report["vae"]
        report["rows"][name] = {"fields": fields, "seconds": vae["seconds"], "final_mse": vae["final_mse"],
                                "measures": keeps_shapes(trainer.components, sets)}
        print(name, report["rows"][name], flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    keys = list(sets)
    lines = ["# How much of a small shape the ShapesWorld VAE keeps\n",
             f"`{report['command']}` on {report['date']}, {report['machine']['platform']}, "
             f"{report['seconds']} s. {args.pairs} small one-object scenes per shape pair and renderer; "
             "latent distance: median L2 between the two shapes' unit-variance latents; kept: share of "
             "reconstructions nearer their own shape's image than the other's.\n",
             "| VAE | time | final MSE | " + " | ".join(f"{k} distance / kept" for k in keys) + " |",
             "|---" * (3 + len(keys)) + "|"]
    for name, row in report["rows"].items():
        cells = [f"{row['measures'][k]['latent_distance']:.2f} / {100 * row['measures'][k]['kept']:.0f}%"
                 for k in keys]
        seconds = f"{row['seconds']:.0f} s" if "seconds" in row else ""
        mse = f"{row['final_mse']:.4f}" if "final_mse" in row else ""
        lines.append(f"| {name} | {seconds} | {mse} | " + " | ".join(cells) + " |")
    models = {name: row["told_apart"] for name, row in report["rows"].items() if "told_apart" in row}
    if models:
        lines += ["\nThe whole model on the same images, image->text between the two shapes' recognition captions "
                  f"(`lab_protocol`: {lab_protocol().samples} stratified draws, seed 0): the share of images whose "
                  "own caption scores strictly higher.\n",
                  "| model | " + " | ".join(f"{k} told apart" for k in keys) + " |", "|---" * (1 + len(keys)) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{100 * told[k]:.0f}%" for k in keys) + " |"
                  for name, told in models.items()]
    output_file(out, ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
