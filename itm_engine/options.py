"""Command-line options declared once, as dataclasses; and the one same-configuration check.

Every console command takes its options from dataclasses whose fields carry their help text (and,
where needed, choices, flag spelling and a value parser) in their metadata, made by `option`:

    @dataclass
    class EvalConfig:
        task: str = option(help="a task name")                        # no default: a required flag
        samples: int = option(10, help="noise draws per pair")        # --samples, type int, default 10
        schedule: Literal["uniform", "stratified"] = option("uniform", help="timesteps")  # choices

`add_options(parser, EvalConfig)` adds one flag per field (the type and choices come from the
annotation: int, float, str, bool as --x/--no-x, `X | None`, `Literal[...]`, `tuple[int, ...]` as
comma-separated values, containers as JSON), and `--help` shows every default;
`from_args(EvalConfig, namespace)` builds the instance, with the field's own default for every flag
not given. Fields marked `identity=False` (where output goes, how many threads) are left out of
`identity(config)`, the record a resumed run must match (`check_same_config`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any, Callable, Mapping, Sequence

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | None = None,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    append: bool = False,
    convert: Callable[[Any], Any] | None = None,
    identity: bool = True,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default / default_factory: as `dataclasses.field`; neither makes the flag required.
        help: what the option means (the default is appended in --help).
        choices: allowed values (default: the annotation's `Literal[...]` values, if any).
        flag: the flag's spelling (default: "--" + the field name with "-" for "_").
        parse: turns the command-line string into the value (default: from the annotation).
        append: the flag may be repeated; `convert` turns the list of parsed values into the field.
        identity: False for fields that do not change the results (left out of `identity`).
        cli: False for fields set by code only (no flag).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "parse": parse,
                "append": append, "convert": convert, "identity": identity, "cli": cli}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser for a command whose options `add_options` adds."""
    return argparse.ArgumentParser(prog=prog, description=description)


def _unwrap_optional(kind: Any) -> Any:
    """X for `X | None` / `Optional[X]`, else `kind`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0]
    return kind


def _comma_separated(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None
    return parse


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None


def _parse_and_choices(kind: Any) -> tuple[Callable[[str], Any] | None, Sequence[Any] | None]:
    """How to read a value of annotation `kind` from the command line, and its choices."""
    kind = _unwrap_optional(kind)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        values = typing.get_args(kind)
        return type(values[0]), values
    if kind in (int, float, str):
        return kind, None
    if origin is tuple and typing.get_args(kind)[1:] == (Ellipsis,) and typing.get_args(kind)[0] in (int, float, str):
        return _comma_separated(typing.get_args(kind)[0]), None
    if kind in (dict, list, tuple) or origin in (dict, list, tuple):
        return _json, None
    raise TypeError(f"no command-line form for a field of type {kind!r}: give it parse=")


def _format_default(value: Any) -> str:
    """A default as it would be typed: "32,64,64" for a tuple of numbers or strings, JSON for
    other containers, else the value as text."""
    if isinstance(value, tuple) and all(isinstance(v, (int, float, str)) for v in value):
        return ",".join(map(str, value))
    if isinstance(value, (tuple, list, dict)):
        return json.dumps(value)
    return str(value)


def add_options(target: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                default_note: str | None = None, exclude: Sequence[str] = ()) -> None:
    """Add one flag per field of dataclass `cls` (see the module docstring) to `target`. A flag not
    given leaves its field out of the parsed namespace, so `from_args` keeps the field's default;
    --help shows that default, as it would be typed, or `default_note` for flags that override
    another object's fields (collected by `given`). Fields named in `exclude` get no flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False) or f.name in exclude:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        required = f.default is _MISSING and f.default_factory is _MISSING
        help_text = meta["help"]
        if default_note is not None:
            help_text += f" (default: {default_note})"
        elif not required:
            default = f.default if f.default is not _MISSING else f.default_factory()
            help_text += f" (default: {_format_default(default)})"
        common = dict(dest=f.name, help=help_text.replace("%", "%%"), required=required, default=argparse.SUPPRESS)
        kind = _unwrap_optional(hints[f.name])
        if kind is bool and not meta["append"]:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        parse, choices = _parse_and_choices(hints[f.name]) if meta["parse"] is None else (meta["parse"], None)
        if meta["append"]:
            parse = meta["parse"] or str
        target.add_argument(flag, type=parse, choices=meta["choices"] if meta["choices"] is not None else choices,
                            metavar=meta["metavar"], action="append" if meta["append"] else "store", **common)


def from_args(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of dataclass `cls` from the flags given (`add_options`; repeated flags through
    their `convert`), the fields' defaults for the rest, and `overrides` for fields with no flag."""
    given = vars(namespace)
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            fields[f.name] = overrides[f.name]
        elif f.name in given and f.metadata.get("cli", False):
            value = given[f.name]
            fields[f.name] = f.metadata["convert"](value) if f.metadata.get("convert") else value
    return cls(**fields)


def parse_batch_size(text: str) -> int | str:
    """A UNet batch size flag: a positive integer, or "auto"."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def given(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The fields of dataclass `cls` whose flags were given, as {field: value}."""
    values = vars(namespace)
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.metadata.get("cli") and f.name in values}


def identity(config: Any) -> dict:
    """The fields of dataclass `config` that determine its results, as a JSON-ready dict (fields
    declared with `identity=False` left out)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.metadata.get("identity", True)}


def with_added_fields(stored: Mapping[str, Any], cls: type, prefix: str = "") -> dict:
    """A recorded identity `stored` with each field of dataclass `cls` it lacks (named `prefix` +
    the field's name) set to the field's default: a field added since the record was written, whose
    default is what the recorded run did."""
    added = {prefix + f.name: f.default for f in dataclasses.fields(cls)
             if f.metadata.get("identity", True) and f.default is not _MISSING and prefix + f.name not in stored}
    return {**_jsonable(added), **stored}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def check_same_config(stored: Mapping[str, Any], current: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse a resume whose configuration differs from the stored one: ValueError naming `source`
    and every changed field. Both are compared as JSON (a tuple equals the list it is stored as)."""
    stored, current = _jsonable(dict(stored)), _jsonable(dict(current))
    if stored != current:
        changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
        raise ValueError(f"--resume with a different configuration than {os.fspath(source)} "
                         f"(changed: {', '.join(changed)}); use the same options or another output folder")
