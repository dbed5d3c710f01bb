"""LoRA checkpoints: add, save, load (ours and plain diffusers), scale, and the research code's
legacy attention-processor format (tiny model, CPU; the released SD 2.1 checkpoint on a meta UNet)."""
import re
import warnings
from pathlib import Path

import diffusers
import pytest
import torch

from itm_engine import DiffusionITM
from itm_engine.evaluate import EvalConfig, build_scorer
from itm_engine.models import architecture_configs, build_random_components
from itm_engine.models.lora import (
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    add_lora,
    load_lora,
    lora_parameters,
    read_lora,
    save_lora,
)

from fixtures.helpers import make_images
from fixtures.models import write_malicious_pickle

TEXTS = ["a red circle", "a blue square on the left", "two green triangles"]
RELEASED = Path(__file__).parents[2] / "shared" / "fixtures" / "diffusion-itm-hardneg-lora"
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # a cross-attention layer of the tiny UNet


def scores(components, images) -> torch.Tensor:
    return DiffusionITM(components)(images, TEXTS, samples=2, seed=3)


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def attention_linears(unet: torch.nn.Module):
    """(attention layer name, projection name, nn.Linear) for to_q/to_k/to_v/to_out of attn1/attn2."""
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                yield name, proj, module.to_out[0] if proj == "to_out" else getattr(module, proj)


def legacy_state_dict(unet: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rank-4 weights under the research code's keys: down [4, in], up [out, 4]."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, proj, linear in attention_linears(unet):
        state[f"{name}.processor.{proj}_lora.down.weight"] = torch.randn(4, linear.in_features, generator=gen) * 0.1
        state[f"{name}.processor.{proj}_lora.up.weight"] = torch.randn(linear.out_features, 4, generator=gen) * 0.1
    return state


@pytest.fixture(scope="module")
def images():
    return make_images(2)


@pytest.fixture(scope="module")
def base_scores(images):
    return scores(build_random_components("tiny"), images)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, images):
    """A tiny UNet with a perturbed LoRA (peft starts B at 0, which would leave the model as it
    was), its scores and UNet output, and the folder it was saved to."""
    components = build_random_components("tiny")
    add_lora(components.unet, rank=4, alpha=8, attention="all")  # alpha != rank: the scale 2 must travel
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in lora_parameters(components.unet):
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.1)
    folder = tmp_path_factory.mktemp("lora")
    assert save_lora(components.unet, folder) == folder / WEIGHTS_NAME
    return {"folder": folder, "scores": scores(components, images), "output": unet_output(components.unet)}


@pytest.mark.parametrize("attention, layers", [("cross", 4), ("all", 8)])
def test_add_lora_trains_only_lora_weights(attention, layers):
    unet = build_random_components("tiny").unet
    add_lora(unet, rank=4, attention=attention)
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    lora = lora_parameters(unet)
    assert len(lora) == len(trainable) == layers * 4 * 2  # 4 projections, A and B each
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.requires_grad for p in lora)
    assert ("attn1" in " ".join(trainable)) == (attention == "all")
    assert unet.peft_config["default"].lora_alpha == 4  # alpha defaults to rank


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(dropout=1.0),
                                    dict(attention="self")])
def test_add_lora_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        add_lora(build_random_components("tiny").unet, **kwargs)


def test_save_then_load_gives_identical_scores(saved, images, base_scores):
    assert not torch.allclose(saved["scores"], base_scores)  # the LoRA matters
    (saved["folder"] / LEGACY_WEIGHTS_NAME).write_bytes(b"not read: safetensors come first")
    components = build_random_components("tiny")
    load_lora(components.unet, saved["folder"])
    assert torch.equal(scores(components, images), saved["scores"])
    (saved["folder"] / LEGACY_WEIGHTS_NAME).unlink()


def test_plain_diffusers_loads_our_checkpoint(saved):
    components = build_random_components("tiny")
    pipe = diffusers.StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(saved["folder"])
    assert torch.equal(unet_output(pipe.unet), saved["output"])


def test_diffusers_model_level_adapter_file_loads(saved, tmp_path):
    """`unet.save_lora_adapter` writes keys and config without the "unet." prefix."""
    source = build_random_components("tiny").unet
    load_lora(source, saved["folder"])
    source.save_lora_adapter(tmp_path)
    unet = build_random_components("tiny").unet
    load_lora(unet, tmp_path)
    assert torch.equal(unet_output(unet), saved["output"])


def test_scale_zero_is_the_base_model_and_half_is_in_between(saved, images, base_scores):
    by_scale = {s: DiffusionITM.from_pretrained("tiny", lora=saved["folder"], lora_scale=s)(images, TEXTS, samples=2,
                                                                                            seed=3)
                for s in (0.0, 0.5, 1.0)}
    assert torch.equal(by_scale[0.0], base_scores)
    assert torch.equal(by_scale[1.0], saved["scores"])
    assert not torch.allclose(by_scale[0.5], by_scale[0.0]) and not torch.allclose(by_scale[0.5], by_scale[1.0])


