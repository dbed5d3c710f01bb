"""Pretraining the ShapesWorld models (`itm-shapes pretrain` / `pretrain-clip`) at toy scale: the
word tokenizer, the caption draw, a full run that saves a loadable diffusers folder, stages, resume
after a crash equal to an uninterrupted run, the command (and its deprecated `itm-train pretrain`
alias), the training objectives, and the tiny CLIP loading through the prefilter."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.training_utils import EMAModel

from itm_engine import cli
from itm_engine.clip import ClipModel
from itm_engine.scoring import DiffusionITM
from itm_engine.shapesworld import cli as shapes_cli
from itm_engine.shapesworld import pretrain, world
from itm_engine.shapesworld.pretrain import PretrainConfig, Pretrainer, draw_captions, word_tokenizer

TOY = dict(scenes=48, vae_steps=3, vae_batch=8, steps=4, batch_size=8, warmup=1, eval_every=0, eval_examples=1,
           eval_samples=1, checkpoint_every=2, unet_channels=(16, 32), text_width=32,
           stages=({"name": "places", "steps": 3, "lr": 5e-4, "hard_negatives": 2, "objects": 1,
                    "grounding_weight": 0.1, "form_weights": {"recognition": 0.1, "position": 1.0}},))


def test_word_tokenizer_round_trips_through_a_folder(tmp_path):
    tok = word_tokenizer()
    ids = tok(["a red circle left of a blue square", "A ZEBRA"], padding="max_length", max_length=16).input_ids
    assert ids[0][0] == tok.bos_token_id and len(ids[0]) == 16
    words = tok.convert_ids_to_tokens(ids[0][1:9])
    assert words == "a red circle left of a blue square".split()
    assert ids[0][9] == tok.eos_token_id and ids[0][10:] == [tok.pad_token_id] * 6
    assert tok.convert_ids_to_tokens(ids[1][1:3]) == ["a", "<unk>"]  # lower-cased; unknown words kept visible
    assert all(w in tok.get_vocab() for w in world.VOCABULARY)
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again("a small red circle").input_ids == tok("a small red circle").input_ids
    assert again.model_max_length == 16


def test_caption_draw_follows_weights_and_dropout():
    scene, _ = world.sample_example(random.Random(1), "spatial", "train")
    forms = world.training_captions(scene)
    config = PretrainConfig(caption_dropout=0.25, form_weights={"binding": 0.0, "pair": 0.0, "spatial": 1.0,
                                                                "position": 0.0})
    drawn = draw_captions(config, [forms] * 2000, random.Random(0))
    assert set(drawn) == {"", *forms["spatial"]}
    assert drawn.count("") / len(drawn) == pytest.approx(0.25, abs=0.03)
    again = draw_captions(config, [forms] * 50, random.Random(3))
    assert draw_captions(config, [forms] * 50, random.Random(3)) == again


def _weights(folder) -> dict[str, torch.Tensor]:
    components = DiffusionITM.from_pretrained(folder).components
    return {f"{name}.{k}": v for name in ("vae", "unet", "text_encoder")
            for k, v in getattr(components, name).state_dict().items()}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    folder = Pretrainer(PretrainConfig(**TOY), out, progress=False).run()
    return out, folder


@pytest.mark.slow
def test_a_run_writes_a_model_the_scorer_loads(toy_run):
    out, folder = toy_run
    scorer = DiffusionITM.from_pretrained(folder)
    comp = scorer.components
    assert comp.latent_shape == (8, 8, 8) and comp.image_size == 32 and comp.prediction_type == "epsilon"
    assert type(comp.unet).__name__ == "CoordUNet2DConditionModel"  # the default recipe feeds x/y coordinates
    image = world.render(world.sample_example(random.Random(0), "spatial", "test")[0])
    scores = scorer([image], ["a red circle left of a blue square", "a red circle"], samples=2)
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()
    # the scaling factor makes the training latents unit-variance
    data = pretrain.training_scenes(PretrainConfig(**TOY), comp)
    from itm_engine.cache import encode_pixels
    assert encode_pixels(comp, data.pixels).std().item() == pytest.approx(1.0, rel=1e-3)
    report = json.loads((out / "training.json").read_text())
    assert report["diffusion"]["steps"] == TOY["steps"] + 3 and report["config"]["scenes"] == TOY["scenes"]
    assert report["seconds"] >= report["vae"]["seconds"] + report["diffusion"]["seconds"]  # the whole run's wall time
    assert set(report["validation"][-1]) == {"step", *world.SUBTASKS}
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"vae", "diffusion"}
    assert [r["name"] for r in rows if r["stage"] == "diffusion"] == ["base", "places"]  # steps 0 and 4 logged


@pytest.mark.slow
def test_stages_take_their_settings_and_scenes(tmp_path, monkeypatch):
    """A later stage draws only from its scenes (`objects`), with its caption odds, ranks its own
    number of items, and starts from the previous stage's averaged weights."""
    config = PretrainConfig(**TOY)
    base, places = config.stage_list()
    assert (base.name, base.steps, base.lr, base.hard_negatives) == ("base", 4, config.lr, 0)
    assert (places.steps, places.lr, places.warmup, places.objects, places.hard_negatives) == (3, 5e-4, 1, 1, 2)
    assert places.rank_weight == config.rank_weight and config.total_steps == 7
    drawn, ranked = [], []
    real_draw, real_rank = pretrain.draw_captions, Pretrainer._ranking_loss
    monkeypatch.setattr(pretrain, "draw_captions", lambda *a: drawn.append(real_draw(*a)) or drawn[-1])
    monkeypatch.setattr(Pretrainer, "_ranking_loss",
                        lambda self, stage, *a: ranked.append(stage.name) or real_rank(self, stage, *a))
    trainer = Pretrainer(config, tmp_path, progress=False)
    averaged = []
    real_copy = EMAModel.copy_to
    monkeypatch.setattr(EMAModel, "copy_to",
                        lambda ema, params: averaged.append(ema.optimization_step) or real_copy(ema, params))
    trainer.run()
    scenes = pretrain.scene_list(48, 0, config.scene_kinds, 64)
    one_object = {c for forms in (world.training_captions(s) for s in scenes)
                  if "recognition" in forms for cs in forms.values() for c in cs}
    assert len(drawn) == 7 and ranked == ["base"] * 4 + ["places"] * 3
    assert all(set(texts) <= one_object | {""} for texts in drawn[4:])  # the places stage: one object only
    assert not all(set(texts) <= one_object | {""} for texts in drawn[:4])
    assert sum(" on the " in c or " at the " in c for texts in drawn[4:] for c in texts) > 8  # places favoured
    assert averaged == [4, 3]  # each stage ends with its own average copied in
    with pytest.raises(ValueError, match="name and steps required"):
        PretrainConfig(stages=({"name": "x", "steps": 3, "momentum": 0.9},)).stage_list()
    with pytest.raises(ValueError, match="objects 0, 1 or 2"):
        PretrainConfig(stages=({"name": "x", "steps": 3, "objects": 3},)).stage_list()


