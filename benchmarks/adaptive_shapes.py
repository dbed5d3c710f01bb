"""Accuracy against UNet items: adaptive successive elimination on ShapesWorld, in one run.

    python benchmarks/adaptive_shapes.py --n 50 --out benchmarks/results/adaptive-shapes

Image->text with 10 candidate captions per image (the positive, its hard negatives, then captions
of other held-out examples of the same subtask), the bundled model, 10 stratified draws as the
full budget. Every policy uses the same noise bank (`NoiseBank.spread` order), so the full run and
each schedule differ only in which (candidate, draw) items they compute. Writes OUT.json (every
figure, with command, date, machine and versions), OUT.md (the table) and OUT.png (accuracy vs
UNet items).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from itm_engine.scoring import DiffusionITM
from itm_engine.shapesworld import world
from itm_engine.storage import output_file

POLICIES = ("2:3,10:1", "2:2,10:1", "1:4,4:2,10:1", "auto:z=3", "auto:z=2")


def ten_candidates(split: str, n: int, seed: int, k: int = 10, style: str = "exact") -> dict[str, list[tuple]]:
    """{subtask: [(image, [k captions, the true one first])]} from `split`, images drawn by the
    renderer `style` (`world.Draw`)."""
    examples: dict[str, list[tuple]] = {}
    draw = world.Draw(split, n, seed, subtasks=world.SUBTASKS, style=style)
    for subtask, scene, negatives in world.draw_scenes(draw):
        examples.setdefault(subtask, []).append((scene, negatives))
    rng = random.Random(seed)
    out = {}
    for subtask, rows in examples.items():
        pool = [world.caption(scene, subtask) for scene, _ in rows]
        out[subtask] = []
        for scene, negatives in rows:
            captions = list(dict.fromkeys([world.caption(s, subtask) for s in (scene, *negatives)]))
            others = [c for c in dict.fromkeys(pool) if c not in captions]
            captions += rng.sample(others, k - len(captions))
            out[subtask].append((draw.render(scene, f"{subtask}_{len(out[subtask]):05d}"), captions))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--n", type=int, default=50, help="held-out examples per subtask")
    parser.add_argument("--samples", type=int, default=10, help="the full budget: draws per candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=";".join(POLICIES), help="';'-separated adaptive policies")
    parser.add_argument("--out", required=True, help="output path without suffix (.json, .md, .png)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    scorer = DiffusionITM.from_pretrained(args.model, progress=False)
    work = ten_candidates("test", args.n, args.seed)
    bank = scorer.noise_bank(args.samples, args.seed, "stratified").spread()
    runs: dict[str, dict] = {}
    for policy in ("full", *args.policies.split(";")):
        per_subtask, items, full_items, seconds = {}, 0, 0, 0.0
        for subtask, rows in work.items():
            images, candidates = [r[0] for r in rows], [r[1] for r in rows]
            scorer.clear_cache()
            start = time.perf_counter()
            if policy == "full":
                scores = scorer.score_candidates(images, candidates, noise=bank)
                used = full = scorer.last_stats.unet_items
            else:
                result = scorer.score_adaptive(images, candidates, policy, noise=bank, samples=args.samples)
                scores, used, full = result.ranking_scores, result.unet_items, result.full_items
            seconds += time.perf_counter() - start
            correct = (scores[:, :1] > scores[:, 1:]).all(1).float().mean().item()
            per_subtask[subtask] = {"accuracy": correct, "unet_items": used}
            items, full_items = items + used, full_items + full
        accuracy = sum(v["accuracy"] for v in per_subtask.values()) / len(per_subtask)
        runs[policy] = {"accuracy": accuracy, "unet_items": items, "full_items": full_items,
                        "savings": full_items / items, "seconds": round(seconds, 1), "subtasks": per_subtask}
        print(f"{policy:<14} accuracy {100 * accuracy:5.1f}%  UNet items {items:7d}  "
              f"({full_items / items:.2f}x fewer than the full budget)  {seconds:6.1f} s", flush=True)

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "model": args.model, "n_per_subtask": args.n, "candidates": 10, "samples": args.samples, "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1), "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    subtasks = list(work)
    lines = ["| policy | mean accuracy | UNet items | fewer than full | " + " | ".join(subtasks) + " |",
             "|---" * (4 + len(subtasks)) + "|"]
    for policy, run in runs.items():
        lines.append(f"| `{policy}` | {100 * run['accuracy']:.1f}% | {run['unet_items']} | {run['savings']:.2f}x | "
                     + " | ".join(f"{100 * run['subtasks'][s]['accuracy']:.0f}%" for s in subtasks) + " |")
    output_file(out, ".md").write_text(
        f"# Adaptive elimination on ShapesWorld (image->text, 10 candidates)\n\n`{report['command']}` on "
        f"{report['date']}, {report['machine']['platform']}. {args.n} held-out examples per subtask, full budget "
        f"{args.samples} stratified draws per candidate, seed {args.seed}.\n\n" + "\n".join(lines) + "\n")
    _plot(output_file(out, ".png"), runs)
    return 0


def _plot(path: Path, runs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, run in runs.items():
        ax.scatter(run["unet_items"], 100 * run["accuracy"], s=40)
        ax.annotate(policy, (run["unet_items"], 100 * run["accuracy"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("UNet items")
    ax.set_ylabel("mean accuracy over subtasks (%)")
    ax.set_title("ShapesWorld image->text, 10 candidates: accuracy vs compute", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
