"""MMVP-VLM (Tong et al., "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs",
CVPR 2024): CLIP-blind image pairs, each with a statement that fits one image and not the other."""
from __future__ import annotations

import csv
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy_by_group, is_correct
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_int, check_string, malformed, require

QUESTIONS = "Questions.csv"
IMAGES = "MLLM_VLM Images"
COLUMNS = ("Question ID", "Type", "Statement")
PROMPT = "a photo of "  # the official evaluation's text: PROMPT + statement


@register
class MMVPVLM(Task):
    """MMVP-VLM text->image pair accuracy per visual pattern (official code tsb0601/MMVP,
    `scripts/evaluate_vlm.py`; data: the Hugging Face dataset MMVP/MMVP_VLM).

    Layout (the Hugging Face dataset's files)::

        ROOT/Questions.csv                     header "Question ID,Type,Statement", one statement
                                               a row; rows 2k-1 and 2k (ids 2k-1, 2k) are a pair
                                               of one Type (the visual pattern)
        ROOT/MLLM_VLM Images/{Type}/{id}.jpg   the image of each statement

    Example (one per pair of consecutive rows, id = "{id 1}-{id 2}"): images = (image of id 1, image
    of id 2), texts = ("a photo of " + statement 1, "a photo of " + statement 2) -- the official
    evaluation's prompt -- label (0, 1) (statement j belongs to image j), meta {"type"}. A pair's
    first id must be odd and its second the next one (the official evaluation reads the right
    image from the id's parity: odd = the pair's first image), both rows of one Type; an odd
    number of rows is an error (the official script drops a last unpaired row). No options.

    Metric (one [2, 2] matrix per pair, s[image, statement], text->image): the official pair
    accuracy. For each statement the official code compares the pair's two images (softmax over
    them, image 1 if its probability > 0.5); a pair is right when both statements pick their own
    image. Here a statement picks its image when that image wins under the protocol's tie policy
    (the official `> 0.5` gives a tie to image 2: right for statement 2, wrong for statement 1;
    "strict" makes a tie wrong for both, "argmax-first" gives it to image 1).
        accuracy/<Type>: pair accuracy per visual pattern (per Type column).
        accuracy/macro: the mean over the patterns, the official "average".
        accuracy: over all pairs (the same number when, as released, every pattern has 15 pairs).
    The official script names the 9 patterns by position (pairs 15k .. 15k + 14 are its k-th
    category: Orientation and Direction, Presence of Specific Features, State and Condition,
    Quantity and Count, Positional and Relational Context, Color and Appearance, Structural
    Characteristics, Texts, Viewpoint and Perspective); grouping by the Type column gives the
    same groups on the released file and works on any subset of it.

    Jeong et al. (2025) read the same files with the same prompt, one task per Type (its rows
    sorted by id).
    """

    name = "mmvp_vlm"
    modes = ("t2i",)
    description = "MMVP-VLM: each statement of a CLIP-blind image pair picks its image, pair accuracy per pattern"

    def _rows(self) -> list[tuple[str, dict]]:
        file = self.root / QUESTIONS
        if not file.is_file():
            raise FileNotFoundError(f"{self.name}: expected {str(file)!r} (layout: docs/evaluation.md)")
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            try:
                rows = [(f"{QUESTIONS}:{reader.line_num}", row) for row in reader]
            except csv.Error as err:
                raise DataError(f"{self.name}: {QUESTIONS} line {reader.line_num}: malformed row ({err})") from None
        if len(rows) % 2:
            raise malformed(rows[-1][0], "an unpaired last row (pairs are rows 2k-1, 2k)", self.name)
        return rows

    def load_examples(self) -> Iterable[Example]:
        rows = self._rows()
        pairs = [(rows[k][0], (rows[k], rows[k + 1])) for k in range(0, len(rows), 2)]
        return list(self.examples_from(pairs, self._build))

    def _statement(self, where: str, row: Any) -> tuple[int, str, str]:
        """(Question ID, Type, Statement) of a row, checked."""
        require(row, COLUMNS, where, self.name)
        question = check_int(row["Question ID"], "Question ID", where, self.name, low=1)
        kind, statement = (check_string(row[c], c, where, self.name) for c in COLUMNS[1:])
        return question, kind, statement

    def _build(self, pair: tuple[tuple[str, Any], tuple[str, Any]]) -> Example:
        (where_1, row_1), (where_2, row_2) = pair
        id_1, kind, statement_1 = self._statement(where_1, row_1)
        id_2, kind_2, statement_2 = self._statement(where_2, row_2)
        if kind_2 != kind:
            raise malformed(where_2, f"Type {kind_2!r} differs from its pair's ({where_1}) {kind!r}", self.name)
        if id_1 % 2 != 1 or id_2 != id_1 + 1:
            raise malformed(where_2, f"a pair's Question IDs must be 2k-1 and 2k, got {id_1} and {id_2}", self.name)
        images = tuple(self.path(f"{IMAGES}/{kind}/{q}.jpg", where) for q, where in ((id_1, where_1), (id_2, where_2)))
        return Example(id=f"{id_1}-{id_2}", images=images, texts=(PROMPT + statement_1, PROMPT + statement_2),
                       label=(0, 1), meta={"type": kind})

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """Pair accuracy from the [2, 2] matrices s[image, statement]: statement j picks image
        label[j] (`is_correct` on column j) for both statements."""
        ties = self.protocol.ties
        correct = [all(is_correct(s[:, j], image, ties) for j, image in enumerate(ex.label))
                   for ex, s in zip(examples, self.score_matrices(examples, scores))]
        return accuracy_by_group(correct, [ex.meta["type"] for ex in examples])
