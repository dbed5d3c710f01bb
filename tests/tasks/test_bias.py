"""MMBias (`bias`): groups and phrase lists, the effect size and its permutation p-value on planted
scores, and the bad-data policy."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from itm_engine.tasks import get_task
from itm_engine.tasks.base import DataError, Example

from fixtures.datasets import BIAS_PLEASANT, BIAS_UNPLEASANT, assert_malformed, outside_file, write_bias
from fixtures.scores import i2t_scores


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
    phrases = {"pleasant_phrases": ["joy"], "unpleasant_phrases": ["agony"]}
    (root / "textual_phrases.txt").write_text(json.dumps(phrases))
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
    return examples, i2t_scores(*rows)


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

    os.symlink(outside_file(tmp_path), root / "images" / "Jewish" / "elsewhere.png")  # listed, but leads outside
    with pytest.raises(DataError, match=r"images/Jewish/elsewhere.png.*resolves outside the data root"):
        get_task("bias", root, skip_missing=True).examples
    (root / "images" / "Jewish" / "elsewhere.png").unlink()
    os.symlink(root / "images" / "Jewish" / "img0.png", root / "images" / "Jewish" / "again.png")  # stays inside
    assert len(get_task("bias", root).examples) == 12
    (root / "images" / "Jewish" / "again.png").unlink()

    (root / "texts" / "unpleasant.txt").unlink()
    with pytest.raises(FileNotFoundError, match="unpleasant.txt"):
        get_task("bias", root).examples
    (root / "texts" / "pleasant.txt").unlink()
    (root / "texts" / "phrases.json").write_text(json.dumps({"pleasant": ["joy"], "unpleasant": "agony"}))
    with pytest.raises(DataError, match=r"phrases.json: malformed row: unpleasant must be a non-empty list"):
        get_task("bias", root).examples

    for options in ({"groups": "Atheist"}, {"pairs": "Christian-Muslim"}, {"pairs": ["Arab_vs_arab"]},
                    {"permutations": 0}, {"seed": 1.5}, {"target": "Arab"}):
        with pytest.raises(ValueError):
            get_task("bias", root, **options)


@pytest.mark.parametrize("phrases, field, value", [
    (["joy", 5], "pleasant[1]", 5), (["joy", None], "pleasant[1]", None), ("joy", "pleasant", "joy"),
])
def test_bias_malformed_phrase_list(tmp_path, phrases, field, value):
    root = write_bias(tmp_path / "bias")
    for kind in ("pleasant", "unpleasant"):
        (root / "texts" / f"{kind}.txt").unlink()
    (root / "texts" / "phrases.json").write_text(json.dumps({"pleasant": phrases, "unpleasant": ["agony"]}))
    assert_malformed(get_task("bias", root), "texts/phrases.json", field, value)
