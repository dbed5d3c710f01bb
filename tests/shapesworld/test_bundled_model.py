"""The bundled ShapesWorld model gets right answers: the end-to-end correctness tests of the engine.

Held-out test split, a fixed subset (N examples per subtask), 10 stratified noise draws per pair,
seed 0. A broken latent or text cache, batching, kernel or noise sharing drops these to chance.
Thresholds: image->text recognition >= 95%, binding >= 90%, spatial >= 75%; text->image
recognition >= 90%; on the `complexity` subtask, null-normalised text->image beats text->image by
raw error (the paper's modality asymmetry) by at least 10 points. The same scenes drawn by the
varied renderer (`world.Style`: background grey, colour shades, object sizes, anti-aliased edges):
image->text shape recognition >= 90%, and no subtask more than 5 points (two examples) below the
exact renderer's: the model recognises shapes, not one renderer's pixels.
"""
from __future__ import annotations

import pytest

from itm_engine.clip import ClipModel
from itm_engine.models.registry import model_folder
from itm_engine.scoring import DiffusionITM
from itm_engine.shapesworld import ASSETS, CLIP, MODEL, report, world

N = 40
BINDING = ("binding_color_shape", "binding_shape_color", "pair_binding_color", "pair_binding_size")


@pytest.fixture(scope="module")
def scorer() -> DiffusionITM:
    return DiffusionITM.from_pretrained(MODEL, progress=False, protocol=report.lab_protocol())


@pytest.fixture(scope="module")
def held_out() -> world.Draw:
    """The fixed subset: N examples of each subtask of the test split, seed 0."""
    return world.Draw("test", N, seed=0)


@pytest.fixture(scope="module")
def i2t(scorer) -> dict[str, float]:
    # the first seven subtasks of `held_out`: a Draw of them alone draws the same examples
    return report.accuracy(scorer, world.Draw("test", N, seed=0, subtasks=world.SUBTASKS), "i2t")


@pytest.fixture(scope="module")
def i2t_varied(scorer) -> dict[str, float]:
    return report.accuracy(scorer, world.Draw("test", N, seed=0, subtasks=world.SUBTASKS, style="varied"), "i2t")


def test_bundled_model_is_a_small_diffusers_folder(scorer):
    folder = model_folder(MODEL)
    assert folder == ASSETS / MODEL
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert not list(folder.rglob("*.bin")) and len(list(folder.rglob("*.safetensors"))) == 3
    assert (folder / "README.md").is_file() and (folder / "training.json").is_file()
    assert scorer.components.source == "builtin:shapes" and scorer.components.latent_shape == (8, 8, 8)
    assert DiffusionITM.from_pretrained(folder).components.source == str(folder)  # and from its path


@pytest.mark.slow
def test_image_to_text_recognition(i2t):
    assert i2t["recognition_color"] >= 0.95 and i2t["recognition_shape"] >= 0.95, i2t


@pytest.mark.slow
def test_image_to_text_binding(i2t):
    assert all(i2t[s] >= 0.90 for s in BINDING), i2t


@pytest.mark.slow
def test_image_to_text_spatial(i2t):
    assert i2t["spatial"] >= 0.75, i2t


@pytest.mark.slow
def test_text_to_image_recognition(scorer):
    # the first two subtasks of `held_out`: a Draw of them alone draws the same examples
    recognition = world.Draw("test", N, seed=0, subtasks=("recognition_color", "recognition_shape"))
    t2i = report.accuracy(scorer, recognition, "t2i")
    assert all(v >= 0.90 for v in t2i.values()), t2i


@pytest.mark.slow
def test_null_normalisation_removes_the_complexity_bias(scorer, held_out):
    # the complexity examples of the whole draw (a Draw of that subtask alone would draw others)
    only = (world.COMPLEXITY,)
    raw = report.accuracy(scorer, held_out, "t2i-raw", subtasks=only)[world.COMPLEXITY]
    normalised = report.accuracy(scorer, held_out, "t2i", subtasks=only)[world.COMPLEXITY]
    assert normalised >= 0.9 and normalised >= raw + 0.1, (raw, normalised)


def test_bundled_clip_is_trained():
    clip = ClipModel.from_name(CLIP, pretrained="bundled").scorer()
    draw = world.Draw("test", 20, seed=1, subtasks=("recognition_color",))
    assert report.accuracy(clip, draw, "i2t")["recognition_color"] >= 0.8


@pytest.mark.slow
def test_image_to_text_survives_another_renderer(i2t, i2t_varied):
    assert i2t_varied["recognition_shape"] >= 0.90, i2t_varied
    assert all(i2t_varied[s] >= i2t[s] - 0.05 for s in world.SUBTASKS), (i2t, i2t_varied)
