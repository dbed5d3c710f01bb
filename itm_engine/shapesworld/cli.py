"""`itm-shapes`: the ShapesWorld lab's command.

    itm-shapes write --out DIR [--split test --n 50 ...]    a data root for itm-eval --task shapes*
    itm-shapes pretrain --out DIR [recipe options]          the latent diffusion model, from scratch
    itm-shapes pretrain-clip --out DIR                      the tiny CLIP baseline
    itm-shapes bundle --run DIR --clip DIR [--accuracy F]   install them as the bundled models
    itm-shapes report --out PATH [--n 100 --lora DIR]       accuracy per subtask, CLIP side by side
    itm-shapes demo                                         `make demo`
    itm-shapes selfbench --out DIR [--n 50 --guidance 5]    Self-Bench: the model's own drawings, judged and scored

`itm-shapes COMMAND --help` lists every option of a command with its default.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Literal

from itm_engine import options
from itm_engine.options import option
from itm_engine.shapesworld import bundle, demo, pretrain, pretrain_clip, report, selfbench, world


@dataclass
class WriteConfig:
    """Options of `itm-shapes write`."""

    out: str = option(help="the data root to write (images/ + examples.json)")
    split: Literal["train", "val", "test", "compositional"] = option("test", help="the split to draw from")
    n: int = option(50, help="examples per subtask")
    seed: int = option(0, help="seed of the draw")
    size: int = option(64, help="image side in pixels")
    subtasks: tuple[str, ...] = option(world.ALL_SUBTASKS, help="comma-separated subtasks to write")
    style: str = option("exact", help="the renderer: 'exact', or 'varied' (each image its own background grey, "
                                      "colour shades, object sizes and anti-aliased edges; world.Style)")
    negclip: bool = option(False, help="also write negclip.tsv (HardNeg training data for itm-train --data)")


def _write(args: argparse.Namespace, argv: list[str]) -> int:
    config = options.from_args(WriteConfig, args)
    root = world.write_shapesworld(config.out, config.split, config.n, config.seed, config.size, config.subtasks,
                                   config.style)
    print(f"wrote {config.n * len(config.subtasks)} {config.split} examples to {root}")
    if config.negclip:
        print(f"wrote {world.write_negclip_tsv(root)}")
    return 0


def _pretrain(args: argparse.Namespace, argv: list[str]) -> int:
    return pretrain.pretrain_command(options.from_args(pretrain.PretrainConfig, args),
                                     options.from_args(pretrain.PretrainRun, args))


def _pretrain_clip(args: argparse.Namespace, argv: list[str]) -> int:
    return pretrain_clip.clip_command(options.from_args(pretrain_clip.ClipPretrainConfig, args),
                                      options.from_args(pretrain_clip.ClipPretrainRun, args))


def _bundle(args: argparse.Namespace, argv: list[str]) -> int:
    bundle.bundle(options.from_args(bundle.BundleConfig, args))
    return 0


def _report(args: argparse.Namespace, argv: list[str]) -> int:
    report.write_report(options.from_args(report.ReportConfig, args), " ".join(["itm-shapes", *argv]))
    return 0


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    return demo.run_demo(options.from_args(demo.DemoConfig, args))


def _selfbench(args: argparse.Namespace, argv: list[str]) -> int:
    selfbench.run_selfbench(options.from_args(selfbench.SelfBenchConfig, args), " ".join(["itm-shapes", *argv]))
    return 0


# name -> (description, option dataclasses, what runs the command from the parsed flags and argv)
COMMANDS: dict[str, tuple[str, tuple[type, ...], Callable[[argparse.Namespace, list[str]], int]]] = {
    "write": ("write a ShapesWorld split as a data root for itm-eval --task shapes*", (WriteConfig,), _write),
    "pretrain": ("train the small latent diffusion model from scratch",
                 (pretrain.PretrainConfig, pretrain.PretrainRun), _pretrain),
    "pretrain-clip": ("train the tiny CLIP baseline on the same scenes",
                      (pretrain_clip.ClipPretrainConfig, pretrain_clip.ClipPretrainRun), _pretrain_clip),
    "bundle": ("install trained runs as the bundled models and write the model card", (bundle.BundleConfig,),
               _bundle),
    "report": ("accuracy per subtask on the test and compositional splits, CLIP side by side",
               (report.ReportConfig,), _report),
    "demo": ("the bundled models on held-out examples, the engine against the research loop (make demo)",
             (demo.DemoConfig,), _demo),
    "selfbench": ("Self-Bench: the model draws the test captions, a judge marks the right drawings, the model "
                  "scores them image->text against the rendered examples' hard negatives",
                  (selfbench.SelfBenchConfig,), _selfbench),
}


def build_parser(prog: str = "itm-shapes") -> argparse.ArgumentParser:
    parser = options.parser(prog, __doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (description, classes, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=description, description=description,
                                  formatter_class=parser.formatter_class)
        for cls in classes:
            options.add_options(sub, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args, argv)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"itm-shapes {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
