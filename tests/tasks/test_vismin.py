"""VisMin (the per-category CSV files and image folders its evaluation code reads): what loads, the
official text/image/group scores per category, ties, the bad-data policy."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from itm_engine.protocols import PRESETS
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import VISMIN_FILES, assert_inside_root, assert_malformed, outside_file, write_csv, write_vismin

HEADER = ["image_path", "edited_image_path", "caption", "edited_caption", "edit_id"]


@pytest.fixture
def root(tmp_path):
    return write_vismin(tmp_path / "vismin")


def official_correct(pred: dict) -> tuple[bool, bool]:
    """vismin-bench/metric.py's `compute_contrastive_accuracy`, for one prediction row: (text, image)."""
    text_correct = pred["T0_I0"] > pred["T1_I0"] and pred["T1_I1"] > pred["T0_I1"]
    image_correct = pred["T0_I0"] > pred["T0_I1"] and pred["T1_I1"] > pred["T1_I0"]
    return text_correct, image_correct


def official_contrastive_accuracy(contrastive_scores: list[dict]) -> dict:
    """vismin-bench/metric.py's `compute_contrastive_accuracy`: per category, percentages rounded to
    2 decimals."""
    counts = defaultdict(lambda: {"text": 0, "image": 0, "group": 0, "count": 0})
    for pred in contrastive_scores:
        text_correct, image_correct = official_correct(pred)
        split = counts[pred["category"]]
        split["text"] += text_correct
        split["image"] += image_correct
        split["group"] += text_correct and image_correct
        split["count"] += 1
    return {category: {kind: round(c[kind] * 100 / c["count"], 2) for kind in ("text", "image", "group")}
            for category, c in counts.items()}


def test_vismin_examples(root):
    task = get_task("vismin", root)
    assert task.modes == ("i2t", "t2i")
    examples = task.examples
    # categories in the order object, attribute, relation, counting (attribute.csv is absent)
    assert [ex.id for ex in examples] == ["object/0", "object/1", "relation/0", "counting/0"]
    assert [ex.meta for ex in examples] == [{"category": c} for c in ("object", "object", "relation", "counting")]
    rows = [row for category in ("object", "relation", "counting") for row in VISMIN_FILES[category]]
    assert [ex.texts for ex in examples] == [(r[2], r[3]) for r in rows]
    assert [ex.images for ex in examples] == [
        (str((root / "original_images").resolve() / r[0][1:]), str((root / "edited_images").resolve() / r[1][1:]))
        for r in rows]
    assert_inside_root(task)


def test_vismin_categories_option(root):
    assert [ex.id for ex in get_task("vismin", root, categories="counting,object").examples] == \
        ["object/0", "object/1", "counting/0"]
    assert [ex.id for ex in get_task("vismin", root, categories=["relation"]).examples] == ["relation/0"]
    with pytest.raises(FileNotFoundError, match=r"no file for attribute .*expected attribute.csv"):
        get_task("vismin", root, categories="attribute,object").examples
    with pytest.raises(ValueError, match=r"option categories: unknown name\(s\) spatial; known: object, attribute"):
        get_task("vismin", root, categories="spatial")
    with pytest.raises(ValueError, match="option categories must be a non-empty list"):
        get_task("vismin", root, categories="")
    with pytest.raises(ValueError, match="unknown option"):
        get_task("vismin", root, category="object")


def as_official(s: torch.Tensor, category: str) -> dict:
    """A score matrix s[image, caption] as the official prediction row (T{caption}_I{image})."""
    return {"T0_I0": s[0, 0].item(), "T0_I1": s[1, 0].item(), "T1_I0": s[0, 1].item(), "T1_I1": s[1, 1].item(),
            "category": category}


