"""SVO-Probes: what loads from each accepted file and column layout, accuracy per negative type, and the
bad-data policy. No model runs here."""
from __future__ import annotations

import json

import pytest

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import SVO_ROWS, assert_inside_root, assert_malformed, file_names, write_csv, write_svo
from fixtures.scores import t2i_matrices


@pytest.fixture
def svo(tmp_path):
    return write_svo(tmp_path / "svo")


def test_svo_load(svo):
    task = get_task("svo", svo)
    assert task.modes == ("t2i",)
    exs = task.examples
    assert [ex.id for ex in exs] == ["0", "1", "2", "3"]
    assert [file_names(ex.images) for ex in exs] == [[r[1], r[2]] for r in SVO_ROWS]
    assert [ex.texts for ex in exs] == [(r[0],) for r in SVO_ROWS]
    assert all(ex.label == 0 for ex in exs)
    assert [ex.meta for ex in exs] == [{"type": r[3]} for r in SVO_ROWS]
    assert_inside_root(task)


def test_svo_metrics(svo):
    task = get_task("svo", svo)
    # subj right; verb tie (wrong); obj wrong; verb right
    scores = {"t2i": t2i_matrices([3, 1], [1, 1], [0, 2], [5, 4])}
    assert task.metrics(task.examples, scores) == pytest.approx(
        {"accuracy": 0.5, "accuracy/subj": 1.0, "accuracy/verb": 0.5, "accuracy/obj": 0.0})


def test_svo_original_columns_and_other_files(svo):
    (svo / "svo_probes.csv").unlink()
    header = ["sentence", "pos_triplet", "neg_triplet", "subj_neg", "verb_neg", "obj_neg",
              "pos_url", "neg_url", "pos_image_id", "neg_image_id"]
    rows = [("a man rides a horse", "man,ride,horse", "woman,ride,horse", "True", "False", "False", "http://x", "http://y",
             "p0", "n0"),
            ("a girl eats an apple", "girl,eat,apple", "girl,eat,pear", "False", "False", "True", "http://x", "http://y",
             "p2", "n2")]
    write_csv(svo / "svo_probes.csv", header, rows)
    exs = get_task("svo", svo).examples
    assert [file_names(ex.images) for ex in exs] == [["p0.jpg", "n0.jpg"], ["p2.jpg", "n2.jpg"]]  # bare ids get .jpg
    assert [ex.meta["type"] for ex in exs] == ["subj", "obj"]

    (svo / "svo_probes.csv").unlink()  # JSON lines
    lines = [json.dumps({"sentence": s, "pos_image": p, "neg_image": n, "neg_type": t}) for s, p, n, t in SVO_ROWS[:2]]
    (svo / "svo_probes.jsonl").write_text("\n".join(lines))
    assert [ex.meta["type"] for ex in get_task("svo", svo).examples] == ["subj", "verb"]

    (svo / "svo_probes.jsonl").unlink()  # the research code's svo.json
    (svo / "svo.json").write_text(json.dumps([{"pos_id": "p3.jpg", "neg_id": "n1.jpg",
                                               "sentence": "a boy throws a ball", "pos_triplet": "boy,throw,ball",
                                               "neg_triplet": "boy,catch,ball", "neg_type": "verb"}]))
    exs = get_task("svo", svo).examples
    assert file_names(exs[0].images) == ["p3.jpg", "n1.jpg"] and exs[0].meta == {"type": "verb"}


