"""Winoground: what loads (examples.jsonl or data.json), its text/image/group metrics per tag, and the
bad-data policy. No model runs here."""
from __future__ import annotations

import json

import pytest
import torch

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import (
    assert_inside_root,
    assert_malformed,
    colour_of,
    file_names,
    outside_file,
    solid_image,
    write_winoground,
    write_winoground_hf,
)


@pytest.fixture
def wino(tmp_path):
    return write_winoground(tmp_path / "winoground")


def test_winoground_load(wino):
    task = get_task("winoground", wino)
    assert task.modes == ("i2t", "t2i")
    exs = task.examples
    assert [ex.id for ex in exs] == ["0", "1", "2"]
    assert file_names(exs[1].images) == ["ex_1_img_0.png", "ex_1_img_1.png"]
    assert exs[0].texts == ("a cat on a dog", "a dog on a cat")
    assert [ex.meta for ex in exs] == [{"tag": "Object", "collapsed_tag": ["Object"]},
                                       {"tag": "Relation", "collapsed_tag": ["Relation"]},
                                       {"tag": "Both", "collapsed_tag": ["Relation", "Both"]}]
    assert_inside_root(task)


def test_winoground_writer_size(tmp_path):
    exs = get_task("winoground", write_winoground(tmp_path / "w", n=8)).examples
    assert [ex.id for ex in exs] == [str(k) for k in range(8)]
    assert len({p for ex in exs for p in ex.images}) == 16


def test_winoground_metrics(wino):
    task = get_task("winoground", wino)
    m = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731  s[image, caption]
    i2t = [m([2, 1], [0, 3]),  # text right
           m([1, 1], [0, 3]),  # image 0 ties between the captions: text wrong
           m([5, 1], [0, 3])]  # text right
    t2i = [m([2, 0], [1, 3]),  # image right
           m([2, 0], [1, 3]),  # image right
           m([0, 1], [1, 0])]  # caption 0 prefers image 1: image wrong
    # per example: text T F T, image T T F, group T F F; ex 2 counts for both Relation and Both
    assert task.metrics(task.examples, {"i2t": i2t, "t2i": t2i}) == pytest.approx({
        "text/overall": 2 / 3, "image/overall": 2 / 3, "group/overall": 1 / 3,
        "text/Object": 1.0, "text/Relation": 0.5, "text/Both": 1.0,
        "image/Object": 1.0, "image/Relation": 0.5, "image/Both": 0.0,
        "group/Object": 1.0, "group/Relation": 0.0, "group/Both": 0.0,
    })


