"""SPEC: what loads from the subsets' image2text.json / text2image.json, the official accuracy per
subset and direction and its average (recomputed here as the official wrappers and eval.py compute
them), ties, the bad-data policy, and itm-eval end to end with the CLIP baseline beside it."""
from __future__ import annotations

import json

import pytest
import torch

from itm_engine import cli
from itm_engine.protocols import Protocol
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import assert_inside_root, assert_malformed, edit_json, file_names, outside_file
from fixtures.models import NAME, write_clip_config
from fixtures.spatial_datasets import SPEC_FILES, write_spec

DIRECTIONS = {"i2t": "image2text.json", "t2i": "text2image.json"}


@pytest.fixture
def spec(tmp_path):
    return write_spec(tmp_path / "spec")


def test_spec_examples(spec):
    task = get_task("spec", spec)
    examples = task.examples
    assert task.modes == ("i2t", "t2i")
    assert [ex.id for ex in examples] == [
        "absolute_size/i2t/0", "absolute_size/i2t/1", "absolute_size/t2i/0", "absolute_size/t2i/1",
        "existence/i2t/0", "existence/t2i/0", "count/i2t/0", "count/t2i/0"]
    assert_inside_root(task)
    i2t = examples[1]
    assert i2t.images == (str((spec / "absolute_size" / "images" / "i2t_1.jpg").resolve()),)
    assert i2t.texts == ("a small dog", "a medium dog", "a large dog") and i2t.label == 2
    assert i2t.meta == {"subset": "absolute_size", "direction": "i2t"}
    t2i = examples[7]
    assert file_names(t2i.images) == [f"t2i_0_{k}.jpg" for k in range(4)]
    assert all(p.startswith(str((spec / "count" / "images").resolve())) for p in t2i.images)
    assert t2i.texts == ("two apples",) and t2i.label == 1 and t2i.meta == {"subset": "count", "direction": "t2i"}


def test_spec_options(spec, tmp_path):
    only_t2i = get_task("spec", spec, directions="t2i")
    assert only_t2i.modes == ("t2i",) and [ex.meta["direction"] for ex in only_t2i.examples] == ["t2i"] * 4
    both = get_task("spec", spec, directions=["t2i", "i2t"])
    assert both.modes == ("i2t", "t2i") and len(both.examples) == 8
    chosen = get_task("spec", spec, subsets="count,existence").examples
    assert [ex.id for ex in chosen] == ["existence/i2t/0", "existence/t2i/0", "count/i2t/0", "count/t2i/0"]
    (spec / "existence" / "text2image.json").unlink()  # an incomplete subset is skipped unless asked for
    assert "existence" not in {ex.meta["subset"] for ex in get_task("spec", spec).examples}
    assert len(get_task("spec", spec, subsets="existence", directions="i2t").examples) == 1
    with pytest.raises(FileNotFoundError, match=r"existence asked for.*existence/text2image.json"):
        get_task("spec", spec, subsets="existence").examples
    with pytest.raises(ValueError, match=r"option directions: unknown name\(s\) both"):
        get_task("spec", spec, directions="both")
    with pytest.raises(ValueError, match=r"option subsets: unknown name\(s\) size"):
        get_task("spec", spec, subsets="size")
    with pytest.raises(ValueError, match="unknown option"):
        get_task("spec", spec, split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="absolute_size/image2text.json"):
        get_task("spec", tmp_path / "empty").examples


def official_accuracies(rows_by_file: dict, scores: dict) -> dict[str, float]:
    """The official numbers (spec/models/*_wrapper.py `i2t_evaluate` / `t2i_evaluate`: torch argmax
    of each row's scores against its label, 100 * correct / total per subset; spec/eval.py: the mean
    over the subsets), as fractions. `scores[(subset, direction)]`: [rows, candidates]."""
    out = {}
    for direction in DIRECTIONS:
        total = 0.0
        subset_num = 0
        for subset, files in rows_by_file.items():
            if (subset, direction) not in scores:
                continue
            labels = torch.tensor([row["label"] for row in files[DIRECTIONS[direction]]])
            pred_labels = scores[(subset, direction)].argmax(dim=-1)
            accuracy = 100 * (labels == pred_labels).sum().item() / len(labels)
            out[f"{direction}/{subset}"] = accuracy / 100
            total += accuracy
            subset_num += 1
        if subset_num:
            out[f"{direction}/average"] = total / subset_num / 100
    return out


