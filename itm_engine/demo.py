"""`make demo` / `python -m itm_engine.demo`: ShapesWorld with the bundled model, on the CPU.

Scores held-out ShapesWorld examples with the bundled latent diffusion model ("shapes") and the
bundled tiny CLIP ("shapes-clip"), both trained by this project (`itm_engine.bundled`), and prints
per subtask: DiffusionITM image->text, text->image by raw error and null-normalised, CLIP both
ways, and chance; then the compositional split (colour-shape combinations never seen in
training); then the engine against the naive research loop on the same work (same noise: the
scores must agree); and writes a figure of a few examples with their candidates' scores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from itm_engine import shapes_eval
from itm_engine.data import shapes
from itm_engine.naive import naive_pair_scores
from itm_engine.scoring import DiffusionITM

def speed_check(scorer: DiffusionITM, examples: shapes_eval.Examples, samples: int, seed: int) -> bool:
    """Engine vs naive loop on the image->text work of the first examples of each subtask."""
    images, texts, pairs = [], [], []
    for subtask, rows in examples.items():
        for scene, negatives in rows[:2]:
            images.append(shapes.render(scene))
            for candidate in (scene, *negatives):
                pairs.append((len(images) - 1, len(texts)))
                texts.append(shapes.caption(candidate, subtask))
    bank = scorer.noise_bank(samples, seed=seed, schedule="stratified")
    scorer.clear_cache()
    start = time.perf_counter()
    engine = scorer.score_pairs(images, texts, pairs, noise=bank)
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_pair_scores(scorer.components, images, texts, pairs, bank)
    naive_s = time.perf_counter() - start
    items = len(pairs) * len(bank)
    rel = ((engine - naive).abs().max() / naive.abs().max()).item()
    print(f"\nspeed on the same work ({len(pairs)} image-caption pairs x {len(bank)} noise draws = {items} UNet items):")
    print(f"  engine {engine_s:6.2f} s = {items / engine_s:7.1f} items/s   naive loop {naive_s:6.2f} s = "
          f"{items / naive_s:7.1f} items/s   speed-up {naive_s / engine_s:.1f}x")
    print(f"  max difference engine vs naive, relative to the error scale: {rel:.1e} -> "
          f"{'agree' if rel <= 1e-5 else 'DISAGREE'}")
    return rel <= 1e-5


def write_figure(path: Path, scorer: DiffusionITM, examples: shapes_eval.Examples, samples: int, seed: int) -> None:
    """One example per subtask: the image, its candidate captions and their I2T scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subtasks = list(examples)
    cols = (len(subtasks) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3.6 * cols, 9.6), gridspec_kw={"hspace": 0.75})
    for ax, subtask in zip(axes.flat, subtasks):
        rows = examples[subtask][:1]
        scores = shapes_eval.candidate_scores(scorer, rows, subtask, "i2t", samples, seed)[0]
        scene, negatives = rows[0]
        ax.imshow(shapes.render(scene))
        ax.set_xticks([])
        ax.set_yticks([])
        best = int(scores.argmax())
        lines = [("* " if j == best else "  ") + f"{shapes.caption(c, subtask)}  {s:+.4f}"
                 for j, (c, s) in enumerate(zip((scene, *negatives), scores.tolist()))]
        ax.set_title(subtask, fontsize=9)
        ax.set_xlabel("\n".join(lines), fontsize=6, family="monospace", loc="left")
    for ax in list(axes.flat)[len(subtasks):]:
        ax.axis("off")
    fig.suptitle("bundled ShapesWorld model, image->text: candidate captions (first = true) and scores "
                 "(-denoising error; * = chosen)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="diffusers folder, cached hub id or built-in name")
    parser.add_argument("--n", type=int, default=20, help="held-out examples per subtask")
    parser.add_argument("--samples", type=int, default=10, help="noise draws per pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default="runs/demo/shapes-examples.png", help="where to write the PNG")
    args = parser.parse_args(argv)

    from itm_engine.prefilter import ClipModel

    start = time.perf_counter()
    scorers = {"DiffusionITM": DiffusionITM.from_pretrained(args.model, progress=False),
               "CLIP": ClipModel.from_name("shapes-clip", pretrained="bundled").scorer()}
    comp = scorers["DiffusionITM"].components
    print(f"model: {comp.source}  latents {comp.latent_shape}  samples per pair: {args.samples} (stratified), "
          f"seed {args.seed}; CLIP: bundled shapes-clip")
    diffusion, clip = scorers["DiffusionITM"], scorers["CLIP"]
    columns = shapes_eval.standard_columns(diffusion, clip)
    test = shapes_eval.world_examples("test", args.n, args.seed)
    print("\n" + shapes_eval.format_table(
        f"ShapesWorld test split, {args.n} examples per subtask: accuracy (the true candidate must score strictly "
        "highest)", shapes_eval.accuracy_table(columns, test, args.samples, args.seed)))
    held_out = shapes_eval.world_examples("compositional", args.n, args.seed, subtasks=shapes.SUBTASKS)
    print("\n" + shapes_eval.format_table(
        "compositional split (colour-shape combinations never seen in training)",
        shapes_eval.accuracy_table(columns, held_out, args.samples, args.seed)))
    ok = speed_check(scorers["DiffusionITM"], test, args.samples, args.seed)
    figure = Path(args.figure)
    write_figure(figure, scorers["DiffusionITM"], test, args.samples, args.seed)
    print(f"\nfigure: {figure}   total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
