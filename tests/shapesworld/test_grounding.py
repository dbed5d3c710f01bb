"""Token grounding for pretraining (`itm_engine.shapesworld.grounding`): recorded cross-attention maps, the words
that name each object, the masks, and the loss."""
from __future__ import annotations

import random

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from itm_engine.shapesworld import grounding, world
from itm_engine.shapesworld.pretrain import PretrainConfig, Pretrainer, build_components

TOY = dict(unet_channels=(16, 32), text_width=32)


def test_recorder_keeps_every_cross_attention_map_and_changes_no_output():
    """Inside `record()` each cross-attention layer's probabilities are kept ([B, heads, H*W, 16],
    rows summing to 1) and the UNet computes what diffusers' AttnProcessor computes; outside, nothing
    is kept; a processor swapped in meanwhile (as a scorer does) is replaced on the next recording."""
    comp = build_components(PretrainConfig(**TOY))
    unet = comp.unet
    gen = torch.Generator().manual_seed(0)
    zt, states = torch.randn(2, 8, 8, 8, generator=gen), torch.randn(2, 16, 32, generator=gen)
    t = torch.tensor([10, 900])
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        expected = unet(zt, t, encoder_hidden_states=states).sample
        recorder = grounding.AttentionRecorder(unet)
        with recorder.record() as maps:
            got = unet(zt, t, encoder_hidden_states=states).sample
        unet(zt, t, encoder_hidden_states=states)
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(maps) == len(cross) and torch.equal(got, expected)
    assert sorted({m.shape[2] for m in maps}) == [16, 64]
    for m in maps:
        assert m.shape[0] == 2 and m.shape[1] in (1, 2) and m.shape[3] == 16  # heads: width // 16
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:3]))
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad(), recorder.record() as again:
        unet(zt, t, encoder_hidden_states=states)
    assert len(again) == len(cross)


def test_words_name_their_objects_and_masks_cover_them():
    assert grounding.word_objects("a red circle left of a blue square", ("blue", "red")) == [
        (1, 1), (2, 1), (6, 0), (7, 0)]
    assert grounding.word_objects("a circle that is red and a square that is blue", ("red", "blue")) == [
        (4, 0), (10, 1)]
    assert grounding.word_objects("", ("red",)) == []
    scene, _ = world.sample_example(random.Random(3), "spatial", "train")
    masks = grounding.object_masks(scene, 64, 8)
    assert masks.shape == (2, 8, 8) and set(masks.unique().tolist()) == {0.0, 1.0}
    for obj, mask in zip(scene, masks):
        assert mask[obj.y // 8, obj.x // 8] == 1  # the centre's cell
    assert not (masks[0] * masks[1]).any()  # two objects never share a cell (>= 0.42 of the side apart)
    assert grounding.object_masks(scene[:1], 64, 8)[1].sum() == 0


def test_grounding_loss_is_the_attention_share_outside_the_mask():
    """1 - sum(A * M) / sum(A), A averaged over heads; coarser layers max-pool the mask; layers of
    other resolutions are ignored."""
    fine = torch.zeros(1, 2, 64, 4)
    fine[0, :, :, 0] = 1.0 / 64  # token 0: uniform over the 8x8 map
    fine[0, 0, 0, 1], fine[0, 1, 63, 1] = 1.0, 1.0  # token 1: head 0 on cell (0, 0), head 1 on (7, 7)
    coarse = torch.full((1, 2, 16, 4), 0.25)
    tiny = torch.rand(1, 2, 4, 4)
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1  # the top-left quarter
    loss = grounding.grounding_loss([fine, coarse, tiny], [(0, 0, mask), (0, 1, mask)])
    # fine: token 0 -> 1 - 16/64, token 1 -> 1 - 1/2; coarse (4x4, the quarter is 4 cells): 1 - 4/16 each
    expected = (0.75 + 0.5 + 0.75 + 0.75) / 4
    assert loss.item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        grounding.grounding_loss([tiny], [(0, 0, mask)])


@pytest.mark.slow
def test_a_grounding_stage_trains_and_moves_attention_onto_the_objects(tmp_path):
    """With only the grounding term's gradient, a few steps on fixed spatial captions raise the share
    of the named words' attention inside their objects."""
    config = PretrainConfig(**TOY, scenes=16, scene_kinds=("spatial",), grounding_weight=1.0, stages=(),
                            form_weights={"spatial": 1.0, "recognition": 0.0, "binding": 0.0, "pair": 0.0,
                                          "position": 0.0})
    trainer = Pretrainer(config, tmp_path, progress=False)
    from itm_engine.shapesworld.pretrain import training_scenes

    data = training_scenes(config, trainer.components)
    assert data.masks.shape == (16, 2, 8, 8)
    stage = config.stage_list()[0]
    idx = torch.arange(16)
    texts = [c["spatial"][0] for c in data.captions]
    zt, t = torch.randn(16, 8, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((16,), 300)
    unet, params = trainer.components.unet, list(trainer.components.unet.parameters())
    optimiser = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(15):
        with trainer.recorder.record() as maps:
            unet(zt, t, encoder_hidden_states=trainer._encode(texts).detach())
        loss = trainer._grounding_loss(stage, texts, idx, data, maps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