def test_winoground_data_json_variants(tmp_path):
    root = tmp_path / "wg"
    rows = [{"id": i, "caption_0": f"a{i}", "caption_1": f"b{i}", "tag": "Object"} for i in (5, 6)]
    for row in rows:
        for i in (0, 1):
            solid_image(root / f"ex_{row['id']}_img_{i}.png", colour_of(i))  # images at the root
    (root / "data.json").write_text(json.dumps(rows))  # a JSON list, no collapsed_tag
    exs = get_task("winoground", root).examples
    assert [ex.id for ex in exs] == ["5", "6"]
    assert exs[0].meta == {"tag": "Object", "collapsed_tag": ["Object"]}
    assert file_names(exs[1].images) == ["ex_6_img_0.png", "ex_6_img_1.png"]
    (root / "data.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON lines
    assert [ex.id for ex in get_task("winoground", root).examples] == ["5", "6"]
    (root / "data.json").write_text(json.dumps(rows[0]))  # JSON lines, one line
    assert [ex.id for ex in get_task("winoground", root).examples] == ["5"]
    rows[1].pop("caption_1")
    (root / "data.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"data.json\[1\]: malformed row: missing field\(s\) caption_1"):
        get_task("winoground", root).examples


def test_winoground_missing_image(wino):
    (wino / "images" / "ex_1_img_1.png").unlink()
    with pytest.raises(DataError, match=r"examples.jsonl:2: missing image file.*ex_1_img_1.png"):
        get_task("winoground", wino).examples
    task = get_task("winoground", wino, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["0", "2"]
    assert len(task.skipped) == 1 and "ex_1_img_1.png" in task.skipped[0]


@pytest.mark.parametrize("line, match", [
    ('{"id": 1, "caption_0": "x", "tag": "Object"}', r"examples.jsonl:2: malformed row: missing field\(s\) caption_1"),
    ('{"id": 1, "caption_0": "x", "caption_1": 3, "tag": "Object"}', r"examples.jsonl:2: malformed row: caption_1"),
    ('{"id": 1, "caption_0": "x", "caption_1": "y", "tag": "Object", "collapsed_tag": [1]}',
     r"examples.jsonl:2: .*collapsed_tag"),
    ('{"id": 1, "caption_0": "x", "caption_1": "y", "tag": 5}', r"examples.jsonl:2: malformed row: tag"),
    ('{"id": 1, "caption_0": "x", ', r"examples.jsonl line 2: malformed row"),
    ('["not", "an", "object"]', r"examples.jsonl:2: malformed row: expected an object"),
    ('{"id": "/../../../x", "caption_0": "x", "caption_1": "y", "tag": "Object"}',
     r"examples.jsonl:2: .*outside the data root"),
    ('{"id": 0, "caption_0": "x", "caption_1": "y", "tag": "Object"}', r"duplicate example id '0'"),
])
def test_winoground_malformed(wino, line, match):
    lines = (wino / "examples.jsonl").read_text().splitlines()
    lines[1] = line
    (wino / "examples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        get_task("winoground", wino).examples


@pytest.mark.parametrize("field, value", [
    ("id", ["x"]), ("id", None), ("id", True), ("image_0", 5), ("image_1", None), ("caption_0", None), ("caption_1", 5),
    ("caption_0", ""),
])
def test_winoground_malformed_field_types(wino, tmp_path, field, value):
    rows = [json.loads(line) for line in (wino / "examples.jsonl").read_text().splitlines()]
    rows[1][field] = value
    (wino / "examples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_malformed(get_task("winoground", wino), "examples.jsonl:2", field, value)
    (wino / "examples.jsonl").rename(wino / "data.json")  # the same rows as a JSON list
    (wino / "data.json").write_text(json.dumps(rows))
    assert_malformed(get_task("winoground", wino), "data.json[1]", field, value)


def test_winoground_ids_and_image_names(wino):
    rows = [json.loads(line) for line in (wino / "examples.jsonl").read_text().splitlines()]
    rows[1].update(id="1", image_0="ex_1_img_0")  # an id as a string, an image named as the default would be
    (wino / "examples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [ex.id for ex in get_task("winoground", wino).examples] == ["0", "1", "2"]


def test_winoground_symlinks_leading_outside_are_refused(wino, tmp_path):
    image = wino / "images" / "ex_1_img_0.png"
    image.rename(wino / "ex_1_img_0.png")
    image.symlink_to(wino / "ex_1_img_0.png")  # inside the root: fine
    assert_inside_root(get_task("winoground", wino))
    image.unlink()
    image.symlink_to(outside_file(tmp_path))
    with pytest.raises(DataError, match=r"examples.jsonl:2: image path 'images/ex_1_img_0.png' resolves outside "
                                        r"the data root"):
        get_task("winoground", wino, skip_missing=True).examples

    hf = write_winoground_hf(tmp_path / "hf")
    (hf / "data" / "images.zip").rename(tmp_path / "images.zip")
    (hf / "data" / "images.zip").symlink_to(tmp_path / "images.zip")  # the archive lies outside the root
    with pytest.raises(DataError, match=r"data/images.zip resolves outside the data root"):
        get_task("winoground", hf).examples


def test_winoground_bad_options(wino, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*split"):
        get_task("winoground", wino, split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="examples.jsonl"):
        get_task("winoground", tmp_path / "empty").examples
