"""Model families beyond SD 1.x/2.x: SD3's components, its folder round trip, its conditioning as
the SD3 pipeline composes it, and Jeong et al.'s timesteps on its shifted flow-matching grid."""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch

from itm_engine.models import build_random_components, load_components, save_random_model
from itm_engine.models.families import FAMILIES, family_of, select
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
    both = {"context": torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [9.0, 9.0]]),
            "pooled": torch.tensor([0.0, 1.0, 2.0, 7.0])}
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


@pytest.mark.parametrize("resize", ["crop", "stretch"])
@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_sdxl_engine_equals_its_pipeline_loop(mode, resize):
    """SDXL: the engine's per-image time_ids (original size and crop of its resize), pooled bigG
    embeddings and zeroed null prompt, against the loop that follows StableDiffusionXLPipeline
    (its encode_prompt and negative branch, `_get_add_time_ids` from the training script's crop)."""
    from itm_engine import reference
    from itm_engine.scoring import DiffusionITM

    from fixtures.helpers import max_rel_diff

    components = build_random_components("tiny-sdxl")
    images, texts = _images(), ["a red circle", "a blue square on the left"]
    scorer = DiffusionITM(components, samples=3, resize=resize)
    loop = reference.pipeline_pair_scores(components, images, texts, reference.all_pairs(2, 2), mode=mode,
                                          protocol=scorer.protocol).view(2, 2)
    scale = scorer(images, texts).abs().max()
    assert max_rel_diff(scorer(images, texts, mode=mode), loop, scale) <= 1e-5


def test_sdxl_time_ids_carry_the_original_size_and_crop():
    components = build_random_components("tiny-sdxl")
    family = family_of(components)
    sizes = torch.tensor([[40, 36], [30, 90], [32, 32]])  # (height, width)
    crop = family.image_conditioning(components, sizes, "crop")["time_ids"]
    # 40 x 36: width to 32, height int(32 * 40 / 36) = 35, top round(1.5) = 2; 30 x 90: width 96, left 32
    assert crop.tolist() == [[40, 36, 2, 0, 32, 32], [30, 90, 0, 32, 32, 32], [32, 32, 0, 0, 32, 32]]
    stretch = family.image_conditioning(components, sizes, "stretch")["time_ids"]
    assert stretch[:, 2:4].abs().sum() == 0 and stretch[:, :2].tolist() == sizes.tolist()
    cond = family.encode(components, ["", "a cat"])
    assert cond["context"][0].abs().sum() == 0 and cond["text_embeds"][0].abs().sum() == 0
    assert cond["context"][1].abs().sum() > 0


def test_sdxl_folder_round_trip_and_exact_architecture(tmp_path):
    folder = save_random_model("tiny-sdxl", tmp_path / "sdxl")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    loaded = load_components(folder)
    assert loaded.family == "sdxl" and set(loaded.extras) == {"text_encoder_2", "tokenizer_2"}
    exact = build_random_components("sdxl-arch", device="meta")
    assert sum(p.numel() for p in exact.denoiser.parameters()) == 2_567_463_684  # SDXL-base's 2.6B UNet
    assert exact.image_size == 1024 and exact.scaling_factor == 0.13025


@pytest.fixture(scope="module")
def tiny_pixart():
    return build_random_components("tiny-pixart")


def test_tiny_pixart_is_a_learned_sigma_ddpm_model(tiny_pixart):
    assert tiny_pixart.family == "pixart"
    assert isinstance(tiny_pixart.denoiser, diffusers.PixArtTransformer2DModel)
    assert tiny_pixart.denoiser.config.out_channels == 8  # [eps ; variance] of 4 latent channels
    assert tiny_pixart.latent_shape == (4, 16, 16) and tiny_pixart.image_size == 32
    assert tiny_pixart.process.kind == "epsilon" and tiny_pixart.scaling_factor == 0.13025
    betas = tiny_pixart.scheduler.betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02) and len(betas) == 1000
    assert tiny_pixart.tokenizer.pad_token_id == 0  # T5's pad id
    assert not any(p.requires_grad for net in tiny_pixart.networks for p in net.parameters())


