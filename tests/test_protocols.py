"""Scoring protocols: each preset reproduces its research code's literal loop, and each convention
(error, timesteps, noise sharing, latent, image preparation, ties) is what that code does, checked
against a re-implementation written from that code (McGill-NLP/diffusion-itm with its diffusers
fork; diffusion-classifier/diffusion-classifier's eval_prob_adaptive.py)."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms as T

from itm_engine import DiffusionITM, protocols
from itm_engine.cache import load_rgb, preprocess_images
from itm_engine.evaluate import main as eval_main
from itm_engine.metrics import is_correct, ranks
from itm_engine.models import build_random_components
from itm_engine.noise import NoiseBank, draw_timesteps
from itm_engine.protocols import PRESETS, Protocol
from itm_engine.reference import all_pairs, diffusion_classifier_pair_scores, diffusion_itm_pair_scores

from fixtures import datasets
from fixtures.helpers import make_images, max_rel_diff

TEXTS = ["a red box", "a blue circle on noise", ""]


@pytest.fixture(scope="module")
def images() -> list[PIL.Image.Image]:
    rgba = PIL.Image.new("RGBA", (36, 20), (200, 30, 30, 90))  # transparency: composite vs convert differ
    return [*make_images(2, size=(40, 24)), rgba]


@pytest.fixture(scope="module")
def components():
    return build_random_components("tiny", seed=1)


def scorer_for(components, protocol, **overrides) -> DiffusionITM:
    return DiffusionITM(components, protocol=protocol, progress=False, **overrides)


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
@pytest.mark.parametrize("preset, loop", [("diffusion-itm", diffusion_itm_pair_scores),
                                          ("diffusion-classifier", diffusion_classifier_pair_scores),
                                          ("engine", diffusion_itm_pair_scores)])
def test_each_preset_equals_its_literal_research_loop(components, images, preset, loop, mode):
    scorer = scorer_for(components, preset, samples=3)
    pairs = all_pairs(len(images), len(TEXTS))
    engine = scorer.score_pairs(images, TEXTS, pairs, mode)
    literal = loop(components, images, TEXTS, pairs, None, mode, scorer.protocol)
    scale = loop(components, images, TEXTS, pairs, None, "i2t", scorer.protocol).abs().max()
    assert max_rel_diff(engine, literal, scale) <= 1e-5


def test_the_research_noise_table_passed_in(components, images):
    """The research code draws one table, torch.randn(1000, 4, 64, 64), and uses row k at the k-th
    timestep of range(10, 990, 1000 // S) for every example: passed in as a bank, the engine
    and the literal loop score on exactly those draws."""
    table = torch.randn(1000, *components.latent_shape, generator=torch.Generator().manual_seed(0))
    timesteps = draw_timesteps("diffusion-itm", 4)
    bank = NoiseBank.from_tensors(timesteps, table[: len(timesteps)])
    scorer = scorer_for(components, "diffusion-itm")
    pairs = all_pairs(len(images), len(TEXTS))
    for mode in ("i2t", "t2i"):
        engine = scorer.score_pairs(images, TEXTS, pairs, mode, noise=bank)
        literal = diffusion_itm_pair_scores(components, images, TEXTS, pairs, bank, mode, "diffusion-itm")
        assert max_rel_diff(engine, literal, literal.abs().max() if mode == "i2t" else 1.0) <= 1e-5
    assert timesteps.tolist() == [10, 260, 510, 760]


@pytest.mark.parametrize("error", ["mse", "l2", "l1", "huber"])
def test_every_error_reduction_equals_the_literal_loop(components, images, error):
    scorer = scorer_for(components, "engine", samples=2, error=error)
    pairs = all_pairs(len(images), len(TEXTS))
    engine = scorer.score_pairs(images, TEXTS, pairs, "t2i")
    literal = diffusion_classifier_pair_scores(components, images, TEXTS, pairs, None, "t2i", scorer.protocol)
    assert max_rel_diff(engine, literal, 1.0) <= 1e-5
    fused = error in ("mse", "l2")
    assert (scorer.last_stats.kernels["item_error"] == f"reference ({error})") is not fused


def test_l2_is_the_norm_of_the_flattened_error_and_mse_its_mean_square(components, images):
    """||eps - pred||_2 over the flattened latent (torch.norm, as the research code) = sqrt(numel * mse)."""
    bank = NoiseBank.sample(2, components.latent_shape, seed=3)
    mse = scorer_for(components, "engine", error="mse").draw_scores(images, TEXTS, [(0, 0)], noise=bank)
    l2 = scorer_for(components, "engine", error="l2").draw_scores(images, TEXTS, [(0, 0)], noise=bank)
    numel = np.prod(components.latent_shape)
    torch.testing.assert_close(l2, -((-mse) * numel).sqrt(), rtol=1e-6, atol=0)


def test_schedules_are_the_research_codes_formulas():
    assert draw_timesteps("diffusion-itm", 10).tolist() == list(range(10, 990, 100))  # 10, 110, ..., 910
    assert len(draw_timesteps("diffusion-itm", 50)) == 49  # the research code's count, not S
    for s in (1, 3, 6, 7, 10, 11, 50):  # Diffusion Classifier: start = T // S // 2; range(start, T, T // S)[:S]
        assert draw_timesteps("stratified", s).tolist() == list(range(1000 // s // 2, 1000, 1000 // s))[:s]
    assert draw_timesteps("stratified", 3).tolist() == [166, 499, 832]
    scorer = DiffusionITM.from_pretrained("tiny", protocol="diffusion-itm", samples=10)
    assert scorer.noise_bank().timesteps.tolist() == list(range(10, 990, 100))  # follows the protocol


def test_research_pixels(components, images, tmp_path):
    """DiffusionITM: PIL `.convert("RGB").resize((512, 512))` (Pillow's default bicubic, a stretch)
    then 2x - 1; Diffusion Classifier: torchvision Resize(bicubic) + CenterCrop, RGB, ToTensor,
    Normalize(0.5, 0.5). Both written here from their code, against the engine's preparation."""
    size = components.image_size
    for image in images:
        rgb = image.convert("RGB")
        itm = np.asarray(rgb.resize((size, size)), dtype=np.float32) / 255.0
        expected = torch.from_numpy(itm).permute(2, 0, 1) * 2 - 1
        itm_protocol = PRESETS["diffusion-itm"]
        loaded = load_rgb(image, transparency=itm_protocol.transparency)
        ours = preprocess_images(components, [loaded], itm_protocol.resize, itm_protocol.interpolation)[0]
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        dc = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                        lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize([0.5], [0.5])])
        dc_protocol = PRESETS["diffusion-classifier"]
        loaded = load_rgb(image, transparency=dc_protocol.transparency)
        ours = preprocess_images(components, [loaded], dc_protocol.resize, dc_protocol.interpolation)[0]
        torch.testing.assert_close(ours, dc(image), rtol=0, atol=1e-6)


