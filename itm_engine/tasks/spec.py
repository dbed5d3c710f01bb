"""SPEC (Peng et al., "Synthesize, Diagnose, and Optimize: Towards Fine-Grained Vision-Language
Understanding", CVPR 2024): synthetic image and caption sets that differ only in an object's size,
position, existence or count."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import grouped_accuracy
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_int, check_string, check_strings, require

SUBSETS = ("absolute_size", "relative_size", "absolute_spatial", "relative_spatial", "existence", "count")
FILES = {"i2t": "image2text.json", "t2i": "text2image.json"}  # per direction, in each subset's folder


@register
class SPEC(Task):
    """SPEC image->text and text->image accuracy per subset (official repo wjpoom/SPEC: `spec/dataset.py`,
    `spec/eval.py` and the model wrappers' `i2t_evaluate` / `t2i_evaluate`; data: data.zip of the
    Hugging Face dataset wjpoom/SPEC, unpacked).

    Layout::

        ROOT/{subset}/image2text.json   a JSON list of {"query": image path relative to
                                        ROOT/{subset}, "keys": [candidate captions], "label": index
                                        of the right caption}
        ROOT/{subset}/text2image.json   a JSON list of {"query": caption, "keys": [candidate image
                                        paths relative to ROOT/{subset}], "label": index of the
                                        right image}
        ROOT/{subset}/...               the images the rows name

    for the subsets absolute_size, relative_size, absolute_spatial, relative_spatial, existence and
    count. A subset whose files are absent is skipped (unless it was asked for by name).

    Examples, subset by subset in the order above, its image2text rows then its text2image rows:
    image->text (id "{subset}/i2t/{row index}"): images = (the query image,), texts = the keys;
    text->image (id "{subset}/t2i/{row index}"): images = the keys, texts = (the query,); label the
    row's label, meta {"subset", "direction"}.

    Options:
        subsets: the subsets to load, a list or a comma-separated string (default: all present).
        directions: "i2t", "t2i" or both (the default): the files read and the score modes run.
            Every example of a run is scored in each of its modes (the metric reads an example's
            own direction), so one direction alone halves the work; `--adaptive` needs one (its
            queries are one image in i2t, one caption in t2i).

    Metrics (the official ones, as fractions rather than percentages): for each direction,
    "<direction>/<subset>" = the fraction of the subset's rows whose label wins (the official
    torch argmax is "argmax-first": a tie goes to the earliest candidate; here the protocol's tie
    policy decides) and "<direction>/average" = the mean over the subsets loaded (`eval.py`'s
    "average all subset").

    Jeong et al. (2025) read the same files, but score text->image on the first three candidate
    images only (two for existence); the official code, and this task, score all of them.
    """

    name = "spec"
    modes = ("i2t", "t2i")
    description = "SPEC: size, position, existence and count; image->text and text->image accuracy per subset"
    option_names = ("subsets", "directions")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.chosen = self.chosen_names("subsets", SUBSETS)
        self.modes = self.chosen_names("directions", tuple(FILES)) or self.modes

    def load_examples(self) -> Iterable[Example]:
        rows = []
        for subset in self.complete_parts(self.chosen, SUBSETS, lambda s: [f"{s}/{FILES[d]}" for d in self.modes]):
            for direction in self.modes:
                file = f"{subset}/{FILES[direction]}"
                data = self.read_json(file)
                if not isinstance(data, list):
                    raise DataError(f"{self.name}: {self.root / file}: expected a JSON list of rows")
                rows += [(f"{file} row {i}", (subset, direction, i, row)) for i, row in enumerate(data)]
        return list(self.examples_from(rows, self._build))

    def _build(self, item: tuple[str, str, int, Any]) -> Example:
        subset, direction, index, row = item
        where = f"{subset}/{FILES[direction]} row {index}"
        require(row, ("query", "keys", "label"), where, self.name)
        query = check_string(row["query"], "query", where, self.name)
        keys = check_strings(row["keys"], "keys", where, self.name)
        label = check_int(row["label"], "label", where, self.name, low=0, high=len(keys) - 1)
        meta = {"subset": subset, "direction": direction}
        if direction == "i2t":
            images, texts = (query,), tuple(keys)
        else:
            images, texts = tuple(keys), (query,)
        images = tuple(self.path(Path(subset) / image, where) for image in images)
        return Example(id=f"{subset}/{direction}/{index}", images=images, texts=texts, label=label, meta=meta)

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """Per direction, from its own examples' matrices (image->text [1, n_texts], text->image
        [n_images, 1]): accuracy per subset and its mean over the subsets."""
        out: dict[str, float] = {}
        for direction in FILES:
            members = [n for n, ex in enumerate(examples) if ex.meta["direction"] == direction]
            if not members:
                continue
            matrices = self.score_matrices(examples, scores, direction)
            chosen = [examples[n] for n in members]
            correct = self.correct(chosen, {direction: [matrices[n] for n in members]}, direction)
            per_subset = grouped_accuracy(correct, [ex.meta["subset"] for ex in chosen])
            out.update({f"{direction}/{subset}": value for subset, value in per_subset.items()})
            out[f"{direction}/average"] = sum(per_subset.values()) / len(per_subset)
        return out
