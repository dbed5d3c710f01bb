"""Hostile inputs to the scorer: bounded memory, no silent wrong scores, clear errors naming the
argument, bounded caches."""
import tracemalloc

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.functional as TF

from itm_engine import DiffusionITM
from itm_engine.cache import EXACT_ASPECT, TextCache, load_rgb, resize_image
from itm_engine.models import build_random_components
from itm_engine.noise import NoiseBank

from fixtures.helpers import make_images


@pytest.fixture(scope="module")
def components():
    return build_random_components("tiny", seed=0)


@pytest.fixture(scope="module")
def scorer(components):
    return DiffusionITM(components, samples=2)


# -- memory on thin images -----------------------------------------------------------------------

def test_a_thin_image_is_cropped_without_a_huge_intermediate():
    thin = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (300_000, 1, 3), dtype=np.uint8))
    tracemalloc.start()
    out = resize_image(thin, 32, "crop")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.size == (32, 32)
    # resize-then-crop makes a 32 x 9,600,000 image first (~0.9 GB); the output needs 3 KB
    assert peak < 50 * 2**20


@pytest.mark.parametrize("size", [(17, 420), (700, 20), (3, 1000)])
def test_a_long_image_keeps_the_window_of_resize_then_crop(size):
    """Past EXACT_ASPECT the window is resampled straight from the source: on a smooth image the
    pixels equal torchvision's Resize + CenterCrop to within the resampling's rounding."""
    w, h = size
    assert max(w, h) > EXACT_ASPECT * min(w, h)
    y, x = np.mgrid[0:h, 0:w]
    smooth = (127 + 60 * np.sin(x / 9.0) + 60 * np.cos(y / 13.0)).astype(np.uint8)
    image = PIL.Image.fromarray(np.stack([smooth, 255 - smooth, smooth // 2], -1))
    expected = TF.center_crop(TF.resize(image, 32, interpolation=TF.InterpolationMode.LANCZOS), 32)
    got = resize_image(image, 32, "crop")
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 3


def test_a_normal_image_is_exactly_resize_then_crop():
    image = make_images(1, size=(90, 50))[0]
    expected = TF.center_crop(TF.resize(image, 32, interpolation=TF.InterpolationMode.LANCZOS), 32)
    assert np.array_equal(np.asarray(resize_image(image, 32, "crop")), np.asarray(expected))


def test_a_too_thin_image_to_pad_is_a_clear_error():
    with pytest.raises(ValueError, match="too thin to fit"):
        resize_image(PIL.Image.new("RGB", (1, 300_000)), 32, "pad")


def test_a_decompression_bomb_is_a_value_error_naming_the_input(scorer, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    PIL.Image.new("RGB", (400, 400)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 400 x 400 > 2 x the limit: PIL refuses it
    with pytest.raises(ValueError, match=r"images\[1\].*decompression bomb"):
        scorer([make_images(1)[0], str(path)], ["a"])


# -- bit depth -----------------------------------------------------------------------------------

def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16)[None].repeat(4, 0) * 257)  # 0 .. 65535
    path = tmp_path / "ramp16.png"
    PIL.Image.fromarray(ramp).save(path)
    assert PIL.Image.open(path).mode == "I;16"
    grey = np.asarray(load_rgb(str(path)))[..., 0]
    assert np.array_equal(grey[0], np.arange(256))  # PIL's own convert gives 255 from 255 on


def test_32_bit_integer_and_float_images_are_scaled():
    values = np.linspace(0, 1, 16).reshape(4, 4)
    as_int = PIL.Image.fromarray((values * (2**31 - 1)).astype(np.int32))
    as_float = PIL.Image.fromarray(values.astype(np.float32))
    assert as_int.mode == "I" and as_float.mode == "F"
    expected = np.round(values * 255)
    for image in (as_int, as_float):
        assert np.abs(np.asarray(load_rgb(image))[..., 0] - expected).max() <= 1


def test_a_float_image_out_of_range_or_nan_is_refused():
    for value in (2.0, float("nan")):
        with pytest.raises(ValueError, match="image"):
            load_rgb(PIL.Image.fromarray(np.full((4, 4), value, dtype=np.float32)), "images[0]")


# -- non-finite values ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_image_tensors_are_refused(scorer, value):
    image = torch.rand(3, 8, 8)
    image[0, 2, 3] = value
    with pytest.raises(ValueError, match=r"images\[0\].*NaN or infinite"):
        scorer([image], ["a"])


def test_a_non_finite_noise_bank_is_refused(components):
    noise = torch.randn(2, *components.latent_shape)
    noise[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        NoiseBank.from_tensors(torch.tensor([10, 500]), noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fractional_timesteps_are_refused_by_an_integer_timestep_model_not_truncated(prediction_type):
    """Fractional timesteps make a continuous (flow-matching) bank, kept as given; a DDPM-step model
    scoring on it is an error, never a truncation to whole steps."""
    model = DiffusionITM(build_random_components("tiny", seed=0, prediction_type=prediction_type), samples=2)
    timesteps = torch.tensor([10.0, 500.7], dtype=torch.float64)
    bank = NoiseBank.from_tensors(timesteps, torch.randn(2, *model.components.latent_shape))
    assert torch.equal(bank.timesteps, timesteps)
    with pytest.raises(ValueError, match=f"a '{prediction_type}' model takes integer timesteps"):
        model(make_images(1), ["a"], noise=bank)


# -- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs, match", [
    ([[0, 0, 0]], r"shape \[P, 2\]"),
    ([0, 0, 1, 0], r"shape \[P, 2\]"),
    (torch.tensor([[0.7, 0.2]]), "integer indices"),
    ([[0.0, 1.0]], "integer indices"),
    ([[True, False]], "integer indices"),
])
def test_malformed_pairs_are_refused_not_reshaped_or_truncated(scorer, pairs, match):
    with pytest.raises(ValueError, match=match):
        scorer.score_pairs(make_images(2), ["a", "b"], pairs)


@pytest.mark.parametrize("overrides, error, match", [
    ({"samples": True}, ValueError, "samples must be an integer"),
    ({"seed": 1.9}, ValueError, "seed must be an integer"),
    ({"batch_size": 1.5}, TypeError, "batch_size"),
    ({"batch_size": True}, TypeError, "batch_size"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"noise": torch.randn(2, 4, 4, 4)}, TypeError, "noise must be a NoiseBank"),
])
def test_bad_call_arguments_name_the_argument(scorer, overrides, error, match):
    with pytest.raises(error, match=match):
        scorer(make_images(1), ["a"], **overrides)


def test_reasonable_call_arguments_are_accepted(scorer):
    images, texts = make_images(2), ["a red square", "a blue circle"]
    expected = scorer(images, texts, seed=3)
    assert torch.equal(scorer((image for image in images), iter(texts), seed=3), expected)  # iterables
    assert torch.equal(scorer(images, texts, seed=3, batch_size="auto"), expected)
    assert torch.equal(scorer(images, texts, seed=None), scorer(images, texts))  # None: the protocol's seed
    generated = scorer.score_candidates((image for image in images), [iter(texts), iter(texts)], seed=3)
    assert torch.equal(generated, expected)


def test_a_caption_with_a_lone_surrogate_is_a_value_error(scorer):
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
        scorer(make_images(1), ["fine", "bad \ud800 caption"])


def test_a_huge_batch_size_allocates_for_the_items_not_the_size(scorer, monkeypatch):
    sizes = []
    original = torch.empty

    def recording_empty(*args, **kwargs):
        shape = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
        sizes.append(int(shape[0]) if len(shape) else 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    scores = scorer(make_images(2), ["a", "b"], batch_size=10**9)
    assert scores.shape == (2, 2) and max(sizes) <= 2 * 2 * 2  # at most the work items
    assert scorer.last_stats.batch_size <= 8


# -- bounded caches ------------------------------------------------------------------------------

def test_caches_keep_their_byte_budget_evicting_the_least_recently_used(components):
    one = DiffusionITM(components, samples=1, cache_bytes=None)
    one(make_images(1), ["x"])
    per_image = one.latent_cache.bytes
    per_text = one.text_cache.bytes
    scorer = DiffusionITM(components, samples=1, cache_bytes=3 * max(per_image, per_text))
    images = make_images(6)
    texts = [f"caption {i}" for i in range(6)]
    expected = one(images, texts)
    for i in range(6):  # one new image and text per call: the caches would hold 6 of each
        scorer([images[i]], [texts[i]])
        assert scorer.latent_cache.bytes <= 3 * max(per_image, per_text)
        assert scorer.text_cache.bytes <= 3 * max(per_image, per_text)
    assert len(scorer.latent_cache) == 3 and scorer.last_stats.evicted == 2  # one image and one text
    assert scorer.last_stats.cache_bytes == {"latent": scorer.latent_cache.bytes, "text": scorer.text_cache.bytes}
    # a call needs more than the budget: all its entries are used, then the budget is restored
    assert torch.allclose(scorer(images, texts), expected, atol=1e-6)
    assert scorer.latent_cache.bytes <= 3 * max(per_image, per_text)


def test_the_least_recently_used_entry_goes_first(components):
    cache = TextCache(components, max_bytes=None)
    cache.get(["a"])
    cache._store.max_bytes = 2 * cache.bytes
    cache.get(["b"])
    cache.get(["a"])  # "a" used again: "b" is now the oldest
    cache.get(["c"])
    assert "a" in cache._store and "b" not in cache._store and "c" in cache._store


def test_unbounded_caches_never_evict(components):
    scorer = DiffusionITM(components, samples=1, cache_bytes=None)
    for i in range(4):
        scorer(make_images(1, seed=i), [f"caption {i}"])
    assert len(scorer.latent_cache) == 4 and len(scorer.text_cache) == 4
