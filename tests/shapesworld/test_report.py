"""The ShapesWorld report (`itm-shapes report`, the demo's tables, pretraining's validation) judges
examples with the same Task and metric as `itm-eval --task shapes*` on the data root the same draw
writes, and the bundled model's card is written from the recipe and the report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from itm_engine import DiffusionITM
from itm_engine.evaluate import EvalConfig, evaluate
from itm_engine.shapesworld import ASSETS, CLIP, MODEL, bundle, report
from itm_engine.shapesworld import cli as shapes_cli
from itm_engine.shapesworld.world import ALL_SUBTASKS, SUBTASKS, Draw, write_shapesworld

ROOT = Path(__file__).resolve().parents[2]
DRAW = Draw("test", n=2, seed=1, size=48, subtasks=("recognition_shape", "spatial", "complexity"))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """The data root of DRAW, as `itm-shapes write` writes it."""
    return write_shapesworld(tmp_path_factory.mktemp("report") / "data", DRAW.split, DRAW.n, DRAW.seed, DRAW.size,
                             DRAW.subtasks)


@pytest.mark.parametrize("direction, task, mode", [("i2t", "shapes", "auto"), ("t2i", "shapes_t2i", "auto"),
                                                   ("t2i-raw", "shapes_t2i", "i2t")])
def test_report_accuracy_is_itm_eval_on_the_written_draw(written, tmp_path, direction, task, mode, monkeypatch):
    scored = {}  # what the report scored: example id -> its score matrix
    real = report.score_examples

    def recording(*args, **kwargs):
        rows, items, full = real(*args, **kwargs)
        scored.update({row["id"]: row["scores"] for row in rows})
        return rows, items, full

    monkeypatch.setattr(report, "score_examples", recording)
    scorer = DiffusionITM.from_pretrained("tiny", progress=False, protocol=report.lab_protocol(samples=2, seed=0))
    mine = report.accuracy(scorer, DRAW, direction)
    config = EvalConfig(task=task, data_root=str(written), model="tiny", mode=mode,
                        protocol_fields={"samples": 2, "seed": 0, "schedule": "stratified"}, chunk_size=DRAW.n,
                        task_options={"subtasks": list(DRAW.subtasks)})
    results = evaluate(config, tmp_path / "run", device="cpu", progress=False)
    assert list(mine) == list(DRAW.subtasks)
    assert mine == {subtask: results["metrics"][f"accuracy/{subtask}"] for subtask in DRAW.subtasks}
    # one chunk per subtask, as the report scores them: the very same numbers, not merely close
    stored = {json.loads(line)["id"]: json.loads(line)["scores"]
              for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()}
    score_mode = report.DIRECTIONS[direction][1]
    assert set(scored) == set(stored) and len(scored) == DRAW.n * len(DRAW.subtasks)
    for example_id, scores in scored.items():
        assert scores[score_mode] == stored[example_id][score_mode], example_id


def test_chance_is_one_over_the_candidates():
    chance = report.chance(Draw("test", 2, subtasks=("recognition_color", "recognition_shape", "spatial")))
    assert chance == {"recognition_color": 1 / 6, "recognition_shape": 1 / 5, "spatial": 1 / 2}


def test_format_table_rows_columns_and_mean():
    table = {"I2T": {"a": 1.0, "b": 0.5}, "chance": {"a": 0.5, "b": 0.25}}
    lines = report.format_table("title", table).splitlines()
    assert lines[0] == "title" and lines[1].split() == ["subtask", "I2T", "chance"]
    assert lines[2].split() == ["a", "100.0%", "50.0%"] and lines[-1].split() == ["mean", "75.0%", "37.5%"]


def test_an_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction must be one of i2t, t2i, t2i-raw"):
        report.accuracy(None, Draw("test", 1), "both")


def test_split_draws_of_some_subtasks_keep_the_splits_that_have_them():
    assert report.split_draw("test", 3, 1, only=("complexity", "spatial")) == Draw(
        "test", 3, 1, subtasks=("spatial", "complexity"))  # in the split's order
    assert report.split_draw("varied", 3, only=("spatial",)).style == "varied"
    assert report.split_draw("compositional", 3, only=("complexity",)) is None  # a test-split subtask only
    assert report.split_draw("compositional", 3).subtasks == SUBTASKS
    with pytest.raises(ValueError, match="--subtasks must name some of recognition_color"):
        report.ReportConfig(out="x", subtasks=("recognition_shape", "shapes"))


@pytest.mark.slow
def test_itm_shapes_report_of_some_subtasks_scores_only_those(tmp_path):
    out = tmp_path / "shape"
    assert shapes_cli.main(["report", "--n", "2", "--samples", "1", "--subtasks", "complexity",
                            "--out", str(out)]) == 0
    saved = json.loads((tmp_path / "shape.json").read_text())
    assert list(saved["accuracy"]) == ["test", "varied"] and saved["subtasks"] == ["complexity"]
    assert all(list(column) == ["complexity"] for split in saved["accuracy"].values() for column in split.values())


@pytest.mark.slow
def test_itm_shapes_report_writes_every_column_of_both_splits(tmp_path, capsys):
    out = tmp_path / "deep" / "accuracy-n2.5"  # a dot in the name is kept, not taken for a suffix
    assert shapes_cli.main(["report", "--n", "2", "--samples", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["accuracy-n2.5.json", "accuracy-n2.5.md"]
    saved = json.loads((out.parent / "accuracy-n2.5.json").read_text())
    assert saved["command"] == f"itm-shapes report --n 2 --samples 2 --out {out}"
    assert (saved["n"], saved["samples"], saved["seed"], saved["model"], saved["lora"]) == (2, 2, 0, "shapes", None)
    for split, subtasks in (("test", ALL_SUBTASKS), ("compositional", SUBTASKS)):
        table = saved["accuracy"][split]
        assert list(table) == ["I2T", "T2I raw", "T2I norm", "CLIP I2T", "CLIP T2I", "chance"]
        for column in table.values():
            assert list(column) == list(subtasks) and all(v in (0.0, 0.5, 1.0) or v < 0.5 for v in column.values())
    markdown = (out.parent / "accuracy-n2.5.md").read_text()
    assert "test split, 2 examples per subtask" in markdown and "compositional split" in markdown
    assert "test split, 2 examples per subtask" in capsys.readouterr().out


def test_bundle_rewrites_the_card_from_the_recipe_and_the_report(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets)
    monkeypatch.setattr(bundle, "ASSETS", assets)
    accuracy = ROOT / "benchmarks" / "results" / "shapes-accuracy.json"
    bundle.bundle(bundle.BundleConfig(accuracy=str(accuracy)))
    card = (assets / MODEL / "README.md").read_text()
    assert "`itm-shapes pretrain`" in card and "itm-train pretrain" not in card and "data/shapes.py" not in card
    assert "7.1 MB in all" in card and "cross-attention at the 8x8 and 4x4 levels and in the middle block" in card
    assert "`itm-shapes report` (100 examples per subtask, 10 stratified draws per pair, seed 0" in card
    assert "| spatial | 100.0% |" in card
    assert (assets / CLIP / f"{CLIP}.safetensors").read_bytes() == (ASSETS / CLIP / f"{CLIP}.safetensors").read_bytes()
    with pytest.raises(ValueError, match="give both --run and --clip"):
        bundle.bundle(bundle.BundleConfig(run=str(tmp_path)))
