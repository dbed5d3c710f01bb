"""Flickr30K retrieval (`flickr30k_i2t`, `flickr30k_t2i`): what loads from the Karpathy JSON, recall on hand-made
scores (ties never count), CLIP-prefiltered and file-given candidates, and the bad-data policy. No model runs here."""
from __future__ import annotations

import json
import os

import pytest
import torch

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import FLICKR_ROWS, assert_inside_root, assert_malformed, file_names, write_flickr30k
from fixtures.scores import i2t_matrices, t2i_matrices


@pytest.fixture
def flickr(tmp_path):
    return write_flickr30k(tmp_path / "flickr")


POOL = ["a red square", "red", "a green square", "green", "a blue square"]  # unique test captions


def test_flickr_i2t_all(flickr):
    task = get_task("flickr30k_i2t", flickr)
    assert task.modes == ("i2t",)
    exs = task.examples
    assert [ex.id for ex in exs] == ["100.jpg", "200.jpg", "300.jpg"]  # the train image is left out
    assert all(file_names(ex.images) == [ex.id] for ex in exs)
    assert all(list(ex.texts) == POOL for ex in exs)  # "green" once, though two images carry it
    assert [ex.label for ex in exs] == [[0, 1], [2, 3], [3, 4]]
    assert_inside_root(task)
    # 100: positive first -> rank 1; 200: best positive third -> rank 3;
    # 300: positive 3 ties with negative 0 at the top -> rank 2 (a tie is not a hit)
    scores = {"i2t": i2t_matrices([5, 1, 2, 3, 4], [9, 8, 7, 1, 0], [6, 0, 0, 6, 1])}
    assert task.metrics(exs, scores) == pytest.approx({"R@1": 1 / 3, "R@5": 1.0, "R@10": 1.0})


def test_flickr_t2i_all(flickr):
    task = get_task("flickr30k_t2i", flickr)
    assert task.modes == ("t2i",)
    exs = task.examples
    assert [ex.id for ex in exs] == ["100.jpg#0", "100.jpg#1", "200.jpg#0", "200.jpg#1", "300.jpg#0", "300.jpg#1"]
    assert all(file_names(ex.images) == ["100.jpg", "200.jpg", "300.jpg"] for ex in exs)
    captions = ["a red square", "red", "a green square", "green", "a blue square", "green"]
    assert [ex.texts for ex in exs] == [(c,) for c in captions]
    assert [ex.label for ex in exs] == [[0], [0], [1], [1], [2], [2]]  # the caption's own image
    # ranks: 1, 3, 2 (tie with a wrong image), 1, 1, 3
    scores = {"t2i": t2i_matrices([3, 2, 1], [1, 2, 3], [1, 2, 2], [0, 5, 1], [0, 0, 9], [9, 8, 7])}
    assert task.metrics(exs, scores) == pytest.approx({"R@1": 0.5, "R@5": 1.0, "R@10": 1.0})
    with pytest.raises(ValueError, match="candidates but"):
        task.metrics(exs, {"t2i": i2t_matrices(*[[1, 2, 3]] * 5, [1, 2])})


def test_flickr_other_split_and_image_dir(flickr):
    os.rename(flickr / "flickr30k-images", flickr / "images")  # the other accepted folder name
    task = get_task("flickr30k_i2t", flickr, split="train")
    assert [ex.id for ex in task.examples] == ["900.jpg"]
    assert task.examples[0].texts == ("a train-only image",) and task.examples[0].label == [0]
    os.rename(flickr / "images", flickr / "pics")
    assert len(get_task("flickr30k_t2i", flickr, image_dir="pics").examples) == 6


class FakePrefilter:
    """Stands in for the CLIP prefilter: fixed picks, and a record of what it was asked."""

    def __init__(self):
        self.calls = []

    def topk_texts(self, images, texts, k):
        self.calls.append(("texts", list(images), list(texts), k))
        return torch.tensor([[len(texts) - 1 - j for j in range(k)]] * len(images))  # the last k, reversed

    def topk_images(self, texts, images, k):
        self.calls.append(("images", list(texts), list(images), k))
        return torch.tensor([[2, 0][:k]] * len(texts))


