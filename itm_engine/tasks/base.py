"""The task protocol shared by every benchmark loader: examples, image references, bad-data policy.

A task turns a dataset in its usual on-disk layout (or, for a task that can draw its own, examples
made in memory) into `Example`s. Each example lists images and
texts; the evaluator scores every image against every text of the example, in each score mode
the task asks for (`Task.modes`), and hands the task one `[n_images, n_texts]` matrix per example
and mode. The task then computes its metrics from those matrices (`Task.metrics`).

    i2t task (one image, k captions):  images = (img,),            texts = (c_1, ..., c_k)
    t2i task (one caption, k images):  images = (i_1, ..., i_k),   texts = (caption,)
    Winoground (2 x 2, both modes):    images = (img_0, img_1),    texts = (caption_0, caption_1)
"""
from __future__ import annotations

import abc
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import PIL.Image
import torch

from itm_engine.metrics import is_correct, winoground_by_group
from itm_engine.protocols import Protocol


class DataError(ValueError):
    """Bad or missing data; the message names the file and the row."""


class StoredImage(abc.ABC):
    """An image a dataset keeps somewhere other than a plain file of its own (a region of a file,
    a member of an archive), read when it is scored; `path` is the file that holds it."""

    path: str

    @abc.abstractmethod
    def load(self) -> PIL.Image.Image:
        """The image, read now."""


@dataclass(frozen=True)
class Crop(StoredImage):
    """A region of an image file: `box` = (left, top, right, bottom) in pixels."""

    path: str
    box: tuple[int, int, int, int]

    def load(self) -> PIL.Image.Image:
        with PIL.Image.open(self.path) as image:
            return image.convert("RGB").crop(self.box)


@dataclass(frozen=True)
class ZipMember(StoredImage):
    """An image file inside a zip archive (`path`), read from the archive without extracting it."""

    path: str
    member: str

    def load(self) -> PIL.Image.Image:
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as handle:
            with PIL.Image.open(handle) as image:
                image.load()
                return image.copy()


# an image file path (absolute, inside the data root), an image stored in one, or one in memory
ImageRef = Union[str, StoredImage, PIL.Image.Image]


def load_image_ref(ref: ImageRef) -> str | PIL.Image.Image:
    """What the scorers accept: the path or the image itself, or the stored image, read."""
    return ref.load() if isinstance(ref, StoredImage) else ref


@dataclass(frozen=True)
class Example:
    """One unit of evaluation.

    Attributes:
        id: unique and stable within the task (results are stored and resumed by it).
        images: image references, n_images >= 1.
        texts: captions, n_texts >= 1.
        label: what the task's metric needs (e.g. the index of the correct candidate).
        meta: extra fields for grouped metrics (e.g. {"tag": ...}); JSON-serialisable.
    """

    id: str
    images: tuple[ImageRef, ...]
    texts: tuple[str, ...]
    label: Any = None
    meta: dict = field(default_factory=dict)