def test_pixart_folder_round_trip_and_released_folders(tiny_pixart, tmp_path):
    """A saved tiny-pixart folder loads back as the same model; a folder as released (a
    PixArtAlphaPipeline index, a DPMSolver inference scheduler) loads as PixArt-Alpha with the
    DDPM training schedule, conditioned as PixArtAlphaPipeline's encode_prompt at its defaults."""
    folder = save_random_model("tiny-pixart", tmp_path / "pixart")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert all((folder / name).is_dir() for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"))
    loaded = load_components(folder)
    assert loaded.family == "pixart" and isinstance(loaded.scheduler, diffusers.DDPMScheduler)
    for name in ("denoiser", "text_encoder", "vae"):
        built, back = getattr(tiny_pixart, name).state_dict(), getattr(loaded, name).state_dict()
        assert built.keys() == back.keys() and all(torch.equal(built[k], back[k]) for k in built), name

    diffusers.DPMSolverMultistepScheduler().save_pretrained(folder / "scheduler")  # as the released folders
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    alpha = load_components(folder)
    assert alpha.family == "pixart-alpha" and isinstance(alpha.scheduler, diffusers.DDPMScheduler)
    assert torch.equal(alpha.scheduler.alphas_cumprod, tiny_pixart.scheduler.alphas_cumprod)
    assert alpha.prediction_type == "epsilon"
    texts = ["A red circle", ""]
    cond = family_of(alpha).encode(alpha, texts)
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=alpha.tokenizer, text_encoder=alpha.text_encoder, vae=alpha.vae,
                                         transformer=alpha.denoiser, scheduler=alpha.scheduler)
    context, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, clean_caption=False)
    assert cond["context"].shape == (2, 120, 64)
    assert torch.equal(cond["context"], context) and torch.equal(cond["mask"], mask)


def test_pixart_conditioning_is_t5_states_and_mask(tiny_pixart):
    """context = T5's last hidden state over the lowercased caption padded to 300 tokens, with its
    attention mask (Long) passed to T5 and kept for the transformer; the null conditioning is the
    pipeline's negative prompt "" with its mask."""
    from itm_engine.models.families import to_device

    family = family_of(tiny_pixart)
    texts = ["A Red circle ", "a small blue square on the left"]
    cond = family.encode(tiny_pixart, texts)
    tokens = tiny_pixart.tokenizer([t.lower().strip() for t in texts], padding="max_length", max_length=300,
                                   truncation=True, return_tensors="pt")
    states = tiny_pixart.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    torch.testing.assert_close(cond["context"], states)
    assert cond["mask"].dtype == torch.long and torch.equal(cond["mask"], tokens.attention_mask)
    assert cond["mask"].sum(1).tolist() == [5, 9]  # bos, the words, eos
    pipe = family.pipeline(tiny_pixart)
    _, _, negative, negative_mask = pipe.encode_prompt("a", negative_prompt="", clean_caption=False)
    null = family.encode(tiny_pixart, [""])
    torch.testing.assert_close(null["context"], negative)
    assert torch.equal(null["mask"], negative_mask) and null["mask"].sum() == 2
    shapes = family.conditioning_shapes(tiny_pixart)
    assert shapes == {"context": (300, 64), "mask": (300,)}
    assert shapes == {name: tuple(value.shape[1:]) for name, value in cond.items()}
    example = family.example_conditioning(tiny_pixart, 3)
    assert example["mask"].dtype == torch.long and bool((example["mask"] == 1).all())
    assert to_device(cond, "cpu", torch.bfloat16)["mask"].dtype == torch.long  # a mask is never cast


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_pixart_engine_equals_its_pipeline_loop(tiny_pixart, mode):
    """The engine (family adapter: masked T5 conditioning, eps half of the output) against the loop
    that follows PixArtSigmaPipeline (its encode_prompt with the mask and negative prompt, the
    transformer called as it calls it, the learned-sigma split, DDPMScheduler.add_noise)."""
    from itm_engine import reference
    from itm_engine.scoring import DiffusionITM

    from fixtures.helpers import max_rel_diff

    images, texts = _images(), ["a red circle", "a blue square on the left", ""]
    scorer = DiffusionITM(tiny_pixart, samples=4)
    loop = reference.pipeline_pair_scores(tiny_pixart, images, texts, reference.all_pairs(2, 3), mode=mode,
                                          protocol=scorer.protocol).view(2, 3)
    scale = scorer(images, texts).abs().max()  # the errors' scale (T2I scores are their differences)
    assert max_rel_diff(scorer(images, texts, mode=mode), loop, scale) <= 1e-5
    assert scorer.last_stats.unet_items == 2 * 3 * len(scorer.noise_bank())