def test_flickr_i2t_clip_prefilter(flickr):
    fake = FakePrefilter()
    task = get_task("flickr30k_i2t", flickr, candidates="clip", prefilter=fake, topk=2)
    exs = task.examples
    kind, images, texts, k = fake.calls[0]
    assert kind == "texts" and file_names(images) == ["100.jpg", "200.jpg", "300.jpg"] and texts == POOL and k == 2
    assert all(ex.texts == ("a blue square", "green") for ex in exs)
    assert [ex.label for ex in exs] == [[], [1], [0, 1]]  # the prefilter missed 100's captions
    # 100 has no positive: never a hit, even at R@5/R@10 with only 2 candidates
    scores = {"i2t": i2t_matrices([1, 0], [0, 1], [1, 0])}
    assert task.metrics(exs, scores) == pytest.approx({"R@1": 2 / 3, "R@5": 2 / 3, "R@10": 2 / 3})
    # k is capped by the pool size; the default k is 10
    get_task("flickr30k_i2t", flickr, candidates="clip", prefilter=fake).examples
    assert fake.calls[-1][3] == 5


def test_flickr_t2i_clip_prefilter(flickr):
    fake = FakePrefilter()
    task = get_task("flickr30k_t2i", flickr, candidates="clip", prefilter=fake, topk=2)
    exs = task.examples
    kind, texts, images, k = fake.calls[0]
    assert kind == "images" and texts == [c for _, s, cs in FLICKR_ROWS if s == "test" for c in cs] and k == 2
    assert all(file_names(ex.images) == ["300.jpg", "100.jpg"] for ex in exs)
    assert [ex.label for ex in exs] == [[1], [1], [], [], [0], [0]]


def test_flickr_bad_prefilter(flickr):
    class Wrong(FakePrefilter):
        def topk_images(self, texts, images, k):
            return torch.zeros(len(texts), k + 1, dtype=torch.long)

    with pytest.raises(ValueError, match="shape"):
        get_task("flickr30k_t2i", flickr, candidates="clip", prefilter=Wrong(), topk=2).examples
    with pytest.raises(ValueError, match="needs option prefilter"):
        get_task("flickr30k_t2i", flickr, candidates="clip")
    with pytest.raises(ValueError, match="topk_texts"):
        get_task("flickr30k_i2t", flickr, candidates="clip", prefilter=object())


