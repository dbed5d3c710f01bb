"""Tests for itm_engine.models: offline tokenizer, built-in architectures, save/load, hub cache."""
import json
import shutil
from pathlib import Path

import diffusers
import huggingface_hub
import open_clip
import pytest
import safetensors.torch
import torch
import transformers

from itm_engine.models import (
    SDComponents,
    architecture_configs,
    build_random_components,
    clip_tokenizer,
    load_components,
    save_random_model,
)
from itm_engine.models.architectures import _clip_bpe

from fixtures.models import write_malicious_pickle

SENTENCES = [
    "A photo of a cat.",
    "Hello, WORLD!! it's 3:45pm",
    "don't STOP-believing... (really)",
    "café naïve — 東京 🙂",
    "  multiple   spaces\tand\nnewlines ",
    "",
    "word " * 100,  # truncated to 77 tokens
]
NETS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model (seed 0, epsilon); tests must not modify it."""
    return save_random_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def assert_same_weights(a: SDComponents, b: SDComponents) -> None:
    for net in NETS:
        state_a, state_b = getattr(a, net).state_dict(), getattr(b, net).state_dict()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{net}.{key}"


def tokenize(tokenizer: transformers.CLIPTokenizer) -> list[list[int]]:
    return tokenizer(SENTENCES, truncation=True).input_ids


def make_hub_cache(root: Path, repo_id: str, model: Path) -> None:
    """Lay ``model`` out as the HF cache does: models--org--name/{refs/main, snapshots/<hash>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo / "snapshots" / commit)


# --- tokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_matches_open_clip(text: str) -> None:
    ids = clip_tokenizer()(text, truncation=True, max_length=77).input_ids
    reference = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    assert ids == reference[: len(ids)] and set(reference[len(ids):]) <= {0}


@pytest.mark.parametrize("text", [s for s in SENTENCES if "!" not in s])
def test_sd2_tokenizer_pads_like_open_clip(text: str) -> None:
    ids = clip_tokenizer("!")(text, padding="max_length", truncation=True, max_length=77).input_ids
    assert ids == open_clip.tokenizer.SimpleTokenizer()([text])[0].tolist()


def test_tokenizer_special_tokens() -> None:
    sd1, sd2 = clip_tokenizer(), clip_tokenizer("!")
    assert len(sd1) == 49408 and sd1.model_max_length == 77
    assert (sd1.bos_token_id, sd1.eos_token_id, sd1.pad_token_id) == (49406, 49407, 49407)
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)
    sd1.model_max_length = 5
    assert clip_tokenizer().model_max_length == 77  # every call gives a fresh instance


# --- architectures ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arch, params",
    [  # parameter counts of the released checkpoints: UNet, VAE, text encoder
        ("sd15-arch", (859_520_964, 83_653_863, 123_060_480)),
        ("sd21-arch", (865_910_724, 83_653_863, 340_387_840)),
    ],
)
def test_sd_architectures_match_released_models(arch: str, params: tuple[int, int, int]) -> None:
    configs = architecture_configs(arch)
    with torch.device("meta"):  # shapes only: no memory, no time
        nets = (
            diffusers.UNet2DConditionModel(**configs["unet"]),
            diffusers.AutoencoderKL(**configs["vae"]),
            transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
        )
    assert tuple(sum(p.numel() for p in net.parameters()) for net in nets) == params
    unet, text = configs["unet"], configs["text_encoder"]
    got = (
        unet["attention_head_dim"], unet["cross_attention_dim"], unet["use_linear_projection"],
        text["hidden_act"], text["num_hidden_layers"], configs["pad_token"],
    )
    if arch == "sd15-arch":
        assert got == (8, 768, False, "quick_gelu", 12, "<|endoftext|>")
    else:
        assert got == ((5, 10, 20, 20), 1024, True, "gelu", 23, "!")


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="sd21-arch"):
        build_random_components("sd3-arch")


