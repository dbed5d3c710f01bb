"""COLA multi-object matching: two images and two captions that swap the attributes of their objects."""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import torch

from itm_engine.metrics import matched_pairs
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_strings, wrong_field

ANNOTATIONS = ("data/COLA_multiobjects_matching_benchmark.json", "COLA_multiobjects_matching_benchmark.json")


@register
class COLA(Task):
    """COLA (Ray et al., NeurIPS 2023), multi-object setting: text->image, each caption against the
    other example's image.

    Layout (the official repository's file, arijitray1993/COLA, and the Visual Genome / GQA images
    it links to)::

        ROOT/data/COLA_multiobjects_matching_benchmark.json   (or at ROOT/) a JSON list of rows
                                  [image 1 URL, caption 1, image 2 URL, caption 2], the URLs
                                  "https://cs-people.bu.edu/array/data/vg_gqa_images/2414605.jpg"
        ROOT/images/2414605.jpg   each image by the file name of its URL (or ROOT/vg_gqa_images/,
                                  the URL's own folder; option image_dir): the Visual Genome image
                                  of that id, e.g. GQA's images/ folder. A row may also name the
                                  image by a file name or relative path; only its file name counts.

    Example (one per row, id = the row index): images = (image 1, image 2), texts = (caption 1,
    caption 2); caption k describes image k and not the other. Options: image_dir (the image
    folder, relative to ROOT).

    Metric: "accuracy", the official multi-object accuracy (scripts/eval.py, ColaMultiObjAcc),
    which is image-side only: with s[image, caption] the T2I scores, an example is right when
    s[0,0] > s[1,0] and s[1,1] > s[0,1] (each caption prefers its own image; a tie is wrong, under
    the protocol's "argmax-first" ties it goes to the first image). The I2T direction is not part
    of it, so only T2I is scored. Jeong et al. (2025) report Winoground's text, image and group
    scores on COLA instead; the image score there is this accuracy.
    """

    name = "cola"
    modes = ("t2i",)
    description = "COLA multi-object: each caption must prefer its own image (the official image-side accuracy)"
    option_names = ("image_dir",)

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.image_dir = self.image_folder(options.get("image_dir"), ("images", "vg_gqa_images"))

    def load_examples(self) -> Iterable[Example]:
        file = next((f for f in ANNOTATIONS if (self.root / f).is_file()), ANNOTATIONS[0])
        data = self.read_json(file)
        if not isinstance(data, list):
            raise DataError(f"{self.name}: {self.root / file}: expected a JSON list of [image 1, caption 1, "
                            "image 2, caption 2] rows")
        rows = [(f"{file} row {i}", (f"{file} row {i}", i, row)) for i, row in enumerate(data)]
        return list(self.examples_from(rows, self._build))

    def _build(self, item: tuple[str, int, Any]) -> Example:
        where, index, row = item
        image_1, caption_1, image_2, caption_2 = check_strings(row, "row", where, self.name, length=4)
        names = [self._file_name(value, f"row[{k}]", where) for k, value in ((0, image_1), (2, image_2))]
        images = tuple(self.path(Path(self.image_dir) / name, where) for name in names)
        return Example(id=str(index), images=images, texts=(caption_1, caption_2))

    def _file_name(self, value: str, key: str, where: str) -> str:
        """The file name an image URL (or path) ends in."""
        path = urlsplit(value).path
        name = PurePosixPath(path).name
        if path.endswith("/") or name in ("", ".", ".."):
            raise wrong_field(value, key, "an image URL or file name", where, self.name)
        return name

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """"accuracy": the fraction of examples whose captions each pick their own image."""
        t2i = torch.stack([s.reshape(2, 2) for s in self.score_matrices(examples, scores, "t2i")])
        return {"accuracy": float(matched_pairs(t2i.transpose(1, 2), self.protocol.ties).double().mean())}
