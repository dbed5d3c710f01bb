"""EqBen (the released Winoground-style annotation file and its image folder): what loads (.npy frames
included), the official text/image/group scores per sub-dataset, ties, the bad-data policy."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from itm_engine.protocols import PRESETS
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError, load_image_ref
from itm_engine.tasks.eqben import BGRArray

from fixtures.datasets import (
    EQBEN_ROWS,
    assert_malformed,
    edit_json,
    file_names,
    noise_image,
    outside_file,
    write_eqben,
)

ANNOTATION = "eqben_subset_10percent_final.json"


@pytest.fixture
def root(tmp_path):
    return write_eqben(tmp_path / "eqben")


def official_wino_score(result: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """evaluate_eqben_locally.py's `cal_wino_score`, per example (before its mean), on arrays
    result["c{caption}i{image}"]."""
    text = np.logical_and(result["c0i0"] > result["c1i0"], result["c1i1"] > result["c0i1"])
    image = np.logical_and(result["c0i0"] > result["c0i1"], result["c1i1"] > result["c1i0"])
    return text, image, np.logical_and(image, text)


def as_official(matrices: list[torch.Tensor]) -> dict:
    """Score matrices s[image, caption] as the official {"c{j}i{i}": array over examples}."""
    return {f"c{j}i{i}": np.array([float(s[i, j]) for s in matrices]) for i in (0, 1) for j in (0, 1)}


def file_paths(images) -> list[str]:
    return [ref.path if isinstance(ref, BGRArray) else ref for ref in images]


def test_eqben_examples(root):
    task = get_task("eqben", root)
    assert task.modes == ("i2t", "t2i")
    examples = task.examples
    assert [ex.id for ex in examples] == ["0", "1", "2", "3"]
    assert [ex.meta["subset"] for ex in examples] == ["eqbenag", "eqbenyoucook2", "eqbenkubric_cnt", "eqbensd"]
    assert [ex.texts for ex in examples] == [(r[1], r[3]) for r in EQBEN_ROWS]
    assert [file_names(file_paths(ex.images)) for ex in examples] == [
        ["frame10.png", "frame20.png"], ["0.npy", "1.npy"], ["a.png", "b.png"], ["0.jpg", "1.jpg"]]
    for ex in examples:
        for path in file_paths(ex.images):
            assert path == str((root / "image_subset").resolve() / path.split("image_subset/")[1])
    assert all(isinstance(ref, BGRArray) for ref in examples[1].images)
    assert all(isinstance(ref, str) for ex in (examples[0], examples[2], examples[3]) for ref in ex.images)


def test_eqben_reads_npy_frames_as_rgb(root):
    ref = get_task("eqben", root).examples[1].images[0]
    array = np.load(root / "image_subset" / EQBEN_ROWS[1][0])
    image = load_image_ref(ref)
    assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == (20, 16)
    assert (np.asarray(image) == array[:, :, [2, 1, 0]]).all()  # the toolkit's process_img_npy
    np.save(root / "image_subset" / EQBEN_ROWS[1][0], array.astype(np.float32))
    with pytest.raises(DataError, match=r"0.npy: expected a uint8 \[H, W, 3\] BGR image array, got float32"):
        load_image_ref(ref)


def test_eqben_subsets_and_file_variants(root):
    chosen = get_task("eqben", root, subsets="eqbensd,eqbenag").examples
    assert [(ex.id, ex.meta["subset"]) for ex in chosen] == [("0", "eqbenag"), ("3", "eqbensd")]  # ids stay
    # the small subset's file and folder (all_select.json, images/)
    (root / ANNOTATION).rename(root / "all_select.json")
    (root / "image_subset").rename(root / "images")
    assert [ex.id for ex in get_task("eqben", root).examples] == ["0", "1", "2", "3"]
    # option annotation; images at the root
    (root / "all_select.json").rename(root / "mine.json")
    for folder in (root / "images").iterdir():
        folder.rename(root / folder.name)
    (root / "images").rmdir()
    task = get_task("eqben", root, annotation="mine.json")
    assert [ex.id for ex in task.examples] == ["0", "1", "2", "3"]
    assert file_paths(task.examples[0].images)[0] == str((root / EQBEN_ROWS[0][0]).resolve())


def test_eqben_light_release_jpg_for_png(root):
    png = root / "image_subset" / EQBEN_ROWS[0][0]
    png.unlink()
    noise_image(png.with_suffix(".jpg"), 1)
    images = get_task("eqben", root).examples[0].images
    assert file_names(images) == ["frame10.jpg", "frame20.png"]


def test_eqben_metrics_match_the_official_evaluation(root):
    task = get_task("eqben", root)
    examples = task.examples
    subsets = np.array([ex.meta["subset"] for ex in examples])
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        i2t = [torch.randint(0, 3, (2, 2), generator=gen).float() for _ in examples]  # small integers: ties
        t2i = [torch.randint(0, 3, (2, 2), generator=gen).float() for _ in examples]
        text, _, _ = official_wino_score(as_official(i2t))
        _, image, _ = official_wino_score(as_official(t2i))
        kinds = {"text": text, "image": image, "group": text & image}
        expected = {f"{kind}/overall": float(correct.mean()) for kind, correct in kinds.items()}
        expected.update({f"{kind}/{s}": float(correct[subsets == s].mean()) for kind, correct in kinds.items()
                         for s in set(subsets)})
        assert task.metrics(examples, {"i2t": i2t, "t2i": t2i}) == pytest.approx(expected)


def test_eqben_ties_follow_the_protocol(root):
    strict, first = get_task("eqben", root), get_task("eqben", root, protocol=PRESETS["diffusion-itm"])
    # image 0 ties between its captions (first wins under argmax-first), image 1 picks caption 1
    half_tied = [torch.tensor([[1.0, 1.0], [0.0, 2.0]])] * 4
    scores = {"i2t": half_tied, "t2i": half_tied}
    assert strict.metrics(strict.examples, scores)["text/overall"] == 0.0
    assert first.metrics(first.examples, scores)["text/overall"] == 1.0
    # caption 0 picks image 0 (1 > 0), caption 1 picks image 1 (2 > 1)
    assert first.metrics(first.examples, scores)["image/overall"] == 1.0
    assert first.metrics(first.examples, scores)["group/overall"] == 1.0
    assert strict.metrics(strict.examples, scores)["group/overall"] == 0.0


def test_eqben_missing_image(root):
    (root / "image_subset" / EQBEN_ROWS[2][2]).unlink()
    with pytest.raises(DataError, match=rf"{ANNOTATION} row 2: missing image file .*scene7/b.png"):
        get_task("eqben", root).examples
    task = get_task("eqben", root, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["0", "1", "3"]
    assert len(task.skipped) == 1 and "b.png" in task.skipped[0]
    assert [ex.id for ex in get_task("eqben", root, subsets="eqbenag").examples] == ["0"]  # not looked up


@pytest.mark.parametrize("field, value", [
    ("image0", None), ("image1", 5), ("caption0", ""), ("caption1", ["x"]),
    ("image0", "eqbenfoo/a.png"), ("image0", "/eqbenag/a.png"),
])
def test_eqben_malformed_field_types(root, field, value):
    edit_json(root / ANNOTATION, lambda rows: rows[1].update({field: value}))
    assert_malformed(get_task("eqben", root), f"{ANNOTATION} row 1", field, value)


@pytest.mark.parametrize("row, match", [
    (["a.png", "x", "b.png", "y"], "row 2: malformed row: expected an object"),
    ({"image0": "eqbenag/a.png", "caption0": "x", "image1": "eqbenag/b.png"}, r"row 2: malformed row: missing "
                                                                               r"field\(s\) caption1"),
])
def test_eqben_malformed_rows(root, row, match):
    edit_json(root / ANNOTATION, lambda rows: rows.__setitem__(2, row))
    with pytest.raises(DataError, match=match):
        get_task("eqben", root).examples


def test_eqben_paths_outside_the_root_are_refused(root, tmp_path):
    outside = outside_file(tmp_path)
    edit_json(root / ANNOTATION, lambda rows: rows[3].update(image1="eqbensd/../../../outside.png"))
    with pytest.raises(DataError, match=rf"{ANNOTATION} row 3: image path .* resolves outside the data root"):
        get_task("eqben", root, skip_missing=True).examples
    root = write_eqben(tmp_path / "linked")
    npy = root / "image_subset" / EQBEN_ROWS[1][2]
    npy.unlink()
    npy.symlink_to(outside)
    with pytest.raises(DataError, match=rf"{ANNOTATION} row 1: .* resolves outside the data root"):
        get_task("eqben", root, skip_missing=True).examples
    (tmp_path / "elsewhere.json").write_text(json.dumps([]))
    with pytest.raises(DataError, match="option annotation '../elsewhere.json' resolves outside the data root"):
        get_task("eqben", root, annotation="../elsewhere.json").examples


def test_eqben_bad_files_and_options(root, tmp_path):
    with pytest.raises(ValueError, match=r"option subsets: unknown name\(s\) eqbenkubric; known: eqbenag"):
        get_task("eqben", root, subsets="eqbenkubric")
    with pytest.raises(ValueError, match="option annotation must be a file path"):
        get_task("eqben", root, annotation=3)
    with pytest.raises(ValueError, match="unknown option"):
        get_task("eqben", root, split="test")
    (root / ANNOTATION).write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="expected a JSON list of"):
        get_task("eqben", root).examples
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=ANNOTATION):
        get_task("eqben", tmp_path / "empty").examples
