"""ShapesWorld accuracy of the bundled model, CLIP side by side, optionally with a HardNeg LoRA.

    python benchmarks/shapes_report.py --n 100 --out benchmarks/results/shapes-accuracy \
        [--lora runs/shapes-hardneg/run/lora]

Per subtask, on the held-out test split and on the compositional split (colour-shape combinations
never seen in training): DiffusionITM image->text, text->image by raw error and null-normalised,
the same with the HardNeg LoRA when given, the bundled CLIP both ways, and chance. Writes
OUT.json (every figure, with command, date, machine, versions and wall time) and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import torch
import transformers

from itm_engine import shapes_eval
from itm_engine.data import shapes
from itm_engine.prefilter import ClipModel
from itm_engine.scoring import DiffusionITM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--lora", default=None, help="a HardNeg LoRA folder for the model (adds columns)")
    parser.add_argument("--n", type=int, default=100, help="examples per subtask and split")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    base = DiffusionITM.from_pretrained(args.model, progress=False)
    clip = ClipModel.from_name("shapes-clip", pretrained="bundled").scorer()
    tuned = DiffusionITM.from_pretrained(args.model, lora=args.lora, progress=False) if args.lora else None
    columns = shapes_eval.standard_columns(base, clip, tuned)
    tables, text = {}, []
    for split, subtasks in (("test", shapes.ALL_SUBTASKS), ("compositional", shapes.SUBTASKS)):
        examples = shapes_eval.world_examples(split, args.n, args.seed, subtasks=subtasks)
        tables[split] = shapes_eval.accuracy_table(columns, examples, args.samples, args.seed)
        text.append(shapes_eval.format_table(f"{split} split, {args.n} examples per subtask", tables[split]))
        print(text[-1] + "\n", flush=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "model": args.model, "lora": args.lora, "n": args.n, "samples": args.samples, "seed": args.seed,
        "schedule": "stratified", "seconds": round(time.perf_counter() - start, 1), "accuracy": tables,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    body = "\n\n".join(f"```\n{t}\n```" for t in text)
    out.with_suffix(".md").write_text(
        f"# ShapesWorld accuracy\n\n`{report['command']}` on {report['date']}, {report['machine']['platform']}, "
        f"{report['seconds']} s. {args.samples} stratified noise draws per pair, seed {args.seed}; the true "
        f"candidate must score strictly highest.\n\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
