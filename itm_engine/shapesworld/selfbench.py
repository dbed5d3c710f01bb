"""Self-Bench on the bundled model (after Jeong et al., NeurIPS 2025 D&B): the model draws the
ShapesWorld test captions itself, a judge decides which drawings show the caption's scene, and the
model then scores each drawing image->text against the same hard negatives as the rendered test
example: `itm-shapes selfbench --out DIR`.

    out = run_selfbench(SelfBenchConfig(out="runs/selfbench", n=50))   # writes DIR, prints the table

Generation: the bundled model's own parts in diffusers' `StableDiffusionPipeline` with a DDIM
sampler over its training schedule (DDPM betas, epsilon prediction), classifier-free guidance
against the empty caption (the model's unconditional: it was trained with caption dropout), at its
native 32 px. Image k of prompt i starts from its own seeded noise (`image_seed`), so a set is
reproducible whatever the batch or the number of prompts.

The judge (`judge`, the role GenEval's detector plays for Self-Bench): the pixels whose colour is
far from grey are split into connected parts; each part large enough is read as an object of the
renderer's vocabulary: its colour the nearest of `world.COLORS` to its pixels, its shape and size
those whose drawing by the renderer itself (anti-aliased, fitted to the part's box) overlaps it
best. The drawing is correct when some order of the objects found has exactly the prompt as its
caption in the subtask's grammar form (`world.caption`): the right number of objects, each
colour-shape pair, the sizes where the caption states them, the relation for spatial. The judge
reads every image at the model's side (a rendered test image is resized with Lanczos first).

On disk (the `selfbench` task's layout, `itm_engine.tasks.selfbench`, with the rows' own candidates)::

    OUT/generated/{index:05d}/metadata.jsonl     {"tag": subtask, "prompt": caption, "candidates":
                                                  [caption, *negative captions], "include": the
                                                  scene's objects, "id": the test example's id}
    OUT/generated/{index:05d}/samples/{k:04d}.png  the model's drawings of the caption
    OUT/generated/results.jsonl                  the judge's verdicts, GenEval's results rows
    OUT/rendered/...                             the same prompts with the rendered test image
                                                 (samples/0000.png) and the judge's verdicts on it
    OUT/prompts/evaluation_metadata.jsonl        the prompts, one row each
    OUT/selfbench.json, OUT/selfbench.md          the table

so `itm-eval --task selfbench --data-root OUT --task-option generator=generated [--task-option
subset=correct] --model shapes` scores the same examples.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import diffusers
import numpy as np
import PIL.Image
import torch

from itm_engine.evaluate import score_examples, versions
from itm_engine.models import SDComponents
from itm_engine.models.families import family_of
from itm_engine.options import option
from itm_engine.scoring import NULL_PROMPT, DiffusionITM
from itm_engine.shapesworld import MODEL, report, world
from itm_engine.storage import output_file
from itm_engine.tasks.selfbench import SelfBench

GENERATED, RENDERED = "generated", "rendered"  # the generator folders of the data root

# -- generation --------------------------------------------------------------------------------


def sampling_pipeline(components: SDComponents) -> diffusers.StableDiffusionPipeline:
    """The model's `StableDiffusionPipeline` over `components` (the same modules) with a DDIM
    sampler over its training schedule."""
    pipe = family_of(components).pipeline(components)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(components.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_seed(seed: int, subtask: str, example: int, k: int) -> int:
    """The seed of the initial noise of drawing k of test example `example` of `subtask`."""
    return ((seed * 1_000_003 + world.SUBTASKS.index(subtask)) * 100_003 + example) * 1_009 + k


@torch.inference_mode()
def generate(components: SDComponents, captions: Sequence[str], seeds: Sequence[int], guidance: float,
             steps: int, batch_size: int = 64) -> list[PIL.Image.Image]:
    """One RGB image [image_size x image_size] per caption: DDIM over `steps` steps from the
    initial latent [C, h, w] that `torch.randn` draws from its seed, with classifier-free guidance
    `guidance` against the empty caption (1 or less: the plain conditional prediction)."""
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    pipe, family = sampling_pipeline(components), family_of(components)
    null = family.encode(components, [NULL_PROMPT])["context"]
    side = components.image_size
    images: list[PIL.Image.Image] = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        latents = torch.stack([torch.randn(components.latent_shape, generator=torch.Generator().manual_seed(s))
                               for s in seeds[start:start + batch_size]])
        out = pipe(prompt_embeds=family.encode(components, chunk)["context"],
                   negative_prompt_embeds=null.expand(len(chunk), -1, -1),
                   latents=latents.to(components.device, components.dtype), guidance_scale=guidance,
                   num_inference_steps=steps, height=side, width=side, output_type="pil")
        images += out.images
    return images


# -- the judge ---------------------------------------------------------------------------------

CHROMA = 60  # an object's pixel: max - min of its RGB above this (the background is grey; every COLORS is > 140)
MIN_AREA = 0.005  # parts smaller than this share of the image are specks, not objects
SIZE_SPLIT = (world.SIZES["small"] + world.SIZES["large"]) / 2  # diameter share between small and large
FIT_SCALES = (0.85, 1.0, 1.15)  # tried around the radius the part's box gives
FIT_SHIFTS = (-0.5, 0.0, 0.5)  # tried around the box's centre, in pixels
_NAMES = list(world.COLORS)
_RGB = np.array([world.COLORS[c] for c in _NAMES], dtype=np.float64)
_DRAWN_CHROMA = max(world.COLORS["red"]) - min(world.COLORS["red"])  # the colour templates are drawn in


def _parts(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected parts of a boolean mask [H, W], each as its pixels' (row, column) [n, 2]."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    parts = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < height and 0 <= u < width and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        parts.append(np.array(pixels))
    return parts


def _coverage(shape: str, x: float, y: float, radius: float, side: int) -> np.ndarray:
    """How much of each pixel of a `side`-px canvas [side, side] the renderer's anti-aliased
    drawing of `shape` (centre x, y and radius in pixels) covers, 0 to 1."""
    factor = radius / (world.SIZES["small"] * side / 2)
    style = world.Style(scales=(factor,), antialias=True)
    pixels = np.asarray(world.render((world.Obj("red", shape, "small", x, y),), side, style), dtype=np.int16)
    return (pixels.max(-1) - pixels.min(-1)) / _DRAWN_CHROMA


def find_objects(image: PIL.Image.Image) -> list[world.Obj]:
    """The objects the judge sees in a square image, in the renderer's vocabulary (centres in
    fractional pixels of the image): see the module docstring."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)  # [side, side, 3]
    side = pixels.shape[0]
    chroma = pixels.max(-1) - pixels.min(-1)
    parts = [p for p in _parts(chroma > CHROMA) if len(p) >= MIN_AREA * side * side]
    owner = np.full((side, side), -1)
    for k, part in enumerate(parts):
        owner[part[:, 0], part[:, 1]] = k
    objects = []
    for k, part in enumerate(parts):
        ys, xs = part[:, 0], part[:, 1]
        core = chroma[ys, xs]
        inner = pixels[ys, xs][core >= np.median(core)].astype(np.float64).mean(0)
        colour = _NAMES[int(((_RGB - inner) ** 2).sum(1).argmin())]
        # the part's own soft coverage, in a square window around its box padded beyond the image
        alpha = np.clip(chroma / np.percentile(core, 90), 0, 1) * ((owner == -1) | (owner == k))
        extent = (xs.max() - xs.min() + ys.max() - ys.min() + 2) / 2
        half = math.ceil(0.65 * extent) + 2
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
        left, top = round(cx) - half, round(cy) - half
        padded = np.pad(alpha, half)
        window = padded[top + half:top + 3 * half + 1, left + half:left + 3 * half + 1]
        best = (-1.0, "", 0.0, 0.0, 0.0)
        for shape in world.SHAPES:
            radius = extent / (1.7 if shape == "square" else 2)  # the square's side is 1.7 x its radius
            for scale, dx, dy in itertools.product(FIT_SCALES, FIT_SHIFTS, FIT_SHIFTS):
                drawn = _coverage(shape, cx - left + dx, cy - top + dy, radius * scale, 2 * half + 1)
                overlap = np.minimum(drawn, window).sum() / max(np.maximum(drawn, window).sum(), 1e-9)
                if overlap > best[0]:
                    best = (overlap, shape, radius * scale, cx + dx, cy + dy)
        _, shape, radius, x, y = best
        size = "small" if 2 * radius / side < SIZE_SPLIT else "large"
        objects.append(world.Obj(colour, shape, size, x, y))
    return objects


