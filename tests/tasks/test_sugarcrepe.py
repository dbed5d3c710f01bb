"""SugarCrepe (the official keyed data files + COCO val2017): what loads, the official per-subset accuracy
and its mean, ties, the bad-data policy; and itm-eval end to end with CLIP side by side."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from itm_engine import cli
from itm_engine.protocols import PRESETS
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import (
    SUGARCREPE_FILES,
    assert_inside_root,
    assert_malformed,
    coco_2017_name,
    edit_json,
    file_names,
    outside_file,
    write_sugarcrepe,
)
from fixtures.models import NAME, write_clip_config
from fixtures.scores import i2t_matrices


@pytest.fixture
def root(tmp_path):
    return write_sugarcrepe(tmp_path / "sugarcrepe")


def official_accuracy(pairs_by_subset: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """main_eval.py's `evaluate`: per subset, the fraction of rows with pos_score > neg_score."""
    return {c: sum(1 if pos > neg else 0 for pos, neg in pairs) / len(pairs) for c, pairs in pairs_by_subset.items()}


def test_sugarcrepe_examples(root):
    task = get_task("sugarcrepe", root)
    assert task.modes == ("i2t",)
    examples = task.examples
    # subsets in the official order (add_att before replace_rel before swap_obj), rows in file order
    assert [ex.id for ex in examples] == ["add_att/0", "add_att/1", "replace_rel/0", "replace_rel/2", "replace_rel/3",
                                          "swap_obj/5"]
    assert file_names(ex.images[0] for ex in examples) == [coco_2017_name(i) for i in (139, 285, 139, 632, 285, 632)]
    assert examples[3].texts == ("A man rides a horse.", "A man feeds a horse.")
    assert all(ex.label == 0 for ex in examples)
    assert [ex.meta for ex in examples[1:3]] == [{"subset": "add_att"}, {"subset": "replace_rel"}]
    assert_inside_root(task)


def test_sugarcrepe_subsets_and_folder_variants(root):
    assert [ex.id for ex in get_task("sugarcrepe", root, subsets="swap_obj,add_att").examples] == \
        ["add_att/0", "add_att/1", "swap_obj/5"]
    assert {ex.meta["subset"] for ex in get_task("sugarcrepe", root, subsets=["replace_rel"]).examples} == \
        {"replace_rel"}
    # the files at the root (main_eval.py's --data_root pointing at data/), the images under images/val2017
    (root / "data" / "swap_obj.json").rename(root / "swap_obj.json")
    (root / "images").mkdir()
    (root / "val2017").rename(root / "images" / "val2017")
    task = get_task("sugarcrepe", root)
    assert len(task.examples) == 6 and task.examples[-1].id == "swap_obj/5"
    assert_inside_root(task)
    # option image_dir
    (root / "images" / "val2017").rename(root / "coco")
    task = get_task("sugarcrepe", root, image_dir="coco")
    assert len(task.examples) == 6
    assert_inside_root(task)


def test_sugarcrepe_metrics_match_the_official_evaluation(root):
    task = get_task("sugarcrepe", root)
    examples = task.examples
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        pairs = torch.randint(0, 3, (len(examples), 2), generator=gen).float()  # small integers: ties happen
        official = official_accuracy({s: [tuple(pairs[n].tolist()) for n, ex in enumerate(examples)
                                          if ex.meta["subset"] == s] for s in SUGARCREPE_FILES})
        result = task.metrics(examples, {"i2t": i2t_matrices(*pairs.tolist())})
        expected = {f"accuracy/{s}": v for s, v in official.items()}
        expected["accuracy/macro"] = sum(official.values()) / len(official)
        expected["accuracy"] = float((pairs[:, 0] > pairs[:, 1]).double().mean())
        assert result == pytest.approx(expected)


def test_sugarcrepe_ties_follow_the_protocol(root):
    strict = get_task("sugarcrepe", root)
    first = get_task("sugarcrepe", root, protocol=PRESETS["diffusion-itm"])
    tied = {"i2t": i2t_matrices(*[[1.0, 1.0]] * len(strict.examples))}
    assert strict.metrics(strict.examples, tied)["accuracy"] == 0.0
    assert first.metrics(first.examples, tied)["accuracy"] == 1.0  # argmax-first: the positive comes first


