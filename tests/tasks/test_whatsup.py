"""What'sUp: what loads from the official data folder, the official individual / per-preposition /
pair / set accuracies (recomputed here from the official `evaluate_scores`), and the bad-data policy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from itm_engine.protocols import Protocol
from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError

from fixtures.datasets import assert_inside_root, assert_malformed, edit_json, file_names, noise_image, outside_file
from fixtures.spatial_datasets import WHATSUP_FILES, write_whatsup

ARGMAX_FIRST = Protocol(ties="argmax-first")
FILES = {"controlled_images_a": "controlled_images_dataset.json",
         "controlled_images_b": "controlled_clevr_dataset.json",
         "coco_qa_one_obj": "coco_qa_one_obj.json", "coco_qa_two_obj": "coco_qa_two_obj.json",
         "vg_qa_one_obj": "vg_qa_one_obj.json", "vg_qa_two_obj": "vg_qa_two_obj.json"}


@pytest.fixture
def whatsup(tmp_path):
    return write_whatsup(tmp_path / "whatsup")


def test_whatsup_examples(whatsup):
    task = get_task("whatsup", whatsup)
    examples = task.examples
    assert task.modes == ("i2t",)
    assert [ex.id for ex in examples] == ([f"controlled_images_a/{i}" for i in range(8)]
                                          + [f"controlled_images_b/{i}" for i in range(4)]
                                          + [f"{s}/{i}" for s in list(FILES)[2:] for i in range(2)])
    assert_inside_root(task)
    a5 = examples[5]
    assert a5.images == (str((whatsup / "controlled_images" / "mug_under_chair.jpeg").resolve()),)
    assert a5.texts == ("A mug under a chair", "A mug on a chair", "A mug to the left of a chair",
                        "A mug to the right of a chair")
    assert a5.label == 0 and a5.meta == {"subset": "controlled_images_a", "preposition": "under",
                                         "objects": ["mug", "chair"]}
    assert examples[10].meta == {"subset": "controlled_images_b", "preposition": "in-front_of",
                                 "objects": ["cube", "sphere"]}
    assert file_names(examples[10].images) == ["cube_in-front_of_sphere.jpeg"]
    coco = examples[13]
    assert file_names(coco.images) == ["000000000285.jpg"] and coco.images[0].endswith("val2017/000000000285.jpg")
    assert coco.texts == ("A cat on the top", "A cat on the bottom")
    assert coco.meta == {"subset": "coco_qa_one_obj", "preposition": "top"}
    vg = examples[17]  # an image id given as a string
    assert file_names(vg.images) == ["2346.jpg"] and vg.images[0].endswith("vg_images/2346.jpg")
    # the official per-preposition groups of the two-object sets
    assert [ex.meta["preposition"] for ex in examples[14:16] + examples[18:]] == ["left", "above", "front", "top"]


def test_whatsup_subsets_option(whatsup, tmp_path):
    chosen = get_task("whatsup", whatsup, subsets="VG_QA_two_obj, coco_qa_one_obj").examples
    assert [ex.id for ex in chosen] == ["coco_qa_one_obj/0", "coco_qa_one_obj/1", "vg_qa_two_obj/0", "vg_qa_two_obj/1"]
    assert len(get_task("whatsup", whatsup, subsets=["controlled_images_b"]).examples) == 4
    (whatsup / "vg_qa_one_obj.json").unlink()  # an absent subset is skipped unless asked for
    assert "vg_qa_one_obj/0" not in {ex.id for ex in get_task("whatsup", whatsup).examples}
    with pytest.raises(FileNotFoundError, match=r"vg_qa_one_obj asked for.*vg_qa_one_obj.json"):
        get_task("whatsup", whatsup, subsets="vg_qa_one_obj").examples
    with pytest.raises(ValueError, match=r"unknown name\(s\) gqa_spatial; known: controlled_images_a"):
        get_task("whatsup", whatsup, subsets="gqa_spatial")
    with pytest.raises(ValueError, match="must be a non-empty list of names"):
        get_task("whatsup", whatsup, subsets=[])
    with pytest.raises(ValueError, match="unknown option"):
        get_task("whatsup", whatsup, subset="coco_qa_one_obj")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="controlled_images_dataset.json"):
        get_task("whatsup", tmp_path / "empty").examples


def official_evaluate_scores(subset: str, dataset: list, scores: np.ndarray) -> dict[str, float]:
    """The official `evaluate_scores` of Controlled_Images / COCO_QA / VG_QA (whatsup_vlms,
    dataset_zoo/aro_datasets.py) on scores [N, n_captions], as fractions and with our key names."""
    preds = np.argmax(scores, axis=-1)
    correct_mask = preds == 0
    out = {f"accuracy/{subset}": float(np.mean(correct_mask))}
    if subset.startswith("controlled"):
        names = [d["image_path"].split("/")[-1] for d in dataset]
        prepositions = []
        for d in dataset:
            if "left_of" in d["image_path"]:
                prepositions.append("left_of")
            elif "right_of" in d["image_path"]:
                prepositions.append("right_of")
            elif subset.endswith("a") and "_on_" in d["image_path"]:
                prepositions.append("on")
            elif subset.endswith("b") and "_in-front_of_" in d["image_path"]:
                prepositions.append("in-front_of")
            else:
                prepositions.append("under" if subset.endswith("a") else "behind")
        slots = ("left", "right", "on", "under") if subset.endswith("a") else ("left", "right", "in-front", "behind")
        eval_dict = {(n.split("_")[0], n.split("_")[-1][:-5]): {s: 0 for s in slots} for n in names}
        for n, correct in zip(names, correct_mask):
            eval_dict[(n.split("_")[0], n.split("_")[-1][:-5])][n.split("_")[1]] = correct
        pair_correct = set_correct = 0
        for correct_dict in eval_dict.values():
            if correct_dict["left"] and correct_dict["right"]:
                pair_correct += 1
            if correct_dict[slots[2]] and correct_dict[slots[3]]:
                pair_correct += 1
            if sum(correct_dict.values()) == 4:
                set_correct += 1
        out[f"pair_accuracy/{subset}"] = pair_correct / (len(dataset) / 2)
        out[f"set_accuracy/{subset}"] = set_correct / (len(dataset) / 4)
    elif subset.endswith("one_obj"):
        prepositions = [d[1].split()[-1] for d in dataset]
    else:
        prepositions = []
        for d in dataset:
            if "left of" in d[1]:
                prepositions.append("left")
            elif "right of" in d[1]:
                prepositions.append("right")
            elif subset.startswith("coco") and "above" in d[1]:
                prepositions.append("above")
            elif subset.startswith("vg") and "front of" in d[1]:
                prepositions.append("front")
            elif subset.startswith("vg") and "behind" in d[1]:
                prepositions.append("behind")
            else:
                prepositions.append("below" if subset.startswith("coco") else "top")
    all_prepositions = np.array(prepositions)
    for preposition in np.unique(all_prepositions):
        out[f"accuracy/{subset}/{preposition}"] = float(correct_mask[all_prepositions == preposition].mean())
    return out


def official_metrics(root, per_subset_scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Every subset's official numbers, our overall (micro, macro) and the paper's Table 1 averages."""
    out: dict[str, float] = {}
    for subset, scores in per_subset_scores.items():
        out.update(official_evaluate_scores(subset, json.loads((root / FILES[subset]).read_text()), scores))
    all_correct = np.concatenate([np.argmax(s, axis=-1) == 0 for s in per_subset_scores.values()])
    out["accuracy"] = float(all_correct.mean())
    subset_accuracies = [out[f"accuracy/{s}"] for s in per_subset_scores]
    out["accuracy/macro"] = sum(subset_accuracies) / len(subset_accuracies)
    for family, members in (("controlled_images", ("controlled_images_a", "controlled_images_b")),
                            ("coco_spatial", ("coco_qa_one_obj", "coco_qa_two_obj")),
                            ("gqa_spatial", ("vg_qa_one_obj", "vg_qa_two_obj"))):
        if all(m in per_subset_scores for m in members):
            out[f"accuracy/{family}"] = sum(out[f"accuracy/{m}"] for m in members) / 2
    return out