def by_subset_and_direction(examples, matrices: dict) -> dict:
    """{(subset, direction): [rows, candidates]} from the per-example matrices of each example's direction."""
    grouped: dict = {}
    for n, ex in enumerate(examples):
        grouped.setdefault((ex.meta["subset"], ex.meta["direction"]), []).append(
            torch.as_tensor(matrices[ex.meta["direction"]][n]).reshape(-1))
    return {key: torch.stack(rows) for key, rows in grouped.items()}


@pytest.mark.parametrize("seed", range(10))
def test_spec_metrics_match_the_official_evaluation(spec, seed):
    """Under argmax-first ties (torch's argmax) the task's numbers are the official ones, ties included;
    each direction reads only its own examples' matrices."""
    task = get_task("spec", spec, protocol=Protocol(ties="argmax-first"))
    gen = torch.Generator().manual_seed(seed)
    matrices = {mode: [torch.randint(0, 3, (len(ex.images), len(ex.texts)), generator=gen).float()
                       for ex in task.examples] for mode in task.modes}
    expected = official_accuracies(SPEC_FILES, by_subset_and_direction(task.examples, matrices))
    assert task.metrics(task.examples, matrices) == pytest.approx(expected)


def test_spec_metrics_by_hand(spec):
    task = get_task("spec", spec)
    unused = [torch.full((len(ex.images), len(ex.texts)), float("nan")) for ex in task.examples]
    i2t = [torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[3.0, 1.0, 2.0]]), None, None,
           torch.tensor([[0.0, 1.0]]), None, torch.tensor([[0.0, 1.0, 2.0, 5.0]]), None]
    t2i = [None, None, torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[2.0], [2.0], [0.0]]),
           None, torch.tensor([[0.0], [1.0]]), None, torch.tensor([[0.0], [1.0], [2.0], [1.0]])]
    scores = {mode: [m if m is not None else u for m, u in zip(matrices, unused)]
              for mode, matrices in (("i2t", i2t), ("t2i", t2i))}
    # i2t: absolute_size right, wrong; existence right; count right. t2i: absolute_size right,
    # tie (wrong under strict ties); existence wrong; count wrong
    assert task.metrics(task.examples, scores) == pytest.approx({
        "i2t/absolute_size": 0.5, "i2t/existence": 1.0, "i2t/count": 1.0, "i2t/average": 2.5 / 3,
        "t2i/absolute_size": 0.5, "t2i/existence": 0.0, "t2i/count": 0.0, "t2i/average": 0.5 / 3})
    first = get_task("spec", spec, protocol=Protocol(ties="argmax-first"))
    assert first.metrics(first.examples, scores)["t2i/absolute_size"] == 1.0  # the tie goes to the label, listed first
    only_i2t = get_task("spec", spec, directions="i2t")
    kept = [n for n, ex in enumerate(task.examples) if ex.meta["direction"] == "i2t"]
    assert only_i2t.metrics(only_i2t.examples, {"i2t": [scores["i2t"][n] for n in kept]}).keys() == {
        "i2t/absolute_size", "i2t/existence", "i2t/count", "i2t/average"}


def test_spec_missing_images(spec):
    (spec / "existence" / "images" / "t2i_0_1.jpg").unlink()
    with pytest.raises(DataError, match=r"existence/text2image.json row 0: missing image file.*t2i_0_1.jpg"):
        get_task("spec", spec).examples
    task = get_task("spec", spec, skip_missing=True)
    assert "existence/t2i/0" not in {ex.id for ex in task.examples} and len(task.examples) == 7
    assert len(task.skipped) == 1 and "t2i_0_1.jpg" in task.skipped[0]