def test_tiny_components() -> None:
    rng = torch.get_rng_state()
    sd = build_random_components("tiny")
    assert torch.equal(rng, torch.get_rng_state())  # building does not disturb the global RNG
    assert sd.source == "builtin:tiny" and sd.prediction_type == "epsilon"
    assert (sd.scaling_factor, sd.vae_scale_factor, sd.image_size) == (0.18215, 2, 32)
    assert sd.latent_shape == (4, 16, 16)
    assert (sd.device, sd.dtype) == (torch.device("cpu"), torch.float32)
    for net in NETS:
        assert not getattr(sd, net).training
        assert not any(p.requires_grad for p in getattr(sd, net).parameters())
    with torch.no_grad():
        z0 = sd.vae.encode(torch.rand(2, 3, sd.image_size, sd.image_size)).latent_dist.mean
        ids = sd.tokenizer(["a cat", "a dog"], padding="max_length", return_tensors="pt").input_ids
        text = sd.text_encoder(ids).last_hidden_state
        pred = sd.unet(z0, torch.tensor([10, 900]), text).sample
    assert z0.shape == pred.shape == (2, *sd.latent_shape)
    assert sd.to(dtype=torch.bfloat16) is sd
    assert {getattr(sd, net).dtype for net in NETS} == {torch.bfloat16}


def test_scheduler_is_sd_training_schedule() -> None:
    config = build_random_components("tiny", prediction_type="v_prediction").scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.num_train_timesteps, config.prediction_type) == (1000, "v_prediction")


def test_bad_prediction_type() -> None:
    with pytest.raises(ValueError, match="sample"):
        build_random_components("tiny", prediction_type="sample")


# --- save / load -----------------------------------------------------------------------------

def test_save_load_round_trip(tiny_folder: Path) -> None:
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert list((tiny_folder / "unet").glob("*.safetensors"))
    loaded = load_components(tiny_folder)
    assert loaded.source == str(tiny_folder)
    assert_same_weights(loaded, build_random_components("tiny"))
    assert tokenize(loaded.tokenizer) == tokenize(clip_tokenizer())
    assert loaded.tokenizer.model_max_length == 77
    assert not loaded.unet.training and not any(p.requires_grad for p in loaded.unet.parameters())


def test_saved_folder_is_a_stable_diffusion_pipeline(tiny_folder: Path) -> None:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder)
    assert pipe.unet.config.sample_size == 16 and pipe.safety_checker is None