@pytest.mark.slow
def test_a_stage_draws_its_batch_size_and_one_object_share_from_one_object_scenes(tmp_path, monkeypatch):
    """A stage's `batch_size` (later stages: the first stage's unless set) and `one_object_share`:
    that share of each of its batches comes from one-object scenes, the rest from all scenes; other
    stages draw from all scenes alike."""
    config = PretrainConfig(**{**TOY, "stages": ({"name": "mixed", "steps": 3, "one_object_share": 0.5,
                                                  "batch_size": 6},)})
    assert [stage.batch_size for stage in config.stage_list()] == [8, 6]
    assert PretrainConfig(**TOY).stage_list()[1].batch_size == 8
    scenes = []
    real_draw = pretrain.draw_captions
    monkeypatch.setattr(pretrain, "draw_captions",
                        lambda c, forms, *a: scenes.append(list(forms)) or real_draw(c, forms, *a))
    Pretrainer(config, tmp_path, progress=False).run()
    assert [len(batch) for batch in scenes] == [8] * 4 + [6] * 3
    one_object = [["recognition" in forms for forms in batch] for batch in scenes]
    assert all(all(batch[:3]) for batch in one_object[4:])  # the mixed stage: 3 of 6 first
    assert not all(all(batch[3:]) for batch in one_object[4:]) and not all(all(batch[:3]) for batch in one_object[:4])
    with pytest.raises(ValueError, match=r"one_object_share and nearest_shape_share in \[0, 1\]"):
        PretrainConfig(stages=({"name": "x", "steps": 3, "one_object_share": 1.5},)).stage_list()
    with pytest.raises(ValueError, match=r"nearest_shape_share in \[0, 1\]"):
        PretrainConfig(stages=({"name": "x", "steps": 3, "nearest_shape_share": -0.1},)).stage_list()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PretrainConfig(stages=({"name": "x", "steps": 3, "batch_size": 0},)).stage_list()