def test_spec_paths_outside_the_root_are_refused(spec, tmp_path):
    outside = outside_file(tmp_path)
    for query in ("../../outside.png", str(outside)):
        edit_json(spec / "count" / "image2text.json", lambda rows: rows[0].update(query=query))
        with pytest.raises(DataError, match=r"count/image2text.json row 0: image path .* outside the data root"):
            get_task("spec", spec, skip_missing=True).examples
    root = write_spec(tmp_path / "other")
    image = root / "absolute_size" / "images" / "t2i_1_2.jpg"
    image.unlink()
    image.symlink_to(outside)
    with pytest.raises(DataError, match=r"absolute_size/text2image.json row 1: .*outside the data root"):
        get_task("spec", root, skip_missing=True).examples


@pytest.mark.parametrize("file, field, value", [
    ("image2text.json", "label", 3),
    ("image2text.json", "label", -1),
    ("text2image.json", "label", True),
    ("text2image.json", "label", 1.0),
    ("image2text.json", "keys", "a small dog"),
    ("text2image.json", "keys", []),
    ("image2text.json", "query", None),
    ("text2image.json", "query", 5),
])
def test_spec_malformed_fields(spec, file, field, value):
    edit_json(spec / "absolute_size" / file, lambda rows: rows[1].update({field: value}))
    assert_malformed(get_task("spec", spec), f"absolute_size/{file} row 1", field, value)


def test_spec_malformed_files(spec):
    edit_json(spec / "count" / "text2image.json", lambda rows: rows[0].pop("label"))
    with pytest.raises(DataError, match=r"count/text2image.json row 0: malformed row: missing field\(s\) label"):
        get_task("spec", spec).examples
    (spec / "count" / "text2image.json").write_text(json.dumps({"query": "two apples"}))
    with pytest.raises(DataError, match="count/text2image.json: expected a JSON list of rows"):
        get_task("spec", spec).examples
    edit_json(spec / "existence" / "image2text.json", lambda rows: rows.__setitem__(0, ["images/i2t_0.jpg"]))
    with pytest.raises(DataError, match=r"existence/image2text.json row 0: malformed row: expected an object"):
        get_task("spec", spec, subsets="existence").examples


def test_spec_end_to_end_with_clip_side_by_side(tmp_path, capsys):
    """itm-eval scores SPEC in both modes with the diffusion scorer and the CLIP baseline; each
    scorer's metrics are the official ones recomputed from its stored scores."""
    root = write_spec(tmp_path / "data")
    out = tmp_path / "out"
    config = write_clip_config(tmp_path)
    assert cli.main(["eval", "--task", "spec", "--data-root", str(root), "--out", str(out),
                     "--scorer", "diffusion,clip", "--clip-model", NAME, "--clip-config", str(config),
                     "--samples", "2", "--no-progress", "--chunk-size", "4"]) == 0
    examples = get_task("spec", root).examples
    for scorer in ("diffusion", "clip"):
        results = json.loads((out / scorer / "results.json").read_text())
        rows = [json.loads(line) for line in (out / scorer / "scores.jsonl").read_text().splitlines()]
        assert results["task"] == "spec" and results["modes"] == ["i2t", "t2i"]
        assert [row["id"] for row in rows] == [ex.id for ex in examples]
        for ex, row in zip(examples, rows):
            for matrix in row["scores"].values():
                assert len(matrix) == len(ex.images) and len(matrix[0]) == len(ex.texts)
        matrices = {mode: [row["scores"][mode] for row in rows] for mode in ("i2t", "t2i")}
        expected = official_accuracies(SPEC_FILES, by_subset_and_direction(examples, matrices))
        assert results["metrics"] == pytest.approx(expected)
    table = capsys.readouterr().out
    assert "diffusion" in table and "clip" in table and "t2i/average" in table
