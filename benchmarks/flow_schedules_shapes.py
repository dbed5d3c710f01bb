"""Which timesteps a flow-matching model should be scored at: image->text accuracy on ShapesWorld
for each timestep distribution, over draw seeds.

    python benchmarks/flow_schedules_shapes.py --model runs/shapes-flow/model --n 50 --draws 10 \
        --seeds 0,1,2 --out benchmarks/results/flow-schedules-shapes

Image->text with 10 candidate captions per image (the positive, its hard negatives, then captions of
other examples of the same subtask: `adaptive_shapes.ten_candidates`) on the ShapesWorld *test*
split (`--n` examples per subtask, exact renderer), a flow-matching model (`itm-shapes pretrain
--prediction-type flow`: x_t = (1 - sigma) z0 + sigma eps, timestep T sigma). Per draw count S and
draw seed, the schedules (`Protocol.schedule`, positions on the scheduler's training grid, so with
shift 1 uniform in sigma):

- "stratified": midpoints T // S // 2 + k (T // S), sigma = 0.05, 0.15, ..., 0.95 for S = 10 (the
  engine's default for every model);
- "uniform": S uniform random grid positions (sigma uniform);
- "stratified + logit-normal": the stratified draws weighted by SD3's training density of sigma
  (`Protocol.timestep_weights="logit-normal"`, `itm_engine.timestep_weights`);
- "jeong2025": Jeong et al.'s positions for SD3, T - 1 - i for i in range(20, T - 20, T // S);
- "stratified, SD3's shift 3": the stratified sigmas moved as SD3's grid moves them,
  3 sigma / (1 + 2 sigma) (more noise), with the stratified row's noise.

The weighted row reuses the stratified row's per-draw scores (the same draws; only the average
differs). Mean and standard deviation over seeds. Writes OUT.json (every figure, with command, date,
machine and versions) and OUT.md (the table).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from weighting_shapes import accuracy_of, examples

from itm_engine.noise import NoiseBank
from itm_engine.protocols import Protocol
from itm_engine.scoring import DiffusionITM
from itm_engine.storage import output_file
from itm_engine.timestep_weights import weights_at

ROWS = ("stratified", "uniform", "stratified + logit-normal", "jeong2025", "stratified, SD3's shift 3")
SD3_SHIFT = 3.0


def schedule_accuracies(scorer: DiffusionITM, images: list, candidates: list[list[str]],
                        protocol: Protocol) -> dict[str, float]:
    """Accuracy of each of `ROWS` with `protocol`'s samples and seed, on `images` with 10
    `candidates` each (the true one first)."""
    texts = [c for cs in candidates for c in cs]
    pairs = [(i, 10 * i + j) for i in range(len(images)) for j in range(10)]
    T = scorer.components.process.num_train_timesteps
    stratified = scorer.noise_bank(protocol=protocol.replace(schedule="stratified"))
    sigma = stratified.timesteps.double() / T
    shifted = NoiseBank.from_tensors(T * SD3_SHIFT * sigma / (1 + (SD3_SHIFT - 1) * sigma), stratified.noise)
    out = {}
    for row, schedule, bank in (("stratified", "stratified", None), ("uniform", "uniform", None),
                                ("jeong2025", "jeong2025", None), ("stratified, SD3's shift 3", "stratified", shifted)):
        draws = scorer.draw_scores(images, texts, pairs, "i2t", noise=bank,
                                   protocol=protocol.replace(schedule=schedule)).view(len(images), 10, -1)
        out[row] = accuracy_of(draws.mean(-1))
        if row == "stratified":
            w = weights_at(protocol.replace(timestep_weights="logit-normal").timestep_weights, sigma).float()
            out["stratified + logit-normal"] = accuracy_of((draws * w).mean(-1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a flow-matching ShapesWorld model folder")
    parser.add_argument("--n", type=int, default=20, help="test examples per subtask")
    parser.add_argument("--draws", default="10", help="comma-separated draw counts S")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated draw seeds")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the test examples and candidates")
    parser.add_argument("--out", required=True, help="output path without suffix (.json, .md)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    scorer = DiffusionITM.from_pretrained(args.model, progress=False)
    process = scorer.components.process
    if process.kind != "flow":
        parser.error(f"{args.model} is a {process.kind!r} model, not a flow-matching one")
    draw_counts = [int(s) for s in args.draws.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    test = examples("test", args.n, args.data_seed, "exact")
    images = [ex.images[0] for ex in test]
    candidates = [list(ex.texts) for ex in test]
    report: dict = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                    "versions": {"torch": torch.__version__, "python": platform.python_version()},
                    "model": args.model, "scheduler": dict(scorer.components.scheduler.config),
                    "n_per_subtask": args.n, "examples": len(test), "seeds": seeds, "accuracy": {}}
    for S in draw_counts:
        per_seed = {row: [] for row in ROWS}
        for seed in seeds:
            result = schedule_accuracies(scorer, images, candidates, Protocol(samples=S, seed=seed))
            for row in ROWS:
                per_seed[row].append(result[row])
            print(f"S={S} seed {seed}: " + ", ".join(f"{row} {100 * result[row]:.1f}%" for row in ROWS), flush=True)
        report["accuracy"][str(S)] = {
            row: {"per_seed": values, "mean": statistics.fmean(values),
                  "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            for row, values in per_seed.items()}
    report["seconds"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    shift = report["scheduler"].get("shift")
    lines = ["# Timestep distributions for a flow-matching model on ShapesWorld (image->text, 10 candidates)\n",
             f"`{report['command']}` on {report['date']}, {report['machine']['platform']}, "
             f"{report['machine']['threads']} threads, {report['seconds']} s. Model `{args.model}` "
             f"(FlowMatchEulerDiscreteScheduler, shift {shift}); test split, exact renderer, {args.n} examples "
             f"per subtask ({len(test)} in all); accuracy mean ± std over draw seeds {args.seeds}.\n",
             "| timesteps | " + " | ".join(f"{S} draws" for S in draw_counts) + " |",
             "|---" * (1 + len(draw_counts)) + "|"]
    for row in ROWS:
        cells = [report["accuracy"][str(S)][row] for S in draw_counts]
        lines.append(f"| {row} | " + " | ".join(f"{100 * c['mean']:.1f}% ± {100 * c['std']:.1f}" for c in cells)
                     + " |")
    output_file(out, ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
