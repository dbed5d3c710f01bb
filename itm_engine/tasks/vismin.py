"""VisMin: a COCO image and a minimally edited copy (one object, attribute, count or spatial relation
changed), each with its caption."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_string, require

CATEGORIES = ("object", "attribute", "relation", "counting")
COLUMNS = ("image_path", "edited_image_path", "caption", "edited_caption")


@register
class VisMin(Task):
    """VisMin (Awal et al., NeurIPS 2024): Winoground-style text, image and group scores per category.

    Layout (the CSV files and image folders the official evaluation code reads,
    rabiulcste/vismin evals/dataset_zoo: `VisMin.load_dataset`)::

        ROOT/{category}.csv      one per category (object, attribute, relation, counting), with
                                 the columns image_path, edited_image_path, caption,
                                 edited_caption (others, e.g. edit_id, are ignored)
        ROOT/original_images/    the source images, by image_path (a leading "/" is dropped:
                                 "/coco/000000000139.jpg" is original_images/coco/000000000139.jpg)
        ROOT/edited_images/      the edited images, by edited_image_path

    The Hugging Face release (mair-lab/vismin-bench) is an Arrow dataset with the images embedded
    (data/test/*.arrow; columns id, image_0, text_0, image_1, text_1, category, and the questions
    of the MLLM task); reading it needs pyarrow, which the engine does not depend on. Write it out
    in the layout above first (image_0 and text_0 as image_path and caption, image_1 and text_1 as
    edited_image_path and edited_caption, rows in id order, one file per category).

    A category whose file is absent is skipped (unless it was asked for by name).

    Example (one per row, id = "{category}/{row index}", the index counting from 0 in each file
    as the release's per-category id does): images = (the image, the edited image), texts =
    (caption, edited_caption), meta {"category"}. Examples come category by category in the order
    above, then in file order.

    Options:
        categories: the categories to load, a list or a comma-separated string (default: all).

    Metrics (the official `compute_contrastive_accuracy`, vismin-bench/metric.py), with s[i, j] =
    score(image i, caption j): text = s[0,0] > s[0,1] and s[1,1] > s[1,0] on the I2T matrix,
    image = s[0,0] > s[1,0] and s[1,1] > s[0,1] on the T2I matrix, group = both; a tie is wrong
    (under the protocol's "argmax-first" ties it goes to the first candidate).
    "text|image|group/<category>" per category, as fractions (the official code prints
    percentages rounded to 2 decimals, per category only), and "text|image|group/overall" over
    all examples. Jeong et al. (2025) load the Hugging Face test split and score one category
    (or all) per run, with the same three scores.
    """

    name = "vismin"
    modes = ("i2t", "t2i")
    description = "VisMin: text, image and group scores per category (object, attribute, relation, counting)"
    option_names = ("categories",)

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        chosen = self.chosen_names("categories", CATEGORIES)
        self.explicit = chosen is not None
        self.categories = chosen or CATEGORIES

    def load_examples(self) -> Iterable[Example]:
        files = self.part_files(self.categories, self.explicit, lambda c: (f"{c}.csv",))
        rows = []
        for category, file in files.items():
            with open(self.root / file, newline="") as handle:
                reader = csv.DictReader(handle)
                try:
                    for n, row in enumerate(reader):
                        where = f"{file}:{reader.line_num}"
                        rows.append((where, (where, category, n, row)))
                except csv.Error as err:
                    line = reader.line_num + 1  # the line it failed to read
                    raise DataError(f"{self.name}: {file} line {line}: malformed row ({err})") from None
        return list(self.examples_from(rows, self._build))

    def _build(self, item: tuple[str, str, int, dict]) -> Example:
        where, category, n, row = item
        require(row, COLUMNS, where, self.name)
        image, edited, caption, edited_caption = (check_string(row[k], k, where, self.name) for k in COLUMNS)
        images = (self.path(Path("original_images") / image.lstrip("/"), where),
                  self.path(Path("edited_images") / edited.lstrip("/"), where))
        return Example(id=f"{category}/{n}", images=images, texts=(caption, edited_caption),
                       meta={"category": category})

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        return self.winoground_metrics(examples, scores, "category")