class Task(abc.ABC):
    """A GDBench task over a local dataset folder.

    Subclasses set `name`, `modes` and `description`, implement `load_examples` and `metrics`,
    and document their on-disk layout in the class docstring. Use `self.path(relative, where)` to
    resolve every file the dataset names (it refuses paths outside the data root and handles
    missing files), the `check_*` functions of this module to read the fields of a row, and raise
    `DataError` naming the file and row (`malformed`) for any other malformed row.
    """

    name: str = ""
    modes: tuple[str, ...] = ("i2t",)  # the score matrices `metrics` needs: "i2t" and/or "t2i"
    description: str = ""
    option_names: tuple[str, ...] = ()  # the options the task takes; any other is a ValueError
    needs_root: bool = True  # False for a task that can also make its examples in memory (root None)

    def __init__(self, root: str | os.PathLike | None, skip_missing: bool = False, *,
                 protocol: Protocol | None = None, **options: Any) -> None:
        """`protocol`: the scoring protocol of the run; the task follows its tie policy (`ties`) and,
        where a benchmark's reference code made a choice, its `conventions`."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            known = ", ".join(self.option_names) if self.option_names else "this task takes none"
            raise ValueError(f"{self.name}: unknown option(s) {', '.join(unknown)}; known: {known}")
        self.root: Path | None = None
        if root is not None:
            self.root = Path(root).expanduser().resolve()
            if not self.root.is_dir():
                raise FileNotFoundError(f"{self.name}: data root {str(self.root)!r} is not a folder")
        elif self.needs_root:
            raise ValueError(f"{self.name}: a data root is needed (this task reads its examples from files)")
        self.skip_missing = skip_missing
        self.protocol = protocol or Protocol()
        self.options = options
        self.skipped: list[str] = []  # "file (row)" of every example skipped for missing data
        self._examples: list[Example] | None = None

    @property
    def examples(self) -> list[Example]:
        """All examples, loaded once; ids are checked to be unique."""
        if self._examples is None:
            examples = list(self.load_examples())
            seen: set[str] = set()
            for example in examples:
                if example.id in seen:
                    raise DataError(f"{self.name}: duplicate example id {example.id!r}")
                seen.add(example.id)
            self._examples = examples
        return self._examples

    @abc.abstractmethod
    def load_examples(self) -> Iterable[Example]:
        """Read the dataset and yield its examples (skipping, with `self.skip(...)`, those whose
        files are missing when `skip_missing` is set)."""

    @abc.abstractmethod
    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """Metrics from `scores[mode][k]`, the [n_images, n_texts] matrix of `examples[k]`
        (higher = better match). Keys are metric names ("accuracy", "R@1", "text/overall", ...)."""

    # -- helpers for metrics ----------------------------------------------------------------

    def score_matrices(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]],
                       mode: str | None = None) -> Sequence[torch.Tensor]:
        """`scores[mode]` (default: the task's first mode), checked to hold one matrix per example."""
        matrices = scores[mode or self.modes[0]]
        if len(matrices) != len(examples) or not examples:
            raise ValueError(f"{self.name}: {len(matrices)} score matrices for {len(examples)} examples")
        return matrices

    def correct(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]],
                mode: str | None = None) -> list[bool]:
        """Per example: does candidate `label` win in its (flattened) matrix, under the protocol's
        tie policy (strictly highest, or the first of the highest)?"""
        matrices = self.score_matrices(examples, scores, mode)
        return [is_correct(s.reshape(-1), ex.label, self.protocol.ties) for ex, s in zip(examples, matrices)]

    def winoground_metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]],
                           group: str) -> dict[str, float]:
        """Winoground's text, image and group scores overall and per `ex.meta[group]`
        (`metrics.winoground_by_group`), from each example's [2, 2] I2T and T2I matrices, under the
        protocol's ties."""
        i2t, t2i = (torch.stack([s.reshape(2, 2) for s in self.score_matrices(examples, scores, mode)])
                    for mode in ("i2t", "t2i"))
        return winoground_by_group(i2t, t2i, [ex.meta[group] for ex in examples], self.protocol.ties)

    # -- helpers for loaders ----------------------------------------------------------------

    def chosen_names(self, option: str, known: Sequence[str]) -> tuple[str, ...] | None:
        """The names task option `option` picks among `known` (subsets, categories, directions): a
        list, or a comma-separated string, matched without regard to case; in `known`'s order, or
        None when the option is not given. ValueError for an empty choice or an unknown name."""
        value = self.options.get(option)
        if value is None:
            return None
        names = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(s, str) and s for s in names):
            raise ValueError(f"{self.name}: option {option} must be a non-empty list of names, got {value!r}")
        spelled = {k.lower(): k for k in known}
        unknown = [s for s in names if s.lower() not in spelled]
        if unknown:
            raise ValueError(f"{self.name}: option {option}: unknown name(s) {', '.join(unknown)}; known: "
                             f"{', '.join(known)}")
        wanted = {spelled[s.lower()] for s in names}
        return tuple(k for k in known if k in wanted)

    def part_files(self, parts: Sequence[str], explicit: bool,
                   locations: Callable[[str], Sequence[str]]) -> dict[str, str]:
        """{part: file relative to the root} for each of `parts` (subsets, categories) that has a
        file: the first of `locations(part)` that exists. A part without one is left out, unless it
        was asked for by name (`explicit`): then, or when no part has a file, FileNotFoundError."""
        files = {p: next((f for f in locations(p) if (self.root / f).is_file()), None) for p in parts}
        absent = [p for p, f in files.items() if f is None]
        if (explicit and absent) or len(absent) == len(files):
            expected = ", ".join(locations(p)[0] for p in absent)
            raise FileNotFoundError(f"{self.name}: no file for {', '.join(absent)} in {self.root} (expected "
                                    f"{expected}; layout: docs/evaluation.md)")
        return {p: f for p, f in files.items() if f is not None}

    def complete_parts(self, chosen: Sequence[str] | None, known: Sequence[str],
                       files: Callable[[str], Sequence[str]]) -> list[str]:
        """The parts to load when a part needs several files (`files(part)`, relative to the root, all
        present): every one `chosen` (each must be complete), else every complete one of `known` (at
        least one must be). FileNotFoundError naming the files otherwise."""
        def complete(part: str) -> bool:
            return all((self.root / f).is_file() for f in files(part))

        if chosen is not None:
            absent = [p for p in chosen if not complete(p)]
            if absent:
                expected = ", ".join(f for p in absent for f in files(p))
                raise FileNotFoundError(f"{self.name}: {', '.join(absent)} asked for, but {self.root} lacks some of "
                                        f"{expected} (layout: docs/evaluation.md)")
            return list(chosen)
        present = [p for p in known if complete(p)]
        if not present:
            expected = ", ".join(f for p in known for f in files(p))
            raise FileNotFoundError(f"{self.name}: none of the files in {self.root}; expected some of {expected} "
                                    "(layout: docs/evaluation.md)")
        return present

    def image(self, value: Any, where: str) -> ImageRef:
        """An image a row names (its field "image"): an image made in memory as it is, else a file
        path relative to the root (`check_string`, then `path`)."""
        if isinstance(value, PIL.Image.Image):
            return value
        return self.path(check_string(value, "image", where, self.name), where)

    def real_path(self, path: str | os.PathLike) -> Path | None:
        """`path` (absolute, or relative to the data root) with every symlink followed and every `..`
        applied (`os.path.realpath`), or None when that lies outside the (equally resolved) data root
        or names no file at all (a NUL character, which the OS refuses).

        The one containment check of every file or folder a dataset names: a symlink inside the
        root that leads out of it is outside, one that stays inside is fine.
        """
        try:
            real = Path(os.path.realpath(self.root / path))
        except ValueError:  # embedded NUL
            return None
        return real if real.is_relative_to(self.root) else None

    def path(self, relative: str | os.PathLike, where: str) -> str:
        """Real absolute path of a file the dataset names, checked (`real_path`).

        Raises DataError when it resolves outside the data root, MissingData (caught by
        `examples_from`) when the file does not exist; `where` names the row for the message.
        """
        full = self.real_path(relative)
        if full is None:
            raise DataError(f"{self.name}: {where}: image path {str(relative)!r} resolves outside the data "
                            f"root {self.root} (symlinks are followed: give a --data-root that holds the files)")
        if not full.is_file():
            raise MissingData(f"{self.name}: {where}: missing image file {str(full)!r}")
        return str(full)

    def image_folder(self, value: Any, defaults: Sequence[str]) -> str:
        """The image folder, relative to the root: option `value` (checked to be a folder inside
        the root, `real_path`), else the first of `defaults` that exists (else the first of them)."""
        if value is None:
            return next((d for d in defaults if (self.root / d).is_dir()), defaults[0])
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{self.name}: option image_dir must be a folder path, got {value!r}")
        folder = self.real_path(value)
        if folder is None or not folder.is_dir():
            raise ValueError(f"{self.name}: option image_dir {str(value)!r} is not a folder inside {self.root}")
        return str(folder.relative_to(self.root))

    def examples_from(self, rows: Iterable[tuple[str, Any]], build) -> Iterable[Example]:
        """Yield `build(row)` for each (where, row); a row whose files are missing stops the run
        with a DataError, or with `skip_missing` is skipped and recorded in `self.skipped`."""
        for where, row in rows:
            try:
                yield build(row)
            except MissingData as err:
                if not self.skip_missing:
                    raise DataError(f"{err} (use --skip-missing to skip such rows)") from None
                self.skipped.append(str(err))

    def read_json(self, relative: str) -> Any:
        """Parse a JSON file of the dataset; errors name the file."""
        file = self.root / relative
        if not file.is_file():
            raise FileNotFoundError(f"{self.name}: expected {str(file)!r} (layout: docs/evaluation.md)")
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{self.name}: {file}: not valid JSON ({err})") from None

    def read_jsonl(self, relative: str) -> list[tuple[str, dict]]:
        """(where, row) for each line of a JSON-lines file; `where` is "file:line"."""
        file = self.root / relative
        if not file.is_file():
            raise FileNotFoundError(f"{self.name}: expected {str(file)!r} (layout: docs/evaluation.md)")
        rows = []
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{file.name}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{self.name}: {file.name} line {number}: malformed row ({err})") from None
        return rows