@pytest.mark.parametrize("seed", range(12))
def test_whatsup_metrics_match_the_official_evaluation(whatsup, seed):
    """Under argmax-first ties (numpy's argmax) the task's numbers are the official ones, ties included."""
    task = get_task("whatsup", whatsup, protocol=ARGMAX_FIRST)
    gen = torch.Generator().manual_seed(seed)
    matrices = [torch.randint(0, 3, (1, len(ex.texts)), generator=gen).float() for ex in task.examples]
    per_subset: dict[str, list] = {}
    for ex, s in zip(task.examples, matrices):
        per_subset.setdefault(ex.meta["subset"], []).append(s[0].numpy())
    expected = official_metrics(whatsup, {k: np.stack(v) for k, v in per_subset.items()})
    assert task.metrics(task.examples, {"i2t": matrices}) == pytest.approx(expected)


def test_whatsup_pair_and_set_accuracy_by_hand(whatsup):
    task = get_task("whatsup", whatsup, subsets="controlled_images_a")
    # mug on a table: all four right (2 pairs, 1 set);
    # on a chair: on/under right, left right, right wrong (1 pair, no set)
    right, wrong = [2.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]
    matrices = [torch.tensor([row]) for row in [right] * 4 + [right, right, right, wrong]]
    result = task.metrics(task.examples, {"i2t": matrices})
    assert result["pair_accuracy/controlled_images_a"] == pytest.approx(3 / 4)
    assert result["set_accuracy/controlled_images_a"] == pytest.approx(1 / 2)
    assert result["accuracy/controlled_images_a"] == pytest.approx(7 / 8)
    assert result["accuracy/controlled_images_a/right_of"] == pytest.approx(1 / 2)
    assert "accuracy/controlled_images" not in result  # the Table 1 average needs both A and B
    full = get_task("whatsup", whatsup)
    keys = full.metrics(full.examples, {"i2t": [torch.ones(1, len(ex.texts)) for ex in full.examples]}).keys()
    assert {k for k in keys if not k.startswith("accuracy/")} == {
        "accuracy", "pair_accuracy/controlled_images_a", "set_accuracy/controlled_images_a",
        "pair_accuracy/controlled_images_b", "set_accuracy/controlled_images_b"}
    assert {"accuracy/macro", "accuracy/controlled_images", "accuracy/coco_spatial", "accuracy/gqa_spatial",
            "accuracy/vg_qa_two_obj/front", "accuracy/controlled_images_b/in-front_of"} <= set(keys)


