"""What a timestep weighting buys on ShapesWorld: accuracy against draws per candidate, in one run.

    python benchmarks/weighting_shapes.py --n 30 --fit-n 16 --out benchmarks/results/weighting-shapes

Image->text with 10 candidate captions per image (the positive, its hard negatives, then captions of
other examples of the same subtask: `adaptive_shapes.ten_candidates`), the bundled model, for the
exact renderer and the varied one (a domain gap: the model was trained mostly on exact images).
Per renderer:

- the weighting is learnt (`itm_engine.fit_timestep_weights`) on the ShapesWorld *val* split
  (`--fit-n` examples per subtask, half to fit, half to choose), 30 stratified draws;
- every weighting is reported on the *test* split (`--n` per subtask) at 2, 5, 10 and 30 draws per
  candidate: uniform random timesteps, stratified timesteps (the engine's default), stratified with
  the learnt weights, stratified with the training-free logit-normal curve, and adaptive
  elimination on top of the learnt weights with a budget of 30 (its draws per candidate are an
  average).

All test rows of one draw count share one bank per schedule, so the weightings differ only in how
they average the same per-draw scores. Writes OUT.json (every figure, with command, date, machine and
versions) and OUT.md (the table).
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
from adaptive_shapes import ten_candidates

from itm_engine.evaluate import example_pairs
from itm_engine.fit_timestep_weights import FitConfig, fit_weights, labelled_draws
from itm_engine.protocols import Protocol
from itm_engine.scoring import DiffusionITM
from itm_engine.storage import output_file
from itm_engine.tasks.base import Example
from itm_engine.timestep_weights import UNIFORM, named_knots, weights_at

DRAWS = (2, 5, 10, 30)
POLICIES = ("2:3,30:1", "auto:z=2")


def examples(split: str, n: int, seed: int, style: str) -> list[Example]:
    """ShapesWorld examples with 10 candidate captions (the true one first, label 0), drawn in `style`."""
    return [Example(id=f"{subtask}/{k}", images=(image,), texts=tuple(captions), label=0, meta={"subtask": subtask})
            for subtask, rows in ten_candidates(split, n, seed, style=style).items()
            for k, (image, captions) in enumerate(rows)]


def accuracy_of(scores: torch.Tensor) -> float:
    """Mean over examples of [the first candidate scores strictly highest]; scores [N, 10]."""
    return float((scores[:, :1] > scores[:, 1:]).all(1).double().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--n", type=int, default=30, help="test examples per subtask")
    parser.add_argument("--fit-n", type=int, default=16, help="val-split examples per subtask to fit and choose on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--styles", default="exact,varied")
    parser.add_argument("--out", required=True, help="output path without suffix (.json, .md)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    scorer = DiffusionITM.from_pretrained(args.model, progress=False)
    base = Protocol(seed=args.seed)
    report: dict = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                    "versions": {"torch": torch.__version__, "python": platform.python_version()},
                    "model": args.model, "n_per_subtask": args.n, "fit_n_per_subtask": args.fit_n, "styles": {}}
    for style in args.styles.split(","):
        fit_examples = examples("val", args.fit_n, args.seed, style)
        fit_draws = labelled_draws(scorer, fit_examples, "i2t", base.replace(samples=30))
        order = random.Random(args.seed).sample(range(len(fit_examples)), len(fit_examples))
        train, val = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2:])
        knots, fit_record = fit_weights(fit_draws, train, val, [], FitConfig(out="", train=len(train), val=len(val)),
                                        base.ties)
        learnt = knots or UNIFORM
        print(f"{style}: chose {fit_record['chosen']} (train {fit_record['sizes']['train']}, "
              f"val {fit_record['sizes']['val']})", flush=True)

        test = examples("test", args.n, args.seed, style)
        images, texts, pairs, _ = example_pairs(test)
        candidates = [list(ex.texts) for ex in test]
        rows: dict[str, dict[int, float]] = {}
        for S in DRAWS:
            for schedule in ("uniform", "stratified"):
                proto = base.replace(samples=S, schedule=schedule)
                draws = scorer.draw_scores(images, texts, pairs, "i2t", protocol=proto).view(len(test), 10, -1)
                if schedule == "uniform":
                    rows.setdefault("uniform timesteps", {})[S] = accuracy_of(draws.mean(-1))
                    continue
                rows.setdefault("stratified", {})[S] = accuracy_of(draws.mean(-1))
                u = scorer.noise_bank(protocol=proto).timesteps.double() / 1000
                for name, curve in (("stratified + learnt weights", learnt),
                                    ("stratified + logit-normal", named_knots("logit-normal"))):
                    w = weights_at(curve, u).float()
                    rows.setdefault(name, {})[S] = accuracy_of((draws * w).mean(-1))
            print(f"{style} S={S}: " + ", ".join(f"{k} {100 * v[S]:.1f}%" for k, v in rows.items()), flush=True)
        bank = scorer.noise_bank(30, args.seed, "stratified").spread()
        adaptive = {}
        for policy in POLICIES:
            result = scorer.score_adaptive(images, candidates, policy, noise=bank, samples=30,
                                           timestep_weights=learnt)
            per_candidate = float(result.draws.double().mean())
            adaptive[policy] = {"accuracy": accuracy_of(result.ranking_scores), "draws_per_candidate": per_candidate}
            print(f"{style} adaptive {policy}: {100 * adaptive[policy]['accuracy']:.1f}% at "
                  f"{per_candidate:.1f} draws per candidate", flush=True)
        report["styles"][style] = {"fit": fit_record, "knots": learnt, "rows": rows, "adaptive": adaptive}
    report["seconds"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Timestep weightings on ShapesWorld (image->text, 10 candidates)\n",
             f"`{report['command']}` on {report['date']}, {report['machine']['platform']}, {report['seconds']} s. "
             f"Test split, {args.n} examples per subtask (7 subtasks); weights learnt on the val split "
             f"({args.fit_n} per subtask: half to fit, half to choose), 30 stratified draws.\n"]
    for style, result in report["styles"].items():
        sizes = result["fit"]["sizes"]
        lines += [f"## {style} renderer\n", f"Chosen on validation: {result['fit']['chosen']} "
                  f"(fit on {sizes['train']}, chosen on {sizes['val']} labelled examples).\n",
                  "| weighting | " + " | ".join(f"{S} draws" for S in DRAWS) + " |",
                  "|---" * (1 + len(DRAWS)) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{100 * row[S]:.1f}%" for S in DRAWS) + " |"
                  for name, row in result["rows"].items()]
        lines += ["", "| adaptive elimination on the learnt weights (budget 30) | accuracy | draws per candidate |",
                  "|---|---|---|"]
        lines += [f"| `{policy}` | {100 * v['accuracy']:.1f}% | {v['draws_per_candidate']:.1f} |"
                  for policy, v in result["adaptive"].items()]
        lines.append("")
    output_file(out, ".md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
