"""An SD-family folder (UNet2DConditionModel) whose training scheduler is a
FlowMatchEulerDiscreteScheduler loads with that scheduler and scores with the flow process, as the
pipeline-following loop scores it; other schedulers still load as DDPM."""
from __future__ import annotations

import json
from dataclasses import replace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from itm_engine import reference
from itm_engine.models import build_random_components, save_components, save_random_model
from itm_engine.scoring import DiffusionITM

from fixtures.helpers import max_rel_diff


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    components = replace(build_random_components("tiny"), scheduler=scheduler)
    return save_components(components, tmp_path_factory.mktemp("sd-flow") / "model")


def test_an_sd_folder_with_a_flow_scheduler_loads_as_a_flow_model(flow_folder):
    comp = DiffusionITM.from_pretrained(str(flow_folder)).components
    assert comp.family == "sd" and isinstance(comp.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert comp.process.kind == "flow" and comp.prediction_type == "flow" and comp.scheduler.config.shift == 3.0
    # the shifted training timesteps, ascending: 1000 * 3 s / (1 + 2 s) for s = 1/1000 ... 1
    sigma = torch.linspace(1 / 1000, 1.0, 1000, dtype=torch.float64)
    torch.testing.assert_close(comp.process.grid, 1000 * 3 * sigma / (1 + 2 * sigma), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("protocol", ["engine", "jeong2025"])
@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_the_engine_equals_the_pipeline_loop_on_an_sd_flow_folder(flow_folder, protocol, mode):
    scorer = DiffusionITM.from_pretrained(str(flow_folder), protocol=protocol, samples=4)
    images, texts = _images(), ["a red circle", "a blue square on the left", ""]
    engine = scorer(images, texts, mode=mode)
    loop = reference.pipeline_pair_scores(scorer.components, images, texts, reference.all_pairs(2, 3), mode=mode,
                                          protocol=scorer.protocol).view(2, 3)
    scale = scorer(images, texts).abs().max()  # T2I scores are differences of errors: at the errors' scale
    assert max_rel_diff(engine, loop, scale) <= 1e-5
    assert scorer.noise_bank().timesteps.is_floating_point()


def test_other_schedulers_of_an_sd_folder_still_load_as_ddpm(tmp_path):
    folder = save_random_model("tiny", tmp_path / "sd", prediction_type="v_prediction")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": "PNDMScheduler"}))  # as SD 1.5 ships it
    comp = DiffusionITM.from_pretrained(str(folder)).components
    assert isinstance(comp.scheduler, diffusers.DDPMScheduler)
    assert comp.process.kind == "v_prediction" and comp.process.alphas_cumprod is not None