def judge(image: PIL.Image.Image, scene: world.Scene, subtask: str, side: int = 32) -> tuple[bool, str]:
    """(correct, reason): does `image` (resized to `side` px with Lanczos when larger) show the
    scene of caption `world.caption(scene, subtask)`, i.e. do the objects found, in some order,
    have exactly that caption? The reason describes what was found when not ("" when correct)."""
    if image.size[0] > side:
        image = image.resize((side, side), PIL.Image.LANCZOS)
    expected = world.caption(scene, subtask)
    found = find_objects(image)
    if len(found) == len(scene) and any(world.caption(order, subtask) == expected
                                        for order in itertools.permutations(found)):
        return True, ""
    seen = "; ".join(f"a {o.size} {o.color} {o.shape} at ({o.x:.0f}, {o.y:.0f})" for o in found) or "nothing"
    return False, f"expected {expected!r}, found {len(found)} object(s): {seen}"


# -- the run -----------------------------------------------------------------------------------


@dataclass
class SelfBenchConfig:
    """Options of `itm-shapes selfbench`."""

    out: str = option(help="the data root to write (generated/, rendered/, prompts/) with selfbench.json and "
                           "selfbench.md", identity=False)
    model: str = option(MODEL, help="the diffusion model that draws and scores: a diffusers folder or a named model")
    n: int = option(50, help="test examples (prompts) per subtask")
    images: int = option(4, help="drawings per prompt (GenEval draws 4)")
    seed: int = option(0, help="seed of the test draw, of the drawings' initial noise and of the scoring draws")
    guidance: float = option(5.0, help="classifier-free guidance scale (the empty caption is the unconditional; "
                                       "1: none)")
    steps: int = option(25, help="DDIM sampling steps")
    samples: int = option(10, help="stratified noise draws per image-caption pair when scoring")
    table: str | None = option(None, help="also write the table as TABLE.json and TABLE.md (path without suffix)",
                               identity=False)
    threads: int | None = option(None, help="torch CPU threads (default: torch's; 1 on a shared machine)",
                                 identity=False)


