"""What'sUp (Kamath et al., "What's "up" with vision-language models? Investigating their struggle
with spatial reasoning", EMNLP 2023): one image, captions that differ only in the spatial relation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy_by_group, grouped_accuracy
from itm_engine.tasks import register
from itm_engine.tasks.base import (
    DataError,
    Example,
    Task,
    check_id,
    check_list,
    check_string,
    check_strings,
    require,
    wrong_field,
)


@dataclass(frozen=True)
class Subset:
    """One of the six datasets of the official code (`dataset_zoo/aro_datasets.py`)."""

    annotations: str   # the JSON file at the root
    images: str        # the image folder at the root
    family: str        # the column of the paper's Table 1 that averages it with its sibling


SUBSETS = {  # the official --dataset names, lower case, in its order
    "controlled_images_a": Subset("controlled_images_dataset.json", "controlled_images", "controlled_images"),
    "controlled_images_b": Subset("controlled_clevr_dataset.json", "controlled_clevr", "controlled_images"),
    "coco_qa_one_obj": Subset("coco_qa_one_obj.json", "val2017", "coco_spatial"),
    "coco_qa_two_obj": Subset("coco_qa_two_obj.json", "val2017", "coco_spatial"),
    "vg_qa_one_obj": Subset("vg_qa_one_obj.json", "vg_images", "gqa_spatial"),
    "vg_qa_two_obj": Subset("vg_qa_two_obj.json", "vg_images", "gqa_spatial"),
}

# A controlled image is named {object}_{relation}_{object}.jpeg (relation "left_of", "on", "in-front_of", ...);
# its second "_" field is the relation's key in the official pair/set table, mapped here to the preposition
# the official per-preposition accuracy reports it under.
CONTROLLED_RELATIONS = {
    "controlled_images_a": {"left": "left_of", "right": "right_of", "on": "on", "under": "under"},
    "controlled_images_b": {"left": "left_of", "right": "right_of", "in-front": "in-front_of", "behind": "behind"},
}
# the opposite relations whose images must both be right for a pair to count
CONTROLLED_PAIRS = {
    "controlled_images_a": (("left_of", "right_of"), ("on", "under")),
    "controlled_images_b": (("left_of", "right_of"), ("in-front_of", "behind")),
}
# two-object COCO/GQA captions: the preposition is the first of these found in the correct caption, else the last
TWO_OBJECT_PREPOSITIONS = {
    "coco_qa_two_obj": (("left of", "left"), ("right of", "right"), ("above", "above"), (None, "below")),
    "vg_qa_two_obj": (("left of", "left"), ("right of", "right"), ("front of", "front"), ("behind", "behind"),
                      (None, "top")),
}


@register
class WhatsUp(Task):
    """What'sUp image->text: which caption gives the right spatial relation (official repo
    amitakamath/whatsup_vlms, `dataset_zoo/aro_datasets.py`, run by `main_aro.py`).

    Layout (the official `data/` folder)::

        ROOT/controlled_images_dataset.json   Controlled-A: a JSON list of {"image_path":
                                              "data/controlled_images/mug_on_table.jpeg",
                                              "caption_options": [correct, wrong, wrong, wrong]}
        ROOT/controlled_images/               its images, by the file name of image_path
        ROOT/controlled_clevr_dataset.json    Controlled-B (CLEVR renders), rows as above
                                              ("data/controlled_clevr/cube_behind_sphere.jpeg")
        ROOT/controlled_clevr/                its images
        ROOT/coco_qa_one_obj.json             COCO-spatial: a JSON list of rows
        ROOT/coco_qa_two_obj.json             [image id, correct caption, wrong caption]
        ROOT/val2017/{image id:012d}.jpg      COCO val2017
        ROOT/vg_qa_one_obj.json               GQA-spatial, rows as above
        ROOT/vg_qa_two_obj.json
        ROOT/vg_images/{image id}.jpg         Visual Genome

    image_path is relative to the official repository's root; only its file name is used, in the
    subset's image folder (so "data/controlled_images/x.jpeg", "controlled_images/x.jpeg" and an
    absolute path all work). A controlled image's name must be {object}_{relation}_{object}.jpeg,
    relation one of left_of, right_of, on, under (A) or left_of, right_of, in-front_of, behind (B):
    the official pair and set accuracies read the object pair and the relation from it. A COCO/GQA
    row may list more than one wrong caption; as in the official loader, only item 2 is used.
    A subset whose JSON file is absent is skipped (unless it was asked for by name).

    Example (one per row, id = "{subset}/{row index}"): images = (the image,), texts = the caption
    options (correct first), label 0, meta {"subset", "preposition"} (+ "objects" for the controlled
    sets). Examples come subset by subset in the order listed under Options, then in file order.

    Options:
        subsets: the subsets to load, a list or a comma-separated string of controlled_images_a,
            controlled_images_b, coco_qa_one_obj, coco_qa_two_obj, vg_qa_one_obj, vg_qa_two_obj
            (the official --dataset names in lower case; default: all present).

    Metrics (the official `evaluate_scores`, as fractions rather than percentages; an example is
    right when the correct caption wins under the protocol's tie policy -- the official argmax is
    "argmax-first", where a tie goes to the correct caption, listed first):
        accuracy/<subset>: individual accuracy (what `evaluate_scores` prints for every subset).
        accuracy/<subset>/<preposition>: per preposition, as the official result records group
            them: controlled sets by the image's relation, one-object sets by the last word of
            the correct caption, two-object sets by the first of left of, right of, above (COCO)
            or left of, right of, front of, behind (GQA) in the correct caption, else below (COCO)
            or top (GQA).
        pair_accuracy/<subset>, set_accuracy/<subset> (controlled sets): per object pair (the
            first and last "_" fields of the image name), a pair is right when both images of
            left/right are right, another when both of on/under (A) or in-front/behind (B) are;
            a set when all four are. Pair accuracy = right pairs / (N / 2), set accuracy = right
            sets / (N / 4), N the subset's examples (the official denominators).
        accuracy: over all examples; accuracy/macro: the mean over the subsets.
        accuracy/controlled_images, accuracy/coco_spatial, accuracy/gqa_spatial: the paper's
            Table 1, the mean of the two subsets (A and B; one- and two-object), when both are loaded.

    Jeong et al. (2025) run a copy of the official classes, each family under its own root
    (whatsup/, coco_qa/, VG_QA/): the same files and metrics.
    """

    name = "whatsup"
    modes = ("i2t",)
    description = "What'sUp: caption with the right spatial relation, accuracy per subset (+ pair/set accuracy)"
    option_names = ("subsets",)

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.chosen = self.chosen_names("subsets", tuple(SUBSETS))

    def load_examples(self) -> Iterable[Example]:
        rows = []
        for subset in self.complete_parts(self.chosen, tuple(SUBSETS), lambda s: [SUBSETS[s].annotations]):
            file = SUBSETS[subset].annotations
            data = self.read_json(file)
            if not isinstance(data, list):
                raise DataError(f"{self.name}: {self.root / file}: expected a JSON list of rows")
            rows += [(f"{file} row {i}", (subset, i, row)) for i, row in enumerate(data)]
        return list(self.examples_from(rows, self._build))

    def _build(self, item: tuple[str, int, Any]) -> Example:
        subset, index, row = item
        where = f"{SUBSETS[subset].annotations} row {index}"
        build = self._controlled if subset in CONTROLLED_RELATIONS else self._question
        image, texts, meta = build(subset, row, where)
        return Example(id=f"{subset}/{index}", images=(image,), texts=texts, label=0, meta={"subset": subset, **meta})

    def _controlled(self, subset: str, row: Any, where: str) -> tuple[str, tuple[str, ...], dict]:
        require(row, ("image_path", "caption_options"), where, self.name)
        image_path = check_string(row["image_path"], "image_path", where, self.name)
        texts = _caption_options(row["caption_options"], where, self.name)
        file_name = PurePosixPath(image_path).name
        fields = PurePosixPath(file_name).stem.split("_")
        relations = CONTROLLED_RELATIONS[subset]
        if len(fields) < 3 or fields[1] not in relations:
            raise wrong_field(image_path, "image_path", "a path to {object}_{relation}_{object}.jpeg with relation "
                              f"one of {', '.join(relations.values())}", where, self.name)
        meta = {"preposition": relations[fields[1]], "objects": [fields[0], fields[-1]]}
        return self.path(f"{SUBSETS[subset].images}/{file_name}", where), texts, meta

    def _question(self, subset: str, row: Any, where: str) -> tuple[str, tuple[str, ...], dict]:
        items = check_list(row, "row", where, self.name, of="items: [image id, correct caption, wrong caption]")
        if len(items) < 3:
            raise wrong_field(row, "row", "a list [image id, correct caption, wrong caption]", where, self.name)
        image_id = check_id(items[0], "item 0 (image id)", where, self.name)
        texts = (check_string(items[1], "item 1 (correct caption)", where, self.name),
                 check_string(items[2], "item 2 (wrong caption)", where, self.name))
        folder = SUBSETS[subset].images
        file_name = f"{image_id.zfill(12)}.jpg" if folder == "val2017" else f"{image_id}.jpg"
        return self.path(f"{folder}/{file_name}", where), texts, {"preposition": _preposition(subset, texts[0])}

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        correct = self.correct(examples, scores)
        subsets = [ex.meta["subset"] for ex in examples]
        out = accuracy_by_group(correct, subsets)
        for family in dict.fromkeys(s.family for s in SUBSETS.values()):
            members = [f"accuracy/{name}" for name, s in SUBSETS.items() if s.family == family]
            if all(key in out for key in members):
                out[f"accuracy/{family}"] = sum(out[key] for key in members) / len(members)
        for subset in dict.fromkeys(subsets):
            chosen = [n for n, s in enumerate(subsets) if s == subset]
            per_preposition = grouped_accuracy([correct[n] for n in chosen],
                                               [examples[n].meta["preposition"] for n in chosen])
            out.update({f"accuracy/{subset}/{p}": value for p, value in per_preposition.items()})
            if subset in CONTROLLED_PAIRS:
                pair, full_set = controlled_pair_and_set_accuracy([correct[n] for n in chosen],
                                                                  [examples[n] for n in chosen],
                                                                  CONTROLLED_PAIRS[subset])
                out[f"pair_accuracy/{subset}"], out[f"set_accuracy/{subset}"] = pair, full_set
        return out


def controlled_pair_and_set_accuracy(correct: Sequence[bool], examples: Sequence[Example],
                                     pairs: Sequence[tuple[str, str]]) -> tuple[float, float]:
    """The official pair and set accuracies of a controlled set: per object pair (meta "objects")
    the result of each relation (meta "preposition"; a later row of the same pair and relation
    replaces an earlier one, an absent one is wrong); right pairs among `pairs` / (N / 2) and
    pairs with all their relations right / (N / 4), N = len(examples)."""
    table: dict[tuple[str, ...], dict[str, bool]] = {}
    for ok, example in zip(correct, examples):
        table.setdefault(tuple(example.meta["objects"]), {})[example.meta["preposition"]] = bool(ok)
    relations = [r for pair in pairs for r in pair]
    pair_hits = sum(all(results.get(r, False) for r in pair) for results in table.values() for pair in pairs)
    set_hits = sum(all(results.get(r, False) for r in relations) for results in table.values())
    return pair_hits / (len(examples) / 2), set_hits / (len(examples) / 4)


def _caption_options(value: Any, where: str, task: str) -> tuple[str, ...]:
    texts = check_strings(value, "caption_options", where, task)
    if len(texts) < 2:
        raise wrong_field(value, "caption_options", "a list of at least 2 strings (the correct one first)", where, task)
    return tuple(texts)


def _preposition(subset: str, correct_caption: str) -> str:
    """The preposition the official per-preposition accuracy files a COCO/GQA row under."""
    if subset not in TWO_OBJECT_PREPOSITIONS:
        return correct_caption.split()[-1]
    return next(label for phrase, label in TWO_OBJECT_PREPOSITIONS[subset]
                if phrase is None or phrase in correct_caption)
