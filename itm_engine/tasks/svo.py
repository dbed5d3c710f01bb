"""SVO-Probes: a sentence, the image it describes and one that differs in subject, verb or object."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy
from itm_engine.tasks import register
from itm_engine.tasks.base import (
    DataError,
    Example,
    Task,
    check_id,
    check_string,
    malformed,
    require,
    wrong_field,
)

TYPES = ("subj", "verb", "obj")
FILES = ("svo_probes.csv", "svo_probes.jsonl", "svo.json")
POS_COLUMNS = ("pos_image", "pos_image_id", "pos_id")  # first one present wins
NEG_COLUMNS = ("neg_image", "neg_image_id", "neg_id")
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no", ""}


@register
class SVOProbes(Task):
    """SVO-Probes (Hendricks & Nematzadeh, 2021), text->image accuracy per negation type.

    Layout::

        ROOT/svo_probes.csv     one probe a row (or svo_probes.jsonl: one JSON object a line, or
                                the research code's svo.json: a JSON list), with
                                  sentence                          the caption
                                  pos_image, neg_image              image file names in images/
                                                                    (or the original pos_image_id /
                                                                    neg_image_id, or pos_id / neg_id;
                                                                    a bare id gets ".jpg")
                                  neg_type                          subj, verb or obj (or the
                                                                    original subj_neg / verb_neg /
                                                                    obj_neg flags, exactly one true)
        ROOT/images/            the images

    Each row is an example: images (positive, negative), the sentence, label 0.
    Metrics: "accuracy" overall and "accuracy/subj", "accuracy/verb", "accuracy/obj".
    """

    name = "svo"
    modes = ("t2i",)
    description = "SVO-Probes text->image accuracy, overall and per negation type (subj/verb/obj)"

    def _rows(self) -> list[tuple[str, Any]]:
        file = next((f for f in FILES if (self.root / f).is_file()), FILES[0])
        if file.endswith(".jsonl"):
            return self.read_jsonl(file)
        if file.endswith(".json"):
            data = self.read_json(file)
            if not isinstance(data, list):
                raise DataError(f"{self.name}: {file}: expected a JSON list of probes")
            return [(f"{file}[{i}]", row) for i, row in enumerate(data)]
        if not (self.root / file).is_file():
            raise FileNotFoundError(f"{self.name}: expected one of {', '.join(FILES)} in {self.root} "
                                    "(layout: docs/evaluation.md)")
        with open(self.root / file, newline="") as handle:
            reader = csv.DictReader(handle)
            try:
                return [(f"{file}:{reader.line_num}", row) for row in reader]
            except csv.Error as err:
                raise DataError(f"{self.name}: {file} line {reader.line_num}: malformed row ({err})") from None

    def load_examples(self) -> Iterable[Example]:
        def build(item: tuple[int, str, Any]) -> Example:
            n, where, row = item
            require(row, (), where, self.name)
            sentence = check_string(row.get("sentence"), "sentence", where, self.name)
            images = tuple(self.path(Path("images") / self._image_name(row, columns, where), where)
                           for columns in (POS_COLUMNS, NEG_COLUMNS))
            return Example(id=str(n), images=images, texts=(sentence,), label=0, meta={"type": self._type(row, where)})

        rows = ((where, (n, where, row)) for n, (where, row) in enumerate(self._rows()))
        return list(self.examples_from(rows, build))

    def _image_name(self, row: dict, columns: Sequence[str], where: str) -> str:
        """The image file name in the first of `columns` with a value (null and "" count as absent):
        a file name, or an id (a string or an integer) that gets ".jpg"."""
        column = next((c for c in columns if row.get(c) not in (None, "")), None)
        if column is None:
            raise malformed(where, f"missing image column ({' or '.join(columns)})", self.name)
        name = check_id(row[column], column, where, self.name).strip()
        return name if Path(name).suffix else f"{name}.jpg"

    def _type(self, row: dict, where: str) -> str:
        if row.get("neg_type") not in (None, ""):  # absent in the original files, which have the flags
            if row["neg_type"] not in TYPES:
                raise wrong_field(row["neg_type"], "neg_type", f"one of {', '.join(TYPES)}", where, self.name)
            return row["neg_type"]
        flags = {t: _flag(row.get(f"{t}_neg"), f"{t}_neg", where, self.name) for t in TYPES}
        if sum(flags.values()) != 1:
            raise malformed(where, "needs neg_type, or exactly one of subj_neg, verb_neg, obj_neg true", self.name)
        return next(t for t, on in flags.items() if on)

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """"accuracy" (the positive image wins, under the protocol's tie policy) overall and per
        negation type."""
        vectors = [s.reshape(-1) for s in scores["t2i"]]
        ties = self.protocol.ties
        out = {"accuracy": accuracy(vectors, [ex.label for ex in examples], ties)}
        for kind in TYPES:
            members = [n for n, ex in enumerate(examples) if ex.meta["type"] == kind]
            if members:
                out[f"accuracy/{kind}"] = accuracy([vectors[n] for n in members], [examples[n].label for n in members],
                                                   ties)
        return out


def _flag(value: Any, key: str, where: str, task: str) -> bool:
    """A boolean column: JSON true/false or 1/0, CSV "True"/"False"/"1"/"0"/"" (absent = false)."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if value is None or str(value).strip().lower() in FALSE:
        return False
    if str(value).strip().lower() in TRUE:
        return True
    raise wrong_field(value, key, "a boolean", where, task)