def _include(scene: world.Scene) -> list[dict]:
    """A scene's objects as GenEval's "include" requirements, with the size the renderer draws."""
    return [{"class": o.shape, "count": 1, "color": o.color, "size": o.size} for o in scene]


def write_prompts(out: Path, rows: list[dict], folder: str, images: list[list[PIL.Image.Image]],
                  side: int) -> list[bool]:
    """OUT/{folder}/{index:05d}/{metadata.jsonl, samples/{k:04d}.png} for the test rows (whose
    "image" and negatives' "image" are scenes) with `images[index]` as samples, and the judge's
    verdicts (at `side` px) as OUT/{folder}/results.jsonl; returns the verdicts in order."""
    verdicts, results = [], []
    for index, (row, drawn) in enumerate(zip(rows, images)):
        metadata = {"tag": row["subtask"], "prompt": row["caption"], "id": row["id"], "include": _include(row["image"]),
                    "candidates": [row["caption"], *(n["caption"] for n in row["negatives"])]}
        prompt_folder = out / folder / f"{index:05d}"
        (prompt_folder / "samples").mkdir(parents=True, exist_ok=True)
        (prompt_folder / "metadata.jsonl").write_text(json.dumps(metadata))
        for k, image in enumerate(drawn):
            relative = f"{folder}/{index:05d}/samples/{k:04d}.png"
            image.save(out / relative)
            correct, reason = judge(image, row["image"], row["subtask"], side)
            verdicts.append(correct)
            results.append({"filename": relative, "tag": row["subtask"], "prompt": row["caption"], "correct": correct,
                            "reason": reason, "metadata": json.dumps(metadata)})
    (out / folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return verdicts


def _accuracy(task: SelfBench, matrices: dict[str, torch.Tensor]) -> dict[str, float]:
    """The task's metrics on its examples, from score matrices by example id ({} without examples)."""
    if not task.examples:
        return {}
    return task.metrics(task.examples, {"i2t": [matrices[ex.id] for ex in task.examples]})


def _score(scorer: DiffusionITM, task: SelfBench) -> dict[str, torch.Tensor]:
    """{example id: [1, n_texts] I2T scores} of the task's examples, a subtask at a time."""
    matrices: dict[str, torch.Tensor] = {}
    for subtask in world.SUBTASKS:
        group = [ex for ex in task.examples if ex.meta["tag"] == subtask]
        if group:
            rows, _, _ = score_examples(scorer, group, ["i2t"])
            matrices.update({row["id"]: torch.tensor(row["scores"]["i2t"]) for row in rows})
    return matrices


def format_table(result: dict) -> str:
    """The run's table as Markdown: per subtask, the rendered and the generated sets' image->text
    accuracy, full and judged-correct, with their sizes; the judge's verdicts on rendered images."""
    lines = ["| subtask | prompts | rendered I2T | generated | judged correct | full I2T | correct I2T | "
             "judge: rendered correct | judge: rendered negatives correct | chance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["subtasks"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prompts']} | {_percent(r['rendered'])} | {r['generated']} | "
                     f"{r['correct_images']} ({100 * r['correct_images'] / r['generated']:.0f}%) | "
                     f"{_percent(r['full'])} | {_percent(r['correct'])} | {r['judge_rendered']}/{r['prompts']} | "
                     f"{r['judge_negatives']}/{r['negatives']} | {_percent(r['chance'])} |")
    for key, label in (("macro", "mean over subtasks"), ("micro", "all images")):
        o = result["overall"][key]
        lines.append(f"| {label} | {sum(r['prompts'] for r in rows.values())} | {_percent(o['rendered'])} | "
                     f"{sum(r['generated'] for r in rows.values())} | "
                     f"{sum(r['correct_images'] for r in rows.values())} | {_percent(o['full'])} | "
                     f"{_percent(o['correct'])} | | | |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal; "-" for none (no example to measure)."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def draw_and_judge(config: SelfBenchConfig, scorer: DiffusionITM, rows: list[dict], draw: world.Draw) -> dict:
    """Draw the test rows' captions, write OUT (module docstring) with the judge's verdicts, also
    judge the rendered negatives against their positive's scene; returns the verdicts: "generated"
    (per drawing, in row then drawing order), "rendered" (per row), "negatives" ((subtask, verdict)
    per rendered negative)."""
    out, side = Path(config.out), scorer.components.image_size
    seeds = [image_seed(config.seed, row["subtask"], int(row["id"].split("/")[1]), k)
             for row in rows for k in range(config.images)]
    drawn = generate(scorer.components, [row["caption"] for row in rows for _ in range(config.images)], seeds,
                     config.guidance, config.steps)
    generated = write_prompts(out, rows, GENERATED, [drawn[i * config.images:(i + 1) * config.images]
                                                     for i in range(len(rows))], side)
    stems = [row["id"].replace("/", "_") for row in rows]  # the rendered test images' file stems
    rendered = write_prompts(out, rows, RENDERED, [[draw.render(row["image"], stem)] for row, stem in zip(rows, stems)],
                             side)
    negatives = [(row["subtask"], judge(draw.render(negative["image"], f"{stem}_neg{j}"), row["image"],
                                        row["subtask"], side)[0])
                 for row, stem in zip(rows, stems) for j, negative in enumerate(row["negatives"])]
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    (out / "prompts" / "evaluation_metadata.jsonl").write_text(
        "".join(json.dumps({"tag": r["subtask"], "include": _include(r["image"]), "prompt": r["caption"]}) + "\n"
                for r in rows))
    return {"generated": generated, "rendered": rendered, "negatives": negatives}


def run_selfbench(config: SelfBenchConfig, command: str = "itm-shapes selfbench") -> dict:
    """Draw, judge, write and score the set of `config` (module docstring); print the table and
    write it to OUT/selfbench.{json,md} (and TABLE.{json,md}); returns the result."""
    for name in ("n", "images", "steps", "samples"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(config, name)}")
    out = Path(config.out)
    if (out / GENERATED).exists():
        raise FileExistsError(f"{out / GENERATED} exists: give a new --out folder")
    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    draw = world.Draw("test", config.n, config.seed, subtasks=world.SUBTASKS)
    rows = world.example_rows(draw, lambda scene, stem: scene)  # each "image": the scene itself
    scorer = DiffusionITM.from_pretrained(config.model, progress=False,
                                          protocol=report.lab_protocol(config.samples, config.seed))
    verdicts = draw_and_judge(config, scorer, rows, draw)
    judged_s = time.perf_counter() - start

    tasks = {name: SelfBench(out, generator=folder, subset=subset, protocol=scorer.protocol)
             for name, folder, subset in (("rendered", RENDERED, "full"), ("full", GENERATED, "full"),
                                          ("correct", GENERATED, "correct"))}
    rendered_scores, generated_scores = _score(scorer, tasks["rendered"]), _score(scorer, tasks["full"])
    accuracy = {"rendered": _accuracy(tasks["rendered"], rendered_scores),
                "full": _accuracy(tasks["full"], generated_scores),
                "correct": _accuracy(tasks["correct"], generated_scores)}
    chance = report.chance(draw)
    subtasks = {}
    for subtask in world.SUBTASKS:
        mine = [i for i, row in enumerate(rows) if row["subtask"] == subtask]
        negatives = [ok for name, ok in verdicts["negatives"] if name == subtask]
        subtasks[subtask] = {
            "prompts": len(mine), "rendered": accuracy["rendered"][f"accuracy/{subtask}"],
            "generated": len(mine) * config.images,
            "correct_images": sum(verdicts["generated"][i * config.images + k] for i in mine
                                  for k in range(config.images)),
            "full": accuracy["full"][f"accuracy/{subtask}"], "correct": accuracy["correct"].get(f"accuracy/{subtask}"),
            "judge_rendered": sum(verdicts["rendered"][i] for i in mine), "negatives": len(negatives),
            "judge_negatives": sum(negatives), "chance": chance[subtask]}
    result = {
        "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), **{k: v for k, v in asdict(config).items() if k not in ("out", "table")},
        "sampler": f"DDIM, {config.steps} steps, guidance {config.guidance}", "protocol": scorer.protocol.as_dict(),
        "seconds": {"draw_and_judge": round(judged_s, 1), "total": round(time.perf_counter() - start, 1)},
        "subtasks": subtasks,
        "overall": {key: {name: accuracy[name].get(metric, float("nan")) for name in accuracy}
                    for key, metric in (("macro", "accuracy/macro"), ("micro", "accuracy"))},
    }
    write_table(result, config)
    return result


def write_table(result: dict, config: SelfBenchConfig) -> None:
    """Print the run's table; write OUT/selfbench.{json,md} and, with --table, TABLE.{json,md}."""
    table = format_table(result)
    print(table)
    out = Path(config.out)
    markdown = (f"# Self-Bench on the bundled ShapesWorld model\n\n`{result['command']}` on {result['date']}, "
                f"{result['seconds']['total']} s. The model draws each test caption {config.images} times "
                f"({result['sampler']}); the judge (`itm_engine/shapesworld/selfbench.py`) marks the drawings "
                f"that show the caption's scene. Image->text accuracy in % ({config.samples} stratified draws per "
                f"pair, seed {config.seed}; the true caption must score strictly highest) against the rendered "
                f"test example's hard negatives.\n\n{table}\n")
    for path in [out / "selfbench", *([Path(config.table)] if config.table else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        output_file(path, ".json").write_text(json.dumps(result, indent=1) + "\n")
        output_file(path, ".md").write_text(markdown)
    drawings = sum(r["generated"] for r in result["subtasks"].values())
    print(f"wrote {out} ({drawings} drawings of {sum(r['prompts'] for r in result['subtasks'].values())} prompts); "
          f"table: {out / 'selfbench.md'}", file=sys.stderr)
