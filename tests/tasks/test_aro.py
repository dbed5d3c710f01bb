"""ARO: VG-Relation and VG-Attribution (crops, macro accuracy), COCO-Order and Flickr30K-Order (the
perturbed captions), each on a tiny dataset in its on-disk layout, and the bad-data policy."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from itm_engine.tasks import get_task
from itm_engine.tasks.aro import SYMMETRIC_RELATIONS, normalize_caption, perturbations, word_class
from itm_engine.tasks.base import Crop, DataError, Example

from fixtures.datasets import (
    COCO_CAPTIONS,
    VG_RELATION_ROWS,
    assert_malformed,
    coco_name,
    edit_json,
    noise_image,
    outside_file,
    write_coco_order,
    write_flickr30k_order,
    write_vg_attribution,
    write_vg_relation,
)
from fixtures.scores import i2t_scores


def test_vg_relation_examples_and_crops(tmp_path):
    root = write_vg_relation(tmp_path / "vg")
    task = get_task("vg_relation", root)
    assert task.modes == ("i2t",)
    examples = task.examples
    assert [ex.id for ex in examples] == ["0", "1", "2", "3"]
    for ex, (image, (x, y, w, h), true, false, relation) in zip(examples, VG_RELATION_ROWS):
        (crop,) = ex.images
        assert isinstance(crop, Crop)
        assert crop.path == str((root / "images" / image).resolve())
        assert crop.box == (x, y, x + w, y + h)
        assert ex.texts == (true, false) and ex.label == 0 and ex.meta == {"relation": relation}
        full = np.asarray(PIL.Image.open(root / "images" / image).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(crop.load()), full[y : y + h, x : x + w])


def test_vg_relation_metrics_macro_over_relations(tmp_path):
    task = get_task("vg_relation", write_vg_relation(tmp_path / "vg"))
    assert "next to" in SYMMETRIC_RELATIONS and "on" not in SYMMETRIC_RELATIONS
    # on: right, tie (wrong) -> 1/2; under: wrong -> 0; next to (symmetric in ARO): right -> 1
    scores = i2t_scores([2.0, 1.0], [1.0, 1.0], [0.0, 1.0], [3.0, 1.0])
    result = task.metrics(task.examples, scores)
    assert result["accuracy"] == pytest.approx((0.5 + 0.0) / 2)           # ARO: symmetric relations left out
    assert result["accuracy/macro_all"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert result["accuracy/micro"] == pytest.approx(2 / 4)


def test_vg_attribution_examples_and_metrics(tmp_path):
    root = write_vg_attribution(tmp_path / "vga")
    task = get_task("vg_attribution", root)
    examples = task.examples
    assert [ex.id for ex in examples] == ["0", "1", "2"]
    assert examples[1].images[0].box == (0, 3, 10, 8)  # fractional box rounded: (0.4, 2.6, 10, 5)
    assert examples[0].meta == {"attributes": ["white", "black"]}
    assert examples[0].texts == ("the white cat and the black dog", "the black cat and the white dog")
    full = np.asarray(PIL.Image.open(root / "images" / "10.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(examples[2].images[0].load()), full[0:16, 3:15])
    result = task.metrics(examples, i2t_scores([1.0, 0.0], [0.5, 0.5], [-1.0, -2.0]))
    assert result == {"accuracy": pytest.approx(2 / 3)}  # no pair has ARO's 25 examples: no macro


def test_vg_attribution_macro_over_frequent_pairs(tmp_path):
    task = get_task("vg_attribution", write_vg_attribution(tmp_path / "vga"))
    examples = [Example(str(i), ("x",), ("t", "f"), 0, {"attributes": ["white", "dog"]}) for i in range(25)]
    examples += [Example(f"r{i}", ("x",), ("t", "f"), 0, {"attributes": ["red", "cat"]}) for i in range(5)]
    rows = [[1.0, 0.0]] * 20 + [[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 5
    result = task.metrics(examples, i2t_scores(*rows))
    assert result["accuracy"] == pytest.approx(25 / 30)
    assert result["accuracy/macro"] == pytest.approx(20 / 25)  # only white_dog has >= 25 examples


def test_vg_missing_image_error_and_skip(tmp_path):
    root = write_vg_relation(tmp_path / "vg")
    edit_json(root / "visual_genome_relation.json", lambda rows: rows[1].update(image_path="gone.png"))
    with pytest.raises(DataError, match=r"visual_genome_relation.json row 1.*gone.png"):
        get_task("vg_relation", root).examples
    task = get_task("vg_relation", root, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["0", "2", "3"]
    assert len(task.skipped) == 1 and "gone.png" in task.skipped[0] and "row 1" in task.skipped[0]


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[2].pop("bbox_w"), r"row 2.*bbox_w"),
    (lambda rows: rows[2].update(bbox_x="left"), r"row 2.*bbox_x"),
    (lambda rows: rows[2].update(bbox_h=0), r"row 2.*empty box"),
    (lambda rows: rows[2].update(true_caption=None), r"row 2.*true_caption"),
    (lambda rows: rows[2].pop("relation_name"), r"row 2.*relation_name"),
    (lambda rows: rows.__setitem__(2, "not a row"), r"row 2.*malformed"),
])
def test_vg_malformed_rows(tmp_path, edit, message):
    root = write_vg_relation(tmp_path / "vg")
    edit_json(root / "visual_genome_relation.json", edit)
    with pytest.raises(DataError, match=message):
        get_task("vg_relation", root, skip_missing=True).examples


@pytest.mark.parametrize("field, value", [
    ("image_path", 5), ("image_path", None), ("true_caption", None), ("false_caption", 3),
    ("relation_name", ["x"]), ("true_caption", "  "),
])
def test_vg_malformed_field_types(tmp_path, field, value):
    root = write_vg_relation(tmp_path / "vg")
    edit_json(root / "visual_genome_relation.json", lambda rows: rows[1].update({field: value}))
    assert_malformed(get_task("vg_relation", root), "visual_genome_relation.json row 1", field, value)


def test_vg_symlinks_are_followed_before_the_root_check(tmp_path):
    root = write_vg_relation(tmp_path / "vg")
    (root / "store").mkdir()
    (root / "images" / "2.png").rename(root / "store" / "2.png")
    (root / "images" / "2.png").symlink_to(root / "store" / "2.png")  # a symlink that stays inside the root
    crop = get_task("vg_relation", root).examples[1].images[0]
    assert os.path.realpath(crop.path) == str(root / "store" / "2.png") and crop.load().size == (20, 16)

    outside = outside_file(tmp_path)
    (root / "images" / "2.png").unlink()
    (root / "images" / "2.png").symlink_to(outside)  # an image file that leads outside
    with pytest.raises(DataError, match=r"visual_genome_relation.json row 1: image path .*2.png.* outside the data "
                                        r"root"):
        get_task("vg_relation", root, skip_missing=True).examples

    edit_json(root / "visual_genome_relation.json", lambda rows: rows[0].update(image_path="1\u0000.png"))
    with pytest.raises(DataError, match=r"row 0: image path .*1\\x00.png.* outside the data root"):
        get_task("vg_relation", root, skip_missing=True).examples  # a path no file can have: no crash either
    edit_json(root / "visual_genome_relation.json", lambda rows: rows[0].update(image_path="1.png"))

    (root / "images").rename(root / "inside")
    (root / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a folder that leads outside
    (root / "inside").rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"visual_genome_relation.json row 0: .*outside the data root"):
        get_task("vg_relation", root, skip_missing=True).examples


def test_vg_attribution_malformed_attributes(tmp_path):
    root = write_vg_attribution(tmp_path / "vga")
    edit_json(root / "visual_genome_attribution.json", lambda rows: rows[0].update(attributes="white"))
    with pytest.raises(DataError, match=r"visual_genome_attribution.json row 0.*attributes"):
        get_task("vg_attribution", root).examples


def test_vg_path_outside_root_and_options(tmp_path):
    root = write_vg_relation(tmp_path / "vg")
    outside_file(tmp_path)
    edit_json(root / "visual_genome_relation.json", lambda rows: rows[0].update(image_path="../../outside.png"))
    with pytest.raises(DataError, match="outside the data root"):
        get_task("vg_relation", root, skip_missing=True).examples
    with pytest.raises(ValueError, match="unknown option"):
        get_task("vg_relation", root, seed=1)


# -- COCO-Order / Flickr30K-Order ----------------------------------------------------------------


def test_word_classes_and_normalisation():
    tags = {w: word_class(w) for w in "a small white dog sitting next to the red fire hydrant, quickly".split()}
    assert tags == {"a": "other", "small": "adj", "white": "adj", "dog": "noun", "sitting": "other", "next": "other",
                    "to": "other", "the": "other", "red": "adj", "fire": "noun", "hydrant,": "noun", "quickly": "other"}
    assert word_class("building") == "noun" and word_class("2") == "other" and word_class("man's") == "noun"
    assert normalize_caption('A "Big" dog;  runs (fast)!\n', 30) == "a big dog runs fast"
    assert normalize_caption("one two three four", max_words=2) == "one two"


def _check_perturbations(texts: tuple[str, ...]) -> None:
    original, nouns_adj, others, within, trigrams = (t.split() for t in texts)
    classes = [word_class(t) for t in original]
    for perturbed in (nouns_adj, others, within, trigrams):
        assert Counter(perturbed) == Counter(original)  # the same words
        assert perturbed != original                    # these captions can all change
    # nouns/adjectives move only among noun/adjective positions (and keep their class); others stay
    for i, c in enumerate(classes):
        if c == "other":
            assert nouns_adj[i] == original[i]
        else:
            assert word_class(nouns_adj[i]) == c
            assert others[i] == original[i]
    # within trigrams: each consecutive trigram keeps its words
    for i in range(0, len(original), 3):
        assert Counter(within[i : i + 3]) == Counter(original[i : i + 3])


def test_coco_order_examples(tmp_path):
    root = write_coco_order(tmp_path / "coco")
    task = get_task("coco_order", root)
    examples = task.examples
    assert [ex.id for ex in examples] == [f"{coco_name(1)}#0", f"{coco_name(1)}#1", f"{coco_name(2)}#0"]
    captions = [c for cs in COCO_CAPTIONS.values() for c in cs]
    for ex, caption in zip(examples, captions):
        assert ex.images == (str((root / "val2014" / coco_name(int(ex.id[13:25]))).resolve()),)
        assert len(ex.texts) == 5 and ex.label == 0
        assert ex.texts[0] == normalize_caption(caption)
        _check_perturbations(ex.texts)
    # deterministic: a second load (and a fresh task) gives the same captions; another seed differs
    assert [ex.texts for ex in get_task("coco_order", root).examples] == [ex.texts for ex in examples]
    other = get_task("coco_order", root, seed=1).examples
    assert [ex.texts[0] for ex in other] == [ex.texts[0] for ex in examples]
    assert [ex.texts[1:] for ex in other] != [ex.texts[1:] for ex in examples]
    # limit_captions keeps the first caption of each image
    assert [ex.id for ex in get_task("coco_order", root, limit_captions=1).examples] == [
        f"{coco_name(1)}#0", f"{coco_name(2)}#0"]


def test_shuffle_trigrams_moves_whole_trigrams():
    caption = "a small white dog sitting next to a red fire hydrant today"  # 12 words: 4 trigrams
    texts = perturbations(caption, "key", seed=3)
    words = caption.split()
    chunks = Counter(tuple(words[i : i + 3]) for i in range(0, 12, 3))
    shuffled = texts[3].split()
    assert Counter(tuple(shuffled[i : i + 3]) for i in range(0, 12, 3)) == chunks and texts[3] != caption
    assert perturbations(caption, "key", seed=3) == texts  # a pure function of (caption, key, seed)


def test_unchangeable_caption_is_kept():
    assert perturbations("dog", "x") == ("dog",) * 4
    # one noun and no adjective: the noun/adjective shuffle cannot change it (kept after the
    # retries); the other three can
    texts = perturbations("there is a dog", "z")
    assert texts[0] == "there is a dog" and all(t != "there is a dog" for t in texts[1:])


def test_order_other_annotation_formats(tmp_path):
    # ARO's own coco_karpathy_test.json, images under images/
    root = tmp_path / "coco_aro"
    noise_image(root / "images" / "COCO_val2014_000000000042.jpg", 42)
    (root / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["A man rides a brown horse.", "A horse."]}]))
    examples = get_task("coco_order", root).examples
    assert [ex.id for ex in examples] == ["COCO_val2014_000000000042.jpg#0", "COCO_val2014_000000000042.jpg#1"]
    assert examples[0].texts[0] == "a man rides a brown horse"
    # Karpathy Flickr30K: only the test split
    root = write_flickr30k_order(tmp_path / "flickr")
    task = get_task("flickr30k_order", root)
    assert [ex.id for ex in task.examples] == ["1000092795.jpg#0", "1000092795.jpg#1", "1002.jpg#0"]
    for ex in task.examples:
        _check_perturbations(ex.texts)
    assert task.examples[2].images == (str((root / "flickr30k-images" / "1002.jpg").resolve()),)


def test_order_metrics(tmp_path):
    task = get_task("coco_order", write_coco_order(tmp_path / "coco"))
    scores = i2t_scores([5.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0])
    assert task.metrics(task.examples, scores) == {"accuracy": pytest.approx(1 / 3)}  # the tie is wrong


def test_order_bad_data(tmp_path):
    root = write_coco_order(tmp_path / "coco")
    (root / "val2014" / coco_name(1)).unlink()
    with pytest.raises(DataError, match=r"captions_val2014.json images\[0\].*COCO_val2014_000000000001.jpg"):
        get_task("coco_order", root).examples
    task = get_task("coco_order", root, skip_missing=True)
    assert [ex.id for ex in task.examples] == [f"{coco_name(2)}#0"]
    assert len(task.skipped) == 2 and all("images[0]" in s for s in task.skipped)  # one per caption

    root = write_coco_order(tmp_path / "coco2")
    edit_json(root / "captions_val2014.json", lambda d: d["annotations"][2].pop("caption"))
    with pytest.raises(DataError, match=r"annotations\[2\].*caption"):
        get_task("coco_order", root).examples
    edit_json(root / "captions_val2014.json", lambda d: d["annotations"][2].update(caption="x", image_id=77))
    with pytest.raises(DataError, match=r"annotations\[2\].*image_id 77"):
        get_task("coco_order", root).examples

    root = write_coco_order(tmp_path / "coco3")
    outside_file(tmp_path)
    edit_json(root / "captions_val2014.json", lambda d: d["images"][1].update(file_name="../../outside.png"))
    with pytest.raises(DataError, match="outside the data root"):
        get_task("coco_order", root, skip_missing=True).examples

    root = write_flickr30k_order(tmp_path / "flickr")
    edit_json(root / "dataset_flickr30k.json", lambda d: d["images"][2]["sentences"].append({"tokens": []}))
    with pytest.raises(DataError, match=r"dataset_flickr30k.json images\[2\] sentences\[1\]"):
        get_task("flickr30k_order", root).examples
    with pytest.raises(FileNotFoundError, match="flickr30k_test.json"):
        get_task("flickr30k_order", tmp_path / "coco").examples


def _coco_karpathy_list(root):
    noise_image(root / "images" / "COCO_val2014_000000000042.jpg", 42)
    (root / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["A horse."]},
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "A man rides a brown horse."}]))
    return root


ORDER_FIELD_CASES = [  # writer, file, edit, where (file and row), field, bad value
    # the COCO captions object
    (write_coco_order, "captions_val2014.json", lambda d: d["images"][1].update(id=["x"]),
     "captions_val2014.json images[1]", "id", ["x"]),
    (write_coco_order, "captions_val2014.json", lambda d: d["images"][1].update(id=None),
     "captions_val2014.json images[1]", "id", None),
    (write_coco_order, "captions_val2014.json", lambda d: d["images"][1].update(file_name=5),
     "captions_val2014.json images[1]", "file_name", 5),
    (write_coco_order, "captions_val2014.json", lambda d: d["images"][1].update(file_name=None),
     "captions_val2014.json images[1]", "file_name", None),
    (write_coco_order, "captions_val2014.json", lambda d: d["annotations"][1].update(image_id=["x"]),
     "captions_val2014.json annotations[1]", "image_id", ["x"]),
    (write_coco_order, "captions_val2014.json", lambda d: d["annotations"][1].update(image_id=True),
     "captions_val2014.json annotations[1]", "image_id", True),
    (write_coco_order, "captions_val2014.json", lambda d: d["annotations"][1].update(caption=None),
     "captions_val2014.json annotations[1]", "caption", None),
    (write_coco_order, "captions_val2014.json", lambda d: d["annotations"][1].update(caption=7),
     "captions_val2014.json annotations[1]", "caption", 7),
    # ARO's JSON list
    (_coco_karpathy_list, "coco_karpathy_test.json", lambda d: d[1].update(image=5),
     "coco_karpathy_test.json row 1", "image", 5),
    (_coco_karpathy_list, "coco_karpathy_test.json", lambda d: d[1].update(image=None),
     "coco_karpathy_test.json row 1", "image", None),
    (_coco_karpathy_list, "coco_karpathy_test.json", lambda d: d[1].update(caption=None),
     "coco_karpathy_test.json row 1", "caption", None),
    (_coco_karpathy_list, "coco_karpathy_test.json", lambda d: d[0].update(caption=["ok", 5]),
     "coco_karpathy_test.json row 0", "caption[1]", 5),
    # Karpathy's split file
    (write_flickr30k_order, "dataset_flickr30k.json", lambda d: d["images"][2].update(filename=5),
     "dataset_flickr30k.json images[2]", "filename", 5),
    (write_flickr30k_order, "dataset_flickr30k.json", lambda d: d["images"][2].update(split=["test"]),
     "dataset_flickr30k.json images[2]", "split", ["test"]),
    (write_flickr30k_order, "dataset_flickr30k.json", lambda d: d["images"][2]["sentences"][0].update(raw=None),
     "dataset_flickr30k.json images[2] sentences[0]", "raw", None),
]


@pytest.mark.parametrize("writer, file, edit, where, field, value", ORDER_FIELD_CASES,
                         ids=[f"{c[1]}-{c[4]}={c[5]!r}" for c in ORDER_FIELD_CASES])
def test_order_malformed_field_types(tmp_path, writer, file, edit, where, field, value):
    root = writer(tmp_path / "order")
    edit_json(root / file, edit)
    name = "flickr30k_order" if file == "dataset_flickr30k.json" else "coco_order"
    assert_malformed(get_task(name, root), where, field, value)


def test_coco_ids_are_read_as_strings(tmp_path):
    """An image id written as a number in one list and as a string in the other is one image."""
    root = write_coco_order(tmp_path / "coco")
    expected = [ex.id for ex in get_task("coco_order", root).examples]
    edit_json(root / "captions_val2014.json", lambda d: [row.update(id=str(row["id"])) for row in d["images"]])
    assert [ex.id for ex in get_task("coco_order", root).examples] == expected
    edit_json(root / "captions_val2014.json", lambda d: d["images"][0].update(id=2))  # "2" and 2: one id
    with pytest.raises(DataError, match=r"captions_val2014.json images\[1\]: image id '2' is listed twice"):
        get_task("coco_order", root).examples


@pytest.mark.parametrize("options", [{"seed": "0"}, {"limit_captions": 0}, {"max_words": -1},
                                     {"image_dir": "nowhere"}, {"shuffle": True}])
def test_order_bad_options(tmp_path, options):
    with pytest.raises(ValueError):
        get_task("coco_order", write_coco_order(tmp_path / "coco"), **options)
