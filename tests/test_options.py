"""itm_engine.options: command-line options generated from dataclasses, and the one same-configuration
check every resume path uses."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from itm_engine import options
from itm_engine.options import option


def _split(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


@dataclass
class Example:
    name: str = option(help="required: no default")
    count: int = option(3, help="an integer")
    rate: float | None = option(None, help="an optional float")
    mode: Literal["fast", "exact"] = option("exact", help="a choice")
    widths: tuple[int, ...] = option((32, 64), help="comma-separated integers")
    weights: dict = option(default_factory=lambda: {"a": 1.0}, help="a JSON object")
    flag: bool = option(False, help="a switch")
    labels: list = option(default_factory=list, flag="--label", append=True, convert=lambda given: sorted(given),
                          help="repeatable")
    custom: str = option("x,y", parse=str.upper, help="parsed by its own function, 100% of the time")
    out: str | None = option(None, identity=False, help="where results go")
    internal: int = option(7, cli=False, help="set by code only")


def _parse(argv: list[str]) -> Example:
    parser = options.parser("prog", "a test command")
    options.add_options(parser, Example)
    return options.from_args(Example, parser.parse_args(argv))


def test_flags_types_and_defaults_come_from_the_fields():
    config = _parse(["--name", "n"])
    assert config == Example(name="n")  # every default as declared, the tuple and dict parsed back from their text
    config = _parse(["--name", "n", "--count", "5", "--rate", "0.5", "--mode", "fast", "--widths", "8,16,32",
                     "--weights", '{"b": 2}', "--flag", "--label", "z", "--label", "a", "--custom", "q",
                     "--out", "o"])
    assert (config.count, config.rate, config.mode, config.widths, config.weights, config.flag) == \
        (5, 0.5, "fast", (8, 16, 32), {"b": 2}, True)
    assert config.labels == ["a", "z"] and config.custom == "Q" and config.out == "o" and config.internal == 7
    assert _parse(["--name", "n", "--flag", "--no-flag"]).flag is False


@pytest.mark.parametrize("argv", [
    [],                                          # the required flag missing
    ["--name", "n", "--count", "x"],             # not an integer
    ["--name", "n", "--mode", "slow"],           # not a choice
    ["--name", "n", "--widths", "8,x"],          # not comma-separated integers
    ["--name", "n", "--weights", "{not json"],   # not JSON
    ["--name", "n", "--internal", "3"],          # no flag for a code-only field
])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2 and "error" in capsys.readouterr().err


def test_a_field_type_without_a_command_line_form_is_an_error():
    @dataclass
    class Bad:
        value: set = option(default_factory=set, help="no form")

    with pytest.raises(TypeError, match="no command-line form"):
        options.add_options(argparse.ArgumentParser(), Bad)


def test_identity_leaves_out_what_does_not_change_results():
    config = Example(name="n", out="somewhere")
    record = options.identity(config)
    assert "out" not in record and record["widths"] == [32, 64] and record["internal"] == 7
    assert set(record) == {"name", "count", "rate", "mode", "widths", "weights", "flag", "labels", "custom",
                           "internal"}


def test_same_configuration_check():
    stored = options.identity(Example(name="n"))
    options.check_same_config(stored, options.identity(Example(name="n", out="elsewhere")), "run/config.json")
    with pytest.raises(ValueError, match=r"different configuration than run/config.json \(changed: count, widths\)"):
        options.check_same_config(stored, options.identity(Example(name="n", count=4, widths=(1,))), "run/config.json")
    with pytest.raises(ValueError, match=r"changed: extra"):  # a field only one side has
        options.check_same_config({**stored, "extra": 1}, stored, "x")


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("1", 1), ("64", 64)])
def test_batch_size_flag(text, value):
    assert options.parse_batch_size(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "big", ""])
def test_batch_size_flag_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'auto'"):
        options.parse_batch_size(text)


def test_fields_added_since_a_record_take_their_defaults():
    @dataclass
    class Recipe:
        lr: float = option(0.1, help="x")
        shift: float = option(1.0, help="x")
        out: str = option("o", help="x", identity=False)

    assert options.with_added_fields({"lr": 0.5}, Recipe) == {"lr": 0.5, "shift": 1.0}
    assert options.with_added_fields({"p.lr": 0.5, "p.shift": 3.0}, Recipe, "p.") == {"p.lr": 0.5, "p.shift": 3.0}
