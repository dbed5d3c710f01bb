"""itm-eval end to end on the tiny model: every task, results files, resume after kill -9,
sharding over 2 processes, bad data."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from itm_engine import cli
from itm_engine.shapesworld.world import write_shapesworld
from itm_engine.tasks import get_task

from fixtures import datasets
from fixtures.models import NAME, write_clip_config
from fixtures.selfbench_datasets import write_selfbench
from fixtures.spatial_datasets import write_mmvp_vlm, write_spec, write_whatsup

FAST = ["--samples", "2", "--no-progress", "--chunk-size", "4"]

# task -> (fixture writer, extra itm-eval arguments)
TASKS = {
    "flickr30k_i2t": (datasets.write_flickr30k, []),
    "flickr30k_t2i": (datasets.write_flickr30k, []),
    "winoground": (datasets.write_winoground, []),
    "imagecode": (datasets.write_imagecode, []),
    "svo": (datasets.write_svo, []),
    "vg_relation": (datasets.write_vg_relation, []),
    "vg_attribution": (datasets.write_vg_attribution, []),
    "coco_order": (datasets.write_coco_order, []),
    "flickr30k_order": (datasets.write_flickr30k_order, []),
    "clevr": (datasets.write_clevr, ["--task-option", "subtasks=spatial,recognition_color"]),
    "pets": (datasets.write_pets, []),
    "bias": (datasets.write_bias, []),
    "shapes": (partial(write_shapesworld, n=1, size=32), []),
    "shapes_t2i": (partial(write_shapesworld, n=1, size=32), []),
    "shapes_retrieval": (partial(write_shapesworld, n=1, size=32), []),
    "sugarcrepe": (datasets.write_sugarcrepe, []),
    "cola": (datasets.write_cola, []),
    "eqben": (datasets.write_eqben, []),
    "vismin": (datasets.write_vismin, []),
    "whatsup": (write_whatsup, []),
    "mmvp_vlm": (write_mmvp_vlm, []),
    "spec": (write_spec, []),
    "selfbench": (write_selfbench, ["--task-option", "tags=counting,position"]),
}


def run_eval(*args: str) -> int:
    return cli.main(["eval", *map(str, args)])


def read(out: Path) -> tuple[dict, list[dict]]:
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return results, rows


def recomputed_metrics(task_name: str, root: Path, rows: list[dict]) -> dict:
    """The task's metrics recomputed from the saved per-example scores alone."""
    task = get_task(task_name, root)
    by_id = {row["id"]: row["scores"] for row in rows}
    examples = [e for e in task.examples if e.id in by_id]
    return task.metrics(examples, {m: [torch.tensor(by_id[e.id][m]) for e in examples] for m in task.modes})


def test_every_registered_task_has_an_end_to_end_test():
    from itm_engine.tasks import all_tasks

    assert set(all_tasks()) == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_end_to_end(tmp_path, task):
    writer, extra = TASKS[task]
    root = writer(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval("--task", task, "--data-root", root, "--out", out, *FAST, *extra) == 0
    results, rows = read(out / "diffusion")
    assert results["task"] == task and results["counts"]["examples"] == len(rows) > 0
    assert results["counts"]["scored_now"] == len(rows) and results["unet_items_now"] > 0
    assert {"torch", "diffusers", "itm_engine"} <= set(results["versions"])
    expected = recomputed_metrics(task, root, rows)
    assert results["metrics"].keys() == expected.keys() and len(expected) > 0
    for name, value in expected.items():
        assert results["metrics"][name] == pytest.approx(value, nan_ok=True)
    example = next(e for e in get_task(task, root).examples if e.id == rows[0]["id"])
    for matrix in rows[0]["scores"].values():
        assert len(matrix) == len(example.images) and len(matrix[0]) == len(example.texts)


def test_unknown_task_lists_the_known_ones(tmp_path, capsys):
    assert run_eval("--task", "wino", "--data-root", tmp_path, "--out", tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err
    assert "unknown task 'wino'" in err and "winoground" in err and "flickr30k_i2t" in err


def test_missing_image_stops_or_is_skipped_and_counted(tmp_path, capsys):
    root = datasets.write_winoground(tmp_path / "data")
    victim = sorted((root / "images").glob("*.png"))[0]
    victim.unlink()
    assert run_eval("--task", "winoground", "--data-root", root, "--out", tmp_path / "a", *FAST) == 2
    assert victim.name in capsys.readouterr().err
    assert run_eval("--task", "winoground", "--data-root", root, "--out", tmp_path / "b", "--skip-missing", *FAST) == 0
    results, rows = read(tmp_path / "b" / "diffusion")
    assert results["counts"]["skipped_missing"] == 1 and victim.name in results["skipped"][0]
    assert results["counts"]["examples"] == len(rows) == len(get_task("winoground", root, skip_missing=True).examples)


def test_existing_output_needs_resume_and_the_same_config(tmp_path, capsys):
    root = datasets.write_winoground(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, *FAST) == 0
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, *FAST) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, "--resume", "--seed", "3", *FAST) == 2
    assert "changed: protocol.seed" in capsys.readouterr().err


