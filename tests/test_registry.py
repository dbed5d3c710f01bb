"""The registry of named models, CLIP checkpoints and UNet classes, and the plugins that fill it
(itm_engine.plugins): the engine finds the ShapesWorld lab's offerings without importing it by name."""
from __future__ import annotations

import importlib.metadata
import json

import diffusers
import pytest
import torch

from itm_engine import DiffusionITM, plugins
from itm_engine.clip import ClipModel
from itm_engine.models import load_components, register_model, register_unet_class, registry, save_random_model
from itm_engine.tasks import TASKS, all_tasks, get_task


@pytest.fixture
def clean_registry(monkeypatch):
    """Empty registries and plugins not yet run, restored afterwards."""
    monkeypatch.setattr(registry, "_MODELS", {})
    monkeypatch.setattr(registry, "_CLIPS", {})
    monkeypatch.setattr(registry, "_UNET_CLASSES", {})
    monkeypatch.setattr(plugins, "_loaded", False)


def test_the_lab_is_an_installed_plugin():
    entries = {e.name: e.value for e in importlib.metadata.entry_points(group=plugins.GROUP)}
    assert entries.get("shapesworld") == "itm_engine.shapesworld:register"


def test_an_unknown_name_runs_the_plugins_once_and_finds_the_lab(clean_registry, monkeypatch):
    calls = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    folder = registry.model_folder("shapes")
    assert folder is not None and (folder / "unet" / "config.json").is_file()
    assert registry.clip_files("shapes-clip")[1].name == "shapes-clip.safetensors"
    assert registry.unet_class({"_class_name": "CoordUNet2DConditionModel"}).__name__ == "CoordUNet2DConditionModel"
    assert registry.model_folder("no-such-model") is None and registry.clip_files("no-such-clip") is None
    assert calls == [{"group": plugins.GROUP}]  # once, however many look-ups miss


def test_a_registered_name_loads_its_folder(clean_registry, tmp_path):
    folder = save_random_model("tiny", tmp_path / "mine", seed=3)
    register_model("my-model", folder)
    loaded = load_components("my-model")
    reference = load_components(folder)
    assert loaded.source == "builtin:my-model"
    for (name, a), b in zip(loaded.unet.state_dict().items(), reference.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_registered_name_whose_folder_is_gone_says_so(clean_registry, tmp_path):
    register_model("gone", tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="registered model 'gone' is missing"):
        load_components("gone")


class WiderUNet(diffusers.UNet2DConditionModel):
    """A UNet class of a plugin: takes one channel more than its latents (like the lab's CoordUNet)."""

    extra_input_channels = 1

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        sample = torch.cat([sample, torch.zeros_like(sample[:, :1])], dim=1)
        return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)


def test_a_registered_unet_class_is_what_a_folder_naming_it_loads_as(clean_registry, tmp_path):
    folder = save_random_model("tiny", tmp_path / "wide")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    unet = WiderUNet(**{k: v for k, v in config.items() if not k.startswith("_")} | {"in_channels": 5})
    unet.save_pretrained(folder / "unet")
    register_unet_class(WiderUNet)
    components = load_components(folder)
    assert type(components.unet) is WiderUNet and components.latent_shape == (4, 16, 16)
    scorer = DiffusionITM(components, progress=False)
    image = torch.rand(3, 32, 32)
    assert torch.isfinite(scorer([image], ["a", "b"], samples=2)).all()


def test_an_unregistered_class_name_loads_as_the_diffusers_unet(clean_registry):
    assert registry.unet_class({"_class_name": "SomethingElse"}) is diffusers.UNet2DConditionModel
    assert registry.unet_class({}) is diffusers.UNet2DConditionModel


def test_only_unet_classes_register(clean_registry):
    with pytest.raises(TypeError, match="not a diffusers.UNet2DConditionModel"):
        register_unet_class(torch.nn.Linear)


def test_bundled_weights_of_an_unregistered_clip_are_an_error():
    with pytest.raises(ValueError, match="none is registered for 'ViT-B-32'"):
        ClipModel.from_name("ViT-B-32", pretrained="bundled")


def test_a_failing_plugin_is_reported_by_name_and_the_others_still_load(clean_registry, monkeypatch):
    class Entry:
        def __init__(self, name, value, function):
            self.name, self.value, self._function = name, value, function

        def load(self):
            return self._function

    loaded = []

    def broken():
        raise ImportError("no module named 'nothing'")

    entries = [Entry("broken", "pkg:broken", broken), Entry("fine", "pkg:fine", lambda: loaded.append("fine"))]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: entries)
    with pytest.raises(RuntimeError, match=r"'broken' \(pkg:broken\): ImportError: no module named 'nothing'"):
        registry.model_folder("anything")
    assert loaded == ["fine"]


def test_tasks_of_the_plugin_join_the_task_registry(tmp_path):
    names = set(all_tasks())
    assert {"shapes", "shapes_t2i", "shapes_retrieval", "winoground", "flickr30k_i2t", "bias"} <= names
    with pytest.raises(ValueError, match="known tasks: .*shapes_t2i.*winoground"):
        get_task("no_such_task", tmp_path)
    assert TASKS["shapes"].__module__ == "itm_engine.shapesworld.tasks"


def test_a_task_that_reads_files_needs_a_data_root():
    with pytest.raises(ValueError, match="winoground: a data root is needed"):
        get_task("winoground", None)
