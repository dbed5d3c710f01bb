"""The forward process written once in itm_engine.noise (x_t and the denoising target), against
diffusers' DDPMScheduler.add_noise / get_velocity, the convention of the models' own training."""
from __future__ import annotations

import pytest
import torch

from itm_engine.kernels import reference
from itm_engine.models import ddpm_scheduler
from itm_engine.noise import add_noise, denoising_target, forward_coefficients


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (5, 3, 7, 9), (3, 16, 2, 5)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_process_is_diffusers_convention(shape, prediction_type):
    scheduler = ddpm_scheduler(prediction_type)
    gen = torch.Generator().manual_seed(sum(shape))
    z0, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (shape[0],), generator=gen)
    t[0] = 999  # the noisiest step, where sqrt(abar) is smallest
    abar = scheduler.alphas_cumprod
    torch.testing.assert_close(add_noise(z0, eps, t, abar), scheduler.add_noise(z0, eps, t), rtol=1e-6, atol=1e-6)
    expected = scheduler.get_velocity(z0, eps, t) if prediction_type == "v_prediction" else eps
    torch.testing.assert_close(denoising_target(z0, eps, t, abar, prediction_type), expected, rtol=1e-6, atol=1e-6)


def test_coefficients_are_float32_on_the_timesteps_device_and_shaped_to_broadcast():
    abar = ddpm_scheduler("epsilon").alphas_cumprod.double()
    a, s = forward_coefficients(torch.tensor([0, 500, 999]), abar)
    assert a.shape == s.shape == (3, 1, 1, 1) and a.dtype == s.dtype == torch.float32
    torch.testing.assert_close(a.square() + s.square(), torch.ones(3, 1, 1, 1))


def test_an_unknown_prediction_type_is_refused():
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction', got 'sample'"):
        denoising_target(z, z, torch.tensor([1]), ddpm_scheduler("epsilon").alphas_cumprod, "sample")


def test_the_fused_op_reference_builds_the_same_x_t_and_target():
    scheduler = ddpm_scheduler("v_prediction")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 6, 6, generator=gen), torch.randn(5, 4, 6, 6, generator=gen)
    img_idx, sample_idx = torch.tensor([0, 2, 1, 2]), torch.tensor([4, 0, 3, 3])
    t = torch.tensor([10, 400, 999, 0])
    x_t = reference.noisy_latents(latents, noise, img_idx, sample_idx, t, scheduler.alphas_cumprod)
    torch.testing.assert_close(x_t, scheduler.add_noise(latents[img_idx], noise[sample_idx], t))
    v = scheduler.get_velocity(latents[img_idx], noise[sample_idx], t)
    pred = v + 0.5  # error 0.25 everywhere against the v target
    errors = reference.item_error(pred, noise, sample_idx, latents, img_idx, "v", t, scheduler.alphas_cumprod)
    torch.testing.assert_close(errors, torch.full((4,), 0.25))
