"""Kernel dispatch: ITM_KERNELS / engine option, availability, and engine scores per backend."""
import diffusers
import pytest
import torch

from itm_engine import DiffusionITM, kernels
from itm_engine.models import build_random_components
from itm_engine.noise import ForwardProcess

from fixtures.helpers import make_images, max_rel_diff

CPU = torch.device("cpu")
CPU_BACKENDS = [b for b in kernels.BACKENDS if kernels.available(b, CPU)]


def test_env_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("ITM_KERNELS", "reference")
    assert kernels.resolve_backend("cpu") == "reference"
    monkeypatch.setenv("ITM_KERNELS", "auto")
    assert kernels.resolve_backend("cpu") == ("ext" if kernels.available("ext", CPU) else "reference")
    monkeypatch.setenv("ITM_KERNELS", "fastest")
    with pytest.raises(ValueError, match="unknown kernel backend 'fastest'"):
        kernels.resolve_backend("cpu")


def test_explicit_choice_overrides_env(monkeypatch):
    monkeypatch.setenv("ITM_KERNELS", "fastest")
    assert kernels.resolve_backend("cpu", "reference") == "reference"


def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("ITM_KERNELS", raising=False)
    assert kernels.resolve_backend("cpu") != "triton"


def test_unavailable_forced_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda backend, device: backend == "reference")
    with pytest.raises(RuntimeError, match="'ext' was asked for"):
        kernels.resolve_backend("cpu", "ext")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_engine_scores_are_the_same_on_every_available_backend(backend):
    components = build_random_components("tiny", seed=0, prediction_type="v_prediction")
    images, texts = make_images(2), ["a red box", "a blue box", ""]
    reference = DiffusionITM(components, kernels="reference")
    bank = reference.noise_bank(2, seed=1)
    expected = reference(images, texts, mode="t2i", noise=bank)
    scorer = DiffusionITM(components, kernels=backend)
    got = scorer(images, texts, mode="t2i", noise=bank)
    assert scorer.last_stats.kernels == {"noisy_latents": backend, "item_error": backend}
    scale = reference(images, texts, noise=bank).abs().max()
    assert max_rel_diff(got, expected, scale=scale) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flow_coefficients_reach_every_backend(backend):
    """The dispatcher hands the per-item coefficients to the backend: flow matching's x_t =
    (1 - sigma) z0 + sigma eps and target eps - z0 (c = -1, d = 1), as the reference builds them."""
    process = ForwardProcess.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    gen = torch.Generator().manual_seed(4)
    latents, noise = torch.randn(3, 4, 5, 7, generator=gen), torch.randn(4, 4, 5, 7, generator=gen)
    img_idx, sample_idx = torch.tensor([2, 0, 1, 2, 0]), torch.tensor([3, 3, 0, 1, 2])
    coefficients = process.coefficients(process.grid[torch.tensor([0, 999, 500, 10, 990])])
    x_t = kernels.noisy_latents(latents, noise, img_idx, sample_idx, coefficients, backend=backend)
    torch.testing.assert_close(x_t, (1 - coefficients[:, 1, None, None, None]) * latents[img_idx]
                               + coefficients[:, 1, None, None, None] * noise[sample_idx], rtol=1e-6, atol=1e-6)
    errors = kernels.item_error(x_t, noise, sample_idx, coefficients, latents, img_idx, backend=backend)
    assert kernels.last_backend == {**kernels.last_backend, "noisy_latents": backend, "item_error": backend}
    target = noise[sample_idx] - latents[img_idx]
    torch.testing.assert_close(errors, (x_t - target).square().flatten(1).mean(1), rtol=1e-5, atol=0)


def test_topk_dispatch_checks_arguments():
    with pytest.raises(ValueError, match="k must be between 1 and the gallery size 3"):
        kernels.topk_similarity(torch.randn(2, 4), torch.randn(3, 4), 4, backend="reference")
    with pytest.raises(ValueError, match=r"queries \[Q, D\] and gallery \[G, D\]"):
        kernels.topk_similarity(torch.randn(2, 4), torch.randn(3, 5), 1, backend="reference")


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
def test_reference_topk_streams_to_the_same_answer(chunk):
    gen = torch.Generator().manual_seed(chunk)
    q, g = torch.randn(3, 16, generator=gen), torch.nn.functional.normalize(torch.randn(100, 16, generator=gen), dim=1)
    g[50] = g[20]  # a tie: index 20 must come first
    q[0] = g[20]  # unit gallery rows: nothing beats the row equal to the query
    values, indices = kernels.reference.topk_similarity(q, g, 5, chunk_size=chunk)
    full = q @ g.T
    assert torch.allclose(values, full.topk(5).values)
    assert indices[0, :2].tolist() == [20, 50]
    assert torch.allclose(full.gather(1, indices), values)
