"""ShapesWorld's tasks (`itm_engine.shapesworld.tasks`: shapes, shapes_t2i, shapes_retrieval): loading
from a data root or from a draw in memory, metrics on hand-made scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from itm_engine.shapesworld.tasks import ShapesI2T, ShapesT2I
from itm_engine.shapesworld.world import ALL_SUBTASKS, SUBTASKS, Draw, write_shapesworld
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError


def test_tasks_load_and_score_hand_made_matrices(splits):
    root = splits["test"]["root"]
    i2t = get_task("shapes", root)
    assert len(i2t.examples) == 12 * len(SUBTASKS)
    first = i2t.examples[0]
    assert first.label == 0 and len(first.images) == 1 and first.texts[0] == splits["test"]["examples"][0]["caption"]
    # right on recognition_color (positive highest), a tie on spatial (wrong), wrong elsewhere
    scores = []
    for ex in i2t.examples:
        s = torch.zeros(1, len(ex.texts))
        if ex.meta["subtask"] == "recognition_color":
            s[0, 0] = 1.0
        elif ex.meta["subtask"] != "spatial":
            s[0, -1] = 1.0
        scores.append(s)
    metrics = i2t.metrics(i2t.examples, {"i2t": scores})
    assert metrics["accuracy/recognition_color"] == 1.0 and metrics["accuracy/spatial"] == 0.0
    assert metrics["accuracy"] == pytest.approx(1 / 7) and metrics["accuracy/macro"] == pytest.approx(1 / 7)
    assert set(metrics) == {"accuracy", "accuracy/macro", *(f"accuracy/{s}" for s in SUBTASKS)}

    assert {ex.meta["subtask"] for ex in get_task("shapes_t2i", root).examples} == set(ALL_SUBTASKS)
    t2i = get_task("shapes_t2i", root, subtasks="spatial,recognition_shape")
    assert {ex.meta["subtask"] for ex in t2i.examples} == {"spatial", "recognition_shape"}
    ex = t2i.examples[0]
    assert len(ex.texts) == 1 and len(ex.images) == 5 and len(set(ex.images)) == 5
    t2i_scores = [torch.arange(len(e.images), 0, -1).float().reshape(-1, 1) for e in t2i.examples]
    assert t2i.metrics(t2i.examples, {"t2i": t2i_scores})["accuracy"] == 1.0
    with pytest.raises(ValueError, match="subtasks"):
        get_task("shapes", root, subtasks="colour")


def test_retrieval_recall_on_hand_made_scores(splits):
    task = get_task("shapes_retrieval", splits["test"]["root"], pool=20)
    (ex,) = task.examples
    assert len(ex.images) == 20 and len(set(ex.texts)) == len(ex.texts)
    assert {Path(image).stem.rsplit("_", 1)[0] for image in ex.images[:7]} == set(SUBTASKS)  # taken in turn
    truth = torch.zeros(len(ex.images), len(ex.texts))
    for i, (j,) in enumerate(ex.label["i2t"]):
        truth[i, j] = 1.0 + i / 100  # distinct, so images sharing a caption do not tie
    assert task.metrics([ex], {"i2t": [truth], "t2i": [truth]}) == {
        "i2t/R@1": 1.0, "i2t/R@5": 1.0, "t2i/R@1": 1.0, "t2i/R@5": 1.0}
    flat = torch.zeros_like(truth)  # all ties: never retrieved at k below the number of candidates
    metrics = task.metrics([ex], {"i2t": [flat], "t2i": [flat]})
    assert metrics["i2t/R@1"] == 0.0 and metrics["t2i/R@5"] == 0.0


def test_from_world_gives_the_examples_itm_eval_reads_from_the_written_root(splits):
    """`from_world(Draw(...))` (the lab's reports) builds in memory the examples that `get_task` reads
    from `write_shapesworld` with the same draw: same ids, texts, labels, meta, and pixels."""
    draw = Draw("test", n=12, seed=0, size=48)
    for task_class, name in ((ShapesI2T, "shapes"), (ShapesT2I, "shapes_t2i")):
        on_disk = get_task(name, splits["test"]["root"]).examples
        in_memory = task_class.from_world(draw).examples
        assert [(ex.id, ex.texts, ex.label, ex.meta) for ex in in_memory] == \
            [(ex.id, ex.texts, ex.label, ex.meta) for ex in on_disk]
        for memory, disk in zip(in_memory, on_disk):
            assert len(memory.images) == len(disk.images)
            for image, path in zip(memory.images, disk.images):
                assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(PIL.Image.open(path).convert("RGB")))
    with pytest.raises(ValueError, match="not both or neither"):
        ShapesI2T(splits["test"]["root"], draw=draw)


@pytest.mark.parametrize("field, value, match", [
    ("id", ["x"], "id must be"), ("id", None, "id must be"), ("caption", None, "caption must be"),
    ("caption", 5, "caption must be"), ("image", 5, "image"), ("image", None, "image"),
])
def test_a_malformed_row_is_a_data_error_naming_file_and_row(tmp_path, field, value, match):
    root = write_shapesworld(tmp_path / "root", n=2, subtasks=("recognition_color",))
    data = json.loads((root / "examples.json").read_text())
    data["examples"][1][field] = value
    (root / "examples.json").write_text(json.dumps(data))
    # the row by its place in examples.json, or (once read) by its id
    with pytest.raises(DataError, match=rf"(examples\.json examples\[1\]|recognition_color/00001).*{match}"):
        get_task("shapes", root).examples


def test_the_varied_renderer_draws_the_same_scenes_in_other_pixels(tmp_path):
    exact = write_shapesworld(tmp_path / "exact", n=3)
    varied = write_shapesworld(tmp_path / "varied", n=3, style="varied")
    rows = [json.loads((root / "examples.json").read_text()) for root in (exact, varied)]
    assert rows[1]["style"] == "varied" and rows[0]["style"] == "exact"
    assert [(r["caption"], r["objects"]) for r in rows[0]["examples"]] == \
        [(r["caption"], r["objects"]) for r in rows[1]["examples"]]
    first = rows[0]["examples"][0]["image"]
    assert not np.array_equal(np.asarray(PIL.Image.open(exact / first)), np.asarray(PIL.Image.open(varied / first)))
    in_memory = ShapesI2T.from_world(Draw("test", 3, style="varied"))
    assert np.array_equal(np.asarray(in_memory.examples[0].images[0]), np.asarray(PIL.Image.open(varied / first)))