def test_transparency_composite_or_convert(components, images):
    rgba = images[-1]
    white = scorer_for(components, "engine", samples=1)
    plain = scorer_for(components, "engine", samples=1, transparency="convert")
    assert not torch.equal(white([rgba], ["x"]), plain([rgba], ["x"]))
    assert torch.equal(plain([rgba], ["x"]), plain([rgba.convert("RGB")], ["x"]))


def test_per_query_noise_is_the_querys_own_whatever_else_is_scored(components, images):
    """Diffusion Classifier: fresh draws per query (here: from the seed and the query's content),
    shared by its candidates; a query's scores do not depend on which other queries share the call."""
    scorer = scorer_for(components, "diffusion-classifier", samples=2)
    alone = scorer(images[:1], TEXTS)
    together = scorer(images, TEXTS)
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-7)
    shared = scorer_for(components, "diffusion-classifier", samples=2, noise="shared")
    assert not torch.allclose(shared(images, TEXTS)[1:], together[1:])
    torch.testing.assert_close(scorer(images, TEXTS, noise="shared"), shared(images, TEXTS))  # the field, per call
    t2i_alone = scorer(images, TEXTS[:1], mode="t2i")
    t2i_together = scorer(images, TEXTS, mode="t2i")
    torch.testing.assert_close(t2i_together[:, :1], t2i_alone, rtol=1e-5, atol=1e-7)


