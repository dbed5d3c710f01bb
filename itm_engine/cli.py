"""Console entry points: `itm-eval`, `itm-bench`, `itm-train` and the ShapesWorld lab's `itm-shapes`.

Also runnable as `python -m itm_engine.cli eval ...`, which is how `accelerate launch -m
itm_engine.cli ...` starts the distributed commands.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"bench": "itm_engine.bench", "eval": "itm_engine.evaluate", "train": "itm_engine.hardneg.train",
            "shapes": "itm_engine.shapesworld.cli"}
# `itm-train pretrain|pretrain-clip --world shapes`, the lab's commands before `itm-shapes`: kept for
# one release, with a deprecation message
DEPRECATED_TRAIN = ("pretrain", "pretrain-clip")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m itm_engine.cli {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    if argv[0] == "train":
        return train_command(argv[1:])
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


def bench_command() -> int:
    return importlib.import_module(COMMANDS["bench"]).main()


def eval_command() -> int:
    return importlib.import_module(COMMANDS["eval"]).main()


def train_command(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DEPRECATED_TRAIN:
        rest = argv[1:]
        for spelling in ("--world=shapes", "--world shapes"):  # the only world there is
            words = spelling.split(" ")
            for i in range(len(rest) - len(words) + 1):
                if rest[i:i + len(words)] == words:
                    rest = rest[:i] + rest[i + len(words):]
                    break
        print(f"itm-train {argv[0]} is deprecated and will be removed in the next release: "
              f"use `itm-shapes {argv[0]}`", file=sys.stderr)
        return shapes_command([argv[0], *rest])
    if argv and argv[0] == "timestep-weights":
        return importlib.import_module("itm_engine.fit_timestep_weights").main(argv[1:])
    return importlib.import_module(COMMANDS["train"]).main(argv)


def shapes_command(argv: list[str] | None = None) -> int:
    return importlib.import_module(COMMANDS["shapes"]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