def test_pixart_scores_read_only_the_eps_half(tiny_pixart):
    """The transformer's second half of channels (the learned variance) changes no score, in the
    engine or the pipeline loop; its first half (eps) does."""
    from transformers.modeling_outputs import ModelOutput

    from itm_engine import reference
    from itm_engine.scoring import DiffusionITM

    images, texts = _images(), ["a red circle", "two dogs"]

    def scores() -> list[torch.Tensor]:
        scorer = DiffusionITM(tiny_pixart, samples=2)
        loop = reference.pipeline_pair_scores(tiny_pixart, images, texts, reference.all_pairs(2, 2), mode="t2i",
                                              protocol=scorer.protocol).view(2, 2)
        return [scorer(images, texts), scorer(images, texts, mode="t2i"), loop]

    def shifted(half: int):
        def hook(module, args, kwargs, output: ModelOutput) -> ModelOutput:
            sample = output.sample.clone()
            sample[:, 4 * half : 4 * (half + 1)] += torch.linspace(-3, 3, sample[0, :4].numel()).view(4, 16, 16)
            return type(output)(sample=sample)
        return tiny_pixart.denoiser.register_forward_hook(hook, with_kwargs=True)

    plain = scores()
    handle = shifted(1)
    try:
        variance_changed = scores()
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain, variance_changed))
    handle = shifted(0)
    try:
        eps_changed = scores()
    finally:
        handle.remove()
    assert not any(torch.allclose(a, b) for a, b in zip(plain, eps_changed))


def test_pixart_alpha_micro_conditions_equal_its_pipelines(tiny_pixart):
    """A transformer with `use_additional_conditions` (PixArt-Alpha at 1024 px) gets the image's
    resolution and aspect ratio as the Alpha pipeline passes them: engine == pipeline loop."""
    import dataclasses

    from itm_engine import reference
    from itm_engine.scoring import DiffusionITM

    from fixtures.helpers import max_rel_diff

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformer = diffusers.PixArtTransformer2DModel(**{**tiny_pixart.denoiser.config,
                                                            "use_additional_conditions": True}).eval()
    alpha = dataclasses.replace(tiny_pixart, denoiser=transformer, family="pixart-alpha")
    family = family_of(alpha)
    added = family.micro_conditions(alpha, torch.zeros(3, 4, 16, 16))
    assert added["resolution"].tolist() == [[32, 32]] * 3 and added["aspect_ratio"].tolist() == [[1.0]] * 3
    images, texts = _images(), ["a red circle", "a blue square"]
    scorer = DiffusionITM(alpha, samples=2)
    scale = scorer(images, texts).abs().max()
    for mode in ("i2t", "t2i"):
        loop = reference.pipeline_pair_scores(alpha, images, texts, reference.all_pairs(2, 2), mode=mode,
                                              protocol=scorer.protocol).view(2, 2)
        assert max_rel_diff(scorer(images, texts, mode=mode), loop, scale) <= 1e-5


def test_exact_pixart_sigma_architecture_on_meta():
    components = build_random_components("pixart-sigma-arch", device="meta")
    assert components.denoiser.device.type == "meta" and components.family == "pixart"
    # PixArt-Sigma-XL-2's 0.6B transformer (diffusers' count: the null caption embedding is not a parameter)
    assert sum(p.numel() for p in components.denoiser.parameters()) == 610_856_096
    # T5-v1.1-XXL's encoder, 4,762,310,656 parameters, with 49,408 - 32,128 more embedding rows of width 4096
    assert sum(p.numel() for p in components.text_encoder.parameters()) == 4_762_310_656 + 17_280 * 4096
    assert components.latent_shape == (4, 128, 128) and components.image_size == 1024
    assert components.scaling_factor == 0.13025 and not components.denoiser.use_additional_conditions
    assert family_of(components).conditioning_shapes(components) == {"context": (300, 4096), "mask": (300,)}


@pytest.fixture(scope="module")
def tiny_flux():
    return build_random_components("tiny-flux")


@pytest.fixture(scope="module")
def flux_dev_meta():
    return build_random_components("flux-dev-arch", device="meta")


def test_tiny_flux_builds_and_round_trips_through_a_folder(tiny_flux, tmp_path):
    assert tiny_flux.family == "flux" and isinstance(tiny_flux.denoiser, diffusers.FluxTransformer2DModel)
    assert tiny_flux.denoiser.config.in_channels == 64 and tiny_flux.denoiser.config.guidance_embeds
    assert tiny_flux.latent_shape == (16, 16, 16) and tiny_flux.image_size == 32
    assert tiny_flux.scaling_factor == pytest.approx(0.3611) and tiny_flux.latent_shift == pytest.approx(0.1159)
    assert tiny_flux.process.kind == "flow" and tiny_flux.prediction_type == "flow"
    assert not any(p.requires_grad for net in tiny_flux.networks for p in net.parameters())
    folder = save_random_model("tiny-flux", tmp_path / "flux")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    loaded = load_components(folder)
    assert loaded.family == "flux" and set(loaded.extras) == {"text_encoder_2", "tokenizer_2"}
    assert isinstance(loaded.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert loaded.scheduler.config.use_dynamic_shifting and torch.equal(loaded.process.grid, tiny_flux.process.grid)
    for built, back in ((tiny_flux.denoiser, loaded.denoiser), (tiny_flux.text_encoder, loaded.text_encoder),
                        (tiny_flux.extras["text_encoder_2"], loaded.extras["text_encoder_2"]),
                        (tiny_flux.vae, loaded.vae)):
        a, b = built.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), type(built).__name__


