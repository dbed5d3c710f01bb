"""ShapesWorld's evaluation tasks: `shapes` (image->text), `shapes_t2i` (text->image) and
`shapes_retrieval`, over a data root written by `itm-shapes write` or over examples drawn in memory
(`from_world`): one loader and one metric for `itm-eval --task shapes*` and the lab's own reports.

Registered into the task registry when the lab's plugin loads (`itm_engine.shapesworld.register`).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy_by_group, recall_at_k
from itm_engine.shapesworld.world import ALL_SUBTASKS, SUBTASKS, Draw, example_rows
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_id, check_string, require


class _Shapes(Task):
    """Reads ROOT/examples.json written by `write_shapesworld` (layout: `itm_engine.shapesworld.world`),
    or, given `draw` instead of a root, the same rows drawn in memory (images as PIL images).

    Options:
        subtasks: the subtasks to load, a list or a comma-separated string (default: the seven
            CLEVR-style `SUBTASKS`; for `shapes_t2i` also `complexity`).
    """

    option_names = ("subtasks",)
    default_subtasks: tuple[str, ...] = SUBTASKS
    needs_root = False

    def __init__(self, root=None, skip_missing: bool = False, *, draw: Draw | None = None, **options: Any) -> None:
        if (root is None) == (draw is None):
            raise ValueError(f"{self.name}: give a data root or a draw (examples made in memory), not both or neither")
        super().__init__(root, skip_missing, **options)
        self.draw = draw
        chosen = options.get("subtasks")
        names = [s.strip() for s in chosen.split(",")] if isinstance(chosen, str) else chosen
        if names is not None and (not isinstance(names, (list, tuple)) or not names
                                  or any(s not in ALL_SUBTASKS for s in names)):
            raise ValueError(f"{self.name}: option subtasks must name some of {', '.join(ALL_SUBTASKS)}, "
                             f"got {chosen!r}")
        self.subtasks = tuple(names) if names else self.default_subtasks

    @classmethod
    def from_world(cls, draw: Draw, **options: Any) -> _Shapes:
        """The task over the examples of `draw`, made in memory: the examples `itm-eval` reads from
        `write_shapesworld(root, **draw)`, with the images as PIL images instead of files."""
        return cls(None, draw=draw, **options)

    def rows(self) -> list[tuple[str, dict]]:
        """(where, row) of each example of the chosen subtasks, validated (files not checked)."""
        if self.draw is not None:
            data = {"examples": example_rows(self.draw, self.draw.render)}
        else:
            data = self.read_json("examples.json")
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise DataError(f"{self.name}: examples.json: expected an object with an 'examples' list")
        rows = []
        for i, row in enumerate(data["examples"]):
            where = f"examples.json examples[{i}]"
            require(row, ("id", "subtask", "image", "caption", "negatives"), where, self.name)
            row = {**row, "id": check_id(row["id"], "id", where, self.name),
                   "caption": check_string(row["caption"], "caption", where, self.name)}
            if not isinstance(row["negatives"], list) or not row["negatives"]:
                raise DataError(f"{self.name}: {where}: malformed row: negatives must be a non-empty list")
            for j, neg in enumerate(row["negatives"]):
                require(neg, ("image", "caption"), f"{where} negatives[{j}]", self.name)
                check_string(neg["caption"], "caption", f"{where} negatives[{j}]", self.name)
            if row["subtask"] in self.subtasks:
                rows.append((where, row))
        return rows

    def load_examples(self) -> Iterable[Example]:
        return list(self.examples_from(self.rows(), self.build))  # `build`: one Example per row

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        """"accuracy" (micro), "accuracy/macro" (mean over subtasks), "accuracy/<subtask>"; the
        correct candidate must score strictly highest (a tie is wrong)."""
        return accuracy_by_group(self.correct(examples, scores), [ex.meta["subtask"] for ex in examples])


@register
class ShapesI2T(_Shapes):
    """ShapesWorld image->text: one image against its positive and hard-negative captions.

    Example (id = the row's id): images = (scene,), texts = (positive, *negatives), label 0,
    meta {"subtask"}. Chance: 1/(1 + #negatives) (1/6 or 1/5 for recognition, 1/2 otherwise).
    """

    name = "shapes"
    modes = ("i2t",)
    description = "ShapesWorld: image vs positive and hard-negative captions, accuracy per subtask"

    def build(self, row: dict) -> Example:
        return Example(id=row["id"], images=(self.image(row["image"], row["id"]),),
                       texts=(row["caption"], *(n["caption"] for n in row["negatives"])), label=0,
                       meta={"subtask": row["subtask"]})


@register
class ShapesT2I(_Shapes):
    """ShapesWorld text->image: the positive caption against the positive image and the negative
    scenes' images (each differs from it in the one attribute the subtask probes).

    Example (id = the row's id): images = (scene, *negative scenes), texts = (caption,), label 0,
    meta {"subtask"}.
    """

    name = "shapes_t2i"
    modes = ("t2i",)
    default_subtasks = ALL_SUBTASKS  # with COMPLEXITY, built for text->image
    description = "ShapesWorld: caption vs images differing in one attribute, accuracy per subtask"

    def build(self, row: dict) -> Example:
        images = [self.image(row["image"], row["id"])]
        images += [self.image(n["image"], f"{row['id']} negatives[{j}]") for j, n in enumerate(row["negatives"])]
        return Example(id=row["id"], images=tuple(images), texts=(row["caption"],), label=0,
                       meta={"subtask": row["subtask"]})


@register
class ShapesRetrieval(_Shapes):
    """ShapesWorld retrieval, like Flickr30K: the positive images of the first `pool` examples
    (taking the subtasks in turn) against their distinct positive captions, all candidates, both directions.

    One example (id "pool{n}"): images = the n images, texts = the distinct captions; label
    {"i2t": [[caption index] per image], "t2i": [[indices of the images with that caption] per
    caption]}. Options: subtasks, pool (default 100). Metrics: "i2t/R@1", "i2t/R@5", "t2i/R@1",
    "t2i/R@5" (`metrics.recall_at_k`, ties count against).
    """

    name = "shapes_retrieval"
    modes = ("i2t", "t2i")
    description = "ShapesWorld: N images x N captions, R@1/R@5 image->text and text->image"
    option_names = ("subtasks", "pool")
    ks = (1, 5)

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.pool = options.get("pool", 100)
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 2:
            raise ValueError(f"{self.name}: option pool must be an integer >= 2, got {self.pool!r}")

    def load_examples(self) -> Iterable[Example]:
        turn: dict[str, int] = {}  # the k-th example of each subtask comes before any (k+1)-th
        keyed = []
        for item in self.rows():
            subtask = item[1]["subtask"]
            keyed.append((turn.get(subtask, 0), item))
            turn[subtask] = turn.get(subtask, 0) + 1
        rows = [item for _, item in sorted(keyed, key=lambda k: k[0])][: self.pool]
        rows = list(self.examples_from(rows, lambda r: (self.image(r["image"], r["id"]), r["caption"])))
        texts = list(dict.fromkeys(text for _, text in rows))
        label = {"i2t": [[texts.index(text)] for _, text in rows],
                 "t2i": [[i for i, (_, t) in enumerate(rows) if t == text] for text in texts]}
        return [Example(id=f"pool{len(rows)}", images=tuple(image for image, _ in rows), texts=tuple(texts),
                        label=label)]

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        if len(examples) != 1 or any(len(scores[m]) != 1 for m in self.modes):
            raise ValueError(f"{self.name}: expected one example with one matrix per mode")
        label = examples[0].label
        out = {f"i2t/{k}": v for k, v in recall_at_k(scores["i2t"][0], label["i2t"], self.ks,
                                                                  self.protocol.ties).items()}
        out.update({f"t2i/{k}": v for k, v in recall_at_k(scores["t2i"][0].T, label["t2i"], self.ks,
                                                                     self.protocol.ties).items()})
        return out
