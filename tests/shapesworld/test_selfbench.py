"""Self-Bench on the bundled model (`itm-shapes selfbench`): the drawings are reproducible from their
seeds and land in the layout the `selfbench` task reads, the judge calls rendered scenes right and
other scenes wrong, and the command runs end to end, scored as itm-eval scores its output."""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest

from itm_engine import DiffusionITM, cli
from itm_engine.shapesworld import MODEL, selfbench, world
from itm_engine.shapesworld import cli as shapes_cli
from itm_engine.tasks import get_task

DRAW = world.Draw("test", n=4, seed=3, subtasks=world.SUBTASKS)


@pytest.fixture(scope="module")
def components():
    return DiffusionITM.from_pretrained(MODEL, progress=False).components


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def test_drawings_are_reproducible_from_their_seeds(components):
    captions = ["a small red circle", "a blue square left of a green triangle", "a small red circle"]
    seeds = [selfbench.image_seed(0, "recognition_color", 0, k) for k in range(2)] + [99]
    first = selfbench.generate(components, captions, seeds, guidance=3.0, steps=3, batch_size=2)
    again = selfbench.generate(components, captions, seeds, guidance=3.0, steps=3, batch_size=2)
    assert all(image.size == (components.image_size,) * 2 and image.mode == "RGB" for image in first)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(again)))
    assert not np.array_equal(pixels(first)[0], pixels(first)[2])  # same caption, other seed
    unguided = selfbench.generate(components, captions[:1], seeds[:1], guidance=1.0, steps=3)
    assert not np.array_equal(pixels(unguided)[0], pixels(first)[0])
    assert isinstance(selfbench.sampling_pipeline(components).scheduler, diffusers.DDIMScheduler)
    assert len({selfbench.image_seed(0, s, e, k) for s in world.SUBTASKS for e in range(50) for k in range(4)}) \
        == len(world.SUBTASKS) * 50 * 4
    with pytest.raises(ValueError, match="2 captions but 1 seeds"):
        selfbench.generate(components, captions[:2], seeds[:1], guidance=3.0, steps=3)


@pytest.mark.parametrize("style", ["exact", "varied"])
def test_judge_calls_rendered_scenes_right_and_other_scenes_wrong(style):
    draw = world.Draw(DRAW.split, DRAW.n, DRAW.seed, subtasks=DRAW.subtasks, style=style)
    scenes = world.draw_scenes(draw)
    for index, (subtask, scene, negatives) in enumerate(scenes):
        assert selfbench.judge(draw.render(scene, f"p{index}"), scene, subtask) == (True, "")
        for j, negative in enumerate(negatives):  # the same scene with the subtask's one attribute edited
            correct, reason = selfbench.judge(draw.render(negative, f"p{index}n{j}"), scene, subtask)
            assert not correct and reason.startswith(f"expected {world.caption(scene, subtask)!r}, found")
        other = scenes[index + 1 if index % draw.n < draw.n - 1 else index - 1][1]  # another example's, same subtask
        if world.caption(other, subtask) != world.caption(scene, subtask):
            assert not selfbench.judge(draw.render(other, f"o{index}"), scene, subtask)[0]


def test_judge_reads_objects_in_the_renderers_vocabulary():
    scene = (world.Obj("orange", "cross", "large", 20, 40), world.Obj("purple", "triangle", "small", 46, 38))
    found = selfbench.find_objects(world.render(scene, 64))
    assert [(o.color, o.shape, o.size) for o in found] == [(o.color, o.shape, o.size) for o in scene]
    assert all(abs(f.x - o.x) <= 1 and abs(f.y - o.y) <= 1 for f, o in zip(found, scene))
    assert selfbench.find_objects(world.render((), 32)) == []
    correct, reason = selfbench.judge(world.render(scene[:1], 64), scene, "binding_color_shape")
    assert not correct and "found 1 object(s): a large orange cross" in reason


def test_written_prompts_are_what_the_selfbench_task_reads(tmp_path):
    rows = world.example_rows(world.Draw("test", 1, 0, subtasks=("recognition_shape", "spatial")),
                              lambda scene, stem: scene)
    drawings = [[world.render(row["image"]), world.render(row["negatives"][0]["image"])] for row in rows]
    verdicts = selfbench.write_prompts(tmp_path, rows, "generated", drawings, side=32)
    assert verdicts == [True, False, True, False]
    task = get_task("selfbench", tmp_path, generator="generated")
    assert [ex.id for ex in task.examples] == ["00000/0000", "00000/0001", "00001/0000", "00001/0001"]
    for ex, row in zip(task.examples[::2], rows):
        assert ex.texts == (row["caption"], *(n["caption"] for n in row["negatives"])) and ex.label == 0
        assert ex.meta == {"tag": row["subtask"]}
    correct = get_task("selfbench", tmp_path, generator="generated", subset="correct").examples
    assert [ex.id for ex in correct] == ["00000/0000", "00001/0000"]
    metadata = json.loads((tmp_path / "generated" / "00001" / "metadata.jsonl").read_text())
    assert metadata["id"] == rows[1]["id"] and metadata["include"][0]["class"] == rows[1]["image"][0].shape


@pytest.mark.slow
def test_selfbench_command_end_to_end_is_what_itm_eval_scores(tmp_path, capsys):
    out = tmp_path / "run"
    assert shapes_cli.main(["selfbench", "--out", str(out), "--n", "1", "--images", "2", "--steps", "3",
                            "--samples", "2", "--table", str(tmp_path / "table-7.5")]) == 0
    result = json.loads((out / "selfbench.json").read_text())
    assert result == json.loads((tmp_path / "table-7.5.json").read_text())  # the name's dot is kept
    assert (tmp_path / "table-7.5.md").read_text() == (out / "selfbench.md").read_text()
    assert list(result["subtasks"]) == list(world.SUBTASKS)
    for row in result["subtasks"].values():
        assert row["prompts"] == 1 and row["generated"] == 2 and row["judge_rendered"] == 1
        assert row["judge_negatives"] == 0 and 0 <= row["correct_images"] <= 2
    assert "| spatial | 1 |" in capsys.readouterr().out
    assert shapes_cli.main(["selfbench", "--out", str(out), "--n", "1"]) == 2  # never over a written set
    for folder, key in (("generated", "full"), ("rendered", "rendered")):
        eval_out = tmp_path / f"eval-{folder}"
        assert cli.main(["eval", "--task", "selfbench", "--data-root", str(out), "--task-option",
                         f"generator={folder}", "--model", MODEL, "--samples", "2", "--out", str(eval_out),
                         "--no-progress"]) == 0
        metrics = json.loads((eval_out / "diffusion" / "results.json").read_text())["metrics"]
        assert metrics["accuracy/macro"] == pytest.approx(result["overall"]["macro"][key])
        assert metrics["accuracy"] == pytest.approx(result["overall"]["micro"][key])
