"""Oxford-IIIT Pet zero-shot classification: classes, splits, per-class accuracy, and the bad-data policy."""
from __future__ import annotations

import pytest

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import assert_malformed, noise_image, outside_file, write_pets
from fixtures.scores import i2t_scores


def test_pets_all_images(tmp_path):
    root = write_pets(tmp_path / "pets")
    task = get_task("pets", root)
    examples = task.examples
    assert task.classes == ["Abyssinian", "american_bulldog", "Bengal"]
    prompts = ("a photo of a abyssinian, a type of pet.", "a photo of a american bulldog, a type of pet.",
               "a photo of a bengal, a type of pet.")
    assert [ex.id for ex in examples] == ["Abyssinian_1", "Abyssinian_2", "Abyssinian_12", "american_bulldog_10",
                                          "Bengal_3"]
    assert [ex.label for ex in examples] == [0, 0, 0, 1, 2]
    assert all(ex.texts == prompts for ex in examples)
    assert examples[3].images == (str((root / "images" / "american_bulldog_10.jpg").resolve()),)


def test_pets_split_files(tmp_path):
    root = write_pets(tmp_path / "pets")
    task = get_task("pets", root, split="test")
    assert [ex.id for ex in task.examples] == ["Bengal_3", "Abyssinian_12", "american_bulldog_10"]
    assert task.classes == ["Abyssinian", "american_bulldog", "Bengal"]  # by class id: 1, 2, 6
    assert [ex.label for ex in task.examples] == [2, 0, 1]
    assert [ex.id for ex in get_task("pets", root, split="trainval").examples] == ["Abyssinian_1", "Abyssinian_2"]


def test_pets_metrics(tmp_path):
    task = get_task("pets", write_pets(tmp_path / "pets"))
    # labels 0, 0, 0, 1, 2: right, tie (wrong), wrong, right, right
    scores = i2t_scores([3.0, 1.0, 2.0], [2.0, 2.0, 0.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 0.1])
    result = task.metrics(task.examples, scores)
    assert result == pytest.approx({"accuracy": 3 / 5, "accuracy/per_class_mean": (1 / 3 + 1 + 1) / 3})


def test_pets_bad_data_and_options(tmp_path):
    root = write_pets(tmp_path / "pets")
    (root / "images" / "Abyssinian_12.jpg").unlink()
    with pytest.raises(DataError, match=r"annotations/test.txt:2.*Abyssinian_12.jpg"):
        get_task("pets", root, split="test").examples
    task = get_task("pets", root, split="test", skip_missing=True)
    assert [ex.id for ex in task.examples] == ["Bengal_3", "american_bulldog_10"] and len(task.skipped) == 1

    (root / "annotations" / "test.txt").write_text("Bengal_3 6 1 6\nBengal_4\n")
    with pytest.raises(DataError, match=r"annotations/test.txt:2: malformed row"):
        get_task("pets", root, split="test").examples
    outside_file(tmp_path)
    (root / "annotations" / "test.txt").write_text("../../outside_1 1 1 1\n")
    noise_image(tmp_path / "outside_1.jpg", 5)
    with pytest.raises(DataError, match="outside the data root"):
        get_task("pets", root, split="test").examples

    (root / "images" / "cat.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"images/cat.jpg: file name"):
        get_task("pets", root).examples
    with pytest.raises(ValueError, match="split must be one of all, test, trainval"):
        get_task("pets", root, split="val")


@pytest.mark.parametrize("class_id", ["\u00b2", "0", "x"])
def test_pets_malformed_class_id(tmp_path, class_id):
    root = write_pets(tmp_path / "pets")
    (root / "annotations" / "test.txt").write_text(f"Bengal_3 6 1 6\nAbyssinian_12 {class_id} 1 1\n")
    assert_malformed(get_task("pets", root, split="test"), "annotations/test.txt:2", "class id", class_id)