class MissingData(Exception):
    """A file a row names does not exist (turned into DataError or a skip by `examples_from`)."""


# -- checking the rows of a dataset ---------------------------------------------------------------
#
# Every check names `task` (when given) and `where` (the file and row) in its DataError, in one form:
# "TASK: WHERE: malformed row: PROBLEM" (`malformed`), a field's problem as "FIELD must be WHAT, got
# VALUE" (`wrong_field`). The `check_*` functions return the value they checked (as the type they
# promise), so a loader reads each field through one of them.


def malformed(where: str, problem: str, task: str | None = None) -> DataError:
    """The DataError of a malformed row: "TASK: WHERE: malformed row: PROBLEM" (no "TASK: " without `task`)."""
    return DataError(f"{task}: {where}: malformed row: {problem}" if task else f"{where}: malformed row: {problem}")


def wrong_field(value: Any, name: str, expected: str, where: str, task: str | None = None) -> DataError:
    """The DataError of a field with a bad value: "... malformed row: NAME must be EXPECTED, got VALUE"
    (its repr, cut at 80 characters)."""
    shown = repr(value)
    return malformed(where, f"{name} must be {expected}, got {shown if len(shown) <= 80 else shown[:77] + '...'}",
                     task)


def require(row: Any, keys: Sequence[str], where: str, task: str | None = None) -> None:
    """Raise DataError unless `row` is a dict with all `keys`; the message names `task` (when
    given) and `where` (file and row)."""
    if not isinstance(row, dict):
        raise malformed(where, f"expected an object, got {type(row).__name__}", task)
    missing = [k for k in keys if k not in row]
    if missing:
        raise malformed(where, f"missing field(s) {', '.join(missing)}", task)


