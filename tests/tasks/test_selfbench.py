"""Self-Bench (GenEval's generation output per generator, GenEval's results file): what loads, the
candidates per tag, accuracy per tag and overall, the "correct" subset, and the bad-data policy."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from itm_engine import cli
from itm_engine.protocols import PRESETS
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError
from itm_engine.tasks.selfbench import GENEVAL_CLASSES

from fixtures.datasets import assert_inside_root, assert_malformed, colour_of, outside_file, solid_image
from fixtures.models import NAME, write_clip_config
from fixtures.selfbench_datasets import GENERATOR, SELFBENCH_CORRECT, SELFBENCH_PROMPTS, write_selfbench

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]


@pytest.fixture
def root(tmp_path):
    return write_selfbench(tmp_path / "selfbench")


def official_two_object_subset(first: str, second: str, classes: list[str]) -> list[str]:
    """Jeong et al.'s two_object_subset.py for one GenEval prompt, over zero_shot_prompts.json's
    "photo" two_object list (zero_prompts.py)."""
    article = lambda name: f"an {name}" if name[0] in "aeiou" else f"a {name}"  # noqa: E731
    text_list = [f"a photo of {article(a)} and {article(b)}" for a in classes for b in classes]
    out, a_count, b_count = [], 0, 0
    for j in text_list:
        if j == f"a photo of {article(first)} and {article(second)}":
            out.append(j)
        elif a_count < 50 and j.startswith(f"a photo of {article(first)} and") and second not in j:
            a_count += 1
            out.append(j)
        elif b_count < 50 and not j.startswith(f"a photo of {article(first)} and") and \
                j.endswith(f"and {article(second)}"):
            b_count += 1
            out.append(j)
    return out


def test_selfbench_examples(root):
    task = get_task("selfbench", root)
    examples = task.examples
    assert task.generator == GENERATOR
    assert [ex.id for ex in examples] == [f"{i:05d}/{k:05d}" for i in range(6) for k in range(2)]
    assert [ex.meta for ex in examples[::2]] == [{"tag": row["tag"]} for row in SELFBENCH_PROMPTS]
    assert examples[3].images == (str((root / GENERATOR / "00001" / "samples" / "00001.png").resolve()),)
    assert_inside_root(task)
    for ex, row in zip(examples[::2], SELFBENCH_PROMPTS):
        assert ex.texts[ex.label] == row["prompt"]
    by_tag = {ex.meta["tag"]: ex for ex in examples[::2]}
    single = by_tag["single_object"]
    assert len(single.texts) == 80 and single.texts[0] == "a photo of a person" and single.label == 13
    assert single.texts[4] == "a photo of an airplane"
    assert by_tag["counting"].texts == ("a photo of one clock", "a photo of two clocks", "a photo of three clocks",
                                        "a photo of four clocks") and by_tag["counting"].label == 1
    assert by_tag["colors"].texts == tuple(f"a photo of a{'n' if c[0] in 'aeiou' else ''} {c} fire hydrant"
                                           for c in COLORS) and by_tag["colors"].label == 4
    assert by_tag["position"].texts == tuple(f"a photo of a dog {p} a teddy bear"
                                             for p in ("left of", "right of", "above", "below"))
    attr = by_tag["color_attr"]
    assert len(attr.texts) == 100 and attr.label == 10 * COLORS.index("purple") + COLORS.index("black")
    assert attr.texts[0] == "a photo of a red wine glass and a red apple"
    two = by_tag["two_object"]
    assert list(two.texts) == official_two_object_subset("bench", "sports ball", list(GENEVAL_CLASSES))
    assert len(two.texts) == 101 and two.texts[two.label] == "a photo of a bench and a sports ball"


def test_selfbench_options_and_layout_variants(root, tmp_path):
    assert get_task("selfbench", root, generator="2.0").generator == GENERATOR  # Jeong et al.'s name
    only = get_task("selfbench", root, tags="counting, position").examples
    assert [ex.meta["tag"] for ex in only] == ["counting", "counting", "position", "position"]
    # the generator folder itself as the root (GenEval's <IMAGE_FOLDER>)
    assert [ex.id for ex in get_task("selfbench", root / GENERATOR).examples][:2] == ["00000/00000", "00000/00001"]
    # GenEval's README names samples 0000.png; sample order is numeric; grid.png and other files are ignored
    samples = root / GENERATOR / "00002" / "samples"
    for k in (2, 10):
        solid_image(samples / f"{k:04d}.png", colour_of(k))
    solid_image(root / GENERATOR / "00002" / "grid.png", colour_of(9))
    (samples / "notes.txt").write_text("not a sample")
    ids = [ex.id for ex in get_task("selfbench", root, tags=["counting"]).examples]
    assert ids == ["00002/00000", "00002/00001", "00002/0002", "00002/0010"]
    # two generators: the default is ambiguous, the option chooses
    write_selfbench(root, generator="9.0/stable-diffusion-v1-5", prompts=SELFBENCH_PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match="several: 9.0/stable-diffusion-2-base, 9.0/stable-diffusion-v1-5"):
        get_task("selfbench", root)
    assert len(get_task("selfbench", root, generator="1.5").examples) == 2
    with pytest.raises(ValueError, match="option subset must be one of full, correct"):
        get_task("selfbench", root, generator="1.5", subset="good")
    with pytest.raises(ValueError, match="is not a folder inside"):
        get_task("selfbench", root, generator="9.0/stable-diffusion-xl")
    with pytest.raises(ValueError, match="no prompt of tag"):
        get_task("selfbench", root, generator="1.5", tags="counting").examples
    with pytest.raises(ValueError, match="unknown option"):
        get_task("selfbench", root, cfg=9.0)
    with pytest.raises(FileNotFoundError, match="found none"):
        get_task("selfbench", tmp_path / "selfbench" / "results")


def official_accuracy(matrices, labels, tags, argmax_first: bool) -> dict[str, float]:
    """Jeong et al.'s utils.evaluate_retrieval per tag (an image is right when np.argmax of its
    scores is its label; with strict ties a tied label is wrong), the mean over tags (GenEval's
    summary_scores.py overall) and over all images."""
    right = []
    for scores, label in zip(matrices, labels):
        s = scores.reshape(-1).numpy()
        if argmax_first:
            right.append(int(np.argmax(s) == label))
        else:
            right.append(int(all(s[label] > v for j, v in enumerate(s) if j != label)))
    per_tag = {t: float(np.mean([r for r, g in zip(right, tags) if g == t])) for t in dict.fromkeys(tags)}
    out = {f"accuracy/{t}": v for t, v in per_tag.items()}
    out["accuracy/macro"] = float(np.mean(list(per_tag.values())))
    out["accuracy"] = float(np.mean(right))
    return out


def score_matrices(examples, seed: int = 0) -> list[torch.Tensor]:
    """Random [1, n_texts] matrices; every third example's label ties with candidate 0 (a win under
    argmax-first when the label is 0, a loss under strict ties)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, ex in enumerate(examples):
        scores = torch.randn(1, len(ex.texts), generator=gen)
        if n % 3 == 0:
            scores[0, ex.label] = scores[0, 0] = scores.max() + 1
        elif n % 3 == 1:
            scores[0, ex.label] = scores.max() + 0.5
        out.append(scores)
    return out


