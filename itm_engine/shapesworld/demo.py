"""`make demo` / `itm-shapes demo`: ShapesWorld with the bundled model, on the CPU.

Scores held-out ShapesWorld examples with the bundled latent diffusion model ("shapes") and the
bundled tiny CLIP ("shapes-clip"), both trained by this project (`itm_engine.shapesworld`), and prints
per subtask: DiffusionITM image->text, text->image by raw error and null-normalised, CLIP both
ways, and chance; then the compositional split (colour-shape combinations never seen in
training); then the engine against the naive research loop on the same work (same noise: the
scores must agree); and writes a figure of a few examples with their candidates' scores, and one
of the model's own drawings of a caption per subtask with the Self-Bench judge's verdicts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from itm_engine import extras
from itm_engine.evaluate import score_examples
from itm_engine.options import option
from itm_engine.reference import diffusion_itm_pair_scores
from itm_engine.scoring import DiffusionITM
from itm_engine.shapesworld import CLIP, MODEL, report, world
from itm_engine.shapesworld.tasks import ShapesI2T


def speed_check(scorer: DiffusionITM, draw: world.Draw) -> bool:
    """Engine vs naive loop on the image->text work of the first two examples of each subtask."""
    images, texts, pairs = [], [], []
    seen: dict[str, int] = {}
    for subtask, scene, negatives in world.draw_scenes(draw):
        seen[subtask] = seen.get(subtask, 0) + 1
        if seen[subtask] > 2:
            continue
        images.append(world.render(scene))
        for candidate in (scene, *negatives):
            pairs.append((len(images) - 1, len(texts)))
            texts.append(world.caption(candidate, subtask))
    bank = scorer.noise_bank()
    scorer.clear_cache()
    start = time.perf_counter()
    engine = scorer.score_pairs(images, texts, pairs, noise=bank)
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = diffusion_itm_pair_scores(scorer.components, images, texts, pairs, bank, "i2t",
                                      scorer.protocol)
    naive_s = time.perf_counter() - start
    items = len(pairs) * len(bank)
    rel = ((engine - naive).abs().max() / naive.abs().max()).item()
    print(f"\nspeed on the same work ({len(pairs)} image-caption pairs x {len(bank)} noise draws = {items} "
          "UNet items):")
    print(f"  engine {engine_s:6.2f} s = {items / engine_s:7.1f} items/s   naive loop {naive_s:6.2f} s = "
          f"{items / naive_s:7.1f} items/s   speed-up {naive_s / engine_s:.1f}x")
    print(f"  max difference engine vs naive, relative to the error scale: {rel:.1e} -> "
          f"{'agree' if rel <= 1e-5 else 'DISAGREE'}")
    return rel <= 1e-5


def write_figure(path: Path, scorer: DiffusionITM, draw: world.Draw) -> None:
    """One example per subtask: the image, its candidate captions and their I2T scores."""
    matplotlib = extras.require("matplotlib", "the demo's figure", "shapes")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = ShapesI2T.from_world(draw, subtasks=draw.subtasks)
    firsts = {}
    for example in task.examples:
        firsts.setdefault(example.meta["subtask"], example)
    cols = (len(firsts) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3.6 * cols, 9.6), gridspec_kw={"hspace": 0.75})
    for ax, (subtask, example) in zip(axes.flat, firsts.items()):
        rows, _, _ = score_examples(scorer, [example], ["i2t"])
        scores = rows[0]["scores"]["i2t"][0]
        ax.imshow(example.images[0])
        ax.set_xticks([])
        ax.set_yticks([])
        best = max(range(len(scores)), key=scores.__getitem__)
        lines = [("* " if j == best else "  ") + f"{text}  {score:+.4f}"
                 for j, (text, score) in enumerate(zip(example.texts, scores))]
        ax.set_title(subtask, fontsize=9)
        ax.set_xlabel("\n".join(lines), fontsize=6, family="monospace", loc="left")
    for ax in list(axes.flat)[len(firsts):]:
        ax.axis("off")
    fig.suptitle("bundled ShapesWorld model, image->text: candidate captions (first = true) and scores "
                 "(-denoising error; * = chosen)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_drawings(path: Path, scorer: DiffusionITM, draw: world.Draw, per_caption: int = 4) -> int:
    """The model's own drawings (Self-Bench, `selfbench.generate` with `itm-shapes selfbench`'s
    guidance and steps) of the first caption of each subtask of `draw`, a row of `per_caption` per
    caption, each titled with the judge's verdict (`selfbench.judge`); returns how many it judged
    correct."""
    from itm_engine.shapesworld import selfbench

    matplotlib = extras.require("matplotlib", "the demo's figure", "shapes")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts: dict[str, world.Scene] = {}
    for subtask, scene, _ in world.draw_scenes(draw):
        if subtask in world.SUBTASKS:
            firsts.setdefault(subtask, scene)
    defaults = selfbench.SelfBenchConfig(out="")
    captions = [world.caption(scene, subtask) for subtask, scene in firsts.items() for _ in range(per_caption)]
    seeds = [selfbench.image_seed(draw.seed, subtask, 0, k) for subtask in firsts for k in range(per_caption)]
    images = selfbench.generate(scorer.components, captions, seeds, defaults.guidance, defaults.steps)
    fig, axes = plt.subplots(len(firsts), per_caption, figsize=(1.6 * per_caption + 2.4, 1.9 * len(firsts)),
                             squeeze=False)
    correct = 0
    for row, (subtask, scene) in enumerate(firsts.items()):
        axes[row, 0].set_ylabel(world.caption(scene, subtask), fontsize=6, rotation=0, ha="right", va="center")
        for k in range(per_caption):
            image = images[row * per_caption + k]
            ok = selfbench.judge(image, scene, subtask)[0]
            correct += ok
            ax = axes[row, k]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("correct" if ok else "wrong", fontsize=7, color="green" if ok else "red")
    fig.suptitle(f"the bundled model's own drawings (DDIM {defaults.steps} steps, guidance {defaults.guidance:g}) "
                 "and the judge's verdicts", fontsize=8)
    fig.subplots_adjust(left=0.3, right=0.98, top=0.93, bottom=0.02)  # the captions left of each row
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return correct


@dataclass
class DemoConfig:
    """Options of the demo (`make demo`, `itm-shapes demo`)."""

    model: str = option(MODEL, help="the diffusion model: a diffusers folder, a named or built-in model")
    n: int = option(20, help="held-out examples per subtask")
    samples: int = option(10, help="stratified noise draws per pair")
    seed: int = option(0, help="seed of the examples and of the noise draws")
    figure: str = option("runs/demo/shapes-examples.png", help="where to write the PNG")
    drawings: str = option("runs/demo/shapes-drawings.png", help="where to write the PNG of the model's own drawings")


def run_demo(config: DemoConfig) -> int:
    """Print the tables and the engine-vs-naive line, write the figure; 0 when engine and naive agree."""
    from itm_engine.clip import ClipModel

    start = time.perf_counter()
    diffusion = DiffusionITM.from_pretrained(config.model, progress=False,
                                             protocol=report.lab_protocol(config.samples, config.seed))
    clip = ClipModel.from_name(CLIP, pretrained="bundled").scorer()
    comp = diffusion.components
    print(f"model: {comp.source}  latents {comp.latent_shape}  samples per pair: {config.samples} (stratified), "
          f"seed {config.seed}; CLIP: bundled {CLIP}")
    columns = report.standard_columns(diffusion, clip)
    test = report.split_draw("test", config.n, config.seed)
    print("\n" + report.format_table(
        f"ShapesWorld test split, {config.n} examples per subtask: accuracy (the true candidate must score strictly "
        "highest)", report.accuracy_table(columns, test)))
    held_out = report.split_draw("compositional", config.n, config.seed)
    print("\n" + report.format_table(
        "compositional split (colour-shape combinations never seen in training)",
        report.accuracy_table(columns, held_out)))
    ok = speed_check(diffusion, test)
    figure = Path(config.figure)
    write_figure(figure, diffusion, test)
    drawings = Path(config.drawings)
    correct = write_drawings(drawings, diffusion, test)
    print(f"\nfigure: {figure}   the model's own drawings: {drawings} ({correct} of {4 * len(world.SUBTASKS)} judged "
          f"correct; itm-shapes selfbench)   total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1
