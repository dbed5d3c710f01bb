"""GDBench loaders for Flickr30K (both directions), Winoground, ImageCoDe and SVO-Probes.

Each task gets a tiny dataset written in its on-disk layout (`write_<task>(root)`, importable by
the end-to-end tests), then: what it loads, its metrics on hand-made score matrices (ties never
count as correct), and the bad-data policy (missing image, malformed row, path outside the root,
bad options). No model runs here.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import PIL.Image
import pytest
import torch

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

# -- fixture writers ---------------------------------------------------------------------------


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (8, 8), colour).save(path)


def _colour(n: int) -> tuple[int, int, int]:
    return (40 * n % 256, 90 * n % 256, 150 * n % 256)


FLICKR_ROWS = [  # (filename, split, captions); "green" belongs to two test images
    ("100.jpg", "test", ["a red square", "red"]),
    ("900.jpg", "train", ["a train-only image"]),
    ("200.jpg", "test", ["a green square", "green"]),
    ("300.jpg", "test", ["a blue square", "green"]),
]


def write_flickr30k(root: Path) -> Path:
    """Karpathy JSON with 3 test images (2 captions each) and 1 train image; flickr30k-images/."""
    root = Path(root)
    images = []
    for n, (filename, split, captions) in enumerate(FLICKR_ROWS):
        _image(root / "flickr30k-images" / filename, _colour(n))
        images.append({"filename": filename, "imgid": n, "split": split,
                       "sentences": [{"raw": c, "tokens": c.split(), "imgid": n} for c in captions]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


WINOGROUND_ROWS = [
    {"id": 0, "caption_0": "a cat on a dog", "caption_1": "a dog on a cat", "tag": "Object", "collapsed_tag": "Object"},
    {"id": 1, "caption_0": "red left blue", "caption_1": "blue left red", "tag": "Relation", "collapsed_tag": "Relation"},
    {"id": 2, "caption_0": "it runs fast", "caption_1": "fast it runs", "tag": "Both",
     "collapsed_tag": ["Relation", "Both"]},
]


def write_winoground(root: Path, n: int = 3) -> Path:
    """examples.jsonl with n examples (the first 3 are WINOGROUND_ROWS, one of them with two
    collapsed tags; more are plain "Object" ones) and images/ex_{id}_img_{0,1}.png."""
    root = Path(root)
    extra = [{"id": k, "caption_0": f"thing {k} on top", "caption_1": f"top {k} on thing", "tag": "Object",
              "collapsed_tag": "Object"} for k in range(len(WINOGROUND_ROWS), n)]
    rows = (WINOGROUND_ROWS + extra)[:n]
    for row in rows:
        for i in (0, 1):
            _image(root / "images" / f"ex_{row['id']}_img_{i}.png", _colour(2 * row["id"] + i))
    (root / "examples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


IMAGECODE_DATA = {
    "open-images-1": {"3": "the third one", "0": "the first one"},
    "video-clip-7": {"5": "a frame of a video"},
    "open-images-2": {"9": "the last one"},
}


def write_imagecode(root: Path) -> Path:
    """valid_data.json over two static sets and one video set, image-sets/{set}/img0..9.jpg."""
    root = Path(root)
    for image_set in IMAGECODE_DATA:
        for i in range(10):
            _image(root / "image-sets" / image_set / f"img{i}.jpg", _colour(i))
    (root / "valid_data.json").write_text(json.dumps(IMAGECODE_DATA))
    return root


SVO_ROWS = [  # sentence, pos, neg, type
    ("a man rides a horse", "p0.jpg", "n0.jpg", "subj"),
    ("a dog catches a ball", "p1.jpg", "n1.jpg", "verb"),
    ("a girl eats an apple", "p2.jpg", "n2.jpg", "obj"),
    ("a boy throws a ball", "p3.jpg", "n1.jpg", "verb"),
]


def write_svo(root: Path) -> Path:
    """svo_probes.csv (sentence, pos_image, neg_image, neg_type) with 4 probes and images/."""
    root = Path(root)
    _write_csv(root / "svo_probes.csv", ["sentence", "pos_image", "neg_image", "neg_type"], SVO_ROWS)
    for n, name in enumerate(sorted({r[1] for r in SVO_ROWS} | {r[2] for r in SVO_ROWS})):
        _image(root / "images" / name, _colour(n))
    return root


def _write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _column(*values) -> list[torch.Tensor]:
    """t2i score matrices [k, 1], one per argument (a list of k scores)."""
    return [torch.tensor(v, dtype=torch.float32).reshape(-1, 1) for v in values]


def _row(*values) -> list[torch.Tensor]:
    """i2t score matrices [1, k]."""
    return [torch.tensor(v, dtype=torch.float32).reshape(1, -1) for v in values]


def _names(paths) -> list[str]:
    return [Path(p).name for p in paths]


def _assert_inside(task) -> None:
    for ex in task.examples:
        for p in ex.images:
            assert os.path.isabs(p) and Path(p).is_relative_to(task.root) and Path(p).is_file()


# -- Flickr30K --------------------------------------------------------------------------------


@pytest.fixture
def flickr(tmp_path):
    return write_flickr30k(tmp_path / "flickr")


POOL = ["a red square", "red", "a green square", "green", "a blue square"]  # unique test captions


def test_flickr_i2t_all(flickr):
    task = get_task("flickr30k_i2t", flickr)
    assert task.modes == ("i2t",)
    exs = task.examples
    assert [ex.id for ex in exs] == ["100.jpg", "200.jpg", "300.jpg"]  # the train image is left out
    assert all(_names(ex.images) == [ex.id] for ex in exs)
    assert all(list(ex.texts) == POOL for ex in exs)  # "green" once, though two images carry it
    assert [ex.label for ex in exs] == [[0, 1], [2, 3], [3, 4]]
    _assert_inside(task)
    # 100: positive first -> rank 1; 200: best positive third -> rank 3;
    # 300: positive 3 ties with negative 0 at the top -> rank 2 (a tie is not a hit)
    scores = {"i2t": _row([5, 1, 2, 3, 4], [9, 8, 7, 1, 0], [6, 0, 0, 6, 1])}
    assert task.metrics(exs, scores) == pytest.approx({"R@1": 1 / 3, "R@5": 1.0, "R@10": 1.0})


def test_flickr_t2i_all(flickr):
    task = get_task("flickr30k_t2i", flickr)
    assert task.modes == ("t2i",)
    exs = task.examples
    assert [ex.id for ex in exs] == ["100.jpg#0", "100.jpg#1", "200.jpg#0", "200.jpg#1", "300.jpg#0", "300.jpg#1"]
    assert all(_names(ex.images) == ["100.jpg", "200.jpg", "300.jpg"] for ex in exs)
    captions = ["a red square", "red", "a green square", "green", "a blue square", "green"]
    assert [ex.texts for ex in exs] == [(c,) for c in captions]
    assert [ex.label for ex in exs] == [[0], [0], [1], [1], [2], [2]]  # the caption's own image
    # ranks: 1, 3, 2 (tie with a wrong image), 1, 1, 3
    scores = {"t2i": _column([3, 2, 1], [1, 2, 3], [1, 2, 2], [0, 5, 1], [0, 0, 9], [9, 8, 7])}
    assert task.metrics(exs, scores) == pytest.approx({"R@1": 0.5, "R@5": 1.0, "R@10": 1.0})
    with pytest.raises(ValueError, match="candidates but"):
        task.metrics(exs, {"t2i": _row(*[[1, 2, 3]] * 5, [1, 2])})


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
    assert kind == "texts" and _names(images) == ["100.jpg", "200.jpg", "300.jpg"] and texts == POOL and k == 2
    assert all(ex.texts == ("a blue square", "green") for ex in exs)
    assert [ex.label for ex in exs] == [[], [1], [0, 1]]  # the prefilter missed 100's captions
    # 100 has no positive: never a hit, even at R@5/R@10 with only 2 candidates
    scores = {"i2t": _row([1, 0], [0, 1], [1, 0])}
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
    assert all(_names(ex.images) == ["300.jpg", "100.jpg"] for ex in exs)
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
    assert [_names(ex.images) for ex in exs] == [["200.jpg"], ["100.jpg"], ["300.jpg"]]
    assert exs[1].texts == ("a blue square", "red")
    assert [ex.label for ex in exs] == [[0, 2], [1], [0, 1]]
    # ragged k (3, 2, 4): ranks 2 (tie), 1, 3
    scores = {"i2t": _row([5, 1, 5], [0, 1], [1, 2, 3, 0])}
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
    assert [_names(ex.images) for ex in exs] == [["300.jpg", "100.jpg"], ["100.jpg", "300.jpg", "200.jpg"], ["200.jpg"]]
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
        with pytest.raises(DataError, match=r"dataset_flickr30k.json images\[2\] \(200.jpg\).*missing image file.*200.jpg"):
            get_task(name, flickr).examples
    task = get_task("flickr30k_i2t", flickr, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["100.jpg", "300.jpg"]
    assert task.examples[0].texts == ("a red square", "red", "a blue square", "green")  # its captions go too
    assert len(task.skipped) == 1 and "200.jpg" in task.skipped[0]
    task = get_task("flickr30k_t2i", flickr, skip_missing=True)
    assert [ex.label for ex in task.examples] == [[0], [0], [1], [1]]
    assert all(_names(ex.images) == ["100.jpg", "300.jpg"] for ex in task.examples)


@pytest.mark.parametrize("change, match", [
    (lambda rows: rows[2].pop("sentences"), r"images\[2\]: malformed row: missing field\(s\) sentences"),
    (lambda rows: rows[3]["sentences"].append({"tokens": []}), r"images\[3\]: malformed row: sentences\[2\]"),
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


# -- Winoground -------------------------------------------------------------------------------


@pytest.fixture
def wino(tmp_path):
    return write_winoground(tmp_path / "winoground")


def test_winoground_load(wino):
    task = get_task("winoground", wino)
    assert task.modes == ("i2t", "t2i")
    exs = task.examples
    assert [ex.id for ex in exs] == ["0", "1", "2"]
    assert _names(exs[1].images) == ["ex_1_img_0.png", "ex_1_img_1.png"]
    assert exs[0].texts == ("a cat on a dog", "a dog on a cat")
    assert [ex.meta for ex in exs] == [{"tag": "Object", "collapsed_tag": ["Object"]},
                                       {"tag": "Relation", "collapsed_tag": ["Relation"]},
                                       {"tag": "Both", "collapsed_tag": ["Relation", "Both"]}]
    _assert_inside(task)


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
            _image(root / f"ex_{row['id']}_img_{i}.png", _colour(i))  # images at the root
    (root / "data.json").write_text(json.dumps(rows))  # a JSON list, no collapsed_tag
    exs = get_task("winoground", root).examples
    assert [ex.id for ex in exs] == ["5", "6"]
    assert exs[0].meta == {"tag": "Object", "collapsed_tag": ["Object"]}
    assert _names(exs[1].images) == ["ex_6_img_0.png", "ex_6_img_1.png"]
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
    ('{"id": 1, "caption_0": "x", "caption_1": 3, "tag": "Object"}', r"examples.jsonl:2: malformed row: caption_0"),
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


def test_winoground_bad_options(wino, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*split"):
        get_task("winoground", wino, split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="examples.jsonl"):
        get_task("winoground", tmp_path / "empty").examples


# -- ImageCoDe --------------------------------------------------------------------------------


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
    assert all(_names(ex.images) == [f"img{i}.jpg" for i in range(10)] for ex in exs)
    assert all(Path(p).parent.name == "open-images-2" for p in exs[2].images)
    _assert_inside(task)
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
    ({"open-images-1": {"2": 5}}, r"\['open-images-1'\]\['2'\]: malformed row: the description"),
    ({"open-images-1": ["a", "b"]}, r"\['open-images-1'\]: malformed row"),
    ({"../../open-images-x": {"2": "x"}}, r"\['../../open-images-x'\]\['2'\].*outside the data root"),
    (["open-images-1"], r"valid_data.json: expected an object"),
])
def test_imagecode_malformed(imagecode, data, match):
    (imagecode / "valid_data.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=match):
        get_task("imagecode", imagecode).examples


def test_imagecode_bad_options(imagecode):
    with pytest.raises(ValueError, match="subset must be one of static, video, all"):
        get_task("imagecode", imagecode, subset="bogus")
    with pytest.raises(ValueError, match="unknown option.*static_only"):
        get_task("imagecode", imagecode, static_only=True)
    with pytest.raises(ValueError, match="no test_data.json for split 'test'; splits found: valid"):
        get_task("imagecode", imagecode, split="test").examples


# -- SVO-Probes -------------------------------------------------------------------------------


@pytest.fixture
def svo(tmp_path):
    return write_svo(tmp_path / "svo")


def test_svo_load(svo):
    task = get_task("svo", svo)
    assert task.modes == ("t2i",)
    exs = task.examples
    assert [ex.id for ex in exs] == ["0", "1", "2", "3"]
    assert [_names(ex.images) for ex in exs] == [[r[1], r[2]] for r in SVO_ROWS]
    assert [ex.texts for ex in exs] == [(r[0],) for r in SVO_ROWS]
    assert all(ex.label == 0 for ex in exs)
    assert [ex.meta for ex in exs] == [{"type": r[3]} for r in SVO_ROWS]
    _assert_inside(task)


def test_svo_metrics(svo):
    task = get_task("svo", svo)
    # subj right; verb tie (wrong); obj wrong; verb right
    scores = {"t2i": _column([3, 1], [1, 1], [0, 2], [5, 4])}
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
    _write_csv(svo / "svo_probes.csv", header, rows)
    exs = get_task("svo", svo).examples
    assert [_names(ex.images) for ex in exs] == [["p0.jpg", "n0.jpg"], ["p2.jpg", "n2.jpg"]]  # bare ids get .jpg
    assert [ex.meta["type"] for ex in exs] == ["subj", "obj"]

    (svo / "svo_probes.csv").unlink()  # JSON lines
    lines = [json.dumps({"sentence": s, "pos_image": p, "neg_image": n, "neg_type": t}) for s, p, n, t in SVO_ROWS[:2]]
    (svo / "svo_probes.jsonl").write_text("\n".join(lines))
    assert [ex.meta["type"] for ex in get_task("svo", svo).examples] == ["subj", "verb"]

    (svo / "svo_probes.jsonl").unlink()  # the research code's svo.json
    (svo / "svo.json").write_text(json.dumps([{"pos_id": "p3.jpg", "neg_id": "n1.jpg", "sentence": "a boy throws a ball",
                                               "pos_triplet": "boy,throw,ball", "neg_triplet": "boy,catch,ball",
                                               "neg_type": "verb"}]))
    exs = get_task("svo", svo).examples
    assert _names(exs[0].images) == ["p3.jpg", "n1.jpg"] and exs[0].meta == {"type": "verb"}


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
    (TYPED, ("", "p0.jpg", "n0.jpg", "subj"), r"svo_probes.csv:3: malformed row: missing or empty sentence"),
    (TYPED, ("x", "p0.jpg"), r"svo_probes.csv:3: malformed row: missing image column"),
    (TYPED, ("x", "../../x.png", "n0.jpg", "subj"), r"svo_probes.csv:3: .*outside the data root"),
    (FLAGGED, ("x", "p0.jpg", "n0.jpg", "True", "True", "False"), r"svo_probes.csv:3: malformed row: needs neg_type"),
    (FLAGGED, ("x", "p0.jpg", "n0.jpg", "maybe", "", ""), r"svo_probes.csv:3: malformed row: subj_neg must be a boolean"),
])
def test_svo_malformed(svo, header, row, match):
    good = ("a man rides a horse", "p0.jpg", "n0.jpg") + (("subj",) if header is TYPED else ("1", "0", "0"))
    _write_csv(svo / "svo_probes.csv", header, [good, row])
    with pytest.raises(DataError, match=match):
        get_task("svo", svo).examples


def test_svo_bad_options(svo, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*neg_type"):
        get_task("svo", svo, neg_type="verb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="svo_probes.csv"):
        get_task("svo", tmp_path / "empty").examples


# -- all four ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, writer", [
    ("flickr30k_i2t", write_flickr30k), ("flickr30k_t2i", write_flickr30k),
    ("winoground", write_winoground), ("imagecode", write_imagecode), ("svo", write_svo),
])
def test_deterministic_and_documented(tmp_path, name, writer):
    root = writer(tmp_path / name)
    first, second = get_task(name, root), get_task(name, root)
    assert first.examples == second.examples
    cls = type(first)
    assert cls.description and "Layout" in cls.__doc__