def test_vismin_metrics_match_the_official_evaluation(root):
    task = get_task("vismin", root)
    examples = task.examples
    categories = [ex.meta["category"] for ex in examples]
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        i2t = [torch.randint(0, 3, (2, 2), generator=gen).float() for _ in examples]  # small integers: ties
        t2i = [torch.randint(0, 3, (2, 2), generator=gen).float() for _ in examples]
        result = task.metrics(examples, {"i2t": i2t, "t2i": t2i})
        assert set(result) == {f"{k}/{g}" for k in ("text", "image", "group")
                               for g in ("overall", "object", "relation", "counting")}
        # the official code scores one similarity matrix; the text score comes from I2T, the image score from T2I
        for kind, matrices in (("text", i2t), ("image", t2i)):
            per_category = official_contrastive_accuracy([as_official(s, c) for s, c in zip(matrices, categories)])
            overall = official_contrastive_accuracy([as_official(s, "all") for s in matrices])["all"]
            for category, official in per_category.items():
                assert result[f"{kind}/{category}"] * 100 == pytest.approx(official[kind], abs=0.005)
            assert result[f"{kind}/overall"] * 100 == pytest.approx(overall[kind], abs=0.005)
        # group: both, per example
        group = [official_correct(as_official(a, ""))[0] and official_correct(as_official(b, ""))[1]
                 for a, b in zip(i2t, t2i)]
        for category in ("object", "relation", "counting"):
            members = [g for g, c in zip(group, categories) if c == category]
            assert result[f"group/{category}"] == pytest.approx(sum(members) / len(members))
        assert result["group/overall"] == pytest.approx(sum(group) / len(group))


def test_vismin_ties_follow_the_protocol(root):
    strict, first = get_task("vismin", root), get_task("vismin", root, protocol=PRESETS["diffusion-itm"])
    tied = [torch.ones(2, 2)] * 4
    for task in (strict, first):  # a full tie is wrong either way: the second candidate never wins it
        assert task.metrics(task.examples, {"i2t": tied, "t2i": tied})["group/overall"] == 0.0
    half_tied = [torch.tensor([[1.0, 1.0], [0.0, 2.0]])] * 4
    scores = {"i2t": half_tied, "t2i": half_tied}
    assert strict.metrics(strict.examples, scores)["text/object"] == 0.0
    assert first.metrics(first.examples, scores)["text/object"] == 1.0


def test_vismin_missing_image(root):
    (root / "edited_images" / "edited" / "coco" / "285" / "0.png").unlink()
    with pytest.raises(DataError, match=r"object.csv:3: missing image file .*edited/coco/285/0.png"):
        get_task("vismin", root).examples
    task = get_task("vismin", root, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["object/0", "relation/0", "counting/0"]
    assert len(task.skipped) == 1 and "285/0.png" in task.skipped[0]


@pytest.mark.parametrize("column, value", [("caption", ""), ("edited_caption", "   "), ("image_path", "")])
def test_vismin_malformed_fields(root, column, value):
    rows = [list(r) for r in VISMIN_FILES["relation"]]
    rows[0][HEADER.index(column)] = value
    write_csv(root / "relation.csv", HEADER, rows)
    assert_malformed(get_task("vismin", root), "relation.csv:2", column, value)


def test_vismin_malformed_files(root):
    write_csv(root / "counting.csv", ["image_path", "caption", "edited_caption"], [("/a.png", "x", "y")])
    with pytest.raises(DataError, match=r"counting.csv:2: malformed row: missing field\(s\) edited_image_path"):
        get_task("vismin", root).examples
    (root / "counting.csv").write_text(",".join(HEADER) + "\n/a.png\n")  # a short row: the other fields are None
    assert_malformed(get_task("vismin", root), "counting.csv:2", "edited_image_path", None)
    write_csv(root / "counting.csv", HEADER, [("/a.png", "/b.png", "x" * 200_000, "y", "e")])  # over csv's limit
    with pytest.raises(DataError, match=r"counting.csv line 2: malformed row \(field larger than field limit"):
        get_task("vismin", root).examples


def test_vismin_paths_outside_the_root_are_refused(root, tmp_path):
    outside_file(tmp_path)
    rows = [list(r) for r in VISMIN_FILES["counting"]]
    rows[0][1] = "/../../outside.png"
    write_csv(root / "counting.csv", HEADER, rows)
    with pytest.raises(DataError, match=r"counting.csv:2: image path .* resolves outside the data root"):
        get_task("vismin", root, skip_missing=True).examples
    root = write_vismin(tmp_path / "linked")
    image = root / "original_images" / "relation" / "17.png"
    image.unlink()
    image.symlink_to(tmp_path / "outside.png")
    with pytest.raises(DataError, match=r"relation.csv:2: .* resolves outside the data root"):
        get_task("vismin", root, skip_missing=True).examples


def test_vismin_without_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no file for object, attribute, relation, counting"):
        get_task("vismin", tmp_path / "empty").examples
