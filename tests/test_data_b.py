"""GDBench loaders, part B: ARO (VG-Relation, VG-Attribution, COCO-Order, Flickr30K-Order), CLEVR,
Pets and MMBias, each on a tiny dataset written in its on-disk layout.

The `write_*` functions are importable by end-to-end tests: each writes a small valid dataset under
`root` and returns `root`.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from itm_engine.tasks import get_task
from itm_engine.tasks.aro import SYMMETRIC_RELATIONS, normalize_caption, perturbations, word_class
from itm_engine.tasks.base import Crop, DataError, Example

# -- writers -----------------------------------------------------------------------------------------


def _save_image(path: Path, seed: int, size: tuple[int, int] = (20, 16)) -> Path:
    """A small RGB noise image (PNG keeps the pixels exact; .jpg files are JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels, mode="RGB").save(path)
    return path


VG_RELATION_ROWS = [
    # image, box (x, y, w, h), true caption, false caption, relation
    ("1.png", (2, 3, 10, 8), "the cup is on the table", "the table is on the cup", "on"),
    ("2.png", (0, 0, 20, 16), "the cat is on the mat", "the mat is on the cat", "on"),
    ("1.png", (5, 1, 4, 12), "the dog is under the tree", "the tree is under the dog", "under"),
    ("2.png", (7, 7, 6, 5), "the man is next to the car", "the car is next to the man", "next to"),
]


def write_vg_relation(root) -> Path:
    """ARO VG-Relation: visual_genome_relation.json + images/ (4 rows over 2 images)."""
    root = Path(root)
    for name, seed in (("1.png", 1), ("2.png", 2)):
        _save_image(root / "images" / name, seed)
    rows = [{"image_id": n, "image_path": image, "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h,
             "true_caption": true, "false_caption": false, "relation_name": relation}
            for n, (image, (x, y, w, h), true, false, relation) in enumerate(VG_RELATION_ROWS)]
    (root / "visual_genome_relation.json").write_text(json.dumps(rows))
    return root


def write_vg_attribution(root) -> Path:
    """ARO VG-Attribution: visual_genome_attribution.json + images/ (3 rows over 2 images)."""
    root = Path(root)
    for name, seed in (("10.png", 10), ("11.png", 11)):
        _save_image(root / "images" / name, seed)
    rows = [
        {"image_path": "10.png", "bbox_x": 1, "bbox_y": 1, "bbox_w": 8, "bbox_h": 8, "attributes": ["white", "black"],
         "true_caption": "the white cat and the black dog", "false_caption": "the black cat and the white dog"},
        {"image_path": "11.png", "bbox_x": 0.4, "bbox_y": 2.6, "bbox_w": 10, "bbox_h": 5, "attributes": ["open", "red"],
         "true_caption": "the open door and the red car", "false_caption": "the red door and the open car"},
        {"image_path": "10.png", "bbox_x": 3, "bbox_y": 0, "bbox_w": 12, "bbox_h": 16, "attributes": ["white", "black"],
         "true_caption": "the white plate and the black table", "false_caption": "the black plate and the white table"},
    ]
    (root / "visual_genome_attribution.json").write_text(json.dumps(rows))
    return root


COCO_CAPTIONS = {
    1: ["A small white dog sitting next to a red fire hydrant.", "The brown horse is eating green grass in a field."],
    2: ["Two young men are playing with a blue frisbee on a sunny beach."],
}


def _coco_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_coco_order(root) -> Path:
    """COCO-Order: captions_val2014.json (COCO captions format) + val2014/ (2 images, 3 captions)."""
    root = Path(root)
    images, annotations = [], []
    for image_id, captions in COCO_CAPTIONS.items():
        _save_image(root / "val2014" / _coco_name(image_id), image_id)
        images.append({"id": image_id, "file_name": _coco_name(image_id), "height": 16, "width": 20})
        annotations += [{"id": 100 * image_id + k, "image_id": image_id, "caption": c} for k, c in enumerate(captions)]
    annotations.insert(1, annotations.pop())  # interleave images: order comes from the images list
    (root / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


FLICKR_ROWS = [  # filename, split, captions
    ("1000092795.jpg", "test", ["Two young guys with shaggy hair look at their hands while hanging out in the yard.",
                                "A black dog is running across the green grass near a wooden fence."]),
    ("1001.jpg", "train", ["A train row that must not appear."]),
    ("1002.jpg", "test", ["An old woman in a red coat walks her small dog on a snowy street."]),
]


def write_flickr30k_order(root) -> Path:
    """Flickr30K-Order: Karpathy dataset_flickr30k.json + flickr30k-images/ (2 test images, 3 captions)."""
    root = Path(root)
    rows = []
    for n, (name, split, captions) in enumerate(FLICKR_ROWS):
        _save_image(root / "flickr30k-images" / name, 50 + n)
        rows.append({"filename": name, "imgid": n, "split": split,
                     "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": rows, "dataset": "flickr30k"}))
    return root


