"""CLIP prefilter and baseline (`itm_engine.clip`): a tiny random open_clip model from a config written
here (fixtures.models), no downloads."""
from __future__ import annotations

import socket
import warnings

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from open_clip.pretrained import _PRETRAINED
from safetensors.torch import save_file

from itm_engine import kernels
from itm_engine.clip import ClipModel, ClipScorer
from itm_engine.tasks.base import Crop

from fixtures.helpers import make_images
from fixtures.models import NAME, make_clip, write_clip_config

TEXTS = ["a red square", "a blue circle", "two dogs", "a cat on a mat", "green", "an empty room", "x"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    return str(write_clip_config(tmp_path_factory.mktemp("clip_config")))


@pytest.fixture
def clip(config) -> ClipModel:
    return make_clip(config)


class Calls:
    def __init__(self, clip: ClipModel, monkeypatch) -> None:
        self.images = self.texts = 0
        encode_image, encode_text = clip.model.encode_image, clip.model.encode_text

        def image(x, *a, **kw):
            self.images += len(x)
            return encode_image(x, *a, **kw)

        def text(x, *a, **kw):
            self.texts += len(x)
            return encode_text(x, *a, **kw)

        monkeypatch.setattr(clip.model, "encode_image", image)
        monkeypatch.setattr(clip.model, "encode_text", text)


def test_embeddings_are_normalised_float32_with_the_right_shapes(clip):
    images = make_images(5)
    e_img, e_txt = clip.embed_images(images), clip.embed_texts(TEXTS)
    assert e_img.shape == (5, 32) and e_txt.shape == (len(TEXTS), 32)
    assert e_img.dtype == e_txt.dtype == torch.float32
    torch.testing.assert_close(e_img.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(e_txt.norm(dim=1), torch.ones(len(TEXTS)))
    sim = clip.similarity(images, TEXTS)
    torch.testing.assert_close(sim, e_img @ e_txt.T)
    assert sim.std() > 0.05  # the spread-out weights give distinct rankings


def test_repeated_and_equal_inputs_are_embedded_once(clip, monkeypatch, tmp_path):
    calls = Calls(clip, monkeypatch)
    a, b = make_images(2, seed=1)
    path = tmp_path / "a.png"
    a.save(path)
    first = clip.embed_images([a, b, a.copy(), str(path), torch.from_numpy(np.array(a)).permute(2, 0, 1)])
    assert calls.images == 2  # a (as PIL, copy, file, tensor) and b
    for row in (2, 3, 4):
        assert torch.equal(first[row], first[0])
    again = clip.embed_images([path, b])
    assert calls.images == 2 and torch.equal(again, first[[0, 1]])

    texts = clip.embed_texts(["one", "two", "one"])
    assert calls.texts == 2 and torch.equal(texts[0], texts[2])
    clip.embed_texts(["two", "one"])
    assert calls.texts == 2
    clip.clear_cache()
    clip.embed_texts(["one"])
    assert calls.texts == 3


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("k", [1, 3, "n"])
def test_topk_equals_torch_topk_of_the_full_matrix(clip, k, backend, monkeypatch):
    monkeypatch.setenv("ITM_KERNELS", backend)
    calls = []
    streaming = kernels.topk_similarity
    monkeypatch.setattr(kernels, "topk_similarity", lambda q, g, k: calls.append(len(g)) or streaming(q, g, k))
    images = make_images(6, seed=2)
    sim = clip.similarity(images, TEXTS)
    # distinct values, so torch.topk's order is defined
    assert len(sim.flatten().unique()) == sim.numel()
    k_t = len(TEXTS) if k == "n" else k
    k_i = len(images) if k == "n" else k
    assert torch.equal(clip.topk_texts(images, TEXTS, k_t), sim.topk(k_t, dim=1).indices)
    assert torch.equal(clip.topk_images(TEXTS, images, k_i), sim.T.topk(k_i, dim=1).indices)
    assert calls == [len(TEXTS), len(images)]  # through the streaming op


def test_topk_ties_go_to_the_lower_index(clip):
    images = make_images(4, seed=3)
    texts = ["a dog", "a cat", "a bird", "a cat", "a fish"]  # 1 and 3 are equal: equal similarity
    order = clip.topk_texts(images, texts, len(texts))
    for row in order.tolist():
        assert row.index(1) + 1 == row.index(3)
    gallery = [images[0], images[1], images[0].copy(), images[2]]  # 0 and 2 are equal
    order = clip.topk_images(["a dog", "a cat"], gallery, len(gallery))
    for row in order.tolist():
        assert row.index(0) + 1 == row.index(2)


def test_topk_k_out_of_range_is_a_clear_error(clip):
    images = make_images(2)
    with pytest.raises(ValueError, match="number of candidate texts"):
        clip.topk_texts(images, TEXTS[:3], 4)
    with pytest.raises(ValueError, match="number of candidate images"):
        clip.topk_images(TEXTS, images, 0)


def test_scorer_matches_similarity_in_both_modes(config, tmp_path):
    clip = make_clip(config)
    scorer = ClipScorer(clip)
    images = make_images(3, seed=4)
    path = tmp_path / "big.png"
    make_images(1, size=(64, 48), seed=5)[0].save(path)
    crop = Crop(str(path), (8, 4, 48, 40))
    images.append(crop)
    sim = clip.similarity([*images[:3], PIL.Image.open(path).convert("RGB").crop(crop.box)], TEXTS)

    full = scorer(images, TEXTS)
    assert full.shape == (4, len(TEXTS)) and full.dtype == torch.float32
    torch.testing.assert_close(full, sim, rtol=0, atol=1e-6)
    pairs = torch.tensor([[0, 0], [3, 5], [1, 2], [3, 0], [0, 0]])
    expected = sim[pairs[:, 0], pairs[:, 1]]
    for mode in ("i2t", "t2i"):
        got = scorer.score_pairs(images, TEXTS, pairs, mode=mode)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="samples"):  # CLIP draws no noise: such options are an error, not ignored
        scorer.score_pairs(images, TEXTS, pairs, samples=3)
    cands = scorer.score_candidates(TEXTS[:2], [images[:2], images[2:]], mode="t2i")
    torch.testing.assert_close(cands, torch.stack([sim[:2, 0], sim[2:, 1]]), rtol=0, atol=1e-6)
    assert scorer.last_stats.unet_items == 0 and scorer.last_stats.images_encoded == 0  # all cached by now

    fresh = make_clip(config).scorer()
    fresh(images, TEXTS[:2])
    stats = fresh.last_stats
    assert (stats.images_encoded, stats.texts_encoded, stats.unet_items) == (4, 2, 0)
    assert stats.seconds["total"] > 0
    with pytest.raises(ValueError, match="mode"):
        scorer(images, TEXTS, mode="both")


def test_random_weights_warn_once(config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ClipModel.from_name(NAME, model_config=config)
    assert [str(w.message) for w in caught if "random weights" in str(w.message)] != []
    assert len([w for w in caught if "random weights" in str(w.message)]) == 1


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network at all, and an empty Hugging Face cache."""
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return cache / "hub"


def test_uncached_pretrained_tag_is_a_helpful_file_not_found(offline):
    with pytest.raises(FileNotFoundError) as err:
        ClipModel.from_name("ViT-B-32", pretrained="laion2b_s34b_b79k")
    message = str(err.value)
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and str(offline) in message
    assert "hf download" in message and "pretrained=PATH" in message


def test_bad_names_are_clear_errors(config, offline, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ClipModel.from_name(NAME, pretrained=str(tmp_path / "missing.pt"), model_config=config)
    with pytest.raises(ValueError, match="tags of 'ViT-B-32': openai"):
        ClipModel.from_name("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipModel.from_name("ViT-B-33")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_checkpoint_file_gives_the_same_embeddings(config, offline, tmp_path, fmt):
    source = make_clip(config)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / f"tiny.{fmt}"
    torch.save(state, path) if fmt == "pt" else save_file(state, str(path))
    images = make_images(3, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real weights: no random-weights warning
        loaded = ClipModel.from_name(NAME, pretrained=str(path), model_config=config)
    torch.testing.assert_close(loaded.embed_images(images), source.embed_images(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.embed_texts(TEXTS), source.embed_texts(TEXTS), rtol=0, atol=1e-6)


def test_cached_pretrained_tag_loads_offline(config, offline, monkeypatch):
    """A tag whose file sits in the Hugging Face cache layout is found without the network."""
    source = make_clip(config)
    monkeypatch.setitem(_PRETRAINED, NAME, {"cachedtag": {"hf_hub": "local-org/tiny-clip/", "quick_gelu": False}})
    snapshot = offline / "models--local-org--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (offline / "models--local-org--tiny-clip" / "refs").mkdir()
    (offline / "models--local-org--tiny-clip" / "refs" / "main").write_text("0" * 40)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    loaded = ClipModel.from_name(NAME, pretrained="cachedtag", model_config=config)
    torch.testing.assert_close(loaded.embed_texts(TEXTS), source.embed_texts(TEXTS), rtol=0, atol=1e-6)
    assert open_clip.get_pretrained_cfg(NAME, "cachedtag")  # (the monkeypatched tag was used)
