"""Model families beyond SD 1.x/2.x: SD3's components, its folder round trip, its conditioning as
the SD3 pipeline composes it, and Jeong et al.'s timesteps on its shifted flow-matching grid."""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch

from itm_engine.models import build_random_components, load_components, save_random_model
from itm_engine.models.families import FAMILIES, concat, family_of, select
from itm_engine.noise import NoiseBank
from itm_engine.protocols import PRESETS


@pytest.fixture(scope="module")
def tiny_sd3():
    return build_random_components("tiny-sd3")


def test_tiny_sd3_is_a_flow_model(tiny_sd3):
    assert tiny_sd3.family == "sd3"
    assert isinstance(tiny_sd3.denoiser, diffusers.SD3Transformer2DModel)
    assert tiny_sd3.process.kind == "flow" and tiny_sd3.prediction_type == "flow"
    assert tiny_sd3.latent_shape == (16, 16, 16) and tiny_sd3.image_size == 32
    assert tiny_sd3.latent_shift == pytest.approx(0.0609)
    assert not any(p.requires_grad for net in tiny_sd3.networks for p in net.parameters())


def test_sd3_folder_round_trip(tiny_sd3, tmp_path):
    folder = save_random_model("tiny-sd3", tmp_path / "sd3")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    loaded = load_components(folder)
    assert loaded.family == "sd3" and loaded.process.kind == "flow"
    assert isinstance(loaded.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert loaded.scheduler.config.shift == 3.0
    for name, built in (("denoiser", tiny_sd3.denoiser), ("text_encoder", tiny_sd3.text_encoder)):
        for (key, a), (_, b) in zip(built.state_dict().items(), getattr(loaded, name).state_dict().items()):
            assert torch.equal(a, b), key
    assert torch.equal(loaded.extras["text_encoder_3"].shared.weight, tiny_sd3.extras["text_encoder_3"].shared.weight)


def test_sd3_conditioning_is_the_pipelines_composition(tiny_sd3):
    """context = [CLIP-L (+) CLIP-G penultimate states, zero-padded to T5's width ; T5 states],
    pooled = CLIP-L (+) CLIP-G text embeddings: the SD3 paper's and pipeline's composition, rebuilt
    here from the encoders themselves."""
    texts = ["a red circle", "a small blue square on the left"]
    cond = family_of(tiny_sd3).encode(tiny_sd3, texts)
    clips, pooled = [], []
    for encoder, tokenizer in ((tiny_sd3.text_encoder, tiny_sd3.tokenizer),
                               (tiny_sd3.extras["text_encoder_2"], tiny_sd3.extras["tokenizer_2"])):
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        clips.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    t5_ids = tiny_sd3.extras["tokenizer_3"](texts, padding="max_length", max_length=256, truncation=True,
                                             return_tensors="pt").input_ids
    t5 = tiny_sd3.extras["text_encoder_3"](t5_ids)[0]
    clip = torch.cat(clips, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    torch.testing.assert_close(cond["context"], torch.cat([clip, t5], dim=1))
    torch.testing.assert_close(cond["pooled"], torch.cat(pooled, dim=-1))
    assert cond["context"].shape == (2, 77 + 256, 64)
    shapes = family_of(tiny_sd3).conditioning_shapes(tiny_sd3)
    assert shapes == {name: tuple(value.shape[1:]) for name, value in cond.items()}


def test_conditioning_rows():
    a = {"context": torch.arange(6.0).view(3, 2), "pooled": torch.arange(3.0)}
    b = {"context": torch.full((1, 2), 9.0), "pooled": torch.tensor([7.0])}
    both = concat([a, b])
    assert both["context"].shape == (4, 2) and both["pooled"].tolist() == [0.0, 1.0, 2.0, 7.0]
    picked = select(both, torch.tensor([3, 0]))
    assert picked["context"].tolist() == [[9.0, 9.0], [0.0, 1.0]] and picked["pooled"].tolist() == [7.0, 0.0]


def test_jeong2025_timesteps_are_their_pipelines():
    """Jeong et al.'s `sampled_timesteps` at its defaults (strength 0.6 of 50 inference steps,
    sampling_steps 30) on SD3's training scheduler: scheduler.timesteps[np.arange(20, 980, 33)]
    reversed; its code lists the values 65.97 ... 993.24."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    num_inference_steps, strength, sampling_steps = 50, 0.6, 30
    rate = int(1000 / sampling_steps)
    t_start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    indices = np.arange(t_start, len(scheduler.timesteps) - t_start, rate)
    theirs = scheduler.timesteps[indices].tolist()[::-1]

    from itm_engine.noise import ForwardProcess

    process = ForwardProcess.from_scheduler(scheduler)
    protocol = PRESETS["jeong2025"]
    bank = NoiseBank.for_protocol(protocol, (16, 4, 4), process)
    assert len(bank) == 30 == protocol.samples
    assert bank.timesteps.tolist() == pytest.approx(theirs, abs=0)
    assert bank.timesteps[0].item() == pytest.approx(65.965576171875)
    assert bank.timesteps[-1].item() == pytest.approx(993.2432861328125)
    # the same positions on a DDPM model: its scheduler.timesteps (999 ... 0) at those indices
    ddpm = NoiseBank.sample(30, (4, 2, 2), schedule="jeong2025")
    assert ddpm.timesteps.tolist() == [999 - i for i in indices.tolist()][::-1]


def test_families_are_registered():
    assert set(FAMILIES) >= {"sd", "sd3"}


def test_exact_sd3_architectures_on_meta():
    sd3, sd35 = (build_random_components(arch, device="meta") for arch in ("sd3-medium-arch", "sd35-medium-arch"))
    count = {name: sum(p.numel() for p in c.denoiser.parameters()) for name, c in (("sd3", sd3), ("sd35", sd35))}
    assert sd3.denoiser.device.type == "meta"
    assert count["sd3"] == 2_028_328_000  # the 2B MMDiT of SD3-medium: 24 joint blocks of width 1536
    assert count["sd35"] > count["sd3"]  # MMDiT-X: 13 dual-attention layers and QK norms on the same trunk
    assert len(sd35.denoiser.config.dual_attention_layers) == 13
    for c in (sd3, sd35):
        assert c.latent_shape == (16, 128, 128) and c.image_size == 1024
        assert sum(p.numel() for p in c.text_encoder.parameters()) == 123_650_304  # CLIP-L text + projection


def _images(n: int = 2) -> list:
    import PIL.Image

    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (40, 36 + 4 * k, 3), dtype=np.uint8)) for k in range(n)]


@pytest.mark.parametrize("protocol", ["engine", "jeong2025"])
@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_sd3_engine_equals_its_pipeline_loop(tiny_sd3, protocol, mode):
    """The batched engine (family adapter, fused ops on flow coefficients, structured text cache)
    against the loop that follows StableDiffusion3Pipeline and its scheduler's `scale_noise`, on the
    same draws: I2T and null-normalised T2I, under the engine's protocol and Jeong et al.'s."""
    from itm_engine import reference
    from itm_engine.scoring import DiffusionITM

    from fixtures.helpers import max_rel_diff

    images, texts = _images(), ["a red circle", "a blue square on the left", ""]
    scorer = DiffusionITM(tiny_sd3, protocol=protocol, samples=4)
    engine = scorer(images, texts, mode=mode)
    loop = reference.pipeline_pair_scores(tiny_sd3, images, texts, reference.all_pairs(2, 3), mode=mode,
                                          protocol=scorer.protocol).view(2, 3)
    # T2I scores are differences of errors: compared at the scale of the errors themselves
    scale = scorer(images, texts).abs().max()
    assert max_rel_diff(engine, loop, scale) <= 1e-5
    # one item per (image, distinct text, draw): T2I's null prompt is the caption "" already scored
    assert scorer.last_stats.unet_items == 2 * 3 * len(scorer.noise_bank())


def test_sd_pipeline_loop_equals_the_engine():
    """The same pipeline-following loop on an SD 1.x model (StableDiffusionPipeline.encode_prompt,
    DDPMScheduler.add_noise) agrees with the engine: one oracle for every family."""
    from itm_engine import reference
    from itm_engine.scoring import DiffusionITM

    from fixtures.helpers import max_rel_diff

    components = build_random_components("tiny", prediction_type="v_prediction")
    images, texts = _images(), ["a red circle", "two dogs"]
    scorer = DiffusionITM(components, samples=3)
    scale = scorer(images, texts).abs().max()  # the errors' scale (T2I scores are their differences)
    for mode in ("i2t", "t2i"):
        loop = reference.pipeline_pair_scores(components, images, texts, reference.all_pairs(2, 2), mode=mode,
                                              protocol=scorer.protocol).view(2, 2)
        assert max_rel_diff(scorer(images, texts, mode=mode), loop, scale) <= 1e-5


def test_a_saved_sd3_folder_scores_through_from_pretrained(tiny_sd3, tmp_path):
    from itm_engine.scoring import DiffusionITM

    folder = save_random_model("tiny-sd3", tmp_path / "sd3")
    from_folder = DiffusionITM.from_pretrained(str(folder), samples=2)
    builtin = DiffusionITM.from_pretrained("tiny-sd3", samples=2)
    images, texts = _images(), ["a red circle", "a blue square"]
    assert torch.equal(from_folder(images, texts), builtin(images, texts))


def test_research_loops_refuse_other_families(tiny_sd3):
    from itm_engine import reference

    with pytest.raises(ValueError, match="SD 1.x/2.x models"):
        reference.diffusion_itm_pair_scores(tiny_sd3, _images(1), ["a"], [(0, 0)])
