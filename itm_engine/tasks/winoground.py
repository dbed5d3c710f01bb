"""Winoground: two images, two captions with the same words in a different order."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import grouped_accuracy, winoground
from itm_engine.tasks import register
from itm_engine.tasks.base import (
    DataError,
    Example,
    ImageRef,
    MissingData,
    Task,
    ZipMember,
    check_id,
    check_string,
    check_strings,
    require,
    wrong_field,
)


@register
class Winoground(Task):
    """Winoground (Thrush et al., 2022): text, image and group scores, overall and per collapsed tag.

    Layout, either as the Hugging Face dataset ships it (facebook/winoground, the copy the
    DiffusionITM research code loads)::

        ROOT/data/examples.jsonl         one example a line: "id", "image_0", "image_1" (the image
                                         names, "ex_{id}_img_0"), "caption_0", "caption_1", "tag",
                                         "secondary_tag", "num_main_preds", "collapsed_tag"
        ROOT/data/images.zip             the images, read from the archive: {image name}.png, at
                                         its root or in a folder of it (images/)

    (ROOT/examples.jsonl and ROOT/images.zip are accepted too), or unpacked::

        ROOT/examples.jsonl              one example a line, or
        ROOT/data.json                   a JSON list of them (JSON lines are accepted too); each
                                         with "id", "caption_0", "caption_1", "tag" and
                                         "collapsed_tag" (a string or a list of strings; when
                                         absent, "tag" is used)
        ROOT/images/ex_{id}_img_0.png    the two images of each example (or directly in ROOT/)
        ROOT/images/ex_{id}_img_1.png

    Each example scores both images against both captions in both modes: text score = the I2T
    matrix picks caption_i for image_i, image score = the T2I matrix picks image_i for caption_i,
    group = both. An example with several collapsed tags counts towards each.
    """

    name = "winoground"
    modes = ("i2t", "t2i")
    description = "Winoground: text, image and group scores, overall and per collapsed tag"

    def _rows(self) -> list[tuple[str, Any]]:
        if (self.root / "data" / "examples.jsonl").is_file() and not (self.root / "examples.jsonl").is_file():
            return self.read_jsonl("data/examples.jsonl")
        if (self.root / "examples.jsonl").is_file() or not (self.root / "data.json").is_file():
            return self.read_jsonl("examples.jsonl")
        try:
            data = json.loads((self.root / "data.json").read_text())
        except json.JSONDecodeError:
            return self.read_jsonl("data.json")  # JSON lines (errors name the line)
        if isinstance(data, dict):  # a JSON-lines file of one line
            return [("data.json:1", data)]
        if not isinstance(data, list):
            raise DataError(f"{self.name}: {self.root / 'data.json'}: expected a JSON list of examples")
        return [(f"data.json[{i}]", row) for i, row in enumerate(data)]

    def _archive(self) -> tuple[Path, dict[str, str]] | None:
        """The images zip and {image file name: member}, when the images come in one (checked to
        lie inside the data root, `real_path`)."""
        if (self.root / "images").is_dir():
            return None
        relative = next((f for f in ("data/images.zip", "images.zip") if (self.root / f).is_file()), None)
        if relative is None:
            return None
        archive = self.real_path(relative)
        if archive is None:
            raise DataError(f"{self.name}: {relative} resolves outside the data root {self.root}")
        try:
            with zipfile.ZipFile(archive) as opened:
                names = [n for n in opened.namelist() if not n.endswith("/")]
        except zipfile.BadZipFile as err:
            raise DataError(f"{self.name}: {archive}: not a readable zip archive ({err})") from None
        return archive, {PurePosixPath(n).name: n for n in names}

    def _image(self, row: dict, example_id: str, i: int, where: str, archive: tuple[Path, dict[str, str]] | None,
               folder: str) -> ImageRef:
        """Image i of the row: named by field image_i (the Hugging Face copy), else ex_{id}_img_{i}."""
        key = f"image_{i}"
        stem = check_string(row[key], key, where, self.name) if key in row else f"ex_{example_id}_img_{i}"
        if archive is None:
            return self.path(f"{folder}/{stem}.png", where)
        path, members = archive
        if f"{stem}.png" not in members:
            raise MissingData(f"{self.name}: {where}: {path.name} has no image {stem}.png")
        return ZipMember(str(path), members[f"{stem}.png"])

    def load_examples(self) -> Iterable[Example]:
        folder = "images" if (self.root / "images").is_dir() else "."
        archive = self._archive()

        def build(item: tuple[str, Any]) -> Example:
            where, row = item
            require(row, ("id", "caption_0", "caption_1", "tag"), where, self.name)
            example_id = check_id(row["id"], "id", where, self.name)
            texts = tuple(check_string(row[k], k, where, self.name) for k in ("caption_0", "caption_1"))
            _tags(row["tag"], "tag", where, self.name)
            collapsed = row.get("collapsed_tag")
            if collapsed in (None, "", []):  # absent or empty in some copies
                collapsed = row["tag"]
            meta = {"tag": row["tag"], "collapsed_tag": _tags(collapsed, "collapsed_tag", where, self.name)}
            images = tuple(self._image(row, example_id, i, where, archive, folder) for i in (0, 1))
            return Example(id=example_id, images=images, texts=texts, meta=meta)

        return list(self.examples_from(((where, (where, row)) for where, row in self._rows()), build))

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """"text|image|group/overall" and "text|image|group/<collapsed tag>" from the [2, 2] matrices."""
        if not examples or any(len(scores[mode]) != len(examples) for mode in self.modes):
            raise ValueError(f"{self.name}: need one i2t and one t2i score matrix for each of the "
                             f"{len(examples)} examples")
        i2t, t2i = (torch.stack([s.reshape(2, 2) for s in scores[mode]]) for mode in ("i2t", "t2i"))
        results = winoground(i2t, t2i)
        owners = [(n, tag) for n, ex in enumerate(examples) for tag in ex.meta["collapsed_tag"]]
        out: dict[str, float] = {}
        for kind, correct in results.items():
            out[f"{kind}/overall"] = float(correct.double().mean())
            per_tag = grouped_accuracy([bool(correct[n]) for n, _ in owners], [tag for _, tag in owners])
            out.update({f"{kind}/{tag}": value for tag, value in per_tag.items()})
        return out


def _tags(value: Any, key: str, where: str, task: str) -> list[str]:
    """A tag field as a list of tags: a string is one tag, a list of strings several."""
    if isinstance(value, list):
        return check_strings(value, key, where, task)
    if not isinstance(value, str) or not value.strip():
        raise wrong_field(value, key, "a non-empty string or list of strings", where, task)
    return [value]