def check_string(value: Any, name: str, where: str, task: str | None = None) -> str:
    """`value` (field `name` of the row `where`), checked to be a string with a non-space character."""
    if not isinstance(value, str) or not value.strip():
        raise wrong_field(value, name, "a non-empty string", where, task)
    return value


def check_id(value: Any, name: str, where: str, task: str | None = None) -> str:
    """`value` as an id: a non-empty string as it is, an integer (not a bool) in decimal, so that
    7 and "7" are the same id."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise wrong_field(value, name, "a non-empty string or an integer", where, task)
    return value


def check_int(value: Any, name: str, where: str, task: str | None = None, *, low: int | None = None,
              high: int | None = None) -> int:
    """`value` as an integer: an int (not a bool), or a string of ASCII digits (a column of a text
    or CSV file, a key of a JSON object); checked to lie in [low, high] where given."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        number = None
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        if low is not None and high is not None:
            expected = f"an integer from {low} to {high}"
        elif low is not None or high is not None:
            expected = f"an integer >= {low}" if low is not None else f"an integer <= {high}"
        else:
            expected = "an integer"
        raise wrong_field(value, name, expected, where, task)
    return number


def check_number(value: Any, name: str, where: str, task: str | None = None) -> float:
    """`value`, checked to be a finite number (an int or a float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise wrong_field(value, name, "a finite number", where, task)
    return value


def check_list(value: Any, name: str, where: str, task: str | None = None, *, length: int | None = None,
               of: str = "items") -> list:
    """`value`, checked to be a non-empty list (of exactly `length` items where given); `of` says
    what the items are, for the message."""
    if not isinstance(value, list) or not value or (length is not None and len(value) != length):
        expected = f"a list of {length} {of}" if length else f"a non-empty list of {of}"
        raise wrong_field(value, name, expected, where, task)
    return value


def check_strings(value: Any, name: str, where: str, task: str | None = None, *,
                  length: int | None = None) -> list[str]:
    """`value`, checked to be a non-empty list (of `length` items where given) of non-empty strings
    (`check_string`; item i is named "name[i]")."""
    items = check_list(value, name, where, task, length=length, of="strings")
    return [check_string(item, f"{name}[{i}]", where, task) for i, item in enumerate(items)]
