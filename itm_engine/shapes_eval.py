"""ShapesWorld accuracy of a scorer, per subtask, straight from the generator (no files).

The in-memory counterpart of `itm-eval --task shapes|shapes_t2i` (same examples, same rule: the
positive must score strictly highest, a tie is wrong), used by pretraining's validation, the
bundled model's accuracy tests and `make demo`, where writing a data root first would be waste.

    examples = world_examples("test", n=40)                 # {subtask: [(scene, negatives), ...]}
    i2t = accuracy(scorer, examples, "i2t")                  # one image vs its k captions
    t2i = accuracy(scorer, examples, "t2i")                  # one caption vs its k images, null-normalised
    raw = accuracy(scorer, examples, "t2i-raw")              # ... by raw denoising error (no normalisation)

`scorer` is any `PairScorer` (DiffusionITM, the CLIP baseline); for CLIP the three modes differ
only in which candidates compete.
"""
from __future__ import annotations

import random
from typing import Literal, Sequence

import torch

from itm_engine.data import shapes
from itm_engine.pairs import PairScorer

Direction = Literal["i2t", "t2i", "t2i-raw"]
Examples = dict[str, list[tuple[shapes.Scene, list[shapes.Scene]]]]


def world_examples(split: str = "test", n: int = 40, seed: int = 0, size: int = 64,
                   subtasks: Sequence[str] = shapes.ALL_SUBTASKS) -> Examples:
    """`n` examples of each subtask of `split`, drawn as `shapes.write_shapesworld` draws them."""
    rng = random.Random(shapes.SPLIT_SEEDS[split] + seed)
    return {subtask: [shapes.sample_example(rng, subtask, split, size) for _ in range(n)] for subtask in subtasks}


def candidate_scores(scorer: PairScorer, examples: Sequence[tuple[shapes.Scene, list[shapes.Scene]]], subtask: str,
                     direction: Direction, samples: int = 10, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Scores [n, k] of each example's k candidates (positive first; k = the fewest any example
    has, so recognition examples of the training split, which lose held-out negatives, align).

    "i2t": the positive image against the captions of the positive and negative scenes;
    "t2i": the positive caption against the scenes' images, null-normalised (DiffusionITM mode
    "t2i"); "t2i-raw": the same pairs scored by raw denoising error (mode "i2t" errors).
    Noise: `samples` stratified draws from `seed`, shared by every pair."""
    k = min(1 + len(negatives) for _, negatives in examples)
    scenes = [[scene, *negatives][:k] for scene, negatives in examples]
    captions = [[shapes.caption(s, subtask) for s in row] for row in scenes]
    images = [[shapes.render(s, size) for s in row] for row in scenes]
    options = dict(samples=samples, seed=seed, schedule="stratified")
    if direction == "i2t":
        return scorer.score_candidates([row[0] for row in images], captions, mode="i2t", **options)
    if direction == "t2i":
        return scorer.score_candidates([row[0] for row in captions], images, mode="t2i", **options)
    if direction != "t2i-raw":
        raise ValueError(f"direction must be 'i2t', 't2i' or 't2i-raw', got {direction!r}")
    flat_images = [image for row in images for image in row]
    texts = [row[0] for row in captions]
    pairs = [(q * k + j, q) for q in range(len(scenes)) for j in range(k)]
    return scorer.score_pairs(flat_images, texts, pairs, mode="i2t", **options).view(len(scenes), k)


def accuracy(scorer: PairScorer, examples: Examples, direction: Direction, samples: int = 10, seed: int = 0,
             size: int = 64) -> dict[str, float]:
    """Fraction of examples whose positive (candidate 0) scores strictly highest, per subtask."""
    out = {}
    for subtask, rows in examples.items():
        scores = candidate_scores(scorer, rows, subtask, direction, samples, seed, size)
        out[subtask] = float((scores[:, :1] > scores[:, 1:]).all(1).float().mean())
    return out


def chance(examples: Examples) -> dict[str, float]:
    """Accuracy of a random ranking, per subtask: 1 / k."""
    return {subtask: 1.0 / min(1 + len(negatives) for _, negatives in rows) for subtask, rows in examples.items()}


def standard_columns(diffusion: PairScorer, clip: PairScorer, hardneg: PairScorer | None = None
                     ) -> dict[str, tuple[PairScorer, Direction]]:
    """The report's columns: DiffusionITM I2T / T2I raw / T2I normalised, optionally a HardNeg
    fine-tuned DiffusionITM (I2T, T2I normalised), and CLIP both ways."""
    columns = {"I2T": (diffusion, "i2t"), "T2I raw": (diffusion, "t2i-raw"), "T2I norm": (diffusion, "t2i")}
    if hardneg is not None:
        columns.update({"HardNeg I2T": (hardneg, "i2t"), "HardNeg T2I norm": (hardneg, "t2i")})
    columns.update({"CLIP I2T": (clip, "i2t"), "CLIP T2I": (clip, "t2i")})
    return columns


def accuracy_table(columns: dict[str, tuple[PairScorer, Direction]], examples: Examples, samples: int = 10,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """{header: {subtask: accuracy}} for each column (header -> (scorer, direction)), plus "chance"."""
    table = {header: accuracy(scorer, examples, direction, samples, seed) for header, (scorer, direction) in columns.items()}
    table["chance"] = chance(examples)
    return table


def format_table(title: str, table: dict[str, dict[str, float]]) -> str:
    """`table` (from `accuracy_table`) as text: a row per subtask, percentages, and the mean row."""
    rows = list(dict.fromkeys(row for column in table.values() for row in column))
    width = max(10, *(len(h) + 2 for h in table))
    lines = [title, f"{'subtask':<22}" + "".join(f"{h:>{width}}" for h in table)]
    for row in rows:
        lines.append(f"{row:<22}" + "".join(f"{100 * table[h][row]:>{width - 1}.1f}%" if row in table[h]
                                             else " " * width for h in table))
    means = {h: sum(v.values()) / len(v) for h, v in table.items()}
    lines.append(f"{'mean':<22}" + "".join(f"{100 * means[h]:>{width - 1}.1f}%" for h in table))
    return "\n".join(lines)
