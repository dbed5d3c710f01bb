"""`make demo` / `python -m itm_engine.demo`: the engine and the naive loop on the same work.

Scores a few generated images against a few captions with the built-in `tiny` model (random
weights: the scores are meaningless, the agreement and the speed are not), in both modes, and
checks that engine and naive reference agree.
"""
from __future__ import annotations

import argparse
import sys
import time

import PIL.Image
import PIL.ImageDraw
import torch

from itm_engine.naive import naive_scores
from itm_engine.scoring import DiffusionITM

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")


def draw_shape(colour: str, shape: str, size: int = 64) -> PIL.Image.Image:
    """A centred filled `shape` ("circle" | "square") of `colour` on white, size x size RGB."""
    image = PIL.Image.new("RGB", (size, size), "white")
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    draw = PIL.ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def print_matrix(title: str, scores: torch.Tensor, texts: list[str]) -> None:
    print(f"\n{title}  (rows: images, columns: captions; higher = better match)")
    print(" " * 16 + "".join(f"{t[:14]:>16}" for t in texts))
    for i, row in enumerate(scores.tolist()):
        print(f"{'image ' + str(i):<16}" + "".join(f"{v:16.5f}" for v in row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="diffusers folder, cached hub id or built-in arch")
    parser.add_argument("--samples", type=int, default=4, help="noise draws per pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pairs = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("yellow", "square")]
    images = [draw_shape(c, s) for c, s in pairs]
    texts = [f"a {c} {s}" for c, s in pairs]
    scorer = DiffusionITM.from_pretrained(args.model, batch_size=64)
    print(f"model: {scorer.components.source}  latents {scorer.components.latent_shape}  "
          f"prediction: {scorer.components.prediction_type}  samples: {args.samples}")

    scorer(images[:1], texts[:1], samples=1)  # warm-up: first-call costs stay out of the timings
    ok, error_scale = True, None
    for mode in ("i2t", "t2i"):
        bank = scorer.noise_bank(args.samples, seed=args.seed)
        scorer.clear_cache()
        start = time.perf_counter()
        engine = scorer(images, texts, mode=mode, noise=bank)
        engine_s = time.perf_counter() - start
        engine_items = scorer.last_stats.unet_items
        start = time.perf_counter()
        naive = naive_scores(scorer.components, images, texts, bank, mode=mode)
        naive_s = time.perf_counter() - start
        naive_items = len(images) * len(texts) * len(bank) * (2 if mode == "t2i" else 1)
        # Relative to the size of the denoising errors (|I2T score|): a T2I score is a small
        # difference of two such errors, so that is the scale its rounding lives on.
        error_scale = error_scale if error_scale is not None else naive.abs().max()
        rel = ((engine - naive).abs().max() / error_scale).item()
        ok &= rel <= 1e-5
        print_matrix(f"[{mode}] engine scores", engine, texts)
        print(f"[{mode}] engine: {engine_items:4d} UNet items in {engine_s:6.2f} s = {engine_items / engine_s:7.1f} items/s")
        print(f"[{mode}] naive : {naive_items:4d} UNet items in {naive_s:6.2f} s = {naive_items / naive_s:7.1f} items/s")
        print(f"[{mode}] speed-up {naive_s / engine_s:.1f}x; max difference engine vs naive, relative to the "
              f"error scale: {rel:.1e} -> {'agree' if rel <= 1e-5 else 'DISAGREE'}")
    print("\nrandom weights: the scores carry no meaning; the agreement and the speed do.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
