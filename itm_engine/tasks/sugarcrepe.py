"""SugarCrepe: a COCO image, its caption and a fluent hard negative that changes one object, attribute
or relation. Also the option helpers of the tasks whose data come in named parts (subsets, categories)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy_by_group
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_string, require

# the order of the official evaluation script (main_eval.py)
SUBSETS = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")


@register
class SugarCrepe(Task):
    """SugarCrepe (Hsieh et al., NeurIPS 2023) image->text: the positive caption against its hard negative.

    Layout (the official repository's data files, RAIVNLab/sugar-crepe, and COCO)::

        ROOT/data/{subset}.json    one per subset (or ROOT/{subset}.json): a JSON object of rows
                                   keyed by a row number ("0", "1", ...; the numbering has gaps),
                                   {"filename": "000000222235.jpg", "caption": ...,
                                    "negative_caption": ...}
        ROOT/val2017/              the COCO 2017 validation images, by filename (or
                                   ROOT/images/val2017/, ROOT/images/; option image_dir)

    Subsets: add_obj, add_att, replace_obj, replace_att, replace_rel, swap_obj, swap_att. A subset
    whose file is absent is skipped (unless it was asked for by name).

    Example (one per row, id = "{subset}/{row key}"): images = (the image,), texts = (caption,
    negative_caption), label 0, meta {"subset"}. Examples come subset by subset in the order
    above, then in file order.

    Options:
        subsets: the subsets to load, a list or a comma-separated string (default: all).
        image_dir: the COCO image folder, relative to ROOT.

    Metrics: "accuracy/<subset>" is what the official evaluation (main_eval.py) reports, per
    subset only: the fraction of rows whose positive caption scores strictly higher than the
    negative (a tie is wrong; under the protocol's "argmax-first" ties, right). Over the subsets:
    "accuracy/macro", the unweighted mean of the per-subset accuracies (the SugarCrepe average as
    papers quote it; the number to report), and "accuracy", over all rows (micro).

    Jeong et al. (2025) also pool add/replace/swap files into att/obj/rel sets by merging the JSON
    objects, so rows with the same key in two files overwrite each other; here every row of every
    subset counts once.
    """

    name = "sugarcrepe"
    modes = ("i2t",)
    description = "SugarCrepe: caption vs hard negative on COCO val2017, accuracy per subset and their mean"
    option_names = ("subsets", "image_dir")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        chosen = self.chosen_names("subsets", SUBSETS)
        self.explicit = chosen is not None
        self.subsets = chosen or SUBSETS
        self.image_dir = self.image_folder(options.get("image_dir"), ("val2017", "images/val2017", "images"))

    def load_examples(self) -> Iterable[Example]:
        files = self.part_files(self.subsets, self.explicit, lambda s: (f"data/{s}.json", f"{s}.json"))
        rows = []
        for subset, file in files.items():
            data = self.read_json(file)
            if not isinstance(data, dict):
                raise DataError(f"{self.name}: {self.root / file}: expected a JSON object {{row key: {{filename, "
                                "caption, negative_caption}}}")
            for key, row in data.items():
                where = f"{file} [{key!r}]"
                rows.append((where, (where, subset, key, row)))
        return list(self.examples_from(rows, self._build))

    def _build(self, item: tuple[str, str, str, Any]) -> Example:
        where, subset, key, row = item
        require(row, ("filename", "caption", "negative_caption"), where, self.name)
        texts = tuple(check_string(row[k], k, where, self.name) for k in ("caption", "negative_caption"))
        filename = check_string(row["filename"], "filename", where, self.name)
        path = self.path(Path(self.image_dir) / filename, where)
        return Example(id=f"{subset}/{key}", images=(path,), texts=texts, label=0, meta={"subset": subset})

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        return accuracy_by_group(self.correct(examples, scores), [ex.meta["subset"] for ex in examples])