def test_itm_eval_passes_lora_to_the_scorer(saved):
    config = EvalConfig(task="unused", data_root="unused", lora=str(saved["folder"]), lora_scale=0.5)
    unet = build_scorer(config, torch.device("cpu"), 64, None).components.unet
    assert unet.peft_config["default"].lora_alpha == 8
    assert unet.get_submodule(f"{LAYER}.to_q").scaling["default"] == pytest.approx(0.5 * 8 / 4)


def test_legacy_checkpoint_loads_as_research_code_computes(tmp_path):
    """y = W x + b + scale * up(down(x)) for every adapted projection (legacy LoRA: alpha = rank)."""
    base = build_random_components("tiny").unet
    state = legacy_state_dict(base)
    torch.save(state, tmp_path / LEGACY_WEIGHTS_NAME)
    unet = build_random_components("tiny").unet
    load_lora(unet, tmp_path / LEGACY_WEIGHTS_NAME, scale=0.5)
    assert len(lora_parameters(unet)) == len(state) == 64
    assert not torch.allclose(unet_output(unet), unet_output(base))
    x = torch.randn(2, 5, 32)
    for proj, module in (("to_k", f"{LAYER}.to_k"), ("to_out", f"{LAYER}.to_out.0")):
        linear = base.get_submodule(module)
        prefix = f"{LAYER}.processor.{proj}_lora"
        down, up = state[f"{prefix}.down.weight"], state[f"{prefix}.up.weight"]
        want = linear(x) + 0.5 * (x @ down.T @ up.T)
        with torch.no_grad():
            torch.testing.assert_close(unet.get_submodule(module)(x), want, rtol=1e-5, atol=1e-6)


def test_legacy_checkpoint_with_a_wrong_key_names_it(tmp_path):
    unet = build_random_components("tiny").unet
    state = legacy_state_dict(unet)
    good = f"{LAYER}.processor.to_v_lora.up.weight"
    bad = good.replace("attn2", "attn3")
    state[bad] = state.pop(good)
    torch.save(state, tmp_path / LEGACY_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=re.escape(bad)):
        load_lora(unet, tmp_path)
    assert not hasattr(unet, "peft_config")  # nothing was loaded


def test_legacy_checkpoint_with_a_wrong_shape_names_it(tmp_path):
    unet = build_random_components("tiny").unet
    state = legacy_state_dict(unet)
    key = f"{LAYER}.processor.to_k_lora.down.weight"
    state[key] = torch.zeros(4, 31)  # to_k of cross-attention reads the 32-wide text embeddings
    torch.save(state, tmp_path / LEGACY_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=re.escape(f"{key} (shape [4, 31], expected [4, 32])")):
        load_lora(unet, tmp_path)


def test_missing_checkpoint_is_named(tmp_path):
    unet = build_random_components("tiny").unet
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        load_lora(unet, tmp_path / "nowhere.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_lora(unet, tmp_path)


def test_malicious_pickle_fixture_runs_its_payload(tmp_path):
    """The crafted file does run its command when unpickled without weights_only: the refusals below
    are of a live payload."""
    marker = tmp_path / "payload-ran"
    torch.load(write_malicious_pickle(tmp_path / LEGACY_WEIGHTS_NAME, marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("plain", [False, True], ids=["torch.save", "bare pickle"])
def test_malicious_legacy_checkpoint_is_refused(tmp_path, plain):
    marker = tmp_path / "payload-ran"
    file = write_malicious_pickle(tmp_path / "lora" / LEGACY_WEIGHTS_NAME, marker, plain=plain)
    unet = build_random_components("tiny").unet
    with pytest.raises(ValueError) as info:
        load_lora(unet, file.parent)
    message = str(info.value)
    assert f"{file} was refused as unsafe" in message
    assert "safetensors.torch.save_file(" in message and "pytorch_lora_weights.safetensors" in message
    assert not marker.exists() and not hasattr(unet, "peft_config")


@pytest.mark.parametrize("name, message", [
    (WEIGHTS_NAME, "is not a valid safetensors file (truncated?)"),
    (LEGACY_WEIGHTS_NAME, "is not a readable PyTorch checkpoint (truncated?)"),
])
def test_truncated_checkpoint_is_named(saved, tmp_path, name, message):
    file = tmp_path / name
    if name == LEGACY_WEIGHTS_NAME:
        torch.save(legacy_state_dict(build_random_components("tiny").unet), file)
        data = file.read_bytes()
    else:
        data = (saved["folder"] / WEIGHTS_NAME).read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{file} {message}")):
        load_lora(build_random_components("tiny").unet, tmp_path)


@pytest.mark.skipif(not (RELEASED / LEGACY_WEIGHTS_NAME).is_file(), reason=f"released checkpoint absent: {RELEASED}")
def test_released_checkpoint_maps_onto_sd21_unet():
    """Every one of the 256 tensors lands on an SD 2.1-base UNet (built on the meta device: shapes only)."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**architecture_configs("sd21-arch")["unet"])
    state, config = read_lora(RELEASED, unet)
    assert len(state) == 256 and config is None
    assert {t.shape[0] for k, t in state.items() if ".lora_A." in k} == {4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, and torch says so
        load_lora(unet, RELEASED)
    lora = {n.replace(".default", ""): p for n, p in unet.named_parameters() if ".lora_" in n}
    assert {n: tuple(p.shape) for n, p in lora.items()} == {k: tuple(t.shape) for k, t in state.items()}
