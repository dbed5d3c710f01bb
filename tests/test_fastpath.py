"""Fast-path options that can run on the CPU give the reference scores."""
import importlib.util

import pytest
import torch

from itm_engine import DiffusionITM
from itm_engine.models import build_random_components

from fixtures.helpers import count_unet_items, make_images, max_rel_diff

TEXTS = ["a red box", "a small blue ball", "three green cubes", ""]


@pytest.fixture(scope="module")
def images():
    return make_images(3)


@pytest.fixture(scope="module")
def reference(images):
    """(bank, expected T2I scores, error scale) from a default scorer on its own model copy."""
    scorer = DiffusionITM(build_random_components("tiny", seed=2))
    bank = scorer.noise_bank(3, seed=1)
    return bank, scorer(images, TEXTS, mode="t2i", noise=bank), scorer(images, TEXTS, noise=bank).abs().max()


@pytest.mark.parametrize(
    "options",
    [
        dict(attention="math"),
        dict(channels_last=True),
        dict(attention="math", channels_last=True, batch_size=5),
        dict(batch_size="auto"),
    ],
    ids=str,
)
def test_options_give_the_reference_scores(images, reference, options):
    bank, expected, scale = reference
    scorer = DiffusionITM(build_random_components("tiny", seed=2), **options)
    assert max_rel_diff(scorer(images, TEXTS, mode="t2i", noise=bank), expected, scale=scale) <= 1e-5


def test_auto_batch_size_is_64_on_the_cpu(images):
    scorer = DiffusionITM(build_random_components("tiny"), batch_size="auto")
    scorer(images, TEXTS, samples=1)
    assert scorer.executor.batch_size == 64
    assert scorer.last_stats.batch_size == min(64, scorer.last_stats.unet_items)  # no batch beyond the work


def test_padding_to_fixed_shapes_never_changes_a_score(images, reference):
    bank, expected, scale = reference
    scorer = DiffusionITM(build_random_components("tiny", seed=2), batch_size=7)
    scorer.executor.fixed_shapes = True
    with count_unet_items(scorer.components.unet) as counted:
        got = scorer(images, TEXTS, mode="t2i", noise=bank)
    real = len(images) * len(TEXTS) * len(bank)  # "" is among TEXTS: it doubles as the null prompt
    assert scorer.last_stats.unet_items == real
    assert scorer.last_stats.padded_items == -real % 7
    assert counted.items == counted.calls * 7  # every call has the fixed shape
    assert max_rel_diff(got, expected, scale=scale) <= 1e-5


@pytest.mark.slow
def test_compiled_unet_gives_the_reference_scores(images, reference):
    bank, expected, scale = reference
    scorer = DiffusionITM(build_random_components("tiny", seed=2), compile=True, batch_size=16)
    got = scorer(images, TEXTS, mode="t2i", noise=bank)
    assert scorer.last_stats.padded_items > 0  # the last batch was padded to 16
    assert max_rel_diff(got, expected, scale=scale) <= 1e-5


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_the_package_is_a_clear_error():
    with pytest.raises(RuntimeError, match="pip install 'itm-engine\\[xformers\\]'"):
        DiffusionITM(build_random_components("tiny"), attention="xformers")


def test_unknown_attention_backend():
    with pytest.raises(ValueError, match="attention must be one of"):
        DiffusionITM(build_random_components("tiny"), attention="flash3")


def test_out_of_memory_retry_scores_every_item_exactly_once(images, reference, monkeypatch):
    bank, expected, scale = reference
    components = build_random_components("tiny", seed=2)
    scorer = DiffusionITM(components, batch_size=16)
    calls = {"n": 0}
    forward = components.unet.forward

    def flaky_forward(*args, **kwargs):  # every third call runs out of memory
        calls["n"] += 1
        if calls["n"] % 3 == 0 and args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(components.unet, "forward", flaky_forward)
    with pytest.warns(UserWarning, match="batch size reduced"):
        got = scorer(images, TEXTS, mode="t2i", noise=bank)
    assert scorer.last_stats.unet_items == len(images) * len(TEXTS) * len(bank)
    assert max_rel_diff(got, expected, scale=scale) <= 1e-5
