"""ShapesWorld accuracy per subtask, DiffusionITM and CLIP side by side: `itm-shapes report`.

The examples are drawn in memory (`tasks.ShapesI2T.from_world`), and are scored and judged by the
same code as `itm-eval --task shapes|shapes_t2i` on a data root written from the same draw
(`evaluate.score_examples`, the task's `metrics`: the positive must score strictly highest). The
examples of each subtask are scored in one call, under the scorer's own protocol: the lab's
reports score with `lab_protocol` (the engine's, with S stratified draws).

    scorer = DiffusionITM.from_pretrained("shapes", protocol=lab_protocol(samples=10, seed=0))
    draw = Draw("test", n=40)
    i2t = accuracy(scorer, draw, "i2t")          # one image vs its k captions
    t2i = accuracy(scorer, draw, "t2i")          # one caption vs its k images, null-normalised
    raw = accuracy(scorer, draw, "t2i-raw")      # ... by raw denoising error (no normalisation)

`scorer` is any `PairScorer` (DiffusionITM, the CLIP baseline); for CLIP the three directions
differ only in which candidates compete.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Sequence

import torch

from itm_engine import protocols
from itm_engine.evaluate import score_examples, versions
from itm_engine.options import option
from itm_engine.pairs import PairScorer
from itm_engine.protocols import Protocol
from itm_engine.shapesworld.tasks import ShapesI2T, ShapesT2I
from itm_engine.shapesworld.world import ALL_SUBTASKS, SUBTASKS, Draw, draw_scenes
from itm_engine.storage import output_file

Direction = Literal["i2t", "t2i", "t2i-raw"]
# direction -> (the task, the score mode): raw T2I scores the T2I examples by their plain errors
DIRECTIONS = {"i2t": (ShapesI2T, "i2t"), "t2i": (ShapesT2I, "t2i"), "t2i-raw": (ShapesT2I, "i2t")}
# the splits of the report, name -> (world split, subtasks, renderer style): the held-out test split
# with the complexity task, the compositional split (colour-shape combinations never seen in
# training), and the test split's scenes drawn by the varied renderer (world.Style)
SPLITS = {"test": ("test", ALL_SUBTASKS, "exact"), "compositional": ("compositional", SUBTASKS, "exact"),
          "varied": ("test", ALL_SUBTASKS, "varied")}
SPLIT_TITLES = {"test": "test split", "compositional": "compositional split",
                "varied": "test split, varied renderer"}


def split_draw(name: str, n: int, seed: int = 0, only: Sequence[str] | None = None) -> Draw | None:
    """The Draw of the report's split `name` (`SPLITS`): n examples per subtask from `seed`, of the
    split's subtasks in `only` when given (a Draw of its own: other examples than the whole split's
    draw has); None when the split has none of them."""
    split, subtasks, style = SPLITS[name]
    if only is not None:
        subtasks = tuple(s for s in subtasks if s in only)
        if not subtasks:
            return None
    return Draw(split, n, seed, subtasks=subtasks, style=style)


def lab_protocol(samples: int = 10, seed: int = 0) -> Protocol:
    """The protocol of the lab's reports: the engine's, with `samples` stratified draws from `seed`."""
    return protocols.resolve(protocols.DEFAULT, samples=samples, seed=seed, schedule="stratified")


def accuracy(scorer: PairScorer, draw: Draw, direction: Direction,
             subtasks: Sequence[str] | None = None) -> dict[str, float]:
    """{subtask: accuracy} of `scorer` on the examples of `draw` in `direction`: of every subtask of
    the draw, or of `subtasks` only (their examples in the whole draw)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    task_class, mode = DIRECTIONS[direction]
    task = task_class.from_world(draw, subtasks=tuple(subtasks or draw.subtasks))
    examples = task.examples
    matrices: dict[str, torch.Tensor] = {}
    for subtask in task.subtasks:
        group = [example for example in examples if example.meta["subtask"] == subtask]
        rows, _, _ = score_examples(scorer, group, [mode])
        matrices.update({row["id"]: torch.tensor(row["scores"][mode]) for row in rows})
    metrics = task.metrics(examples, {task.modes[0]: [matrices[example.id] for example in examples]})
    return {subtask: metrics[f"accuracy/{subtask}"] for subtask in task.subtasks}