@pytest.mark.slow
def test_attention_levels_set_which_unet_levels_cross_attend_and_grounding_reads_them(tmp_path):
    """`attention_levels` 1 of 2: the finest level keeps its transformer blocks, the coarser one
    has plain resnet blocks (the middle block always attends); token grounding still finds its maps,
    and the saved model scores through `DiffusionITM` like any other."""
    config = PretrainConfig(**{**TOY, "attention_levels": 1, "stages": ({"name": "ground", "steps": 2,
                                                                          "grounding_weight": 0.1},)})
    unet = pretrain.build_components(config).unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    every = pretrain.build_components(PretrainConfig(**TOY)).unet
    assert sum(p.numel() for p in unet.parameters()) < sum(p.numel() for p in every.parameters())
    trainer = Pretrainer(config, tmp_path, progress=False)
    recorded = []
    real = pretrain.Pretrainer._grounding_loss
    trainer._grounding_loss = lambda stage, texts, idx, data, maps: (
        recorded.append([m.shape[2] for m in maps]) or real(trainer, stage, texts, idx, data, maps))
    folder = trainer.run()
    # map sides (H * W) in call order: the 8x8 down block, the middle block (4x4), the 8x8 up block's two
    assert recorded[-1] == [64, 16, 64, 64]
    scores = DiffusionITM.from_pretrained(folder)([world.render(())], ["a red circle", "a blue square"], samples=2)
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="attention_levels must be >= 0"):
        pretrain.build_components(PretrainConfig(**{**TOY, "attention_levels": -1}))



def test_vae_channels_set_the_vae_level_widths_and_the_saved_model_keeps_them(tmp_path):
    config = PretrainConfig(**{**TOY, "vae_channels": [8, 16, 24], "vae_steps": 2})  # a JSON list: kept a tuple
    assert config.vae_channels == (8, 16, 24)
    vae = pretrain.build_components(config).vae
    assert [block.resnets[0].conv2.out_channels for block in vae.encoder.down_blocks] == [8, 16, 24]
    trainer = Pretrainer(config, tmp_path, progress=False)
    trainer.train_vae(pretrain.training_scenes(config, trainer.components))
    pretrain.save_components(trainer.components, tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "vae" / "config.json").read_text())
    assert saved["block_out_channels"] == [8, 16, 24]
    for bad in ([16, 32], [16, 32, 30], [0, 8, 8]):
        with pytest.raises(ValueError, match="vae_channels takes three widths, each a multiple of 8"):
            PretrainConfig(**{**TOY, "vae_channels": bad})

