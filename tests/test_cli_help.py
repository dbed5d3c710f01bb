"""Every console command's --help lists every option of its dataclasses with its default (the
options are declared once, in the dataclasses, and `itm_engine.options` turns them into flags)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from itm_engine import bench, cli, evaluate, fit_timestep_weights
from itm_engine.hardneg import train
from itm_engine.shapesworld import cli as shapes_cli


def expected_default(field: dataclasses.Field) -> str | None:
    """How --help must show the field's default; None for a required flag."""
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return None
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, tuple) and all(isinstance(v, (int, float, str)) for v in value):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, (tuple, list, dict)) else str(value)


def option_help(text: str, flag: str) -> str:
    """The help of `flag` in --help output `text` (printed wide: an option's help is on its line, or
    on the next when the flag and its metavar are long), whitespace normalised."""
    blocks: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            blocks.append(line)
        elif blocks and line.startswith("   "):
            blocks[-1] += line
    found = [" ".join(b.split()) for b in blocks if b.startswith((f"  {flag} ", f"  {flag},")) or b == f"  {flag}"
             or b.startswith(f"  {flag}   ")]
    assert len(found) == 1, (flag, found)
    return found[0]


COMMANDS = {
    "itm-eval": (evaluate.main, [], (evaluate.EvalConfig, evaluate.EvalRun)),
    "itm-train": (train.main, [], (train.TrainConfig, train.TrainRun)),
    "itm-train timestep-weights": (fit_timestep_weights.main, [], (fit_timestep_weights.FitConfig,)),
    "itm-bench": (bench.main, [], (bench.BenchConfig,)),
    **{f"itm-shapes {name}": (shapes_cli.main, [name], classes)
       for name, (_, classes, _) in shapes_cli.COMMANDS.items()},
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_option_with_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: argparse wraps long words at hyphens
    main, prefix, classes = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_info:
        main([*prefix, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    fields = [f for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("cli")]
    assert fields
    for field in fields:
        flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
        shown = option_help(text, flag)
        assert " ".join(field.metadata["help"].split()) in shown, (command, flag)
        default = expected_default(field)
        if default is None:
            assert "(default" not in shown, (command, flag)
        else:
            assert shown.endswith(f"(default: {default})"), (command, flag, shown)


def test_itm_shapes_lists_its_commands(capsys):
    with pytest.raises(SystemExit):
        shapes_cli.main(["--help"])
    text = capsys.readouterr().out
    for name in ("write", "pretrain", "pretrain-clip", "bundle", "report", "demo"):
        assert f"    {name}" in text


def test_python_m_cli_dispatches_every_command(capsys):
    for name in ("eval", "bench", "train", "shapes"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
    assert cli.main(["nope"]) == 2 and "usage" in capsys.readouterr().err
