"""Accuracy and its spread over noise seeds on ShapesWorld, per scoring protocol, in one run.

    python benchmarks/protocols_shapes.py --n 40 --seeds 0,1,2 --out benchmarks/results/protocols-shapes

The bundled model on the test split (image->text on the seven CLEVR-style subtasks, null-normalised
text->image on all eight), under each preset and under the engine's conventions with one field
changed, on the same draws budget (S = 10 per pair). The examples are fixed (draw seed 0); each
protocol seed draws other noise (and other posterior samples), so the spread over seeds is the
protocol's own variance. Writes OUT.json (every figure, with command, date, machine and versions)
and OUT.md (the table).
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

from itm_engine import protocols
from itm_engine.scoring import DiffusionITM
from itm_engine.shapesworld import report, world
from itm_engine.storage import output_file

# name -> (preset, field overrides)
PROTOCOLS = {
    "engine (the default)": ("engine", {}),
    "engine, uniform timesteps": ("engine", {"schedule": "uniform"}),
    "engine, diffusion-itm timesteps": ("engine", {"schedule": "diffusion-itm"}),
    "engine, l2 norm": ("engine", {"error": "l2"}),
    "engine, posterior sample per draw": ("engine", {"latent": "sample-per-draw"}),
    "engine, per-query noise": ("engine", {"noise": "per-query"}),
    "diffusion-itm": ("diffusion-itm", {}),
    "diffusion-classifier": ("diffusion-classifier", {}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--n", type=int, default=40, help="test examples per subtask")
    parser.add_argument("--samples", type=int, default=10, help="draws per pair")
    parser.add_argument("--seeds", default="0,1,2", help="protocol seeds (noise draws)")
    parser.add_argument("--out", required=True, help="output path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    i2t_draw = world.Draw("test", args.n, 0, subtasks=world.SUBTASKS)
    t2i_draw = world.Draw("test", args.n, 0, subtasks=world.ALL_SUBTASKS)
    results = {}
    for name, (preset, fields) in PROTOCOLS.items():
        runs = []
        for seed in seeds:
            protocol = protocols.resolve(preset, samples=args.samples, seed=seed, **fields)
            scorer = DiffusionITM.from_pretrained(args.model, protocol=protocol, progress=False)
            i2t = report.accuracy(scorer, i2t_draw, "i2t")
            t2i = report.accuracy(scorer, t2i_draw, "t2i")
            runs.append({"seed": seed, "i2t": i2t, "t2i": t2i, "i2t_mean": statistics.mean(i2t.values()),
                         "t2i_mean": statistics.mean(t2i.values())})
            last = runs[-1]
            print(f"{name:<36} seed {seed}: I2T {100 * last['i2t_mean']:.1f}%  T2I {100 * last['t2i_mean']:.1f}%",
                  flush=True)
        summary = {}
        for k in ("i2t", "t2i"):
            values = [r[f"{k}_mean"] for r in runs]
            summary[f"{k}_mean"] = statistics.mean(values)
            summary[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        results[name] = {"preset": preset, "fields": fields, "protocol": protocol.replace(seed=0).as_dict(),
                         "runs": runs, **summary}
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "model": args.model, "n_per_subtask": args.n, "samples": args.samples, "seeds": seeds,
        "seconds": round(time.perf_counter() - started, 1), "protocols": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| protocol | I2T mean (7 subtasks) | I2T std over seeds | T2I norm mean (8 subtasks) "
             "| T2I std over seeds |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['i2t_mean']:.1f}% | {100 * r['i2t_std']:.2f} | {100 * r['t2i_mean']:.1f}% "
                     f"| {100 * r['t2i_std']:.2f} |")
    output_file(out, ".md").write_text(
        f"# ShapesWorld accuracy per scoring protocol\n\n`{record['command']}` on {record['date']}, "
        f"{record['machine']['platform']}, {record['seconds']} s. Bundled model, test split, {args.n} examples per "
        f"subtask, {args.samples} draws per pair, protocol seeds {args.seeds}; std in points over the seeds.\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
