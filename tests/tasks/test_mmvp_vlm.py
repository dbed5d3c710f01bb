"""MMVP-VLM: what loads from Questions.csv and the image folders, the official pair accuracy
(recomputed here as scripts/evaluate_vlm.py computes it), ties, and the bad-data policy."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from itm_engine.protocols import Protocol
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import assert_inside_root, assert_malformed, file_names, outside_file, write_csv
from fixtures.spatial_datasets import MMVP_QUESTIONS, write_mmvp_vlm

HEADER = ["Question ID", "Type", "Statement"]


@pytest.fixture
def mmvp(tmp_path):
    return write_mmvp_vlm(tmp_path / "mmvp")


def rewrite(root, rows) -> None:
    write_csv(root / "Questions.csv", HEADER, rows)


def test_mmvp_vlm_examples(mmvp):
    task = get_task("mmvp_vlm", mmvp)
    examples = task.examples
    assert task.modes == ("t2i",)
    assert [ex.id for ex in examples] == ["1-2", "3-4", "5-6", "7-8"]
    assert_inside_root(task)
    color = examples[2]
    assert color.images == tuple(str((mmvp / "MLLM_VLM Images" / "Color" / f"{q}.jpg").resolve()) for q in (5, 6))
    assert color.texts == ("a photo of The car is red, with white stripes", "a photo of The car is blue")
    assert color.label == (0, 1) and color.meta == {"type": "Color"}
    assert file_names(examples[3].images) == ["7.jpg", "8.jpg"]
    assert examples[3].images[0].endswith("MLLM_VLM Images/Camera Perspective/7.jpg")


def official_pair_accuracies(rows, matrices) -> dict[str, float]:
    """scripts/evaluate_vlm.py of tsb0601/MMVP: rows read two at a time; for each statement the
    softmax over the pair's two images, "img1" when its probability > 0.5; the truth "img1" for an
    odd Question ID; a pair counts when both statements are right. Per pattern (the Type column;
    the official script's positional categories on the released file) and their mean."""
    right = defaultdict(list)
    for k in range(0, len(rows), 2):
        (qid1, qtype1, _), (qid2, _, _) = rows[k], rows[k + 1]
        s = matrices[k // 2]  # [image, statement]
        img1_score1 = s[:, 0].softmax(dim=-1)[0]
        img1_score2 = s[:, 1].softmax(dim=-1)[0]
        pred1 = "img1" if img1_score1 > 0.5 else "img2"
        pred2 = "img1" if img1_score2 > 0.5 else "img2"
        gt1 = "img1" if qid1 % 2 == 1 else "img2"
        gt2 = "img1" if qid2 % 2 == 1 else "img2"
        right[qtype1].append(pred1 == gt1 and pred2 == gt2)
    per_pattern = {kind: sum(v) / len(v) for kind, v in right.items()}
    all_pairs = [ok for v in right.values() for ok in v]
    return {"accuracy": sum(all_pairs) / len(all_pairs), "accuracy/macro": sum(per_pattern.values()) / len(per_pattern),
            **{f"accuracy/{kind}": value for kind, value in per_pattern.items()}}


@pytest.mark.parametrize("seed", range(10))
def test_mmvp_vlm_metrics_match_the_official_evaluation(mmvp, seed):
    task = get_task("mmvp_vlm", mmvp)
    gen = torch.Generator().manual_seed(seed)
    matrices = [torch.randn(2, 2, generator=gen) for _ in task.examples]  # no ties
    expected = official_pair_accuracies(MMVP_QUESTIONS, matrices)
    assert task.metrics(task.examples, {"t2i": matrices}) == pytest.approx(expected)


def test_mmvp_vlm_pair_accuracy_by_hand(mmvp):
    task = get_task("mmvp_vlm", mmvp)
    m = lambda *rows: torch.tensor(rows)  # noqa: E731  s[image, statement]
    matrices = [m([2.0, 0.0], [1.0, 3.0]),   # both statements pick their image: right
                m([2.0, 2.5], [1.0, 3.0]),   # statement 2 picks image 2 (3 > 2.5): right
                m([2.0, 5.0], [1.0, 3.0]),   # statement 2 picks image 1: wrong
                m([0.0, 0.0], [1.0, 3.0])]   # statement 1 picks image 2: wrong
    assert task.metrics(task.examples, {"t2i": matrices}) == pytest.approx({
        "accuracy": 2 / 4, "accuracy/macro": (1.0 + 0.0 + 0.0) / 3, "accuracy/Orientation": 1.0,
        "accuracy/Color": 0.0, "accuracy/Camera Perspective": 0.0})


def test_mmvp_vlm_ties_follow_the_protocol(mmvp):
    """The official `> 0.5` sends a tie to image 2; here the protocol's policy decides."""
    strict = get_task("mmvp_vlm", mmvp)
    first = get_task("mmvp_vlm", mmvp, protocol=Protocol(ties="argmax-first"))
    statement_1_ties = [torch.tensor([[1.0, 0.0], [1.0, 2.0]])] * 4
    statement_2_ties = [torch.tensor([[2.0, 1.0], [0.0, 1.0]])] * 4
    assert official_pair_accuracies(MMVP_QUESTIONS, statement_1_ties)["accuracy"] == 0.0
    assert official_pair_accuracies(MMVP_QUESTIONS, statement_2_ties)["accuracy"] == 1.0
    assert strict.metrics(strict.examples, {"t2i": statement_1_ties})["accuracy"] == 0.0
    assert strict.metrics(strict.examples, {"t2i": statement_2_ties})["accuracy"] == 0.0
    assert first.metrics(first.examples, {"t2i": statement_1_ties})["accuracy"] == 1.0  # image 1 comes first
    assert first.metrics(first.examples, {"t2i": statement_2_ties})["accuracy"] == 0.0


def test_mmvp_vlm_missing_images(mmvp):
    (mmvp / "MLLM_VLM Images" / "Color" / "6.jpg").unlink()
    with pytest.raises(DataError, match=r"Questions.csv:7: missing image file.*Color/6.jpg"):
        get_task("mmvp_vlm", mmvp).examples
    task = get_task("mmvp_vlm", mmvp, skip_missing=True)
    assert [ex.id for ex in task.examples] == ["1-2", "3-4", "7-8"]
    assert len(task.skipped) == 1 and "6.jpg" in task.skipped[0]


def test_mmvp_vlm_paths_outside_the_root_are_refused(mmvp, tmp_path):
    rows = [list(row) for row in MMVP_QUESTIONS]
    rows[4][1] = rows[5][1] = "../.."
    rewrite(mmvp, rows)
    with pytest.raises(DataError, match=r"Questions.csv:6: image path .* resolves outside the data root"):
        get_task("mmvp_vlm", mmvp, skip_missing=True).examples

    root = write_mmvp_vlm(tmp_path / "other")
    image = root / "MLLM_VLM Images" / "Orientation" / "3.jpg"
    image.unlink()
    image.symlink_to(outside_file(tmp_path))
    with pytest.raises(DataError, match=r"Questions.csv:4: .*outside the data root"):
        get_task("mmvp_vlm", root, skip_missing=True).examples


@pytest.mark.parametrize("row, where, field, value", [
    ((3, "Orientation", "The arrow points up"), "Questions.csv:5", None, None),  # ids 3, 3: not 2k-1, 2k
    (("x", "Orientation", "The arrow points up"), "Questions.csv:5", "Question ID", "x"),
    ((True, "Orientation", "The arrow points up"), "Questions.csv:5", "Question ID", "True"),
    ((4, "", "The arrow points up"), "Questions.csv:5", "Type", ""),
    ((4, "Orientation", " "), "Questions.csv:5", "Statement", " "),
    ((4, "Orientation"), "Questions.csv:5", "Statement", None),
])
def test_mmvp_vlm_malformed_fields(mmvp, row, where, field, value):
    rows = list(MMVP_QUESTIONS)
    rows[3] = row
    rewrite(mmvp, rows)
    if field is None:
        with pytest.raises(DataError, match=rf"{where}: malformed row: a pair's Question IDs must be 2k-1 and 2k, "
                                            r"got 3 and 3"):
            get_task("mmvp_vlm", mmvp).examples
    else:
        assert_malformed(get_task("mmvp_vlm", mmvp), where, field, value)


def test_mmvp_vlm_malformed_files(mmvp, tmp_path):
    rows = list(MMVP_QUESTIONS)
    rewrite(mmvp, rows[:-1])
    with pytest.raises(DataError, match=r"Questions.csv:8: malformed row: an unpaired last row"):
        get_task("mmvp_vlm", mmvp).examples
    rewrite(mmvp, rows[:2] + [(3, "Color", "The arrow points up")] + rows[3:])
    with pytest.raises(DataError, match=r"Questions.csv:5: malformed row: Type 'Orientation' differs from its pair's "
                                        r"\(Questions.csv:4\) 'Color'"):
        get_task("mmvp_vlm", mmvp).examples
    rewrite(mmvp, rows[1:2] + rows[:1] + rows[2:])  # a pair listed even id first
    with pytest.raises(DataError, match=r"Questions.csv:3: .*got 2 and 1"):
        get_task("mmvp_vlm", mmvp).examples
    rewrite(mmvp, [(q + 1, kind, text) for q, kind, text in rows[:2]] + rows[2:])  # ids 2, 3: the parity is off
    with pytest.raises(DataError, match=r"Questions.csv:3: .*got 2 and 3"):
        get_task("mmvp_vlm", mmvp).examples
    write_csv(mmvp / "Questions.csv", ["Question ID", "Type"], [row[:2] for row in rows])
    with pytest.raises(DataError, match=r"Questions.csv:2: malformed row: missing field\(s\) Statement"):
        get_task("mmvp_vlm", mmvp).examples
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="Questions.csv"):
        get_task("mmvp_vlm", tmp_path / "empty").examples
    with pytest.raises(ValueError, match="unknown option"):
        get_task("mmvp_vlm", mmvp, subsets="Color")
