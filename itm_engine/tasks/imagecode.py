"""ImageCoDe: pick, among 10 near-identical images, the one a description is about."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_int, check_string, malformed

SET_SIZE = 10
SUBSETS = ("static", "video", "all")


@register
class ImageCoDe(Task):
    """ImageCoDe (Krojer et al., 2022), text->image accuracy over the 10 images of a set.

    Layout::

        ROOT/{split}_data.json                  {image-set folder: {index: description}}
        ROOT/image-sets/{set}/img0.jpg ... img9.jpg
                                                (the set folders may also sit directly in ROOT)

    Options:
        split: which `{split}_data.json` (default "valid"; "val" is read as "valid").
        subset: "static" (default: the sets from Open Images, whose folder name contains
            "open-images", as in the paper), "video" (the other sets: video frames) or "all".

    Each (set, index, description) is an example: the 10 images of the set in index order and
    the description; label = index.
    """

    name = "imagecode"
    modes = ("t2i",)
    description = "ImageCoDe (static subset) text->image accuracy over 10 images"
    option_names = ("split", "subset")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        split = options.get("split", "valid")
        if not isinstance(split, str) or not split or "/" in split:
            raise ValueError(f"{self.name}: option split must be a split name such as 'valid', got {split!r}")
        self.split = "valid" if split == "val" else split
        self.subset = options.get("subset", "static")
        if self.subset not in SUBSETS:
            raise ValueError(f"{self.name}: option subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}")

    def load_examples(self) -> Iterable[Example]:
        file = f"{self.split}_data.json"
        if not (self.root / file).is_file():
            found = sorted(p.name[: -len("_data.json")] for p in self.root.glob("*_data.json"))
            if found:
                raise ValueError(f"{self.name}: no {file} for split {self.split!r}; splits found: {', '.join(found)}")
        data = self.read_json(file)
        if not isinstance(data, dict):
            raise DataError(f"{self.name}: {file}: expected an object {{image set: {{index: description}}}}")
        folder = "image-sets" if (self.root / "image-sets").is_dir() else "."
        rows = []
        for image_set, descriptions in data.items():
            if self.subset != "all" and ("open-images" in image_set) != (self.subset == "static"):
                continue
            if not isinstance(descriptions, dict):
                raise malformed(f"{file} [{image_set!r}]", "expected {index: description}", self.name)
            rows += [(f"{file} [{image_set!r}][{index!r}]", (image_set, index, text))
                     for index, text in descriptions.items()]

        def build(item: tuple[str, tuple[str, str, Any]]) -> Example:
            where, (image_set, index, text) = item
            label = check_int(index, "index", where, self.name, low=0, high=SET_SIZE - 1)
            text = check_string(text, "description", where, self.name)
            images = tuple(self.path(f"{folder}/{image_set}/img{i}.jpg", where) for i in range(SET_SIZE))
            return Example(id=f"{image_set}#{label}", images=images, texts=(text,), label=label)

        return list(self.examples_from(((where, (where, row)) for where, row in rows), build))

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """"accuracy": the described image scores strictly highest of the 10."""
        return {"accuracy": accuracy([s.reshape(-1) for s in scores["t2i"]], [ex.label for ex in examples],
                                     self.protocol.ties)}