def test_a_run_recorded_before_a_protocol_field_existed_resumes_at_its_default(tmp_path, capsys):
    """config.json of a run from before `protocol.guidance` existed: the run used what is now the
    field's default, so a resume with the default goes on and one with another value is refused."""
    root = datasets.write_winoground(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, *FAST) == 0
    config_file = out / "diffusion" / "config.json"
    stored = json.loads(config_file.read_text())
    del stored["protocol.guidance"]
    config_file.write_text(json.dumps(stored))
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, "--resume", *FAST) == 0
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, "--resume", "--guidance", "3.5",
                    *FAST) == 2
    assert "changed: protocol.guidance" in capsys.readouterr().err


def test_forced_mode_and_clip_side_by_side(tmp_path, capsys):
    root = datasets.write_winoground(tmp_path / "data")
    out = tmp_path / "out"
    config = write_clip_config(tmp_path)
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, "--mode", "i2t",
                    "--scorer", "diffusion,clip", "--clip-model", NAME, "--clip-config", config, *FAST) == 0
    diffusion, rows = read(out / "diffusion")
    clip, clip_rows = read(out / "clip")
    assert diffusion["modes"] == ["i2t"] and set(rows[0]["scores"]) == {"i2t"}
    assert clip["metrics"].keys() == diffusion["metrics"].keys()
    table = capsys.readouterr().out
    assert "diffusion" in table and "clip" in table and "group/overall" in table


