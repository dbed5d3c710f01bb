"""CLEVR (the research code's subtask caption files): what loads, accuracy per subtask, and the bad-data
policy."""
from __future__ import annotations

import pytest

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import assert_malformed, edit_json, outside_file, write_clevr
from fixtures.scores import i2t_scores


def test_clevr_examples(tmp_path):
    root = write_clevr(tmp_path / "clevr")
    examples = get_task("clevr", root).examples
    assert [ex.id for ex in examples] == [
        "pair_binding_size/CLEVR_a.png/0", "pair_binding_size/CLEVR_a.png/1", "pair_binding_size/CLEVR_b.png/0",
        "recognition_color/CLEVR_b.png/0", "spatial/CLEVR_a.png/0", "spatial/CLEVR_c.png/0"]
    ex = examples[3]
    assert ex.images == (str((root / "images" / "CLEVR_b.png").resolve()),)
    assert ex.texts == ("A red cube.", "A blue cube.") and ex.label == 0 and ex.meta == {"subtask": "recognition_color"}
    # option subtasks (string or list); the research code's captions/ folder works too
    assert {ex.meta["subtask"] for ex in get_task("clevr", root, subtasks="spatial").examples} == {"spatial"}
    (root / "captions").mkdir()
    (root / "recognition_color.json").rename(root / "captions" / "recognition_color.json")
    chosen = get_task("clevr", root, subtasks=["recognition_color", "spatial"]).examples
    assert [ex.meta["subtask"] for ex in chosen] == ["recognition_color", "spatial", "spatial"]


def test_clevr_metrics(tmp_path):
    task = get_task("clevr", write_clevr(tmp_path / "clevr"))
    # size: right, tie, wrong -> 1/3; colour: right -> 1; spatial: right, wrong -> 1/2
    scores = i2t_scores([2.0, 1.0], [1.0, 1.0], [0.0, 1.0], [5.0, 4.0], [-1.0, -2.0], [-3.0, -2.0])
    result = task.metrics(task.examples, scores)
    assert result == pytest.approx({
        "accuracy": 3 / 6, "accuracy/macro": (1 / 3 + 1 + 1 / 2) / 3, "accuracy/pair_binding_size": 1 / 3,
        "accuracy/recognition_color": 1.0, "accuracy/spatial": 0.5})


def test_clevr_bad_data_and_options(tmp_path):
    root = write_clevr(tmp_path / "clevr")
    (root / "images" / "CLEVR_c.png").unlink()
    with pytest.raises(DataError, match=r"spatial.json \['CLEVR_c.png'\].*CLEVR_c.png"):
        get_task("clevr", root).examples
    task = get_task("clevr", root, skip_missing=True)
    assert len(task.examples) == 5 and len(task.skipped) == 1 and "CLEVR_c.png" in task.skipped[0]

    edit_json(root / "spatial.json", lambda d: d["CLEVR_a.png"].append(["one", "two", "three"]))
    with pytest.raises(DataError, match=r"spatial.json \['CLEVR_a.png'\]: malformed row: pairs\[1\] must be"):
        get_task("clevr", root).examples

    root = write_clevr(tmp_path / "clevr2")
    outside_file(tmp_path)
    edit_json(root / "spatial.json", lambda d: d.update({"../../outside.png": [["a", "b"]]}))
    with pytest.raises(DataError, match="outside the data root"):
        get_task("clevr", root).examples

    with pytest.raises(ValueError, match=r"option subtasks: unknown name\(s\) colour; known: pair_binding_size"):
        get_task("clevr", root, subtasks="colour")
    with pytest.raises(FileNotFoundError, match="binding_color_shape"):
        get_task("clevr", root, subtasks="binding_color_shape").examples
    with pytest.raises(ValueError, match="unknown option"):
        get_task("clevr", root, subtask="spatial")


@pytest.mark.parametrize("pairs, field, value", [
    ([["A red cube.", None]], "pairs[0][1]", None),
    ([["A red cube.", "A blue cube."], [5, "A blue cube."]], "pairs[1][0]", 5),
    (["A red cube."], "pairs[0]", "A red cube."),
    ("A red cube.", "pairs", "A red cube."),
    ([], "pairs", []),
])
def test_clevr_malformed_field_types(tmp_path, pairs, field, value):
    root = write_clevr(tmp_path / "clevr")
    edit_json(root / "recognition_color.json", lambda d: d.update({"CLEVR_b.png": pairs}))
    assert_malformed(get_task("clevr", root), "recognition_color.json ['CLEVR_b.png']", field, value)