CLEVR_FILES = {
    "pair_binding_size": {"CLEVR_a.png": [["A small cube and a large sphere.", "A large cube and a small sphere."],
                                          ["A large sphere and a small cube.", "A small sphere and a large cube."]],
                          "CLEVR_b.png": [["A small cylinder and a large cube.", "A large cylinder and a small cube."]]},
    "recognition_color": {"CLEVR_b.png": [["A red cube.", "A blue cube."]]},
    "spatial": {"CLEVR_a.png": [["On the left is a gray cube.", "On the right is a gray cube."]],
                "CLEVR_c.png": [["On the right is a red sphere.", "On the left is a red sphere."]]},
}


def write_clevr(root) -> Path:
    """CLEVR: three subtask caption files at the root + images/ (3 images, 6 examples)."""
    root = Path(root)
    for n, name in enumerate(("CLEVR_a.png", "CLEVR_b.png", "CLEVR_c.png")):
        _save_image(root / "images" / name, 70 + n)
    for subtask, data in CLEVR_FILES.items():
        (root / f"{subtask}.json").write_text(json.dumps(data))
    return root


PETS_IMAGES = ["Abyssinian_1", "Abyssinian_12", "american_bulldog_10", "Bengal_3", "Abyssinian_2"]


def write_pets(root) -> Path:
    """Oxford-IIIT Pet: images/{Breed}_{n}.jpg (3 breeds, 5 images) + annotations/{test,trainval}.txt."""
    root = Path(root)
    for n, stem in enumerate(PETS_IMAGES):
        _save_image(root / "images" / f"{stem}.jpg", 90 + n)
    (root / "images" / "Abyssinian_1.mat").write_bytes(b"not an image")  # the real folder has such files
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "test.txt").write_text("Bengal_3 6 1 6\nAbyssinian_12 1 1 1\namerican_bulldog_10 2 2 1\n")
    (root / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nAbyssinian_2 1 1 1\n")
    return root


BIAS_PLEASANT = ["caress", "freedom", "health"]
BIAS_UNPLEASANT = ["abuse", "crash"]
BIAS_IMAGES = {  # folder under images/ -> number of images
    "Religion/Christian": 3,
    "Religion/muslim": 2,     # group names are case-insensitive
    "Jewish": 2,              # a group folder directly under images/
    "Nationality/American": 2,
    "Nationality/Arab": 2,
    "Other/Unrelated": 1,     # not a group: ignored
}


def write_bias(root) -> Path:
    """MMBias: images/[Category/]Group/*.png (5 groups, 11 images) + texts/{pleasant,unpleasant}.txt."""
    root = Path(root)
    seed = 200
    for folder, count in BIAS_IMAGES.items():
        for k in range(count):
            seed += 1
            _save_image(root / "images" / folder / f"img{k}.png", seed)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    (root / "texts" / "pleasant.txt").write_text("\n".join(BIAS_PLEASANT) + "\n\n")
    (root / "texts" / "unpleasant.txt").write_text("  abuse \ncrash\n")
    return root


# -- helpers -------------------------------------------------------------------------------------


def _scores(*rows) -> dict[str, list[torch.Tensor]]:
    """One [1, n_texts] i2t matrix per example."""
    return {"i2t": [torch.tensor([row], dtype=torch.float32) for row in rows]}


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _outside_file(tmp_path: Path) -> Path:
    return _save_image(tmp_path / "outside.png", 999)


# -- VG-Relation / VG-Attribution ----------------------------------------------------------------


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
    scores = _scores([2.0, 1.0], [1.0, 1.0], [0.0, 1.0], [3.0, 1.0])
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
    result = task.metrics(examples, _scores([1.0, 0.0], [0.5, 0.5], [-1.0, -2.0]))
    assert result == {"accuracy": pytest.approx(2 / 3)}  # no pair has ARO's 25 examples: no macro


def test_vg_attribution_macro_over_frequent_pairs(tmp_path):
    task = get_task("vg_attribution", write_vg_attribution(tmp_path / "vga"))
    examples = [Example(str(i), ("x",), ("t", "f"), 0, {"attributes": ["white", "dog"]}) for i in range(25)]
    examples += [Example(f"r{i}", ("x",), ("t", "f"), 0, {"attributes": ["red", "cat"]}) for i in range(5)]
    rows = [[1.0, 0.0]] * 20 + [[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 5
    result = task.metrics(examples, _scores(*rows))
    assert result["accuracy"] == pytest.approx(25 / 30)
    assert result["accuracy/macro"] == pytest.approx(20 / 25)  # only white_dog has >= 25 examples


def test_vg_missing_image_error_and_skip(tmp_path):
    root = write_vg_relation(tmp_path / "vg")
    _edit_json(root / "visual_genome_relation.json", lambda rows: rows[1].update(image_path="gone.png"))
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
    _edit_json(root / "visual_genome_relation.json", edit)
    with pytest.raises(DataError, match=message):
        get_task("vg_relation", root, skip_missing=True).examples


def test_vg_attribution_malformed_attributes(tmp_path):
    root = write_vg_attribution(tmp_path / "vga")
    _edit_json(root / "visual_genome_attribution.json", lambda rows: rows[0].update(attributes="white"))
    with pytest.raises(DataError, match=r"visual_genome_attribution.json row 0.*attributes"):
        get_task("vg_attribution", root).examples


def test_vg_path_outside_root_and_options(tmp_path):
    root = write_vg_relation(tmp_path / "vg")
    _outside_file(tmp_path)
    _edit_json(root / "visual_genome_relation.json", lambda rows: rows[0].update(image_path="../../outside.png"))
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
    assert [ex.id for ex in examples] == [f"{_coco_name(1)}#0", f"{_coco_name(1)}#1", f"{_coco_name(2)}#0"]
    captions = [c for cs in COCO_CAPTIONS.values() for c in cs]
    for ex, caption in zip(examples, captions):
        assert ex.images == (str((root / "val2014" / _coco_name(int(ex.id[13:25]))).resolve()),)
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
        f"{_coco_name(1)}#0", f"{_coco_name(2)}#0"]


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
    _save_image(root / "images" / "COCO_val2014_000000000042.jpg", 42)
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
    scores = _scores([5.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0])
    assert task.metrics(task.examples, scores) == {"accuracy": pytest.approx(1 / 3)}  # the tie is wrong


def test_order_bad_data(tmp_path):
    root = write_coco_order(tmp_path / "coco")
    (root / "val2014" / _coco_name(1)).unlink()
    with pytest.raises(DataError, match=r"captions_val2014.json images\[0\].*COCO_val2014_000000000001.jpg"):
        get_task("coco_order", root).examples
    task = get_task("coco_order", root, skip_missing=True)
    assert [ex.id for ex in task.examples] == [f"{_coco_name(2)}#0"]
    assert len(task.skipped) == 2 and all("images[0]" in s for s in task.skipped)  # one per caption

    root = write_coco_order(tmp_path / "coco2")
    _edit_json(root / "captions_val2014.json", lambda d: d["annotations"][2].pop("caption"))
    with pytest.raises(DataError, match=r"annotations\[2\].*caption"):
        get_task("coco_order", root).examples
    _edit_json(root / "captions_val2014.json", lambda d: d["annotations"][2].update(caption="x", image_id=77))
    with pytest.raises(DataError, match=r"annotations\[2\].*image_id 77"):
        get_task("coco_order", root).examples

    root = write_coco_order(tmp_path / "coco3")
    _outside_file(tmp_path)
    _edit_json(root / "captions_val2014.json", lambda d: d["images"][1].update(file_name="../../outside.png"))
    with pytest.raises(DataError, match="outside the data root"):
        get_task("coco_order", root, skip_missing=True).examples

    root = write_flickr30k_order(tmp_path / "flickr")
    _edit_json(root / "dataset_flickr30k.json", lambda d: d["images"][2]["sentences"].append({"tokens": []}))
    with pytest.raises(DataError, match=r"dataset_flickr30k.json images\[2\] sentences\[1\]"):
        get_task("flickr30k_order", root).examples
    with pytest.raises(FileNotFoundError, match="flickr30k_test.json"):
        get_task("flickr30k_order", tmp_path / "coco").examples


@pytest.mark.parametrize("options", [{"seed": "0"}, {"limit_captions": 0}, {"max_words": -1},
                                     {"image_dir": "nowhere"}, {"shuffle": True}])
def test_order_bad_options(tmp_path, options):
    with pytest.raises(ValueError):
        get_task("coco_order", write_coco_order(tmp_path / "coco"), **options)


# -- CLEVR ---------------------------------------------------------------------------------------


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
    scores = _scores([2.0, 1.0], [1.0, 1.0], [0.0, 1.0], [5.0, 4.0], [-1.0, -2.0], [-3.0, -2.0])
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

    _edit_json(root / "spatial.json", lambda d: d["CLEVR_a.png"].append(["one", "two", "three"]))
    with pytest.raises(DataError, match=r"spatial.json \['CLEVR_a.png'\] pair 1: malformed"):
        get_task("clevr", root).examples

    root = write_clevr(tmp_path / "clevr2")
    _outside_file(tmp_path)
    _edit_json(root / "spatial.json", lambda d: d.update({"../../outside.png": [["a", "b"]]}))
    with pytest.raises(DataError, match="outside the data root"):
        get_task("clevr", root).examples

    with pytest.raises(ValueError, match=r"unknown subtask\(s\) colour; known: pair_binding_size"):
        get_task("clevr", root, subtasks="colour")
    with pytest.raises(FileNotFoundError, match="binding_color_shape"):
        get_task("clevr", root, subtasks="binding_color_shape").examples
    with pytest.raises(ValueError, match="unknown option"):
        get_task("clevr", root, subtask="spatial")


# -- Pets ----------------------------------------------------------------------------------------


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
    scores = _scores([3.0, 1.0, 2.0], [2.0, 2.0, 0.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 0.1])
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
    _outside_file(tmp_path)
    (root / "annotations" / "test.txt").write_text("../../outside_1 1 1 1\n")
    _save_image(tmp_path / "outside_1.jpg", 5)
    with pytest.raises(DataError, match="outside the data root"):
        get_task("pets", root, split="test").examples

    (root / "images" / "cat.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"images/cat.jpg: file name"):
        get_task("pets", root).examples
    with pytest.raises(ValueError, match="split must be one of all, test, trainval"):
        get_task("pets", root, split="val")


# -- Bias ----------------------------------------------------------------------------------------


def test_bias_examples(tmp_path):
    root = write_bias(tmp_path / "bias")
    examples = get_task("bias", root).examples
    ids = [ex.id for ex in examples]
    assert ids == ["Religion/Christian/img0.png", "Religion/Christian/img1.png", "Religion/Christian/img2.png",
                   "Religion/muslim/img0.png", "Religion/muslim/img1.png", "Jewish/img0.png", "Jewish/img1.png",
                   "Nationality/American/img0.png", "Nationality/American/img1.png",
                   "Nationality/Arab/img0.png", "Nationality/Arab/img1.png"]
    texts = tuple(BIAS_PLEASANT + BIAS_UNPLEASANT)
    assert all(ex.texts == texts and ex.label is None for ex in examples)
    assert examples[3].meta == {"group": "Muslim", "category": "Religion", "n_pleasant": 3}
    assert examples[-1].meta == {"group": "Arab", "category": "Nationality", "n_pleasant": 3}
    assert examples[0].images == (str((root / "images" / "Religion" / "Christian" / "img0.png").resolve()),)
    # the phrase lists as JSON (MMBias's own keys), and option groups
    (root / "texts" / "pleasant.txt").unlink()
    (root / "texts" / "unpleasant.txt").unlink()
    (root / "textual_phrases.txt").write_text(json.dumps({"pleasant_phrases": ["joy"], "unpleasant_phrases": ["agony"]}))
    task = get_task("bias", root, groups="arab, christian")
    assert [ex.meta["group"] for ex in task.examples] == ["Christian"] * 3 + ["Arab"] * 2
    assert task.examples[0].texts == ("joy", "agony")


def _bias_examples(phis: dict[str, list[float]]) -> tuple[list[Example], dict[str, list[torch.Tensor]]]:
    """Examples with 1 pleasant + 1 unpleasant phrase whose scores give exactly the wanted phi."""
    examples, rows = [], []
    for group, values in phis.items():
        for k, phi in enumerate(values):
            examples.append(Example(f"{group}/{k}", ("x",), ("good", "bad"), None,
                                    {"group": group, "category": "?", "n_pleasant": 1}))
            rows.append([phi + 0.25, 0.25])
    return examples, _scores(*rows)


def test_bias_effect_size_by_hand(tmp_path):
    task = get_task("bias", write_bias(tmp_path / "bias"))
    examples, scores = _bias_examples({"Christian": [1.0, 2.0], "Muslim": [0.0], "Arab": [5.0]})
    result = task.metrics(examples, scores)
    # mean 1.5 - mean 0 over the sample std of {1, 2, 0} (= 1); American has no images: skipped
    assert set(result) == {"effect_size/Christian_vs_Muslim", "p_value/Christian_vs_Muslim"}
    assert result["effect_size/Christian_vs_Muslim"] == pytest.approx(1.5)
    # 3 relabellings of {1, 2, 0} into 2 + 1: d = 1.5, 0, -1.5; p = (1 + #{d >= 1.5}) / (1 + n)
    assert 0.2 < result["p_value/Christian_vs_Muslim"] < 0.47


def test_bias_planted_association_and_none(tmp_path):
    task = get_task("bias", write_bias(tmp_path / "bias"), permutations=2000, seed=1)
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0.0, 0.1, 8).tolist()  # noqa: E731
    planted = {"Christian": [1.0 + v for v in noise()], "Jewish": noise(),
               "American": [0.1, -0.1, 0.2, -0.2, 0.3, -0.3], "Arab": [-0.3, 0.3, -0.2, 0.2, -0.1, 0.1]}
    result = task.metrics(*_bias_examples(planted))
    assert result["effect_size/Christian_vs_Jewish"] > 1.5
    assert result["p_value/Christian_vs_Jewish"] < 0.01
    assert abs(result["effect_size/American_vs_Arab"]) < 1e-9  # no association
    assert result["p_value/American_vs_Arab"] > 0.3
    assert "effect_size/Christian_vs_Muslim" not in result  # no Muslim scores here
    # the research code's pairs, and explicit ones
    task = get_task("bias", tmp_path / "bias", pairs="diffusion_itm", permutations=100)
    assert "effect_size/Buddhist_vs_Christian" not in task.metrics(*_bias_examples(planted))
    task = get_task("bias", tmp_path / "bias", pairs=["Jewish_vs_Christian"], permutations=100)
    result = task.metrics(*_bias_examples(planted))
    assert set(result) == {"effect_size/Jewish_vs_Christian", "p_value/Jewish_vs_Christian"}
    assert result["effect_size/Jewish_vs_Christian"] < -1.5


def test_bias_bad_data_and_options(tmp_path):
    root = write_bias(tmp_path / "bias")
    os.symlink(root / "images" / "nowhere.png", root / "images" / "Jewish" / "broken.png")
    with pytest.raises(DataError, match=r"images/Jewish/broken.png.*missing image"):
        get_task("bias", root).examples
    task = get_task("bias", root, skip_missing=True)
    assert len(task.examples) == 11 and len(task.skipped) == 1 and "broken.png" in task.skipped[0]
    (root / "images" / "Jewish" / "broken.png").unlink()

    # (image paths come from listing the group folders: none can name a file outside the root)
    (root / "texts" / "unpleasant.txt").unlink()
    with pytest.raises(FileNotFoundError, match="unpleasant.txt"):
        get_task("bias", root).examples
    (root / "texts" / "pleasant.txt").unlink()
    (root / "texts" / "phrases.json").write_text(json.dumps({"pleasant": ["joy"], "unpleasant": "agony"}))
    with pytest.raises(DataError, match=r"phrases.json \['unpleasant'\]: malformed"):
        get_task("bias", root).examples

    for options in ({"groups": "Atheist"}, {"pairs": "Christian-Muslim"}, {"pairs": ["Arab_vs_arab"]},
                    {"permutations": 0}, {"seed": 1.5}, {"target": "Arab"}):
        with pytest.raises(ValueError):
            get_task("bias", root, **options)