def test_whatsup_ties_follow_the_protocol(whatsup):
    strict, first = get_task("whatsup", whatsup), get_task("whatsup", whatsup, protocol=ARGMAX_FIRST)
    tied = [torch.ones(1, len(ex.texts)) for ex in strict.examples]
    assert strict.metrics(strict.examples, {"i2t": tied})["accuracy"] == 0.0
    assert first.metrics(first.examples, {"i2t": tied})["accuracy"] == 1.0  # the correct caption comes first


def test_whatsup_missing_images(whatsup):
    (whatsup / "controlled_images" / "mug_under_chair.jpeg").unlink()
    with pytest.raises(DataError, match=r"controlled_images_dataset.json row 5: missing image file.*mug_under_chair"):
        get_task("whatsup", whatsup).examples
    task = get_task("whatsup", whatsup, skip_missing=True)
    assert len(task.examples) == 19 and "controlled_images_a/5" not in {ex.id for ex in task.examples}
    assert len(task.skipped) == 1 and "mug_under_chair.jpeg" in task.skipped[0]
    (whatsup / "val2017" / "000000000139.jpg").unlink()  # used by two subsets
    task = get_task("whatsup", whatsup, skip_missing=True)
    assert len(task.examples) == 17 and len(task.skipped) == 3


def test_whatsup_paths_outside_the_root_are_refused(whatsup, tmp_path):
    noise_image(tmp_path / "outside.jpg", 1)
    edit_json(whatsup / "vg_qa_one_obj.json", lambda rows: rows.append(["../../outside", "a", "b"]))
    with pytest.raises(DataError, match=r"vg_qa_one_obj.json row 2: image path .* resolves outside the data root"):
        get_task("whatsup", whatsup, skip_missing=True).examples

    root = write_whatsup(tmp_path / "other")
    image = root / "controlled_clevr" / "cube_behind_sphere.jpeg"
    image.unlink()
    image.symlink_to(outside_file(tmp_path))
    with pytest.raises(DataError, match=r"controlled_clevr_dataset.json row 3: .*outside the data root"):
        get_task("whatsup", root, skip_missing=True).examples