def test_sample_per_draw_latents(components, images):
    mean = scorer_for(components, "engine", samples=3)(images, TEXTS)
    per_draw = scorer_for(components, "engine", samples=3, latent="sample-per-draw")
    first = per_draw(images, TEXTS)
    assert not torch.allclose(first, mean)
    torch.testing.assert_close(per_draw(images[::-1], TEXTS), first.flip(0), rtol=1e-5, atol=1e-7)  # per image
    assert not torch.allclose(per_draw(images, TEXTS, seed=5), first)


def test_adaptive_elimination_refuses_per_query_noise(components, images):
    scorer = scorer_for(components, "diffusion-classifier")
    with pytest.raises(ValueError, match="per-query"):
        scorer.score_adaptive(images[:1], [TEXTS], "1:2,2:1")


def test_protocol_object_api():
    protocol = protocols.resolve("diffusion-itm", samples=20)
    assert protocol.samples == 20 and protocol.error == "l2"
    assert protocol == PRESETS["diffusion-itm"].replace(samples=20)
    assert protocols.resolve(None) == PRESETS[protocols.DEFAULT]
    with pytest.raises(ValueError, match="unknown protocol 'paper'"):
        protocols.resolve("paper")
    with pytest.raises(TypeError, match="unknown protocol field"):
        protocols.resolve("engine", errror="l2")
    with pytest.raises(ValueError, match="error must be one of mse, l2, l1, huber"):
        Protocol(error="l3")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        Protocol(samples=0)
    scorer = DiffusionITM.from_pretrained("tiny", protocol="diffusion-itm", seed=3)
    assert scorer.protocol.seed == 3 and scorer.protocol.error == "l2"
    assert scorer.components.dtype == torch.float32  # the preset's fp16 is for CUDA
    assert DiffusionITM.from_pretrained("tiny", dtype=torch.float64).components.dtype == torch.float64


def test_guidance_field():
    """FLUX.1-dev's guidance value: 1 (the plain conditional prediction) in every preset, any finite
    number (kept as a float), overridable like every field; SD models ignore it."""
    assert all(p.guidance == 1.0 for p in PRESETS.values())
    assert protocols.resolve("engine", guidance=3).guidance == 3.0
    assert isinstance(Protocol(guidance=3).guidance, float) and Protocol(guidance=3) == Protocol(guidance=3.0)
    for bad in (True, "3.5", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance must be a finite number"):
            Protocol(guidance=bad)


def test_tie_policies():
    tied = torch.tensor([2.0, 2.0, 1.0])
    assert not is_correct(tied, 0, "strict") and is_correct(tied, 0, "argmax-first")
    assert not is_correct(tied, 1, "argmax-first")  # an earlier candidate wins the tie
    assert ranks(tied[None], [[0]], "argmax-first").tolist() == [1.0]
    assert ranks(tied[None], [[1]], "argmax-first").tolist() == [2.0]
    assert ranks(tied[None], [[0]], "strict").tolist() == [2.0]


def test_itm_eval_takes_a_preset_and_field_flags_and_records_the_protocol(tmp_path, capsys):
    root = datasets.write_winoground(tmp_path / "data", n=2)
    out = tmp_path / "out"
    args = ["--task", "winoground", "--data-root", str(root), "--out", str(out), "--model", "tiny",
            "--protocol", "diffusion-itm", "--samples", "2", "--error", "l1", "--no-progress"]
    assert eval_main(args) == 0
    results = json.loads((out / "diffusion" / "results.json").read_text())
    assert results["protocol"] == PRESETS["diffusion-itm"].replace(samples=2, error="l1").as_dict()
    assert results["config"]["protocol"] == "diffusion-itm"
    assert eval_main([*args[:-2], "l2", "--resume", "--no-progress"]) == 2
    assert "changed: protocol.error" in capsys.readouterr().err