@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [2, 4, 6])  # in the first stage, at its end, in the second
def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(toy_run, tmp_path, monkeypatch, crash_at):
    _, uninterrupted = toy_run
    real_save = Pretrainer._save_checkpoint

    def crash_after_a_checkpoint(self, *args):
        real_save(self, *args)
        if self.step == crash_at:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Pretrainer, "_save_checkpoint", crash_after_a_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(PretrainConfig(**TOY), tmp_path, progress=False).run()
    monkeypatch.setattr(Pretrainer, "_save_checkpoint", real_save)
    with pytest.raises(FileExistsError, match="--resume"):
        Pretrainer(PretrainConfig(**TOY), tmp_path, progress=False).run()
    different = r"--resume with a different configuration than .*checkpoint.pt \(changed: lr\)"
    with pytest.raises(ValueError, match=different):
        Pretrainer(PretrainConfig(**{**TOY, "lr": 0.5}), tmp_path, progress=False).run(resume=True)
    if crash_at == 4:  # a checkpoint of a recipe from before flow_shift existed: that run used its default
        state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        state["config"] = json.dumps({k: v for k, v in json.loads(state["config"]).items() if k != "flow_shift"})
        torch.save(state, tmp_path / "checkpoint.pt")
    resumed = Pretrainer(PretrainConfig(**TOY), tmp_path, progress=False).run(resume=True)
    a, b = _weights(uninterrupted), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_cli_reports_bad_resume(tmp_path, capsys):
    assert shapes_cli.main(["pretrain", "--out", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert shapes_cli.main(["pretrain", "--out", str(tmp_path / "x"), "--stages", '[{"name": "x"}]']) == 2
    assert "name and steps required" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_second_pretraining_run_on_one_folder_is_refused(tmp_path, capsys):
    from itm_engine import storage

    with storage.folder_lock(tmp_path / "run", "another run"):
        assert shapes_cli.main(["pretrain", "--out", str(tmp_path / "run")]) == 2
    assert "in use by another process (another run" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_itm_train_pretrain_is_a_deprecated_alias_of_itm_shapes_pretrain(tmp_path, capsys):
    """`itm-train pretrain --world shapes ...` (the command before `itm-shapes`) still runs
    `itm-shapes pretrain ...`, after a deprecation message; so does `pretrain-clip`."""
    assert cli.train_command(["pretrain", "--world", "shapes", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "itm-train pretrain is deprecated" in err and "itm-shapes pretrain" in err and "no checkpoint" in err
    assert cli.main(["train", "pretrain", "--world=shapes", "--out", str(tmp_path / "x"),
                     "--stages", '[{"name": "x"}]']) == 2
    err = capsys.readouterr().err
    assert "deprecated" in err and "name and steps required" in err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # an unknown option: argparse's error, after the message
        cli.train_command(["pretrain-clip", "--world", "shapes", "--no-such-option"])
    assert "itm-train pretrain-clip is deprecated" in capsys.readouterr().err


def test_tiny_clip_trains_and_loads_through_the_prefilter(tmp_path):
    from itm_engine.shapesworld.pretrain_clip import CLIP_NAME, ClipPretrainConfig, train_clip

    weights = train_clip(ClipPretrainConfig(scenes=64, steps=3, batch_size=16), tmp_path, progress=False)
    clip = ClipModel.from_name(CLIP_NAME, pretrained=weights, model_config=tmp_path / f"{CLIP_NAME}.json")
    saved = __import__("safetensors.torch").torch.load_file(weights)
    state = clip.model.state_dict()
    assert set(saved) == set(state)
    torch.testing.assert_close(state["text_projection"], saved["text_projection"].float())
    image = world.render(world.sample_example(random.Random(0), "spatial", "test")[0])
    scores = clip.scorer()([image], ["a red circle", "a blue square left of a green cross"])
    assert scores.shape == (1, 2) and scores.abs().max() <= 1.0 + 1e-5


def test_ranking_term_takes_the_first_eligible_items_and_compares_their_errors_under_the_hard_negative(tmp_path):
    """The hard-negative term: up to `hard_negatives` items whose caption has a negative, position
    captions first, are denoised again (same noisy latent and step) under it, and the term is
    T * softplus((e_true - e_neg) / T); a batched prediction of both equals separate calls."""
    config = PretrainConfig(**{**TOY, "hard_negatives": 2, "rank_temperature": 0.05})
    trainer = Pretrainer(config, tmp_path, progress=False)
    comp, stage = trainer.components, config.stage_list()[0]
    texts = ["a red circle and a blue square", "a red circle left of a blue square", "",
             "a small red circle on the left", "a blue square above a red circle"]
    negatives = trainer._hard_negatives(stage, texts, random.Random(0))
    # rows 1 and 3 (places first); row 4 is past the cap, rows 0 and 2 come later or have none
    assert negatives == [(1, "a red circle right of a blue square"), (3, "a small red circle on the right")]
    assert trainer._hard_negatives(stage, ["", ""], random.Random(0)) == []
    assert trainer._hard_negatives(replace(stage, hard_negatives=0), texts, random.Random(0)) == []
    nearest = replace(stage, hard_negatives=8, nearest_shape_share=1.0)  # the stage's share reaches the draw
    assert trainer._hard_negatives(nearest, ["a small red cross", "a large blue circle"], random.Random(0)) \
        == [(0, "a small red diamond"), (1, "a large blue square")]
    gen = torch.Generator().manual_seed(0)
    zt, t = torch.randn(5, 8, 8, 8, generator=gen), torch.tensor([900, 500, 100, 700, 300])
    target = torch.randn(5, 8, 8, 8, generator=gen)
    rows = torch.tensor([1, 3])
    with torch.no_grad():
        pred = comp.unet(zt, t, encoder_hidden_states=trainer._encode(texts)).sample
        again = comp.unet(zt[rows], t[rows], encoder_hidden_states=trainer._encode([n for _, n in negatives])).sample
        batched = comp.unet(torch.cat([zt, zt[rows]]), torch.cat([t, t[rows]]),
                            encoder_hidden_states=trainer._encode(texts + [n for _, n in negatives])).sample
    torch.testing.assert_close(batched, torch.cat([pred, again]), rtol=1e-4, atol=1e-5)
    e_true = (pred[rows] - target[rows]).square().mean((1, 2, 3))
    e_neg = (again - target[rows]).square().mean((1, 2, 3))
    expected = 0.05 * torch.nn.functional.softplus((e_true - e_neg) / 0.05).mean()
    term = trainer._ranking_loss(stage, rows, torch.cat([pred, again]), target)
    assert float(term) == pytest.approx(float(expected), rel=1e-5)
    assert trainer._ranking_loss(stage, torch.tensor([], dtype=torch.long), pred, target) == 0.0


@pytest.mark.slow
def test_a_ranking_step_makes_one_unet_call_over_the_batch_and_its_negatives(tmp_path, monkeypatch):
    """A training step of a ranking stage denoises the batch and its hard negatives in one UNet
    call: batch_size + n items, the last n the ranked rows' noisy latents and timesteps again."""
    config = PretrainConfig(**{**TOY, "stages": (), "hard_negatives": 3, "steps": 2})
    trainer = Pretrainer(config, tmp_path, progress=False)
    picked, calls = [], []
    real = Pretrainer._hard_negatives
    monkeypatch.setattr(Pretrainer, "_hard_negatives", lambda self, *a: picked.append(real(self, *a)) or picked[-1])
    trainer.components.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].clone(), args[1].clone())) if module.training else None,
        with_kwargs=True)
    trainer.run()
    assert len(calls) == 2 and all(len(p) == 3 for p in picked)
    for (sample, timesteps), negatives in zip(calls, picked):
        rows = torch.tensor([i for i, _ in negatives])
        assert len(sample) == config.batch_size + 3
        assert torch.equal(sample[config.batch_size:], sample[rows])
        assert torch.equal(timesteps[config.batch_size:], timesteps[rows])