def test_flux_conditioning_is_t5_states_and_clip_pooled(tiny_flux):
    """context = T5's last hidden state over the caption padded to 512 tokens, pooled = CLIP-L's
    pooled output (its end-of-text token's state): FluxPipeline's composition, rebuilt here from the
    encoders themselves."""
    texts = ["a red circle", "a small blue square on the left"]
    family = family_of(tiny_flux)
    cond = family.encode(tiny_flux, texts)
    clip_ids = tiny_flux.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
    t5_ids = tiny_flux.extras["tokenizer_2"](texts, padding="max_length", max_length=512, truncation=True,
                                             return_tensors="pt").input_ids
    torch.testing.assert_close(cond["pooled"], tiny_flux.text_encoder(clip_ids).pooler_output)
    torch.testing.assert_close(cond["context"], tiny_flux.extras["text_encoder_2"](t5_ids)[0])
    assert cond["context"].shape == (2, 512, 64) and cond["pooled"].shape == (2, 32)
    assert family.conditioning_shapes(tiny_flux) == {name: tuple(value.shape[1:]) for name, value in cond.items()}


def test_flux_denoise_packs_and_unpacks_as_the_pipeline(tiny_flux):
    """Through a transformer that returns its input, `denoise` is the identity (pack then unpack);
    it passes the pipeline's arguments: 2x2 patches packed into channels, image ids (0, row, col),
    zero text ids, timestep T sigma / 1000 and the guidance value [B]."""
    from types import SimpleNamespace

    seen = {}

    def echo(hidden_states, **kwargs):
        seen.update(kwargs, hidden_states=hidden_states)
        return SimpleNamespace(sample=hidden_states)

    family = family_of(tiny_flux)
    x_t = torch.randn(3, 16, 6, 8)
    cond = family.example_conditioning(tiny_flux, 3)
    out = family.denoise(tiny_flux, x_t, torch.tensor([500.0, 20.0, 1000.0], dtype=torch.float64), cond,
                         forward=echo, guidance=3.5)
    assert torch.equal(out, x_t)
    packed = seen["hidden_states"]
    assert packed.shape == (3, 12, 64) and torch.equal(packed[0, 1, :4], x_t[0, 0, :2, 2:4].flatten())
    assert torch.equal(packed.flatten(1).sort().values, x_t.flatten(1).sort().values)  # a permutation: same errors
    assert seen["img_ids"].tolist() == [[0, r, c] for r in range(3) for c in range(4)]
    assert seen["txt_ids"].shape == (512, 3) and not seen["txt_ids"].any()
    assert seen["timestep"].dtype == x_t.dtype and seen["timestep"].tolist() == pytest.approx([0.5, 0.02, 1.0])
    assert seen["guidance"].tolist() == [3.5] * 3


