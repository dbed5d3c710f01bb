"""The forward process written once in itm_engine.noise (x_t and the denoising target), against
diffusers' schedulers, the convention of the models' own training: DDPMScheduler.add_noise /
get_velocity (epsilon, v) and FlowMatchEulerDiscreteScheduler.scale_noise with the SD3 training
script's target eps - z0 (flow)."""
from __future__ import annotations

import diffusers
import pytest
import torch

from itm_engine.kernels import reference
from itm_engine.models import ddpm_scheduler
from itm_engine.noise import ForwardProcess, add_noise, denoising_target


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (5, 3, 7, 9), (3, 16, 2, 5)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_process_is_diffusers_convention(shape, prediction_type):
    scheduler = ddpm_scheduler(prediction_type)
    gen = torch.Generator().manual_seed(sum(shape))
    z0, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (shape[0],), generator=gen)
    t[0] = 999  # the noisiest step, where sqrt(abar) is smallest
    coefficients = ForwardProcess.from_scheduler(scheduler).coefficients(t)
    torch.testing.assert_close(add_noise(z0, eps, coefficients), scheduler.add_noise(z0, eps, t), rtol=1e-6, atol=1e-6)
    expected = scheduler.get_velocity(z0, eps, t) if prediction_type == "v_prediction" else eps
    torch.testing.assert_close(denoising_target(z0, eps, coefficients), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_coefficients_are_float32_rows_on_the_timesteps_device(prediction_type):
    process = ForwardProcess.from_scheduler(ddpm_scheduler(prediction_type))
    a, b, c, d = process.coefficients(torch.tensor([0, 500, 999])).T
    assert process.coefficients(torch.tensor([0, 500, 999])).shape == (3, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a.square() + b.square(), torch.ones(3))
    if prediction_type == "epsilon":  # the target is eps itself
        assert torch.equal(c, torch.zeros(3)) and torch.equal(d, torch.ones(3))
    else:  # v = a eps - b z0
        assert torch.equal(c, -b) and torch.equal(d, a)


def test_the_v_target_rounds_as_sqrt_abar_eps_minus_sqrt_one_minus_abar_z0():
    """c z0 + d eps with (c, d) = (-sqrt(1 - abar), sqrt(abar)) is bitwise the v of the former
    formula, a eps - s z0 (an exact negation, then one rounded sum in the other order)."""
    scheduler = ddpm_scheduler("v_prediction")
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(6, 4, 5, 5, generator=gen), torch.randn(6, 4, 5, 5, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    former = abar.sqrt() * eps - (1 - abar).sqrt() * z0
    assert torch.equal(denoising_target(z0, eps, ForwardProcess.from_scheduler(scheduler).coefficients(t)), former)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="forward process kind must be one of epsilon, v_prediction, flow"):
        ForwardProcess("sample", 1000, torch.arange(1000.0), ddpm_scheduler("epsilon").alphas_cumprod)


def test_the_flow_process_is_diffusers_flow_matching_and_the_sd3_training_target():
    """FlowMatchEulerDiscreteScheduler (SD3's, shift 3): for its training timesteps t = T sigma,
    x_t is its `scale_noise` (sigma eps + (1 - sigma) z0) and the target eps - z0, as the SD3
    training script (diffusers' train_dreambooth_sd3.py) builds them."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    process = ForwardProcess.from_scheduler(scheduler)
    assert process.kind == "flow" and process.num_train_timesteps == 1000
    assert torch.equal(process.grid, scheduler.timesteps.flip(0).double())  # ascending noise
    t = scheduler.timesteps[torch.tensor([0, 1, 137, 500, 863, 998, 999])]  # from sigma = 1 down to the least
    gen = torch.Generator().manual_seed(3)
    z0, eps = torch.randn(len(t), 4, 6, 5, generator=gen), torch.randn(len(t), 4, 6, 5, generator=gen)
    coefficients = process.coefficients(t)
    torch.testing.assert_close(coefficients[:, 1], scheduler.sigmas[torch.tensor([0, 1, 137, 500, 863, 998, 999])],
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(add_noise(z0, eps, coefficients), scheduler.scale_noise(z0, t, eps), rtol=1e-6,
                               atol=1e-6)
    assert torch.equal(denoising_target(z0, eps, coefficients), eps - z0)


def test_the_fused_op_reference_builds_the_same_x_t_and_target():
    scheduler = ddpm_scheduler("v_prediction")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 6, 6, generator=gen), torch.randn(5, 4, 6, 6, generator=gen)
    img_idx, sample_idx = torch.tensor([0, 2, 1, 2]), torch.tensor([4, 0, 3, 3])
    t = torch.tensor([10, 400, 999, 0])
    coefficients = ForwardProcess.from_scheduler(scheduler).coefficients(t)
    x_t = reference.noisy_latents(latents, noise, img_idx, sample_idx, coefficients)
    torch.testing.assert_close(x_t, scheduler.add_noise(latents[img_idx], noise[sample_idx], t))
    v = scheduler.get_velocity(latents[img_idx], noise[sample_idx], t)
    pred = v + 0.5  # error 0.25 everywhere against the v target
    errors = reference.item_error(pred, noise, sample_idx, coefficients, latents, img_idx)
    torch.testing.assert_close(errors, torch.full((4,), 0.25))


def test_the_fused_op_reference_refuses_a_latent_target_without_latents():
    coefficients = ForwardProcess.from_scheduler(ddpm_scheduler("v_prediction")).coefficients(torch.tensor([10, 20]))
    noise, idx = torch.randn(2, 4, 3, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs latents and img_idx"):
        reference.item_error(noise, noise, idx, coefficients)
    with pytest.raises(ValueError, match="latents need img_idx"):
        reference.item_error(noise, noise, idx, coefficients, latents=noise)
    with pytest.raises(ValueError, match=r"coefficients must be float32 \[B, 4\] with B = 2"):
        reference.item_error(noise, noise, idx, coefficients.double(), noise, idx)
    with pytest.raises(ValueError, match=r"coefficients must be float32 \[B, 4\] with B = 2"):
        reference.noisy_latents(noise, noise, idx, idx, coefficients[:, :3])