def test_sugarcrepe_missing_image(root):
    (root / "val2017" / coco_2017_name(632)).unlink()
    with pytest.raises(DataError, match=r"data/replace_rel.json \['2'\]: missing image file .*000000000632.jpg"):
        get_task("sugarcrepe", root).examples
    task = get_task("sugarcrepe", root, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["add_att/0", "add_att/1", "replace_rel/0", "replace_rel/3"]
    assert len(task.skipped) == 2 and all("000000000632.jpg" in s for s in task.skipped)


@pytest.mark.parametrize("row, match", [
    (["000000000139.jpg", "a", "b"], r"data/add_att.json \['1'\]: malformed row: expected an object"),
    ({"filename": "000000000139.jpg", "caption": "a"}, r"add_att.json \['1'\]: malformed row: missing field\(s\) "
                                                       r"negative_caption"),
])
def test_sugarcrepe_malformed_rows(root, row, match):
    edit_json(root / "data" / "add_att.json", lambda d: d.update({"1": row}))
    with pytest.raises(DataError, match=match):
        get_task("sugarcrepe", root).examples


@pytest.mark.parametrize("field, value", [
    ("filename", None), ("filename", 139), ("caption", ""), ("caption", ["a"]), ("negative_caption", 5),
])
def test_sugarcrepe_malformed_field_types(root, field, value):
    edit_json(root / "data" / "replace_rel.json", lambda d: d["2"].update({field: value}))
    assert_malformed(get_task("sugarcrepe", root), "data/replace_rel.json ['2']", field, value)


def test_sugarcrepe_paths_outside_the_root_are_refused(root, tmp_path):
    outside_file(tmp_path)
    edit_json(root / "data" / "swap_obj.json", lambda d: d["5"].update(filename="../../outside.png"))
    with pytest.raises(DataError, match=r"swap_obj.json \['5'\]: image path .* resolves outside the data root"):
        get_task("sugarcrepe", root, skip_missing=True).examples
    root = write_sugarcrepe(tmp_path / "linked")
    image = root / "val2017" / coco_2017_name(285)
    image.unlink()
    image.symlink_to(tmp_path / "outside.png")
    with pytest.raises(DataError, match=r"add_att.json \['1'\]: .* resolves outside the data root"):
        get_task("sugarcrepe", root, skip_missing=True).examples


def test_sugarcrepe_bad_files_and_options(root, tmp_path):
    with pytest.raises(ValueError, match=r"option subsets: unknown name\(s\) swap_rel; known: add_obj, add_att"):
        get_task("sugarcrepe", root, subsets="swap_rel")
    with pytest.raises(ValueError, match="option subsets must be a non-empty list"):
        get_task("sugarcrepe", root, subsets=[])
    with pytest.raises(FileNotFoundError, match=r"no file for add_obj .*expected data/add_obj.json"):
        get_task("sugarcrepe", root, subsets="add_obj,add_att").examples
    with pytest.raises(ValueError, match="unknown option"):
        get_task("sugarcrepe", root, subset="add_att")
    with pytest.raises(ValueError, match="option image_dir 'nowhere' is not a folder"):
        get_task("sugarcrepe", root, image_dir="nowhere")
    (root / "data" / "add_att.json").write_text(json.dumps([{"filename": "x.jpg"}]))
    with pytest.raises(DataError, match=r"add_att.json: expected a JSON object"):
        get_task("sugarcrepe", root).examples
    (root / "data" / "add_att.json").write_text("{not json")
    with pytest.raises(DataError, match=r"add_att.json: not valid JSON"):
        get_task("sugarcrepe", root).examples
    shutil.rmtree(root / "data")
    with pytest.raises(FileNotFoundError, match="no file for add_obj, add_att, replace_obj"):
        get_task("sugarcrepe", root).examples


def test_itm_eval_end_to_end_with_clip_side_by_side(tmp_path, capsys):
    """itm-eval on the SugarCrepe fixture with the default tiny diffusion model and the tiny CLIP:
    both results files, the same metric names, metrics equal to the task's own on the saved scores."""
    root = write_sugarcrepe(tmp_path / "data")
    out = tmp_path / "out"
    config = write_clip_config(tmp_path)
    assert cli.main(["eval", "--task", "sugarcrepe", "--data-root", str(root), "--out", str(out),
                     "--scorer", "diffusion,clip", "--clip-model", NAME, "--clip-config", str(config),
                     "--task-option", "subsets=add_att,swap_obj",
                     "--samples", "2", "--no-progress", "--chunk-size", "4"]) == 0
    task = get_task("sugarcrepe", root, subsets="add_att,swap_obj")
    for scorer in ("diffusion", "clip"):
        results = json.loads((out / scorer / "results.json").read_text())
        rows = [json.loads(line) for line in (out / scorer / "scores.jsonl").read_text().splitlines()]
        assert results["task"] == "sugarcrepe" and sorted(r["id"] for r in rows) == ["add_att/0", "add_att/1",
                                                                                     "swap_obj/5"]
        by_id = {r["id"]: torch.tensor(r["scores"]["i2t"]) for r in rows}
        assert all(matrix.shape == (1, 2) for matrix in by_id.values())
        expected = task.metrics(task.examples, {"i2t": [by_id[ex.id] for ex in task.examples]})
        assert results["metrics"] == pytest.approx(expected)
        assert set(expected) == {"accuracy", "accuracy/macro", "accuracy/add_att", "accuracy/swap_obj"}
    table = capsys.readouterr().out
    assert "diffusion" in table and "clip" in table and "accuracy/macro" in table