def test_flickr_candidates_files(flickr):
    i2t_file = flickr / "val_top10_RN50x64_text.json"
    i2t_file.write_text(json.dumps({
        "flickr30k-images/200.jpg": ["green", "a red square", "a green square"],
        str(flickr / "flickr30k-images" / "100.jpg"): ["a blue square", "red"],  # absolute, inside the root
        "datasets/flickr30k/images/300.jpg": ["green", "a blue square", "red", "a red square"],  # research paths
    }))
    task = get_task("flickr30k_i2t", flickr, candidates=i2t_file.name)  # relative to the root
    exs = task.examples
    assert [ex.id for ex in exs] == ["200.jpg", "100.jpg", "300.jpg"]  # file order
    assert [file_names(ex.images) for ex in exs] == [["200.jpg"], ["100.jpg"], ["300.jpg"]]
    assert exs[1].texts == ("a blue square", "red")
    assert [ex.label for ex in exs] == [[0, 2], [1], [0, 1]]
    # ragged k (3, 2, 4): ranks 1 (its two correct captions tie: no wrong one ahead), 1, 3
    scores = {"i2t": i2t_matrices([5, 1, 5], [0, 1], [1, 2, 3, 0])}
    assert task.metrics(exs, scores) == pytest.approx({"R@1": 2 / 3, "R@5": 1.0, "R@10": 1.0})
    # a wrong caption tying the best correct one counts ahead: rank 2
    scores = {"i2t": i2t_matrices([5, 5, 4], [0, 1], [1, 2, 3, 0])}
    assert task.metrics(exs, scores) == pytest.approx({"R@1": 1 / 3, "R@5": 1.0, "R@10": 1.0})
    cut = get_task("flickr30k_i2t", flickr, candidates=str(i2t_file), topk=1).examples  # absolute path
    assert [ex.texts for ex in cut] == [("green",), ("a blue square",), ("green",)]
    assert [ex.label for ex in cut] == [[0], [], [0]]

    t2i_file = flickr / "val_top10_RN50x64.json"
    t2i_file.write_text(json.dumps({
        "a blue square": ["datasets/flickr30k/images/300.jpg", "flickr30k-images/100.jpg"],
        "green": ["flickr30k-images/100.jpg", "flickr30k-images/300.jpg", "flickr30k-images/200.jpg"],
        "red": [str(flickr / "flickr30k-images" / "200.jpg")],
    }))
    exs = get_task("flickr30k_t2i", flickr, candidates=str(t2i_file)).examples
    assert [ex.id for ex in exs] == ["300.jpg#0", "200.jpg#1", "100.jpg#1"]
    assert [ex.texts for ex in exs] == [("a blue square",), ("green",), ("red",)]
    assert [file_names(ex.images) for ex in exs] == [
        ["300.jpg", "100.jpg"], ["100.jpg", "300.jpg", "200.jpg"], ["200.jpg"]]
    assert [ex.label for ex in exs] == [[0], [1, 2], []]  # both images captioned "green" count


def test_flickr_candidates_file_errors(flickr, tmp_path):
    def load(content, direction="t2i"):
        file = flickr / "cands.json"
        file.write_text(json.dumps(content))
        return get_task(f"flickr30k_{direction}", flickr, candidates="cands.json").examples

    with pytest.raises(DataError, match=r"cands.json \['not a caption'\].*not in split 'test'"):
        load({"not a caption": ["flickr30k-images/100.jpg"]})
    with pytest.raises(DataError, match=r"cands.json \['flickr30k-images/900.jpg'\].*not in split"):
        load({"flickr30k-images/900.jpg": ["red"]}, "i2t")
    with pytest.raises(DataError, match="outside the data root"):
        load({"red": ["../../x.jpg"]})
    with pytest.raises(DataError, match="outside the data root"):
        load({str(tmp_path / "elsewhere" / "100.jpg"): ["red"]}, "i2t")
    with pytest.raises(DataError, match=r"cands.json \['red'\].*non-empty list of strings"):
        load({"red": "flickr30k-images/100.jpg"})
    with pytest.raises(DataError, match=r"cands.json \['red'\] item 1.*missing image file.*missing.jpg"):
        load({"red": ["flickr30k-images/100.jpg", "flickr30k-images/missing.jpg"]})
    (flickr / "cands.json").write_text(json.dumps({"red": ["flickr30k-images/100.jpg", "x/missing.jpg"],
                                                   "green": ["flickr30k-images/200.jpg"]}))
    task = get_task("flickr30k_t2i", flickr, candidates="cands.json", skip_missing=True)
    assert [ex.id for ex in task.examples] == ["200.jpg#1"]
    assert len(task.skipped) == 1 and "missing.jpg" in task.skipped[0]