@pytest.mark.parametrize("file, index, row, field, value", [
    ("controlled_images_dataset.json", 2, {"image_path": 5, "caption_options": ["a", "b"]}, "image_path", 5),
    ("controlled_images_dataset.json", 2, {"image_path": "data/controlled_images/mug_near_table.jpeg",
                                           "caption_options": ["a", "b"]},
     "image_path", "data/controlled_images/mug_near_table.jpeg"),
    ("controlled_images_dataset.json", 2, {"image_path": "data/controlled_images/mug.jpeg",
                                           "caption_options": ["a", "b"]},
     "image_path", "data/controlled_images/mug.jpeg"),
    ("controlled_clevr_dataset.json", 0, {"image_path": "data/controlled_clevr/cube_on_sphere.jpeg",
                                          "caption_options": ["a", "b"]},
     "image_path", "data/controlled_clevr/cube_on_sphere.jpeg"),  # "on" is a relation of set A only
    ("controlled_images_dataset.json", 2, {"image_path": "data/controlled_images/mug_on_table.jpeg",
                                           "caption_options": "a mug"}, "caption_options", "a mug"),
    ("controlled_images_dataset.json", 2, {"image_path": "data/controlled_images/mug_on_table.jpeg",
                                           "caption_options": ["only one"]}, "caption_options", ["only one"]),
    ("controlled_images_dataset.json", 2, {"image_path": "data/controlled_images/mug_on_table.jpeg",
                                           "caption_options": ["a", None]}, "caption_options[1]", None),
    ("coco_qa_one_obj.json", 1, [285, "A cat on the top"], "row", [285, "A cat on the top"]),
    ("coco_qa_one_obj.json", 1, {"image": 285}, "row", {"image": 285}),
    ("coco_qa_two_obj.json", 1, [True, "a", "b"], "item 0 (image id)", True),
    ("vg_qa_one_obj.json", 0, [2345, 7, "b"], "item 1 (correct caption)", 7),
    ("vg_qa_two_obj.json", 1, [2347, "a", ""], "item 2 (wrong caption)", ""),
])
def test_whatsup_malformed_rows(whatsup, file, index, row, field, value):
    edit_json(whatsup / file, lambda rows: rows.__setitem__(index, row))
    assert_malformed(get_task("whatsup", whatsup), f"{file} row {index}", field, value)


def test_whatsup_malformed_files(whatsup):
    edit_json(whatsup / "controlled_images_dataset.json", lambda rows: rows[3].pop("caption_options"))
    with pytest.raises(DataError, match=r"controlled_images_dataset.json row 3: malformed row: missing field\(s\) "
                                        r"caption_options"):
        get_task("whatsup", whatsup).examples
    (whatsup / "coco_qa_two_obj.json").write_text(json.dumps({"rows": WHATSUP_FILES["coco_qa_two_obj.json"]}))
    with pytest.raises(DataError, match="coco_qa_two_obj.json: expected a JSON list of rows"):
        get_task("whatsup", whatsup, subsets="coco_qa_two_obj").examples
    (whatsup / "coco_qa_two_obj.json").write_text("[[139, ")
    with pytest.raises(DataError, match="coco_qa_two_obj.json: not valid JSON"):
        get_task("whatsup", whatsup, subsets="coco_qa_two_obj").examples
