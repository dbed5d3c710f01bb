"""COLA multi-object (the official JSON of image URLs and captions): what loads, the official image-side
accuracy, ties, the bad-data policy."""
from __future__ import annotations

import json

import pytest
import torch

from itm_engine.protocols import PRESETS
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import (
    COLA_ROWS,
    assert_inside_root,
    assert_malformed,
    edit_json,
    file_names,
    outside_file,
    write_cola,
)

ANNOTATION = "data/COLA_multiobjects_matching_benchmark.json"


@pytest.fixture
def root(tmp_path):
    return write_cola(tmp_path / "cola")


def official_multi_obj_acc(preds) -> bool:
    """scripts/eval.py's ColaMultiObjAcc on a 2 x 2 array preds[image, caption]."""
    im0_c0, im0_c1 = preds[0][0], preds[0][1]
    im1_c0, im1_c1 = preds[1][0], preds[1][1]
    return im0_c0 > im1_c0 and im1_c1 > im0_c1


def test_cola_examples(root):
    task = get_task("cola", root)
    assert task.modes == ("t2i",)
    examples = task.examples
    assert [ex.id for ex in examples] == ["0", "1", "2"]
    assert [file_names(ex.images) for ex in examples] == [[f"{a}.jpg", f"{b}.jpg"] for a, _, b, _ in COLA_ROWS]
    assert examples[2].images[1] == examples[0].images[0]  # one image in two rows
    assert [ex.texts for ex in examples] == [(ca, cb) for _, ca, _, cb in COLA_ROWS]
    assert all(ex.meta == {} for ex in examples)
    assert_inside_root(task)


def test_cola_folder_variants(root):
    (root / ANNOTATION).rename(root / "COLA_multiobjects_matching_benchmark.json")  # at the root
    (root / "images").rename(root / "vg_gqa_images")  # the URLs' own folder name
    task = get_task("cola", root)
    assert len(task.examples) == 3
    assert_inside_root(task)
    (root / "vg_gqa_images").rename(root / "gqa")
    rows = json.loads((root / "COLA_multiobjects_matching_benchmark.json").read_text())
    rows[1][0] = "2383130.jpg"  # a bare file name
    rows[1][2] = "some/folder/2382835.jpg"  # a relative path: its file name counts
    (root / "COLA_multiobjects_matching_benchmark.json").write_text(json.dumps(rows))
    task = get_task("cola", root, image_dir="gqa")
    assert file_names(task.examples[1].images) == ["2383130.jpg", "2382835.jpg"]
    assert_inside_root(task)


def test_cola_metric_matches_the_official_evaluation(root):
    task = get_task("cola", root)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        matrices = [torch.randint(0, 3, (2, 2), generator=gen).float() for _ in task.examples]  # ties happen
        official = sum(official_multi_obj_acc(m.tolist()) for m in matrices) / len(matrices)
        assert task.metrics(task.examples, {"t2i": matrices}) == pytest.approx({"accuracy": official})


def test_cola_is_image_side_only(root):
    task = get_task("cola", root)
    m = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731  s[image, caption]
    image_side_right = m([2, 3], [0, 4])  # each caption prefers its own image; image 0 prefers caption 1
    image_side_wrong = m([0, 5], [1, 0])  # caption 0 prefers image 1
    assert task.metrics(task.examples, {"t2i": [image_side_right] * 3}) == {"accuracy": 1.0}
    assert task.metrics(task.examples, {"t2i": [image_side_right, image_side_wrong, image_side_wrong]}) == \
        pytest.approx({"accuracy": 1 / 3})
    with pytest.raises(ValueError, match="2 score matrices for 3 examples"):
        task.metrics(task.examples, {"t2i": [image_side_right] * 2})


def test_cola_ties_follow_the_protocol(root):
    tied = {"t2i": [torch.ones(2, 2)] * 3}
    assert get_task("cola", root).metrics(get_task("cola", root).examples, tied) == {"accuracy": 0.0}
    # argmax-first: caption 0's tie goes to image 0 (right), caption 1's to image 0 too (wrong)
    first = get_task("cola", root, protocol=PRESETS["diffusion-itm"])
    assert first.metrics(first.examples, tied) == {"accuracy": 0.0}
    half_tied = {"t2i": [torch.tensor([[1.0, 0.0], [1.0, 2.0]])] * 3}  # caption 0 ties, caption 1 picks image 1
    assert first.metrics(first.examples, half_tied) == {"accuracy": 1.0}
    assert get_task("cola", root).metrics(first.examples, half_tied) == {"accuracy": 0.0}


def test_cola_missing_image(root):
    (root / "images" / "2388902.jpg").unlink()
    with pytest.raises(DataError, match=rf"{ANNOTATION} row 0: missing image file .*2388902.jpg"):
        get_task("cola", root).examples
    task = get_task("cola", root, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["1", "2"]
    assert len(task.skipped) == 1 and "2388902.jpg" in task.skipped[0]


@pytest.mark.parametrize("row, field, value", [
    ({"image": "x"}, "row", {"image": "x"}),
    (["a.jpg", "cap", "b.jpg"], "row", ["a.jpg", "cap", "b.jpg"]),
    (["a.jpg", None, "b.jpg", "cap"], "row[1]", None),
    (["a.jpg", "cap", 7, "cap"], "row[2]", 7),
    (["https://cs-people.bu.edu/array/data/vg_gqa_images/", "cap", "b.jpg", "cap"], "row[0]",
     "https://cs-people.bu.edu/array/data/vg_gqa_images/"),
    (["a.jpg", "cap", "images/..", "cap"], "row[2]", "images/.."),
])
def test_cola_malformed_rows(root, row, field, value):
    edit_json(root / ANNOTATION, lambda rows: rows.__setitem__(1, row))
    assert_malformed(get_task("cola", root), f"{ANNOTATION} row 1", field, value)


def test_cola_paths_outside_the_root_are_refused(root, tmp_path):
    image = root / "images" / "2382835.jpg"
    image.unlink()
    image.symlink_to(outside_file(tmp_path))
    with pytest.raises(DataError, match=rf"{ANNOTATION} row 1: image path .* resolves outside the data root"):
        get_task("cola", root, skip_missing=True).examples
    with pytest.raises(ValueError, match="option image_dir '..' is not a folder inside"):
        get_task("cola", root, image_dir="..")


def test_cola_bad_files(root, tmp_path):
    (root / ANNOTATION).write_text(json.dumps({"0": []}))
    with pytest.raises(DataError, match="expected a JSON list of"):
        get_task("cola", root).examples
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="COLA_multiobjects_matching_benchmark.json"):
        get_task("cola", tmp_path / "empty").examples
    with pytest.raises(ValueError, match="unknown option"):
        get_task("cola", root, subsets="gqa")
