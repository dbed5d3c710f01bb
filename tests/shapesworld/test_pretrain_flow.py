"""`itm-shapes pretrain --prediction-type flow`: the flow-matching training scheduler and its
shift, the training timesteps drawn as diffusers' SD3 training scripts draw them (the DDPM draw
unchanged), a toy run whose UNet learns the flow velocity and whose folder scores as a flow model,
and resume after a crash equal to an uninterrupted run."""
from __future__ import annotations

import random

import diffusers
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from itm_engine.noise import ForwardProcess
from itm_engine.scoring import DiffusionITM
from itm_engine.shapesworld import world
from itm_engine.shapesworld.pretrain import PretrainConfig, Pretrainer, training_scheduler, training_timesteps

TOY = dict(scenes=48, vae_steps=3, vae_batch=8, steps=4, batch_size=8, warmup=1, eval_every=0, eval_examples=1,
           eval_samples=1, checkpoint_every=2, unet_channels=(16, 32), text_width=32, prediction_type="flow",
           flow_shift=3.0, stages=({"name": "ranked", "steps": 3, "lr": 5e-4, "hard_negatives": 2},))


def test_the_flow_scheduler_is_sd3s_with_the_configured_shift():
    scheduler = training_scheduler(PretrainConfig(prediction_type="flow"))
    assert isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.shift == 1.0
    assert not scheduler.config.use_dynamic_shifting
    shifted = training_scheduler(PretrainConfig(prediction_type="flow", flow_shift=3.0))
    sigma = torch.linspace(1.0, 1 / 1000, 1000)
    torch.testing.assert_close(shifted.sigmas, 3 * sigma / (1 + 2 * sigma))
    assert isinstance(training_scheduler(PretrainConfig()), diffusers.DDPMScheduler)


def test_flow_timesteps_are_the_sd3_training_scripts_draw():
    """u = sigmoid(N(0, 1)) from the step's generator, index floor(u T) into the scheduler's
    descending (shifted) timesteps: the same values, as float model timesteps."""
    scheduler = training_scheduler(PretrainConfig(prediction_type="flow", flow_shift=3.0))
    process = ForwardProcess.from_scheduler(scheduler)
    t = training_timesteps(process, 4096, torch.Generator().manual_seed(7))
    u = compute_density_for_timestep_sampling("logit_normal", 4096, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(7))
    expected = scheduler.timesteps[(u * 1000).long()]
    assert t.dtype == torch.float64 and torch.equal(t.float(), expected)
    # logit-normal around sigma 1/2 before the shift: the median lands at 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert t.median().item() / 1000 == pytest.approx(0.75, abs=0.02)
    coefficients = process.coefficients(t)
    torch.testing.assert_close(coefficients[:, 1], (t / 1000).float())  # x_t = (1 - sigma) z0 + sigma eps


def test_ddpm_timesteps_keep_their_uniform_draw():
    """The DDPM recipes (the bundled model's) draw exactly as before: uniform integer steps."""
    process = ForwardProcess.from_scheduler(training_scheduler(PretrainConfig()))
    t = training_timesteps(process, 64, torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain-flow")
    calls = []
    trainer = Pretrainer(PretrainConfig(**TOY), out, progress=False)
    unet = trainer.components.unet
    real_forward = unet.forward
    unet.forward = lambda x, t, **kw: calls.append(t.clone()) or real_forward(x, t, **kw)
    folder = trainer.run()
    return out, folder, calls


@pytest.mark.slow
def test_a_flow_run_trains_on_the_flow_grid_and_saves_a_flow_model(flow_run):
    out, folder, calls = flow_run
    grid = training_scheduler(PretrainConfig(**TOY)).timesteps.double()
    training = [t for t in calls if t.dtype == torch.float64 and len(t) >= TOY["batch_size"]]
    assert len(training) >= TOY["steps"] + 3  # every training step called the UNet with float T sigma
    assert all(torch.isin(t, grid).all() for t in training)
    scorer = DiffusionITM.from_pretrained(folder)
    comp = scorer.components
    assert isinstance(comp.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert comp.scheduler.config.shift == 3.0 and comp.process.kind == "flow"
    torch.testing.assert_close(comp.process.grid, grid.flip(0))
    image = world.render(world.sample_example(random.Random(0), "spatial", "test")[0])
    scores = scorer([image], ["a red circle left of a blue square", "a red circle"], samples=2)
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_a_flow_run_resumes_to_the_uninterrupted_weights(flow_run, tmp_path, monkeypatch):
    _, uninterrupted, _ = flow_run
    real_save = Pretrainer._save_checkpoint

    def crash_after_a_checkpoint(self, *args):
        real_save(self, *args)
        if self.step == 6:  # in the second stage
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Pretrainer, "_save_checkpoint", crash_after_a_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(PretrainConfig(**TOY), tmp_path, progress=False).run()
    monkeypatch.setattr(Pretrainer, "_save_checkpoint", real_save)
    with pytest.raises(ValueError, match=r"changed: flow_shift"):
        Pretrainer(PretrainConfig(**{**TOY, "flow_shift": 1.0}), tmp_path, progress=False).run(resume=True)
    resumed = Pretrainer(PretrainConfig(**TOY), tmp_path, progress=False).run(resume=True)
    a, b = (DiffusionITM.from_pretrained(f).components for f in (uninterrupted, resumed))
    for name in ("vae", "unet", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=f"{name}.{key}")
