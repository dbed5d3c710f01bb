"""ImageCoDe: static/video subsets, accuracy on hand-made scores, the image-set folders, and the bad-data
policy. No model runs here."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import IMAGECODE_DATA, assert_inside_root, assert_malformed, file_names, write_imagecode


@pytest.fixture
def imagecode(tmp_path):
    return write_imagecode(tmp_path / "imagecode")


def test_imagecode_load(imagecode):
    task = get_task("imagecode", imagecode)
    assert task.modes == ("t2i",)
    exs = task.examples
    assert [ex.id for ex in exs] == ["open-images-1#3", "open-images-1#0", "open-images-2#9"]  # static only
    assert [ex.texts for ex in exs] == [("the third one",), ("the first one",), ("the last one",)]
    assert [ex.label for ex in exs] == [3, 0, 9]
    assert all(file_names(ex.images) == [f"img{i}.jpg" for i in range(10)] for ex in exs)
    assert all(Path(p).parent.name == "open-images-2" for p in exs[2].images)
    assert_inside_root(task)
    assert [ex.id for ex in get_task("imagecode", imagecode, subset="video").examples] == ["video-clip-7#5"]
    assert len(get_task("imagecode", imagecode, subset="all", split="val").examples) == 4


def test_imagecode_metrics(imagecode):
    task = get_task("imagecode", imagecode)
    s0, s1, s2 = torch.zeros(10), torch.zeros(10), torch.zeros(10)
    s0[3] = 1  # label 3 strictly highest: right
    s1[0], s1[4] = 2, 2  # label 0 ties with image 4: wrong
    s2[9], s2[2] = 1, 3  # image 2 beats label 9: wrong
    scores = {"t2i": [s.reshape(10, 1) for s in (s0, s1, s2)]}
    assert task.metrics(task.examples, scores) == pytest.approx({"accuracy": 1 / 3})


def test_imagecode_sets_at_root(imagecode):
    for image_set in IMAGECODE_DATA:
        os.rename(imagecode / "image-sets" / image_set, imagecode / image_set)
    (imagecode / "image-sets").rmdir()
    exs = get_task("imagecode", imagecode).examples
    assert Path(exs[0].images[0]) == imagecode / "open-images-1" / "img0.jpg"


def test_imagecode_missing_image(imagecode):
    (imagecode / "image-sets" / "open-images-2" / "img7.jpg").unlink()
    with pytest.raises(DataError, match=r"valid_data.json \['open-images-2'\]\['9'\]: missing image file.*img7.jpg"):
        get_task("imagecode", imagecode).examples
    task = get_task("imagecode", imagecode, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["open-images-1#3", "open-images-1#0"]
    assert len(task.skipped) == 1 and "img7.jpg" in task.skipped[0]


@pytest.mark.parametrize("data, match", [
    ({"open-images-1": {"12": "x"}}, r"\['open-images-1'\]\['12'\]: malformed row: index"),
    ({"open-images-1": {"x": "x"}}, r"\['open-images-1'\]\['x'\]: malformed row: index"),
    ({"open-images-1": {"2": 5}}, r"\['open-images-1'\]\['2'\]: malformed row: description"),
    ({"open-images-1": ["a", "b"]}, r"\['open-images-1'\]: malformed row"),
    ({"../../open-images-x": {"2": "x"}}, r"\['../../open-images-x'\]\['2'\].*outside the data root"),
    (["open-images-1"], r"valid_data.json: expected an object"),
])
def test_imagecode_malformed(imagecode, data, match):
    (imagecode / "valid_data.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=match):
        get_task("imagecode", imagecode).examples


@pytest.mark.parametrize("index, value, field", [
    ("2", None, "description"), ("2", 5, "description"), ("2", ["x"], "description"), ("2", " ", "description"),
    ("\u00b2", "superscript two", "index"), ("-1", "x", "index"), ("10", "x", "index"),
])
def test_imagecode_malformed_field_types(imagecode, index, value, field):
    (imagecode / "valid_data.json").write_text(json.dumps({"open-images-1": {"3": "ok", index: value}}))
    bad = value if field == "description" else index
    assert_malformed(get_task("imagecode", imagecode), f"valid_data.json ['open-images-1'][{index!r}]", field, bad)


def test_imagecode_bad_options(imagecode):
    with pytest.raises(ValueError, match="subset must be one of static, video, all"):
        get_task("imagecode", imagecode, subset="bogus")
    with pytest.raises(ValueError, match="unknown option.*static_only"):
        get_task("imagecode", imagecode, static_only=True)
    with pytest.raises(ValueError, match="no test_data.json for split 'test'; splits found: valid"):
        get_task("imagecode", imagecode, split="test").examples
