"""Inputs and caches: image modes, paths, tensors, content keys, text handling, clear errors."""
import warnings

import PIL.Image
import pytest
import torch

from itm_engine import DiffusionITM
from itm_engine.cache import LatentCache, TextCache, load_rgb
from itm_engine.models import build_random_components

from fixtures.helpers import count_unet_items, make_images


@pytest.fixture(scope="module")
def components():
    return build_random_components("tiny", seed=0)


@pytest.fixture(scope="module")
def scorer(components):
    return DiffusionITM(components)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_any_pil_mode_becomes_rgb(mode):
    image = make_images(1)[0]
    converted = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    rgb = load_rgb(converted)
    assert rgb.mode == "RGB" and rgb.size == image.size


def test_transparent_pixels_become_white():
    image = PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_path_and_pil_and_tensor_of_the_same_image_share_one_cache_entry(tmp_path, components):
    image = make_images(1)[0]
    path = tmp_path / "img.png"
    image.save(path)
    tensor = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
    cache = LatentCache(components)
    latents, index = cache.get([image, str(path), path, tensor, tensor.float() / 255])
    assert latents.shape == (1, *components.latent_shape)
    assert index.tolist() == [0, 0, 0, 0, 0] and len(cache) == 1


def test_latents_are_the_scaled_posterior_mean(components):
    image = make_images(1)[0]
    latents, _ = LatentCache(components).get([image])
    from itm_engine.cache import preprocess_images

    pixels = preprocess_images(components, [image])
    assert pixels.shape == (1, 3, components.image_size, components.image_size)
    assert pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        expected = components.vae.encode(pixels).latent_dist.mean * components.scaling_factor
    torch.testing.assert_close(latents, expected)


def test_crop_policy_keeps_the_centre(components):
    """A wide image, red in its middle third and blue at the sides, crops to all red; the
    "stretch" policy keeps the blue."""
    wide = PIL.Image.new("RGB", (900, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (300, 0, 600, 100))
    from itm_engine.cache import preprocess_images

    pixels = preprocess_images(components, [wide])[0]
    assert torch.allclose(pixels[0], torch.ones_like(pixels[0]), atol=0.05)  # red channel ~ +1
    assert torch.allclose(pixels[2], -torch.ones_like(pixels[2]), atol=0.05)  # blue channel ~ -1
    stretched = preprocess_images(components, [wide], resize="stretch")[0]
    assert stretched[2, :, 0].min() > 0.9  # the blue left edge survives


def test_missing_image_path_names_it(scorer):
    with pytest.raises(FileNotFoundError, match="images\\[1\\].*nope.png"):
        scorer([make_images(1)[0], "/tmp/does/not/exist/nope.png"], ["a"])


def test_unreadable_image_file_names_it(scorer, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="images\\[0\\].*broken.jpg"):
        scorer([bad], ["a"])


@pytest.mark.parametrize(
    "images, texts, match",
    [
        ([], ["a"], "images is empty"),
        (None, [], "texts is empty"),
        (None, "a caption", "texts must be a list"),
        (None, ["ok", 3], r"texts\[1\] is a int"),
        ([torch.rand(3, 8, 8) * 2], ["a"], r"\[0, 1\]"),
        ([torch.rand(4, 8, 8)], ["a"], r"\[3, H, W\]"),
        ([42], ["a"], "expected a PIL image"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_culprit(scorer, images, texts, match):
    images = make_images(1) if images is None else images
    with pytest.raises(ValueError, match=match):
        scorer(images, texts)


def test_zero_samples_and_misfit_bank_are_value_errors(scorer):
    images = make_images(1)
    with pytest.raises(ValueError, match="samples"):
        scorer(images, ["a"], samples=0)
    from itm_engine import NoiseBank

    wrong = NoiseBank.sample(2, (4, 8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        scorer(images, ["a"], noise=wrong)
    with pytest.raises(ValueError, match="mode"):
        scorer(images, ["a"], mode="both")


def test_overlong_caption_is_truncated_with_one_warning(scorer):
    images = make_images(1)
    long_a = "a photo of " + "a very large red dog " * 30
    long_b = long_a + " and a cat"
    limit = scorer.components.tokenizer.model_max_length
    with pytest.warns(UserWarning, match=f"{limit}-token limit") as record:
        scores = scorer(images, [long_a, long_b, "short"], samples=1)
    assert len([w for w in record if "token limit" in str(w.message)]) == 1
    # Both long captions agree on their first 77 tokens, so after truncation they are the same.
    assert scores[0, 0] == scores[0, 1]


def test_empty_caption_is_the_null_prompt(scorer):
    images = make_images(2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scores = scorer(images, ["", "a dog"], mode="t2i", samples=2)
    assert not [w for w in record if "token" in str(w.message)]
    assert torch.equal(scores[:, 0], torch.zeros(2))  # err(x, "") - err(x, "") on the same draw


def test_text_cache_encodes_each_string_once(components):
    cache = TextCache(components)
    cond, index = cache.get(["a", "b", "a", ""])
    assert list(cond) == ["context"]
    emb = cond["context"]
    assert emb.shape[0] == 3 and index.tolist() == [0, 1, 0, 2]
    assert emb.shape[1] == components.tokenizer.model_max_length
    emb2, _ = cache.get(["b"])
    assert torch.equal(emb2["context"][0], emb[1]) and len(cache) == 3


def test_caches_persist_across_calls_until_cleared(components):
    scorer = DiffusionITM(components)
    images = make_images(2)
    scorer(images, ["a", "b"], samples=1)
    assert len(scorer.latent_cache) == 2 and len(scorer.text_cache) == 2
    with count_unet_items(components.vae.encoder) as counted:
        scorer(images, ["a", "b"], samples=1)
    assert counted.calls == 0
    scorer.clear_cache()
    assert len(scorer.latent_cache) == 0 and len(scorer.text_cache) == 0
