"""CoordUNet2DConditionModel: the coordinate channels, saving and loading through the real loading
code, and the engine's scores on it against the naive reference loop."""
import diffusers
import pytest
import torch

from itm_engine import DiffusionITM
from itm_engine.models import load_components, save_components, save_random_model
from itm_engine.reference import diffusion_itm_scores
from itm_engine.shapesworld.coord_unet import CoordUNet2DConditionModel, coordinate_grid
from itm_engine.shapesworld.pretrain import PretrainConfig, build_components

from fixtures.helpers import make_images, max_rel_diff

TEXTS = ["a red circle left of a blue square", "a red circle right of a blue square", ""]


@pytest.fixture(scope="module")
def coord_folder(tmp_path_factory):
    """A seeded, untrained ShapesWorld-recipe model (coordinates on) saved as a diffusers folder."""
    components = build_components(PretrainConfig(unet_channels=(16, 32), text_width=32, coordinates=True))
    return save_components(components, tmp_path_factory.mktemp("coord") / "model")


def test_coordinate_grid_runs_from_minus_one_to_one_across_each_axis():
    grid = coordinate_grid(torch.zeros(2, 8, 4, 6, dtype=torch.float64))
    assert grid.shape == (2, 2, 4, 6) and grid.dtype == torch.float64
    x, y = grid[0]
    f64 = torch.float64
    assert torch.equal(x[0], torch.linspace(-1, 1, 6, dtype=f64)) and torch.equal(x[:, 0], -torch.ones(4, dtype=f64))
    assert torch.equal(y[:, 0], torch.linspace(-1, 1, 4, dtype=f64)) and torch.equal(y[0], -torch.ones(6, dtype=f64))


def test_forward_is_the_plain_unet_on_latent_plus_coordinates(coord_folder):
    unet = load_components(coord_folder).unet
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(3, 8, 8, 8, generator=gen), torch.randn(3, 16, 32, generator=gen)
    t = torch.tensor([10, 500, 990])
    ours = unet(latents, t, encoder_hidden_states=context).sample
    plain = diffusers.UNet2DConditionModel.forward(unet, torch.cat([latents, coordinate_grid(latents)], 1), t,
                                                   encoder_hidden_states=context).sample
    assert torch.equal(ours, plain)
    # the coordinate channels reach the output: without their conv_in weights it changes
    unet.conv_in.weight.data[:, 8:] *= 0
    assert not torch.allclose(unet(latents, t, encoder_hidden_states=context).sample, ours)


def test_forward_refuses_latents_that_already_carry_the_coordinates(coord_folder):
    unet = load_components(coord_folder).unet
    with pytest.raises(ValueError, match="takes latents with 8 channels"):
        unet(torch.zeros(1, 10, 8, 8), torch.tensor([1]), encoder_hidden_states=torch.zeros(1, 16, 32))


def test_loading_picks_the_class_the_folder_names(coord_folder, tmp_path):
    components = load_components(coord_folder)
    assert type(components.unet) is CoordUNet2DConditionModel
    assert components.unet.config.in_channels == 10 and components.latent_shape == (8, 8, 8)
    plain = load_components(save_random_model("tiny", tmp_path / "tiny"))
    assert type(plain.unet) is diffusers.UNet2DConditionModel and plain.latent_shape == (4, 16, 16)


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_engine_matches_naive_reference_on_a_coordinate_unet(coord_folder, mode):
    scorer = DiffusionITM.from_pretrained(coord_folder, progress=False)
    images = make_images(2)
    bank = scorer.noise_bank(samples=3, seed=1, schedule="stratified")
    engine = scorer(images, TEXTS, mode=mode, noise=bank)
    naive = diffusion_itm_scores(scorer.components, images, TEXTS, bank, mode=mode, protocol=scorer.protocol)
    scale = scorer(images, TEXTS, mode="i2t", noise=bank).abs().max()
    assert max_rel_diff(engine, naive, scale=scale) <= 1e-5