def test_seeds_differ() -> None:
    a, b = build_random_components("tiny", seed=0), build_random_components("tiny", seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    embeddings = [sd.text_encoder.get_input_embeddings().weight for sd in (a, b)]
    assert not torch.equal(*embeddings)


def test_v_prediction_round_trip(tmp_path: Path) -> None:
    folder = save_random_model("tiny", tmp_path / "v", seed=3, prediction_type="v_prediction")
    assert load_components(folder).prediction_type == "v_prediction"


def test_load_builtin_to_dtype() -> None:
    sd = load_components("tiny", dtype=torch.bfloat16)
    assert sd.source == "builtin:tiny" and sd.dtype == sd.text_encoder.dtype == torch.bfloat16


def test_load_bin_weights_with_hub_key_names(tiny_folder: Path, tmp_path: Path) -> None:
    """Older checkpoints: .bin files only, text encoder keys under ``text_model.`` (transformers 4.x)."""
    folder = shutil.copytree(tiny_folder, tmp_path / "bin")
    for net, safe_name, bin_name, prefix in [
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", ""),
        ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", ""),
        ("text_encoder", "model.safetensors", "pytorch_model.bin", "text_model."),
    ]:
        state = safetensors.torch.load_file(folder / net / safe_name)
        torch.save({prefix + key: value for key, value in state.items()}, folder / net / bin_name)
        (folder / net / safe_name).unlink()
    assert_same_weights(load_components(folder), build_random_components("tiny"))


def test_load_classic_tokenizer_files(tiny_folder: Path, tmp_path: Path) -> None:
    """Hub checkpoints ship vocab.json + merges.txt rather than tokenizer.json."""
    folder = shutil.copytree(tiny_folder, tmp_path / "classic")
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    vocab, merges = _clip_bpe()
    (folder / "tokenizer" / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "tokenizer" / "merges.txt").write_text(merges, encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!"}
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_components(folder).tokenizer
    assert tokenizer.pad_token_id == 0
    assert tokenize(tokenizer) == tokenize(clip_tokenizer("!"))


def test_folder_with_other_scheduler_class(tiny_folder: Path, tmp_path: Path) -> None:
    """SD 1.5 / 2.1-base ship a PNDMScheduler config: only its betas and prediction type matter."""
    folder = shutil.copytree(tiny_folder, tmp_path / "pndm")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(_class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False)
    config_file.write_text(json.dumps(config))
    scheduler = load_components(folder).scheduler
    assert isinstance(scheduler, diffusers.DDPMScheduler)
    assert torch.equal(scheduler.alphas_cumprod, build_random_components("tiny").scheduler.alphas_cumprod)


def test_folder_with_unsupported_prediction_type(tiny_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_folder, tmp_path / "sample")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="sample"):
        load_components(folder)


def test_folder_missing_component(tiny_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_folder, tmp_path / "partial")
    shutil.rmtree(folder / "unet")
    with pytest.raises(FileNotFoundError, match="unet") as info:
        load_components(folder)
    assert str(folder) in str(info.value) and "vae" not in str(info.value)


# --- unreadable weights files: the message names the file -----------------------------------

@pytest.mark.parametrize("net, name", [("unet", "diffusion_pytorch_model.safetensors"),
                                       ("text_encoder", "model.safetensors")])
def test_truncated_safetensors_file_is_named(tiny_folder: Path, tmp_path: Path, net: str, name: str) -> None:
    folder = shutil.copytree(tiny_folder, tmp_path / "truncated")
    file = folder / net / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError) as info:
        load_components(folder)
    assert f"{file} is not a valid safetensors file (truncated?)" in str(info.value)


@pytest.mark.parametrize("net, safe_name, bin_name", [
    ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
])
def test_unsafe_pickle_is_refused_and_named(tiny_folder: Path, tmp_path: Path, net: str, safe_name: str,
                                            bin_name: str) -> None:
    folder = shutil.copytree(tiny_folder, tmp_path / "unsafe")
    (folder / net / safe_name).unlink()
    marker = tmp_path / "payload-ran"
    file = write_malicious_pickle(folder / net / bin_name, marker)
    with pytest.raises(ValueError) as info:
        load_components(folder)
    message = str(info.value)
    assert f"{file} was refused as unsafe" in message
    assert "posix.system" in message  # torch's reason: the callable the pickle would run
    assert "save_pretrained(" in message and "safe_serialization=True" in message  # how to convert it
    assert not marker.exists()


@pytest.mark.parametrize("source", ["./no/such/model", "/no/such/model", "~/no-model", Path("no-model")])
def test_missing_path(source: str | Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_components(source)


# --- hub ids: local HF cache only ------------------------------------------------------------

def test_hub_id_from_cache_dir(tiny_folder: Path, tmp_path: Path) -> None:
    make_hub_cache(tmp_path, "org/tiny-sd", tiny_folder)
    sd = load_components("org/tiny-sd", cache_dir=tmp_path)
    assert sd.source == "org/tiny-sd"
    assert_same_weights(sd, build_random_components("tiny"))


def test_hub_id_from_default_cache(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HOME / HF_HUB_CACHE once, at import: patch the resolved constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    make_hub_cache(tmp_path, "org/tiny-sd", tiny_folder)
    assert load_components("org/tiny-sd").unet.config.sample_size == 16


@pytest.mark.parametrize("repo_id", ["org/not-cached", "not-cached"])
def test_hub_id_not_cached(repo_id: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_components(repo_id, cache_dir=tmp_path)
    message = str(info.value)
    assert repr(repo_id) in message and str(tmp_path) in message
    assert f"hf download {repo_id}" in message and "sd15-arch" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_not_a_hub_id() -> None:
    with pytest.raises(FileNotFoundError, match="not a local folder, a built-in architecture"):
        load_components("no such model!")
