"""Training data for HardNeg-DiffusionITM (`itm_engine.hardneg.data`): readers, hard-negative captions,
CLIP neighbours, sampler."""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import PIL.Image
import pytest
import torch

from itm_engine import kernels
from itm_engine.hardneg.data import (
    HARD_NEGATIVE_KINDS,
    NEGATIVE_KINDS,
    Negative,
    NegativeSampler,
    TrainPair,
    clip_nearest_images,
    hard_negative_captions,
    hard_negatives,
    read_pairs,
)
from itm_engine.tasks.base import DataError

from fixtures.helpers import make_images
from fixtures.models import make_clip, write_clip_config

COLOURS = ["red", "green", "blue", "white", "black"]


def write_images(folder: Path, names: list[str]) -> list[str]:
    """Tiny one-colour PNGs named `names` under `folder`; their absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        PIL.Image.new("RGB", (8, 8), COLOURS[i % len(COLOURS)]).save(path)
        paths.append(str(path.resolve()))
    return paths


def write_coco(path: Path, names: list[str], captions: list[tuple[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": 100 + i, "file_name": name} for i, name in enumerate(names)]
    annotations = [{"id": j, "image_id": 100 + i, "caption": c} for j, (i, c) in enumerate(captions)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))


def write_table(path: Path, rows: list[list], delimiter: str) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)


# -- readers ----------------------------------------------------------------------------------------


COCO_CAPTIONS = [(0, "A dog on a table. "), (1, "a red cup"), (0, "a dog sitting on a table")]


@pytest.mark.parametrize("layout", ["beside", "annotations"])
def test_coco_json_one_pair_per_annotation_with_the_default_image_folder(tmp_path, layout):
    names = ["COCO_train2014_0.jpg", "COCO_train2014_1.jpg"]
    paths = write_images(tmp_path / "train2014", names)
    json_path = tmp_path / ("captions_train2014.json" if layout == "beside" else "annotations/captions_train2014.json")
    write_coco(json_path, names, COCO_CAPTIONS)
    pairs = read_pairs(json_path)
    assert pairs == [TrainPair(paths[0], "A dog on a table."), TrainPair(paths[1], "a red cup"),
                     TrainPair(paths[0], "a dog sitting on a table")]
    assert read_pairs(json_path, limit=2) == pairs[:2]


def test_coco_json_with_an_explicit_image_root(tmp_path):
    names = ["a.png", "b.png"]
    paths = write_images(tmp_path / "elsewhere", names)
    write_coco(tmp_path / "captions.json", names, COCO_CAPTIONS)
    assert [p.image for p in read_pairs(tmp_path / "captions.json", image_root=tmp_path / "elsewhere")] == [
        paths[0], paths[1], paths[0]]


def test_jsonl_relative_and_absolute_paths_blank_lines_and_limit(tmp_path):
    paths = write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    lines = [json.dumps({"image": "img/a.png", "caption": "one"}), "",
             json.dumps({"image": paths[1], "caption": "two", "extra": 1}),
             json.dumps({"image": "img/c.png", "caption": " three "})]
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join(lines) + "\n")
    assert read_pairs(file) == [TrainPair(paths[0], "one"), TrainPair(paths[1], "two"), TrainPair(paths[2], "three")]
    assert read_pairs(file, limit=2) == read_pairs(file)[:2]
    with pytest.raises(DataError, match="img/img/a.png"):  # relative to the given root
        read_pairs(file, image_root=tmp_path / "img")


def test_csv_with_extra_columns_and_quoted_captions(tmp_path):
    paths = write_images(tmp_path, ["a.png", "b.png"])
    file = tmp_path / "pairs.csv"
    rows = [["id", "image", "caption"], [7, "a.png", 'a dog, "happy", on a table'], [8, "b.png", "a cat"]]
    write_table(file, rows, ",")
    assert read_pairs(file) == [TrainPair(paths[0], 'a dog, "happy", on a table'), TrainPair(paths[1], "a cat")]
    assert read_pairs(file, limit=1) == [TrainPair(paths[0], 'a dog, "happy", on a table')]


def negclip_rows() -> list[list]:
    # as pandas writes it: an unnamed index column first, literal lists quoted where needed
    return [["", "title", "filepath", "neg_caption", "neg_image"],
            [0, "a dog on a table", "a.png", "['a table on a dog', \"a dog's table\"]", "[1, 2, 0]"],
            [1, "a red cup", "b.png", "['a blue cup']", "[0]"],
            [2, "a cat", "c.png", "[]", "[]"]]


def test_negclip_tsv_literal_lists(tmp_path):
    paths = write_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    file = tmp_path / "train_neg_clip.tsv"
    write_table(file, negclip_rows(), "\t")
    pairs = read_pairs(file, image_root=tmp_path / "images")
    assert pairs == [
        TrainPair(paths[0], "a dog on a table", ("a table on a dog", "a dog's table"), (1, 2)),  # self index dropped
        TrainPair(paths[1], "a red cup", ("a blue cup",), (0,)),
        TrainPair(paths[2], "a cat"),
    ]
    # with a limit, indices of rows past it are dropped
    assert read_pairs(file, image_root=tmp_path / "images", limit=2) == [
        TrainPair(paths[0], "a dog on a table", ("a table on a dog", "a dog's table"), (1,)),
        TrainPair(paths[1], "a red cup", ("a blue cup",), (0,)),
    ]


@pytest.mark.parametrize(
    "suffix, content, where",
    [
        (".jsonl", '{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": \n', "line 2"),
        (".jsonl", '{"image": "a.png", "caption": "ok"}\n{"image": "a.png"}\n', "line 2"),
        (".jsonl", '{"image": "a.png", "caption": "  "}\n', "line 1"),
        (".csv", "image,caption\na.png,fine\na.png\n", "row 1"),
        (".tsv", "title\tfilepath\tneg_caption\tneg_image\nok\ta.png\t['x'\t[]\n", "row 0"),
        (".tsv", "title\tfilepath\tneg_caption\tneg_image\nok\ta.png\t[]\t[]\nok\ta.png\t[]\t['one']\n", "row 1"),
        (".tsv", "title\tfilepath\tneg_caption\tneg_image\nok\ta.png\t[]\t[5]\n", "row 0"),
        (".tsv", "title\tfilepath\tneg_caption\tneg_image\nok\ta.png\t'x'\t[]\n", "row 0"),
        (".json", json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                              "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 2, "caption": "x"}]}),
         "annotations[1]"),
        (".json", json.dumps({"images": [{"id": 1}], "annotations": []}), "images[0]"),
    ],
)
def test_malformed_rows_name_the_file_and_row(tmp_path, suffix, content, where):
    write_images(tmp_path, ["a.png"])
    file = tmp_path / f"data{suffix}"
    file.write_text(content)
    with pytest.raises(DataError) as err:
        read_pairs(file, image_root=tmp_path)
    assert str(file) in str(err.value) and where in str(err.value)


def test_missing_columns_missing_images_and_missing_files(tmp_path):
    write_images(tmp_path, ["a.png"])
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("image,text\na.png,hi\n")
    with pytest.raises(DataError, match="caption"):
        read_pairs(csv_file)
    jsonl = tmp_path / "pairs.jsonl"
    names = ["a.png", "gone.png", "gone.png"]
    jsonl.write_text("\n".join(json.dumps({"image": name, "caption": "c"}) for name in names))
    with pytest.raises(DataError) as err:
        read_pairs(jsonl)
    message = str(err.value)
    assert "1 missing image file" in message and "gone.png" in message and "line 2" in message
    assert str(jsonl) in message
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        read_pairs(jsonl, image_root=tmp_path / "no-such-folder")
    with pytest.raises(ValueError, match="unknown training data format"):
        read_pairs(tmp_path / "a.png")
    with pytest.raises(ValueError, match="limit"):
        read_pairs(jsonl, limit=0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no image-caption pairs"):
        read_pairs(tmp_path / "empty.jsonl")


# -- hard-negative captions -------------------------------------------------------------------------

CAPTIONS = ["a dog on a table", "A small brown dog sitting on a wooden table.",
            "a man riding a horse in front of a red barn", "A red cup on a blue plate, next to a fork.",
            "two cats and a dog sleeping under a green blanket near the fire"]


def words(text: str) -> Counter:
    return Counter(w.strip(",.").lower() for w in text.split())


def test_hard_negatives_are_deterministic_differ_from_the_caption_and_are_distinct():
    for caption in CAPTIONS:
        negatives = hard_negative_captions(caption, seed=3)
        assert negatives == hard_negative_captions(caption, seed=3)
        assert negatives and len(set(negatives)) == len(negatives)
        assert all(" ".join(n.split()) != " ".join(caption.split()) for n in negatives)
        by_kind = hard_negatives(caption, seed=3)
        assert list(by_kind.values()) == negatives and set(by_kind) <= set(HARD_NEGATIVE_KINDS)
    long = "a big dog and a small cat and a red bird on a green tree near a white house by a blue lake"
    assert len({tuple(hard_negative_captions(long, seed)) for seed in range(6)}) > 1


def test_noun_and_adjective_swaps_keep_the_words_and_relation_swaps_move_the_arguments():
    caption = "a brown dog chasing a white cat on the grass"
    swapped = hard_negatives(caption, 0)["swap_nouns"]
    assert words(swapped) == words(caption) and swapped != caption
    assert hard_negatives(caption, 0)["swap_adjectives"] == "a white dog chasing a brown cat on the grass"
    assert "a table on a dog" in hard_negative_captions("a dog on a table", 0)
    assert "a dog under a table" in hard_negative_captions("a dog on a table", 0)
    by_kind = hard_negatives("A small brown dog sitting on a wooden table.", 0)
    assert by_kind["swap_relation_arguments"] == "A wooden table sitting on a small brown dog."
    assert by_kind["replace_relation"] == "A small brown dog sitting under a wooden table."
    assert "a cat to the right of a dog" in hard_negative_captions("a cat to the left of a dog", 1)
    # punctuation stays in place, words inside relation phrases are not swapped as nouns
    for negative in hard_negative_captions("a cup on a plate, in front of a fork.", 0):
        assert negative.endswith(".")
    assert all(hard_negatives("a cup in front of a fork", seed)["swap_nouns"] == "a fork in front of a cup"
               for seed in range(5))
    # articles agree with the swapped-in word
    assert "an umbrella" in hard_negatives("a man holding an umbrella", 0)["swap_nouns"]


def test_short_captions_may_have_no_hard_negatives():
    assert hard_negative_captions("dog", 0) == []
    assert hard_negative_captions("  ", 0) == []
    assert hard_negative_captions("two dogs", 0) == ["dogs two"]


# -- CLIP nearest neighbours ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(str(write_clip_config(tmp_path_factory.mktemp("clip_config"))))


def test_clip_nearest_images_equal_brute_force_top_k(clip, tmp_path, monkeypatch):
    images = make_images(7, seed=5)
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"{i}.png"))
        image.save(files[-1])
    images[3].save(tmp_path / "copy3.png")  # another file with the same pixels as 3.png
    order = [0, 1, 0, 2, 3, 4, 5, 1, 6]  # rows; 0 and 1 appear twice (several captions of one image)
    pairs = [TrainPair(files[i], f"caption {row}") for row, i in enumerate(order)]
    pairs.append(TrainPair(str(tmp_path / "copy3.png"), "copy"))
    calls = []
    streaming = kernels.topk_similarity
    monkeypatch.setattr(kernels, "topk_similarity",
                        lambda q, g, k: calls.append((len(q), len(g), k)) or streaming(q, g, k))

    k = 3
    got = clip_nearest_images(pairs, clip, k=k)

    distinct = list(dict.fromkeys(p.image for p in pairs))
    first_row = {image: next(r for r, p in enumerate(pairs) if p.image == image) for image in distinct}
    emb = clip.embed_images(distinct)
    sim = emb @ emb.T
    same = (emb[:, None, :] == emb[None, :, :]).all(-1)  # itself and pixel copies
    assert same.sum() == len(distinct) + 2
    sim[same] = -math.inf
    # exact ties only between an image and its copy (the lower index first, as the top-k op does);
    # other similarities far enough apart that the summation order cannot swap them
    values = sim[~same].unique()
    assert len(values) == 21 and (values.diff() > 1e-6).all()
    ranked = sim.sort(dim=1, descending=True, stable=True).indices[:, :k].tolist()
    expected = {image: tuple(first_row[distinct[j]] for j in ranked[u]) for u, image in enumerate(distinct)}
    assert got == [expected[p.image] for p in pairs]
    assert got[0] == got[2] and all(r not in (0, 2) for r in got[0])
    assert calls and all(g == len(distinct) for _, g, _ in calls)  # through the streaming op
    assert any(k_ > k + 1 for _, _, k_ in calls)  # the copy crowded out a candidate: asked again for more

    with pytest.raises(ValueError, match="k must be between"):
        clip_nearest_images(pairs, clip, k=len(distinct))
    with pytest.raises(ValueError, match="k must be between"):
        clip_nearest_images(pairs, clip, k=0)


# -- negative sampling ------------------------------------------------------------------------------


def sampler_pairs() -> list[TrainPair]:
    return [
        TrainPair("/d/0.jpg", "a dog on a table", ("a table on a dog",), (1, 2)),
        TrainPair("/d/1.jpg", "a red cup next to a blue plate", (), (0, 3)),   # 3 has the same image: left out
        TrainPair("/d/2.jpg", "a man riding a horse"),
        TrainPair("/d/1.jpg", "a cup and a plate"),
        TrainPair("/d/4.jpg", "dog"),                                          # no hard text, no hard image
    ]


def test_sampler_is_deterministic_in_seed_epoch_and_index():
    pairs = sampler_pairs()
    a, b = NegativeSampler(pairs, seed=1), NegativeSampler(pairs, seed=1)
    draws = [(i, e) for e in range(6) for i in range(len(pairs))]
    first = [a.negative(i, e) for i, e in draws]
    assert first == [b.negative(i, e) for i, e in reversed(draws)][::-1]  # order of calls does not matter
    assert first == [a.negative(i, e) for i, e in draws]
    assert len({a.negative(0, e) for e in range(20)}) > 1  # epochs differ
    other = NegativeSampler(pairs, seed=2)
    assert first != [other.negative(i, e) for i, e in draws]


def test_each_kind_gives_the_right_image_and_caption():
    pairs = sampler_pairs()
    for epoch in range(10):
        text = NegativeSampler(pairs, "hard-text", seed=4)
        assert text.negative(0, epoch) == Negative("hard-text", "/d/0.jpg", "a table on a dog")
        generated = text.negative(2, epoch)
        assert generated.kind == "hard-text" and generated.image == "/d/2.jpg"
        assert generated.caption in hard_negative_captions("a man riding a horse", 4)
        assert text.negative(4, epoch) is None  # one-word caption: no hard text

        image = NegativeSampler(pairs, "hard-image")
        assert image.negative(0, epoch) in {Negative("hard-image", "/d/1.jpg", "a dog on a table"),
                                            Negative("hard-image", "/d/2.jpg", "a dog on a table")}
        assert image.negative(1, epoch) == Negative("hard-image", "/d/0.jpg", "a red cup next to a blue plate")
        assert image.negative(2, epoch) is None

        random_ = NegativeSampler(pairs, "random").negative(1, epoch)
        assert random_.kind == "random" and random_.image == "/d/1.jpg"
        assert random_.caption in {p.caption for p in pairs if p.image != "/d/1.jpg"}

        assert NegativeSampler(pairs, "none").negative(0, epoch) is None


def test_neighbours_serve_pairs_without_neg_images():
    pairs = [TrainPair(f"/d/{i}.jpg", f"caption {i}") for i in range(4)]
    with pytest.raises(ValueError, match="clip_nearest_images"):
        NegativeSampler(pairs, "hard-image")
    sampler = NegativeSampler(pairs, "hard-image", neighbours=[(1,), (2, 0), (3,), (0,)])
    assert sampler.negative(1, 0).image in {"/d/2.jpg", "/d/0.jpg"}
    assert sampler.negative(3, 5) == Negative("hard-image", "/d/0.jpg", "caption 3")


def test_neg_prob_and_mixed():
    pairs = sampler_pairs()
    assert all(NegativeSampler(pairs, kind, neg_prob=0.0).negative(i, e) is None
               for kind in NEGATIVE_KINDS for i in range(len(pairs)) for e in range(5))
    half = [NegativeSampler(pairs, "random", neg_prob=0.5).negative(1, e) for e in range(400)]
    assert 140 < sum(n is None for n in half) < 260

    mixed = NegativeSampler(pairs, "mixed", seed=7)
    kinds = Counter(mixed.negative(0, e).kind for e in range(300))
    assert set(kinds) == {"hard-text", "hard-image", "random"} and min(kinds.values()) > 70
    # a pair with neither hard text nor hard images gets random negatives only
    assert {mixed.negative(4, e).kind for e in range(50)} == {"random"}
    assert {mixed.negative(2, e).kind for e in range(100)} == {"hard-text", "random"}


def test_bad_arguments_raise():
    pairs = sampler_pairs()
    with pytest.raises(ValueError, match="known kinds: none, hard-text, hard-image, random, mixed"):
        NegativeSampler(pairs, "hard")
    for p in (-0.1, 1.5, math.nan, True, "1"):
        with pytest.raises(ValueError, match="neg_prob"):
            NegativeSampler(pairs, neg_prob=p)
    with pytest.raises(ValueError, match="seed"):
        NegativeSampler(pairs, seed=1.5)
    with pytest.raises(ValueError, match="at least one pair"):
        NegativeSampler([])
    with pytest.raises(ValueError, match="row index"):
        NegativeSampler([TrainPair("/a.jpg", "a", (), (5,)), TrainPair("/b.jpg", "b")])
    with pytest.raises(ValueError, match="two different image files"):
        NegativeSampler([TrainPair("/a.jpg", "a"), TrainPair("/a.jpg", "b")], "random")
    with pytest.raises(ValueError, match="neighbours has 1 rows"):
        NegativeSampler(pairs, neighbours=[(1,)])
    sampler = NegativeSampler(pairs)
    with pytest.raises(IndexError):
        sampler.negative(len(pairs), 0)
    with pytest.raises(ValueError, match="epoch"):
        sampler.negative(0, -1)
    assert sampler.negative(torch.tensor(1), 0) == sampler.negative(1, 0)


def test_relation_swaps_of_unequal_length_keep_articles_right():
    """"left of" and "on" differ in length: a swap changes the token count (a past IndexError)."""
    from itm_engine.hardneg.data import HARD_NEGATIVE_KINDS, hard_negatives

    swaps = HARD_NEGATIVE_KINDS[:4]  # the shuffles may put any word after an article
    for caption in ["two green cubes left of a tree", "a white cup behind a brown bag", "a cat in front of an apple"]:
        negatives = hard_negatives(caption, seed=0)
        assert any(kind in negatives for kind in swaps)
        for negative in (negatives[kind] for kind in swaps if kind in negatives):
            words = negative.split()
            for article, word in zip(words, words[1:]):
                if article in ("a", "an") and word[0].isalpha():
                    assert article == ("an" if word[0] in "aeiou" else "a"), negative
