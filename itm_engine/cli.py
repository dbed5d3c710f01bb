"""Console entry points: `itm-bench`, `itm-eval` and `itm-train`.

Also runnable as `python -m itm_engine.cli bench ...`, which is how `accelerate launch -m
itm_engine.cli ...` starts the distributed commands.
"""
from __future__ import annotations

import sys

COMMANDS = {"bench": "itm_engine.bench", "eval": "itm_engine.evaluate", "train": "itm_engine.train"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m itm_engine.cli {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


def bench_command() -> int:
    from itm_engine import bench as module

    return module.main()


def eval_command() -> int:
    from itm_engine import evaluate as module

    return module.main()


def train_command() -> int:
    from itm_engine import train as module

    return module.main()


if __name__ == "__main__":
    sys.exit(main())
