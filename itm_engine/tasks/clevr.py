"""CLEVR (GDBench's compositional subtasks): the right caption of a synthetic scene against a minimal
edit of it."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy_by_group
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_list, check_strings

SUBTASKS = ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
            "binding_color_shape", "binding_shape_color")


@register
class CLEVR(Task):
    """CLEVR image->text: which of two captions describes the scene (DiffusionITM's GDBench subtasks).

    Layout (the research code's caption files)::

        ROOT/{subtask}.json     one per subtask (or ROOT/captions/{subtask}.json):
                                {"CLEVR_val2_000138.png": [[positive, negative], ...], ...}
        ROOT/images/            the scenes, by the file names used as keys

    Subtasks: pair_binding_size, pair_binding_color, recognition_color, recognition_shape, spatial,
    binding_color_shape, binding_shape_color. A subtask whose file is absent is skipped (unless it
    was asked for by name).

    Example (one per (image, pair), id = "{subtask}/{image}/{pair index}"): images = (the scene,),
    texts = (positive, negative), label 0, meta {"subtask"}. Examples come subtask by subtask in
    the order above, then in file order.

    Options:
        subtasks: the subtasks to load, a list or a comma-separated string (default: all).

    Metrics: "accuracy" over all examples (micro, what the research code prints),
    "accuracy/macro" the mean of the per-subtask accuracies, "accuracy/<subtask>" per subtask.
    A tie between the two captions counts as wrong.
    """

    name = "clevr"
    modes = ("i2t",)
    description = "CLEVR: positive vs minimally edited caption, accuracy per subtask and overall"
    option_names = ("subtasks",)

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        chosen = self.chosen_names("subtasks", SUBTASKS)
        self.explicit = chosen is not None
        self.subtasks = chosen or SUBTASKS

    def load_examples(self) -> Iterable[Example]:
        files = self.part_files(self.subtasks, self.explicit, lambda s: (f"{s}.json", f"captions/{s}.json"))
        rows = []
        for subtask, file in files.items():
            data = self.read_json(file)
            if not isinstance(data, dict):
                raise DataError(f"{self.name}: {self.root / file}: expected a JSON object {{image: "
                                "[[positive, negative], ...]}")
            for image, pairs in data.items():
                where = f"{file} [{image!r}]"
                check_list(pairs, "pairs", where, self.name, of="[positive, negative] pairs")
                for k, pair in enumerate(pairs):
                    pair = check_strings(pair, f"pairs[{k}]", where, self.name, length=2)
                    rows.append((where, (where, subtask, image, k, pair)))
        return list(self.examples_from(rows, self._build))

    def _build(self, item: tuple[str, str, str, int, list[str]]) -> Example:
        where, subtask, image, k, (positive, negative) = item
        path = self.path(f"images/{image}", where)
        return Example(id=f"{subtask}/{image}/{k}", images=(path,), texts=(positive, negative), label=0,
                       meta={"subtask": subtask})

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        return accuracy_by_group(self.correct(examples, scores), [ex.meta["subtask"] for ex in examples])