def test_svo_missing_image(svo):
    (svo / "images" / "p2.jpg").unlink()
    with pytest.raises(DataError, match=r"svo_probes.csv:4: missing image file.*p2.jpg"):
        get_task("svo", svo).examples
    task = get_task("svo", svo, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["0", "1", "3"]  # ids stay the row numbers
    assert len(task.skipped) == 1 and "p2.jpg" in task.skipped[0]


TYPED = ["sentence", "pos_image", "neg_image", "neg_type"]
FLAGGED = ["sentence", "pos_image", "neg_image", "subj_neg", "verb_neg", "obj_neg"]


@pytest.mark.parametrize("header, row, match", [
    (TYPED, ("x", "p0.jpg", "n0.jpg", "adj"), r"svo_probes.csv:3: malformed row: neg_type"),
    (TYPED, ("", "p0.jpg", "n0.jpg", "subj"), r"svo_probes.csv:3: malformed row: sentence must be a non-empty string"),
    (TYPED, ("x", "p0.jpg"), r"svo_probes.csv:3: malformed row: missing image column"),
    (TYPED, ("x", "../../x.png", "n0.jpg", "subj"), r"svo_probes.csv:3: .*outside the data root"),
    (FLAGGED, ("x", "p0.jpg", "n0.jpg", "True", "True", "False"), r"svo_probes.csv:3: malformed row: needs neg_type"),
    (FLAGGED, ("x", "p0.jpg", "n0.jpg", "maybe", "", ""),
     r"svo_probes.csv:3: malformed row: subj_neg must be a boolean"),
])
def test_svo_malformed(svo, header, row, match):
    good = ("a man rides a horse", "p0.jpg", "n0.jpg") + (("subj",) if header is TYPED else ("1", "0", "0"))
    write_csv(svo / "svo_probes.csv", header, [good, row])
    with pytest.raises(DataError, match=match):
        get_task("svo", svo).examples


def _svo_json_rows() -> list[dict]:
    return [{"sentence": s, "pos_image": p, "neg_image": n, "neg_type": t} for s, p, n, t in SVO_ROWS]


@pytest.mark.parametrize("file", ["svo_probes.jsonl", "svo.json"])
@pytest.mark.parametrize("field, value", [
    ("sentence", None), ("sentence", 5), ("pos_image", ["p1.jpg"]), ("neg_image", True), ("neg_image", 2.5),
    ("neg_type", ["verb"]),
])
def test_svo_malformed_field_types(svo, file, field, value):
    (svo / "svo_probes.csv").unlink()
    rows = _svo_json_rows()
    rows[1][field] = value
    if file.endswith(".jsonl"):
        (svo / file).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        (svo / file).write_text(json.dumps(rows))
    where = "svo_probes.jsonl:2" if file.endswith(".jsonl") else "svo.json[1]"
    assert_malformed(get_task("svo", svo), where, field, value)


def test_svo_null_image_is_a_missing_column(svo):
    (svo / "svo_probes.csv").unlink()
    rows = _svo_json_rows()
    rows[1]["pos_image"] = None  # null counts as absent: the next column of POS_COLUMNS is tried, here none
    (svo / "svo.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"svo.json\[1\]: malformed row: missing image column \(pos_image or "):
        get_task("svo", svo).examples


def test_svo_image_ids_as_numbers(svo):
    (svo / "svo_probes.csv").unlink()
    rows = [{"sentence": "a man rides a horse", "pos_image_id": 0, "neg_image_id": "1", "neg_type": "subj"}]
    (svo / "svo.json").write_text(json.dumps(rows))
    for name in ("0.jpg", "1.jpg"):
        (svo / "images" / name).write_bytes((svo / "images" / "p0.jpg").read_bytes())
    assert file_names(get_task("svo", svo).examples[0].images) == ["0.jpg", "1.jpg"]


def test_svo_csv_blank_sentence(svo):
    write_csv(svo / "svo_probes.csv", ["sentence", "pos_image", "neg_image", "neg_type"],
              [SVO_ROWS[0], ("  ", "p0.jpg", "n0.jpg", "subj")])
    assert_malformed(get_task("svo", svo), "svo_probes.csv:3", "sentence", "  ")


def test_svo_bad_options(svo, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*neg_type"):
        get_task("svo", svo, neg_type="verb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="svo_probes.csv"):
        get_task("svo", tmp_path / "empty").examples