def chance(draw: Draw) -> dict[str, float]:
    """Accuracy of a random ranking per subtask: 1 / k, k the fewest candidates (the positive and
    its negatives) of its examples; from the scenes alone, nothing rendered."""
    fewest: dict[str, int] = {}
    for subtask, _, negatives in draw_scenes(draw):
        fewest[subtask] = min(fewest.get(subtask, 1 + len(negatives)), 1 + len(negatives))
    return {subtask: 1.0 / k for subtask, k in fewest.items()}


def standard_columns(diffusion: PairScorer, clip: PairScorer, hardneg: PairScorer | None = None
                     ) -> dict[str, tuple[PairScorer, Direction]]:
    """The report's columns: DiffusionITM I2T / T2I raw / T2I normalised, optionally a HardNeg
    fine-tuned DiffusionITM (I2T, T2I normalised), and CLIP both ways."""
    columns = {"I2T": (diffusion, "i2t"), "T2I raw": (diffusion, "t2i-raw"), "T2I norm": (diffusion, "t2i")}
    if hardneg is not None:
        columns.update({"HardNeg I2T": (hardneg, "i2t"), "HardNeg T2I norm": (hardneg, "t2i")})
    columns.update({"CLIP I2T": (clip, "i2t"), "CLIP T2I": (clip, "t2i")})
    return columns


def accuracy_table(columns: dict[str, tuple[PairScorer, Direction]], draw: Draw) -> dict[str, dict[str, float]]:
    """{header: {subtask: accuracy}} for each column (header -> (scorer, direction)), plus "chance"."""
    table = {header: accuracy(scorer, draw, direction) for header, (scorer, direction) in columns.items()}
    table["chance"] = chance(draw)
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


@dataclass
class ReportConfig:
    """Options of `itm-shapes report`."""

    out: str = option(help="output path without suffix: OUT.json (every figure) and OUT.md are written",
                      identity=False)
    model: str = option("shapes", help="the diffusion model: a diffusers folder, a named or built-in model")
    lora: str | None = option(None, help="a HardNeg LoRA folder for the model (adds its columns)")
    n: int = option(100, help="examples per subtask and split")
    samples: int = option(10, help="stratified noise draws per pair")
    seed: int = option(0, help="seed of the examples and of the noise draws")
    subtasks: tuple[str, ...] | None = option(None, help=(
        "report these subtasks only, comma-separated (each split scores those it has; a draw of some subtasks "
        "holds other examples than the draw of all); default: every subtask"))

    def __post_init__(self) -> None:
        if self.subtasks is not None:
            self.subtasks = tuple(self.subtasks)
            unknown = [s for s in self.subtasks if s not in ALL_SUBTASKS]
            if unknown or not self.subtasks:
                raise ValueError(f"--subtasks must name some of {', '.join(ALL_SUBTASKS)}, got {list(self.subtasks)}")


def write_report(config: ReportConfig, command: str) -> dict:
    """Score every split of `SPLITS`, print their tables, write OUT.json and OUT.md; returns the report."""
    from itm_engine.clip import ClipModel
    from itm_engine.scoring import DiffusionITM
    from itm_engine.shapesworld import CLIP

    start = time.perf_counter()
    protocol = lab_protocol(config.samples, config.seed)
    base = DiffusionITM.from_pretrained(config.model, progress=False, protocol=protocol)
    clip = ClipModel.from_name(CLIP, pretrained="bundled").scorer()
    tuned = (DiffusionITM.from_pretrained(config.model, lora=config.lora, progress=False, protocol=protocol)
             if config.lora else None)
    columns = standard_columns(base, clip, tuned)
    tables, text = {}, []
    for name in SPLITS:
        draw = split_draw(name, config.n, config.seed, config.subtasks)
        if draw is None:
            continue
        tables[name] = accuracy_table(columns, draw)
        text.append(format_table(f"{SPLIT_TITLES[name]}, {config.n} examples per subtask", tables[name]))
        print(text[-1] + "\n", flush=True)
    report = {
        "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
        "versions": versions(), **{k: v for k, v in asdict(config).items() if k != "out"},
        "schedule": "stratified", "seconds": round(time.perf_counter() - start, 1), "accuracy": tables,
    }
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    body = "\n\n".join(f"```\n{t}\n```" for t in text)
    output_file(out, ".md").write_text(
        f"# ShapesWorld accuracy\n\n`{report['command']}` on {report['date']}, {report['machine']['platform']}, "
        f"{report['seconds']} s. {config.samples} stratified noise draws per pair, seed {config.seed}; the true "
        f"candidate must score strictly highest.\n\n{body}\n")
    print(f"wrote {output_file(out, '.json')} and {output_file(out, '.md')}", file=sys.stderr)
    return report