def test_layout_objective_reads_the_later_object_and_end_states_of_spatial_captions(tmp_path):
    """The text encoder's layout objective: cross-entropy of the head over the states of Y's colour
    and shape words and of the end token of each spatial caption "a X REL a Y" (position + 1 for
    the start token), labelled with where Y is relative to X; other captions take no part."""
    config = PretrainConfig(**{**TOY, "layout_weight": 0.5})
    trainer = Pretrainer(config, tmp_path, progress=False)
    texts = ["a red circle and a blue square", "a red circle left of a blue square", "",
             "a green cross below a yellow diamond"]
    states = torch.randn(4, 16, config.text_width, requires_grad=True)
    term = trainer._layout_loss(config.stage_list()[0], texts, states)
    term.backward()
    touched = sorted(map(tuple, states.grad.abs().sum(-1).nonzero().tolist()))
    assert touched == [(1, 7), (1, 8), (1, 9), (3, 6), (3, 7), (3, 8)]
    picked = states[[1, 1, 1, 3, 3, 3], [7, 8, 9, 6, 7, 8]]
    labels = torch.tensor([world.RELATIONS.index("right of")] * 3 + [world.RELATIONS.index("above")] * 3)
    expected = 0.5 * torch.nn.functional.cross_entropy(trainer.layout_head(picked), labels)
    assert term.item() == pytest.approx(expected.item(), rel=1e-6)
    assert trainer._layout_loss(config.stage_list()[0], ["a large red circle", ""], states[:2]) == 0.0
    assert trainer._layout_loss(PretrainConfig(**{**TOY, "layout_weight": 0.0}).stage_list()[0], texts, states) == 0.0


def test_training_scenes_mix_the_varied_renderer_in_their_share_with_matching_backgrounds_and_masks():
    config = PretrainConfig(**{**TOY, "scenes": 200, "varied_share": 0.5})
    styles = pretrain.scene_styles(config.scenes, config.seed, config.varied_share)
    assert 0.35 < sum(s != world.EXACT for s in styles) / len(styles) < 0.65
    assert styles == pretrain.scene_styles(config.scenes, config.seed, config.varied_share)  # from the seed
    data = pretrain.training_scenes(config, pretrain.build_components(config))
    for pixels, background in zip(data.pixels[:60], data.backgrounds[:60]):  # the most common value: background
        values, counts = pixels[0].flatten().unique(return_counts=True)
        assert values[counts.argmax()] == background[0, 0, 0] and (background == background[0]).all()  # a grey
    assert len({float(b[0]) for b in data.backgrounds}) > 5
    scenes = pretrain.scene_list(config.scenes, config.seed, config.scene_kinds, config.render_size)
    latent = config.image_size // 4
    for i in range(30):  # the grounding masks cover exactly the cells where the scene's own render is drawn
        image = torch.from_numpy(np.asarray(world.render(scenes[i], config.render_size, styles[i])).copy())
        drawn = (image != styles[i].background).any(-1).float()[None, None]
        assert torch.equal(data.masks[i].amax(0), F.adaptive_max_pool2d(drawn, latent)[0, 0])
    assert all(style == world.EXACT for style in pretrain.scene_styles(50, 0, 0.0))
