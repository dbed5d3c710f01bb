"""EqBen: two frames (or renders) that differ by a minimal visual change, and their two captions."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np
import PIL.Image
import torch

from itm_engine.tasks import register
from itm_engine.tasks.base import (
    DataError,
    Example,
    ImageRef,
    StoredImage,
    Task,
    check_string,
    require,
    wrong_field,
)

# the sub-datasets, as the official evaluation (evaluate_eqben_locally.py) reports them
SUBSETS = ("eqbenag", "eqbenyoucook2", "eqbengebc", "eqbenkubric_loc", "eqbenkubric_attr", "eqbenkubric_cnt",
           "eqbensd")
# the Winoground-style annotation files, tried in order: the 10% subset, then the small one
ANNOTATIONS = ("eqben_subset_10percent_final.json", "all_select.json")


@dataclass(frozen=True)
class BGRArray(StoredImage):
    """An image stored as a NumPy array file (`path`, .npy: uint8 [H, W, 3], channels in BGR
    order, as EqBen ships its YouCook2 frames), read as an RGB image."""

    path: str

    def load(self) -> PIL.Image.Image:
        array = np.load(self.path, allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise DataError(f"{self.path}: expected a uint8 [H, W, 3] BGR image array, got {array.dtype} "
                            f"{list(array.shape)}")
        return PIL.Image.fromarray(np.ascontiguousarray(array[:, :, ::-1]), "RGB")


@register
class EqBen(Task):
    """EqBen (Wang et al., ICCV 2023): Winoground-style text, image and group scores per sub-dataset.

    Layout (the released Winoground-style annotation files of the official repository,
    Wangt-CN/EqBen, with their image folders)::

        ROOT/eqben_subset_10percent_final.json   the 10% evaluation subset (~25K image-text pairs),
                                                 or ROOT/all_select.json, the small subset released
                                                 for MLLMs (option annotation: another file): a
                                                 JSON list of rows {"image0", "caption0", "image1",
                                                 "caption1"}, image paths relative to the image
                                                 folder, e.g. "eqbenag/<video>/<frame>.png"
        ROOT/image_subset/                       the images (or ROOT/images/, or ROOT itself;
                                                 option image_dir)

    The official README links both annotation files without naming them; the names are those the
    VisMin evaluation config (rabiulcste/vismin, the 10% subset with image_subset/) and t2v_metrics'
    EqBen_Mini / Jeong et al. (all_select.json with images/) read them under.

    The sub-dataset of a row is the first folder of its image0: eqbenag, eqbenyoucook2,
    eqbengebc, eqbenkubric_loc, eqbenkubric_attr, eqbenkubric_cnt or eqbensd. A .npy image
    (YouCook2 frames) is a uint8 [H, W, 3] BGR array, read as RGB (`BGRArray`, as the official
    toolkit's `process_img_npy`). An image named .png that is absent while the same name with
    .jpg exists is read from the .jpg (the "light" release converted the PNGs to JPEG).

    Example (one per row, id = the row index in the file): images = (image0, image1), texts =
    (caption0, caption1), meta {"subset"}.

    Options:
        subsets: the sub-datasets to load, a list or a comma-separated string (default: all).
        annotation: the annotation file, relative to ROOT (default: the first of the above).
        image_dir: the image folder, relative to ROOT.

    Metrics (the official `cal_wino_score`, evaluate_eqben_locally.py and eqben_acc.py), with
    s[i, j] = score(image i, caption j): text = s[0,0] > s[0,1] and s[1,1] > s[1,0] on the I2T
    matrix, image = s[0,0] > s[1,0] and s[1,1] > s[0,1] on the T2I matrix, group = both; a tie
    is wrong (under the protocol's "argmax-first" ties it goes to the first candidate).
    "text|image|group/<subset>" per sub-dataset (what the official evaluation reports) and
    "text|image|group/overall" over all examples (the EqBen-mini overall of t2v_metrics).

    The full test set ships as randomised single pairs scored one by one and regrouped with
    private index files (ann_json_finegrained_random.json); it is not read here. Jeong et al.
    (2025) read all_select.json and pick a sub-dataset by a substring of image0.
    """

    name = "eqben"
    modes = ("i2t", "t2i")
    description = "EqBen: text, image and group scores per sub-dataset (eqbenag, ..., eqbensd) and overall"
    option_names = ("subsets", "annotation", "image_dir")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.subsets = self.chosen_names("subsets", SUBSETS) or SUBSETS
        annotation = options.get("annotation")
        if annotation is not None and (not isinstance(annotation, str) or not annotation.strip()):
            raise ValueError(f"{self.name}: option annotation must be a file path, got {annotation!r}")
        self.annotation = annotation
        self.image_dir = self.image_folder(options.get("image_dir"), ("image_subset", "images", "."))

    def load_examples(self) -> Iterable[Example]:
        file = self.annotation or next((f for f in ANNOTATIONS if (self.root / f).is_file()), ANNOTATIONS[0])
        if self.annotation and self.real_path(file) is None:
            raise DataError(f"{self.name}: option annotation {file!r} resolves outside the data root {self.root}")
        data = self.read_json(file)
        if not isinstance(data, list):
            raise DataError(f"{self.name}: {self.root / file}: expected a JSON list of {{image0, caption0, image1, "
                            "caption1}} rows")
        rows = [(f"{file} row {i}", (f"{file} row {i}", i, row)) for i, row in enumerate(data)]
        return [ex for ex in self.examples_from(rows, self._build) if ex is not None]

    def _build(self, item: tuple[str, int, Any]) -> Example | None:
        """The row's example, None when its sub-dataset was not chosen (its images are not looked up)."""
        where, index, row = item
        require(row, ("image0", "caption0", "image1", "caption1"), where, self.name)
        texts = tuple(check_string(row[k], k, where, self.name) for k in ("caption0", "caption1"))
        names = [check_string(row[k], k, where, self.name) for k in ("image0", "image1")]
        subset = PurePosixPath(names[0]).parts[0]
        if subset not in SUBSETS:
            raise wrong_field(names[0], "image0", f"a path in one of the folders {', '.join(SUBSETS)}", where,
                              self.name)
        if subset not in self.subsets:
            return None
        images = tuple(self._image(name, where) for name in names)
        return Example(id=str(index), images=images, texts=texts, meta={"subset": subset})

    def _image(self, name: str, where: str) -> ImageRef:
        """The image file `name` in the image folder: a .npy array as a `BGRArray`; a .png that is
        absent, from the .jpg of the same name when that exists."""
        relative = Path(self.image_dir) / name
        light = relative.with_suffix(".jpg")
        if relative.suffix.lower() == ".png" and not (self.root / relative).exists() and (self.root / light).is_file():
            relative = light
        path = self.path(relative, where)
        return BGRArray(path) if relative.suffix.lower() == ".npy" else path

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        return self.winoground_metrics(examples, scores, "subset")