def test_flickr_missing_image(flickr):
    (flickr / "flickr30k-images" / "200.jpg").unlink()
    for name in ("flickr30k_i2t", "flickr30k_t2i"):
        missing = r"dataset_flickr30k.json images\[2\] \(200.jpg\).*missing image file.*200.jpg"
        with pytest.raises(DataError, match=missing):
            get_task(name, flickr).examples
    task = get_task("flickr30k_i2t", flickr, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["100.jpg", "300.jpg"]
    assert task.examples[0].texts == ("a red square", "red", "a blue square", "green")  # its captions go too
    assert len(task.skipped) == 1 and "200.jpg" in task.skipped[0]
    task = get_task("flickr30k_t2i", flickr, skip_missing=True)
    assert [ex.label for ex in task.examples] == [[0], [0], [1], [1]]
    assert all(file_names(ex.images) == ["100.jpg", "300.jpg"] for ex in task.examples)


@pytest.mark.parametrize("change, match", [
    (lambda rows: rows[2].pop("sentences"), r"images\[2\]: malformed row: missing field\(s\) sentences"),
    (lambda rows: rows[3]["sentences"].append({"tokens": []}),
     r"images\[3\] sentences\[2\]: malformed row: missing field\(s\) raw"),
    (lambda rows: rows[0].update(filename=7), r"images\[0\]: malformed row: filename"),
    (lambda rows: rows[0].update(filename="../../x.jpg"), r"images\[0\].*outside the data root"),
    (lambda rows: rows.append(dict(rows[0])), r"100.jpg.*listed twice"),
])
def test_flickr_malformed(flickr, change, match):
    data = json.loads((flickr / "dataset_flickr30k.json").read_text())
    change(data["images"])
    (flickr / "dataset_flickr30k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=match):
        get_task("flickr30k_t2i", flickr).examples


@pytest.mark.parametrize("row, field, value", [
    ("", "filename", None), ("", "filename", ["100.jpg"]), ("", "split", 5), ("", "sentences", []),
    (" sentences[1]", "raw", None), (" sentences[1]", "raw", 5),
])
def test_flickr_malformed_field_types(flickr, row, field, value):
    data = json.loads((flickr / "dataset_flickr30k.json").read_text())
    (data["images"][2]["sentences"][1] if row else data["images"][2])[field] = value
    (flickr / "dataset_flickr30k.json").write_text(json.dumps(data))
    assert_malformed(get_task("flickr30k_i2t", flickr), f"dataset_flickr30k.json images[2]{row}", field, value)


@pytest.mark.parametrize("entry, value", [(["flickr30k-images/100.jpg", 5], 5),
                                          (["flickr30k-images/100.jpg", None], None)])
def test_flickr_candidates_file_field_types(flickr, entry, value):
    (flickr / "cands.json").write_text(json.dumps({"red": entry}))
    task = get_task("flickr30k_t2i", flickr, candidates="cands.json")
    assert_malformed(task, "cands.json ['red']", "candidates[1]", value)


def test_flickr_bad_json(flickr):
    (flickr / "dataset_flickr30k.json").write_text('{"images": [')
    with pytest.raises(DataError, match="dataset_flickr30k.json: not valid JSON"):
        get_task("flickr30k_i2t", flickr).examples


@pytest.mark.parametrize("options, match", [
    (dict(candidates="bogus"), "candidates must be 'all', 'clip' or the path"),
    (dict(topk=0), "topk must be a positive integer"),
    (dict(prefilter=FakePrefilter()), "prefilter is only used with candidates='clip'"),
    (dict(image_dir="nope"), "image_dir 'nope' is not a folder"),
    (dict(image_dir="../.."), "is not a folder inside"),
    (dict(split=3), "split must be a split name"),
    (dict(top_k=5), "unknown option.*top_k"),
])
def test_flickr_bad_options(flickr, options, match):
    with pytest.raises(ValueError, match=match):
        get_task("flickr30k_i2t", flickr, **options)


def test_flickr_topk_unused_with_all(flickr):  # what itm-eval --candidates all passes
    assert len(get_task("flickr30k_i2t", flickr, candidates="all", topk=10).examples[0].texts) == 5


def test_flickr_unknown_split(flickr):
    with pytest.raises(ValueError, match="no images of split 'val'.*splits there: test, train"):
        get_task("flickr30k_i2t", flickr, split="val").examples