def test_flux_dev_grid_is_its_pipelines_shift_at_the_native_resolution(tiny_flux, flux_dev_meta):
    """FLUX.1-dev's scheduler shifts sigmas by the image's token count (use_dynamic_shifting): the
    grid is `set_timesteps(sigmas, mu=calculate_shift(tokens, ...))` as FluxPipeline calls it for
    1000 steps, and the exponential time shift e^mu / (e^mu + 1 / sigma - 1) written out, at the
    native latents' tokens (64 for tiny-flux's 16x16, 4096 for 1024 px); schnell's is unshifted."""
    import copy
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from itm_engine.noise import ForwardProcess

    for components, tokens in ((tiny_flux, 64), (flux_dev_meta, 4096)):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        scheduler = copy.deepcopy(components.scheduler)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=mu)
        grid = components.process.grid
        assert torch.equal(grid, scheduler.timesteps.double().flip(0))
        sigma = torch.arange(1, 1001, dtype=torch.float64) / 1000
        torch.testing.assert_close(grid, 1000 * math.exp(mu) / (math.exp(mu) + 1 / sigma - 1), rtol=1e-6, atol=0)
    assert calculate_shift(4096, 256, 4096, 0.5, 1.15) == pytest.approx(1.15)  # 1024 px: the maximal shift
    assert flux_dev_meta.process.grid[0].item() == pytest.approx(3.1514, abs=1e-4)
    schnell = build_random_components("flux-schnell-arch", device="meta")
    assert schnell.process.grid.tolist() == pytest.approx(list(range(1, 1001)), rel=1e-6)  # float32 T sigma
    with pytest.raises(ValueError, match="image_seq_len"):
        ForwardProcess.from_scheduler(tiny_flux.scheduler)


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_flux_engine_equals_its_pipeline_loop_at_each_guidance(tiny_flux, mode):
    """The engine (family adapter, fused ops on the shifted flow grid) against the loop that follows
    FluxPipeline (encode_prompt, _pack_latents, _prepare_latent_image_ids, the shifted scheduler's
    scale_noise, the guided transformer call, _unpack_latents), at two guidance values of the
    protocol, which give FLUX.1-dev different scores."""
    from itm_engine import reference
    from itm_engine.scoring import DiffusionITM

    from fixtures.helpers import max_rel_diff

    images, texts = _images(), ["a red circle", "a blue square on the left", ""]
    scores = {}
    for guidance in (1.0, 3.5):
        scorer = DiffusionITM(tiny_flux, samples=3, guidance=guidance)
        assert scorer.protocol.guidance == guidance
        scores[guidance] = scorer(images, texts, mode=mode)
        loop = reference.pipeline_pair_scores(tiny_flux, images, texts, reference.all_pairs(2, 3), mode=mode,
                                              protocol=scorer.protocol).view(2, 3)
        scale = scorer(images, texts).abs().max()  # the errors' scale (T2I scores are their differences)
        assert max_rel_diff(scores[guidance], loop, scale) <= 1e-5
    assert (scores[1.0] - scores[3.5]).abs().max() > 1e-5


def test_flux_without_guidance_embeddings_ignores_the_guidance(tiny_flux):
    """FLUX.1-schnell's transformer has no guidance input: the protocol's guidance changes nothing,
    and engine and pipeline loop agree (guidance None)."""
    import dataclasses

    from itm_engine import reference
    from itm_engine.models.architectures import architecture_configs
    from itm_engine.models.components import frozen
    from itm_engine.scoring import DiffusionITM

    from fixtures.helpers import max_rel_diff

    config = dict(architecture_configs("tiny-flux")["transformer"], guidance_embeds=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        schnell = frozen(dataclasses.replace(tiny_flux, denoiser=diffusers.FluxTransformer2DModel(**config)), "cpu",
                         torch.float32)
    images, texts = _images(), ["a red circle", "a blue square"]
    scorers = [DiffusionITM(schnell, samples=2, guidance=g) for g in (1.0, 3.5)]
    one, other = (scorer(images, texts) for scorer in scorers)
    assert torch.equal(one, other)
    loop = reference.pipeline_pair_scores(schnell, images, texts, reference.all_pairs(2, 2),
                                          protocol=scorers[1].protocol).view(2, 2)
    assert max_rel_diff(one, loop) <= 1e-5


def test_exact_flux_architectures_on_meta(flux_dev_meta):
    schnell = build_random_components("flux-schnell-arch", device="meta")
    count = {name: sum(p.numel() for p in c.denoiser.parameters()) for name, c in (("dev", flux_dev_meta),
                                                                                  ("schnell", schnell))}
    assert count["dev"] == 11_901_408_320  # FLUX.1-dev's 11.9B transformer: 19 double + 38 single blocks
    assert count["dev"] - count["schnell"] == 10_229_760  # schnell lacks the guidance embedder (256 -> 3072 -> 3072)
    config = flux_dev_meta.denoiser.config
    assert (config.num_attention_heads, config.attention_head_dim) == (24, 128)
    assert tuple(config.axes_dims_rope) == (16, 56, 56) and config.in_channels == 64
    assert config.guidance_embeds and not schnell.denoiser.config.guidance_embeds
    assert flux_dev_meta.latent_shape == (16, 128, 128) and flux_dev_meta.image_size == 1024
    assert flux_dev_meta.scaling_factor == 0.3611 and flux_dev_meta.latent_shift == 0.1159
    assert sum(p.numel() for p in flux_dev_meta.text_encoder.parameters()) == 123_060_480  # CLIP-L's text tower
    t5 = flux_dev_meta.extras["text_encoder_2"]
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656 + 17_280 * 4096  # T5-XXL, CLIP's vocabulary
    family = family_of(flux_dev_meta)
    assert family.conditioning_shapes(flux_dev_meta) == {"context": (512, 4096), "pooled": (768,)}
    assert not schnell.scheduler.config.use_dynamic_shifting and schnell.scheduler.config.shift == 1.0