@pytest.mark.parametrize("preset", ["engine", "jeong2025"])
def test_selfbench_metrics_and_ties(root, preset):
    task = get_task("selfbench", root, protocol=PRESETS[preset])
    examples = task.examples
    matrices = score_matrices(examples)
    expected = official_accuracy(matrices, [ex.label for ex in examples], [ex.meta["tag"] for ex in examples],
                                 argmax_first=PRESETS[preset].ties == "argmax-first")
    result = task.metrics(examples, {"i2t": matrices})
    assert result.keys() == expected.keys() and result == pytest.approx(expected)
    # single_object's label (13) ties with candidate 0: wrong either way; counting's (1) wins its ties only first
    single = [torch.zeros(1, 80).index_fill_(1, torch.tensor([0, 13]), 1.0)] * 2
    assert task.metrics(examples[:2], {"i2t": single})["accuracy"] == 0.0
    tied = [torch.tensor([[0.0, 1.0, 1.0, 0.0]])] * 2
    assert task.metrics(examples[4:6], {"i2t": tied})["accuracy"] == (1.0 if preset == "jeong2025" else 0.0)


def test_selfbench_correct_subset(root):
    task = get_task("selfbench", root, subset="correct")
    kept = [f"{i:05d}/{k:05d}" for (i, k), ok in SELFBENCH_CORRECT.items() if ok]
    assert [ex.id for ex in task.examples] == kept and "counting" not in {ex.meta["tag"] for ex in task.examples}
    matrices = score_matrices(task.examples, seed=1)
    expected = official_accuracy(matrices, [ex.label for ex in task.examples],
                                 [ex.meta["tag"] for ex in task.examples], argmax_first=False)
    assert task.metrics(task.examples, {"i2t": matrices}) == pytest.approx(expected)
    # the results file beside the prompt folders, or named by the option
    moved = root / GENERATOR / "results.jsonl"
    shutil.move(root / "results" / "stable-diffusion-2-base" / "results.jsonl", moved)
    assert [ex.id for ex in get_task("selfbench", root, subset="correct").examples] == kept
    shutil.move(moved, root / "verdicts.jsonl")
    assert [ex.id for ex in get_task("selfbench", root, subset="correct", results="verdicts.jsonl").examples] == kept
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        get_task("selfbench", root, subset="correct").examples
    with pytest.raises(ValueError, match="option results must be a file path inside"):
        get_task("selfbench", root, subset="correct", results="../verdicts.jsonl").examples
    rows = (root / "verdicts.jsonl").read_text().splitlines()
    (root / "verdicts.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(DataError, match="no row for 1 image.*00005/samples/00001.png"):
        get_task("selfbench", root, subset="correct", results="verdicts.jsonl").examples
    bad = json.loads(rows[0]) | {"correct": "yes"}
    (root / "verdicts.jsonl").write_text("\n".join([json.dumps(bad), *rows[1:]]) + "\n")
    assert_malformed(get_task("selfbench", root, subset="correct", results="verdicts.jsonl"),
                     "verdicts.jsonl:1", "correct", "yes")


def test_selfbench_rows_that_list_their_candidates(tmp_path):
    rows = [{"tag": "spatial", "prompt": "a red circle left of a blue square",
             "candidates": ["a red circle left of a blue square", "a red circle right of a blue square"]},
            {"tag": "recognition", "prompt": "a small red circle", "include": [],
             "candidates": ["a small green circle", "a small red circle"]}]
    root = write_selfbench(tmp_path / "own", generator="generated", prompts=rows)
    examples = get_task("selfbench", root).examples
    assert [(ex.meta["tag"], ex.texts, ex.label) for ex in examples[::2]] == [
        ("spatial", tuple(rows[0]["candidates"]), 0), ("recognition", tuple(rows[1]["candidates"]), 1)]


@pytest.mark.parametrize("index, edit, field, value", [
    (0, lambda r: r.pop("prompt"), None, None),
    (0, lambda r: r.update(prompt=7), "prompt", 7),
    (1, lambda r: r.update(tag="three_object"), "tag", "three_object"),
    (2, lambda r: r.update(include="clock"), "include", "clock"),
    (4, lambda r: r["include"].pop(), "include", [{"class": "teddy bear", "count": 1}]),
    (3, lambda r: r["include"][0].update({"class": ["fire hydrant"]}), "class", ["fire hydrant"]),
    (5, lambda r: r.update(candidates=["a", 5]), "candidates[1]", 5),
])
def test_selfbench_malformed_rows(root, index, edit, field, value):
    file = root / GENERATOR / f"{index:05d}" / "metadata.jsonl"
    row = json.loads(file.read_text())
    edit(row)
    file.write_text(json.dumps(row))
    task = get_task("selfbench", root)
    where = f"{index:05d}/metadata.jsonl"
    if field is None:
        with pytest.raises(DataError, match=f"selfbench: {where}: malformed row: missing field\\(s\\) prompt"):
            task.examples
    elif field == "class":
        assert_malformed(task, f"{where} include[0]", field, value)
    else:
        assert_malformed(task, where, field, value)


def test_selfbench_prompt_not_among_candidates_and_bad_json(root):
    file = root / GENERATOR / "00003" / "metadata.jsonl"
    file.write_text(json.dumps(SELFBENCH_PROMPTS[3] | {"prompt": "a photo of a blue car"}))
    with pytest.raises(DataError, match=r"00003/metadata.jsonl: malformed row: prompt 'a photo of a blue car' is "
                                        "not among its candidate prompts"):
        get_task("selfbench", root).examples
    file.write_text("{not json")
    with pytest.raises(DataError, match="00003/metadata.jsonl: not valid JSON"):
        get_task("selfbench", root).examples


def test_selfbench_missing_images_and_paths_outside_the_root(root, tmp_path):
    shutil.rmtree(root / GENERATOR / "00002" / "samples")
    with pytest.raises(DataError, match="00002/metadata.jsonl: no generated image.*--skip-missing"):
        get_task("selfbench", root).examples
    task = get_task("selfbench", root, skip_missing=True)
    assert len(task.examples) == 10 and len(task.skipped) == 1 and "00002" in task.skipped[0]

    os.symlink(outside_file(tmp_path), root / GENERATOR / "00001" / "samples" / "00007.png")
    with pytest.raises(DataError, match="00001/metadata.jsonl: image path .*00007.png.* resolves outside the data"):
        get_task("selfbench", root, skip_missing=True).examples
    with pytest.raises(ValueError, match="is not a folder inside"):
        get_task("selfbench", root, generator="..")


def test_selfbench_end_to_end_with_clip_side_by_side(root, tmp_path, capsys):
    out = tmp_path / "out"
    config = write_clip_config(tmp_path)
    assert cli.main(["eval", "--task", "selfbench", "--data-root", str(root), "--out", str(out),
                     "--task-option", "tags=counting,position", "--task-option", "subset=full",
                     "--scorer", "diffusion,clip", "--clip-model", NAME, "--clip-config", str(config),
                     "--samples", "2", "--no-progress", "--chunk-size", "4"]) == 0
    for scorer in ("diffusion", "clip"):
        results = json.loads((out / scorer / "results.json").read_text())
        rows = [json.loads(line) for line in (out / scorer / "scores.jsonl").read_text().splitlines()]
        assert results["counts"]["examples"] == len(rows) == 4
        assert set(results["metrics"]) == {"accuracy", "accuracy/macro", "accuracy/counting", "accuracy/position"}
        assert all(len(row["scores"]["i2t"][0]) == 4 for row in rows)
    assert "accuracy/position" in capsys.readouterr().out