def _eval_command(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "itm_engine.cli", "eval", "--task", "winoground", "--data-root", str(root),
            "--out", str(out), "--samples", "16", "--chunk-size", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_resume_after_kill_9_recomputes_nothing_and_matches_an_uninterrupted_run(tmp_path):
    root = datasets.write_winoground(tmp_path / "data", n=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_eval_command(root, reference), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    shard = killed / "diffusion" / "scores" / "rank0.jsonl"
    process = subprocess.Popen(_eval_command(root, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (shard.exists() and shard.read_text().count("\n") >= 2):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = shard.read_text().count("\n")
    assert 2 <= done_before < 8, "the run should have been killed part-way"
    assert not (killed / "diffusion" / "results.json").exists()

    subprocess.run(_eval_command(root, killed) + ["--resume"], check=True, env=env, capture_output=True)
    resumed, resumed_rows = read(killed / "diffusion")
    expected, expected_rows = read(reference / "diffusion")
    assert resumed["counts"]["resumed"] >= done_before
    assert resumed["counts"]["scored_now"] == 8 - resumed["counts"]["resumed"]
    assert resumed_rows == expected_rows
    assert resumed["metrics"] == expected["metrics"]


@pytest.mark.slow
def test_two_processes_through_accelerate_match_one(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    root = datasets.write_winoground(tmp_path / "data", n=6)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    args = ["--task", "winoground", "--data-root", str(root), "--samples", "2", "--chunk-size", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in both runs: bit-identical reductions
    subprocess.run([sys.executable, "-m", "itm_engine.cli", "eval", *args, "--out", str(single), "--device", "cpu"],
                   check=True, env=env, capture_output=True)
    launched = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "itm_engine.cli", "eval", *args, "--out", str(sharded)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    shards = sorted(p.name for p in (sharded / "diffusion" / "scores").glob("rank*.jsonl"))
    assert shards == ["rank0.jsonl", "rank1.jsonl"]
    one, one_rows = read(single / "diffusion")
    two, two_rows = read(sharded / "diffusion")
    assert two["counts"]["processes"] == 2
    assert two_rows == one_rows and two["metrics"] == one["metrics"]


def test_flickr_with_the_clip_prefilter(tmp_path):
    config = write_clip_config(tmp_path)
    root = datasets.write_flickr30k(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval("--task", "flickr30k_i2t", "--data-root", root, "--out", out, "--prefilter", "clip", "--topk", "3",
                    "--clip-model", NAME, "--clip-config", config, *FAST) == 0
    results, rows = read(out / "diffusion")
    assert results["config"]["prefilter"] == "clip"
    assert all(len(row["scores"]["i2t"][0]) == 3 for row in rows)  # each image against its top-3 captions
    assert set(results["metrics"]) == {"R@1", "R@5", "R@10"}


def test_adaptive_eval_keeps_the_metric_when_keeping_all_and_reports_draws(tmp_path):
    root = write_shapesworld(tmp_path / "data", n=3, size=32, subtasks=("recognition_color", "spatial"))
    common = ["--task", "shapes", "--data-root", root, "--samples", "4", "--schedule", "stratified", "--no-progress",
              "--chunk-size", "4"]
    assert run_eval(*common, "--out", tmp_path / "full") == 0
    assert run_eval(*common, "--out", tmp_path / "keep_all", "--adaptive", "2:6,4:6") == 0
    assert run_eval(*common, "--out", tmp_path / "eliminate", "--adaptive", "1:3,4:1") == 0
    full, full_rows = read(tmp_path / "full" / "diffusion")
    keep_all, keep_rows = read(tmp_path / "keep_all" / "diffusion")
    assert keep_all["metrics"] == pytest.approx(full["metrics"])
    for a, b in zip(full_rows, keep_rows):  # same ranking of the candidates of every example
        assert torch.equal(torch.tensor(a["scores"]["i2t"]).argsort(), torch.tensor(b["scores"]["i2t"]).argsort())
        assert b["scores"]["adaptive/i2t"]["draws"] == [4] * len(a["scores"]["i2t"][0])
    assert keep_all["unet_items_now"] == keep_all["full_budget_items_now"] == full["unet_items_now"]

    eliminate, rows = read(tmp_path / "eliminate" / "diffusion")
    # "1:3,4:1": every candidate 1 draw; the best 3 (both of a 2-candidate spatial example) go to 4 draws
    for row in rows:
        draws = row["scores"]["adaptive/i2t"]["draws"]
        expected = [4, 4] if len(draws) == 2 else [1] * (len(draws) - 3) + [4] * 3
        assert sorted(draws) == expected
    used = sum(sum(row["scores"]["adaptive/i2t"]["draws"]) for row in rows)
    assert eliminate["adaptive"]["candidate_draws"] == used
    assert eliminate["adaptive"]["full_budget_draws"] == 4 * sum(len(row["scores"]["i2t"][0]) for row in rows)
    assert eliminate["unet_items_now"] == used < eliminate["full_budget_items_now"] == full["unet_items_now"]
    assert eliminate["metrics"] == pytest.approx(recomputed_metrics("shapes", root, rows))

    assert run_eval("--task", "shapes_retrieval", "--data-root", root, "--out", tmp_path / "bad", "--adaptive",
                    "1:2", "--no-progress") == 2  # an N x N retrieval matrix has no single query


# -- resume safety: data fingerprint, score-file tails, metadata, lock, full disk -------------------


def _winoground_run(tmp_path: Path, *extra: str) -> tuple[Path, Path, list[str]]:
    """A finished winoground run: (data root, output folder, the command's arguments)."""
    root = datasets.write_winoground(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--task", "winoground", "--data-root", root, "--out", out, *FAST, *extra]
    assert run_eval(*args) == 0
    return root, out, args


def _touch(path: Path, seconds: int = 1000) -> None:
    """Move `path`'s modification time forward by `seconds` (a rewrite of the same size)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def test_resume_refuses_regenerated_examples_under_the_same_ids(tmp_path, capsys):
    root, out, args = _winoground_run(tmp_path)
    examples = root / "examples.jsonl"
    size = examples.stat().st_size
    rows = [json.loads(line) for line in examples.read_text().splitlines()]
    examples.write_text("".join(json.dumps({**row, "caption_0": row["caption_0"] + " again"}) + "\n" for row in rows))
    capsys.readouterr()
    assert run_eval(*args, "--resume") == 2
    err = capsys.readouterr().err
    assert f"examples.jsonl changed (size {size} -> {examples.stat().st_size})" in err
    assert str(out / "diffusion") in err and "--resume" in err


def test_resume_refuses_changed_images_and_lists_a_few_with_a_count(tmp_path, capsys):
    root, out, args = _winoground_run(tmp_path)
    images = sorted((root / "images").glob("*.png"))
    assert len(images) == 6
    for image in images:
        _touch(image)
    capsys.readouterr()
    assert run_eval(*args, "--resume") == 2
    err = capsys.readouterr().err
    assert "images/ex_0_img_0.png changed (modified " in err
    assert "and 1 more (6 files changed)" in err and images[-1].name not in err
    for image in images:  # the same files again: the resume goes ahead
        _touch(image, -1000)
    assert run_eval(*args, "--resume") == 0


def test_resume_refuses_changed_model_weights_of_a_local_model_folder(tmp_path, capsys):
    from itm_engine.models.loading import save_random_model

    model = save_random_model("tiny", tmp_path / "model")
    root, out, args = _winoground_run(tmp_path, "--model", model)
    weights = sorted((model / "unet").glob("*.safetensors"))
    assert weights
    _touch(weights[0])
    capsys.readouterr()
    assert run_eval(*args, "--resume") == 2
    assert f"model: unet/{weights[0].name} changed (modified " in capsys.readouterr().err


def test_resume_of_a_run_without_a_fingerprint_warns_and_records_one(tmp_path):
    root, out, args = _winoground_run(tmp_path)
    fingerprint = out / "diffusion" / "fingerprint.json"
    data = json.loads(fingerprint.read_text())
    assert data["data"].keys() >= {"examples.jsonl", "images/ex_0_img_0.png"}
    fingerprint.unlink()  # a run stored before fingerprints
    with pytest.warns(UserWarning, match="no fingerprint.json"):
        assert run_eval(*args, "--resume") == 0
    assert json.loads(fingerprint.read_text()) == data


def test_a_stored_row_missing_only_its_final_newline_is_kept_and_a_torn_one_dropped(tmp_path):
    from itm_engine.evaluate import ScoreStore

    folder = tmp_path / "scores"
    folder.mkdir()
    shard = folder / "rank0.jsonl"
    row = {"id": "a", "scores": {"i2t": [[1.0, 2.0]]}}
    for tail, kept in ((json.dumps({**row, "id": "b"}), {"a", "b"}), ('{"id": "b", "sco', {"a"})):
        shard.write_text(json.dumps(row) + "\n" + tail)
        store = ScoreStore(folder, 0)
        assert set(store.load_all()) == kept
        store.append([{**row, "id": "c"}])
        assert set(store.load_all()) == kept | {"c"}  # what load counted is still there after the append
        assert all(json.loads(line)["id"] for line in shard.read_text().splitlines())


def test_a_torn_config_json_is_named_in_the_error(tmp_path, capsys):
    root, out, args = _winoground_run(tmp_path)
    config = out / "diffusion" / "config.json"
    config.write_text("")  # what a full disk leaves of a write
    capsys.readouterr()
    assert run_eval(*args, "--resume") == 2
    err = capsys.readouterr().err
    assert f"{config} is not valid JSON (empty file)" in err and "start over" in err


def test_a_second_writer_of_an_output_folder_is_refused(tmp_path, capsys):
    import fcntl

    root = datasets.write_winoground(tmp_path / "data")
    out = tmp_path / "out"
    (out / "diffusion").mkdir(parents=True)
    # another run holding the folder's lock (flock treats each open file on its own, so this
    # process can play that run)
    with open(out / "diffusion" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_eval("--task", "winoground", "--data-root", root, "--out", out, *FAST) == 2
    err = capsys.readouterr().err
    assert f"{out / 'diffusion'} is in use by another process" in err
    assert not (out / "diffusion" / "config.json").exists()
    assert run_eval("--task", "winoground", "--data-root", root, "--out", out, *FAST) == 0  # released


def test_a_full_disk_stops_with_a_message_and_resume_continues(tmp_path, capsys, monkeypatch):
    import errno

    from itm_engine.evaluate import ScoreStore

    root = datasets.write_winoground(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--task", "winoground", "--data-root", root, "--out", out, *FAST]

    def disk_full(self, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ScoreStore, "append", disk_full)
    assert run_eval(*args) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing to {out}" in err and "--resume" in err
    monkeypatch.undo()
    assert run_eval(*args, "--resume") == 0
