"""Token grounding for pretraining: the UNet's cross-attention maps of a caption's words pulled onto
the objects they name (TokenCompose, Wang et al., CVPR 2024, token loss; there with segmentation
masks, here with the renderer's exact ones).

`AttentionRecorder` installs a recording processor on every cross-attention layer of a
`diffusers.UNet2DConditionModel` (diffusers' own `AttnProcessor`, whose attention probabilities it
keeps while `recording`). `grounding_loss` takes the recorded maps of the layers at the resolutions
asked for, and for each grounded (item, token, object) the share of the token's attention that falls
outside the object's mask: 1 - sum(A * M) / sum(A), averaged over heads, layers and tokens.
`word_objects` says which words of a ShapesWorld caption name which object (a colour word and the
shape word right after it), `object_masks` renders each object's mask at latent resolution.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from itm_engine.shapesworld import world

# latent sides (H = W) whose cross-attention maps the pretraining grounding term reads
GROUNDING_RESOLUTIONS = (8, 4)


class _RecordingProcessor(AttnProcessor):
    """diffusers' `AttnProcessor`; while its recorder is recording, keeps each call's attention
    probabilities, as [batch, heads, queries, tokens], in `recorder.maps`."""

    def __init__(self, recorder: "AttentionRecorder") -> None:
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if not self.recorder.recording:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        scores = attn.get_attention_scores

        def recorded(query, key, mask=None):
            probs = scores(query, key, mask)
            self.recorder.maps.append(probs.unflatten(0, (-1, attn.heads)))  # [B, heads, queries, tokens]
            return probs

        attn.get_attention_scores = recorded
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        finally:
            del attn.get_attention_scores


class AttentionRecorder:
    """Records the cross-attention maps of `unet` inside `with recorder.record() as maps:` (a list
    of [B, heads, H * W, tokens] tensors in call order). Entering installs the recording processor
    on every cross-attention layer (again if something, e.g. a scorer built for validation, has
    replaced it); outside a recording it computes as diffusers' `AttnProcessor`."""

    def __init__(self, unet: diffusers.UNet2DConditionModel) -> None:
        self.unet, self.recording, self.maps = unet, False, []
        self.processor = _RecordingProcessor(self)

    @contextmanager
    def record(self) -> Iterator[list[torch.Tensor]]:
        current = self.unet.attn_processors
        if any(p is not self.processor for name, p in current.items() if name.endswith("attn2.processor")):
            self.unet.set_attn_processor({name: self.processor if name.endswith("attn2.processor") else p
                                          for name, p in current.items()})
        self.maps, self.recording = [], True
        try:
            yield self.maps
        finally:
            self.recording = False


def word_objects(caption: str, colors: Sequence[str]) -> list[tuple[int, int]]:
    """(word position, object index) for each word of `caption` that names one of the objects whose
    colours are `colors` (distinct): a colour word, and the shape word right after it ("a red circle
    left of a blue square", colours ("blue", "red") -> [(1, 1), (2, 1), (6, 0), (7, 0)])."""
    words = caption.split()
    out = []
    for i, word in enumerate(words):
        if word in colors:
            out.append((i, colors.index(word)))
            if i + 1 < len(words) and words[i + 1] in world.SHAPES:
                out.append((i + 1, colors.index(word)))
    return out


def object_masks(scene: world.Scene, size: int, latent: int, objects: int = 2,
                 style: world.Style = world.EXACT) -> torch.Tensor:
    """[objects, latent, latent] float masks: 1 where a latent cell (of a `size`-px render in
    `style`) holds any pixel of that object of `scene`, 0 elsewhere and for absent objects."""
    out = torch.zeros(objects, latent, latent)
    background = torch.tensor((style.background,) * 3, dtype=torch.uint8)
    for k, obj in enumerate(scene[:objects]):
        pixels = torch.from_numpy(np.array(world.render((obj,), size, style.of_object(k))))  # [size, size, 3]
        drawn = (pixels != background).any(-1).float()[None, None]
        out[k] = F.adaptive_max_pool2d(drawn, latent)[0, 0]
    return out


def grounding_loss(maps: Sequence[torch.Tensor], items: Sequence[tuple[int, int, torch.Tensor]],
                   resolutions: Sequence[int] = GROUNDING_RESOLUTIONS) -> torch.Tensor:
    """Mean over the recorded `maps` ([B, heads, H * W, tokens]) with H in `resolutions` and over
    `items` (batch row, token column, mask [M, M] at the largest resolution M; coarser layers
    max-pool it) of 1 - sum(A * mask) / sum(A), A the token's attention map averaged over heads."""
    rows = torch.tensor([r for r, _, _ in items])
    columns = torch.tensor([c for _, c, _ in items])
    masks = torch.stack([m for _, _, m in items])[:, None]  # [n, 1, M, M]
    losses = []
    for probs in maps:
        side = int(round(probs.shape[2] ** 0.5))
        if side not in resolutions:
            continue
        attention = probs.mean(1)[rows, :, columns]  # [n, H * W]
        mask = F.adaptive_max_pool2d(masks, side).flatten(1)  # [n, H * W]
        inside = (attention * mask).sum(1) / attention.sum(1).clamp_min(1e-8)
        losses.append(1 - inside)
    if not losses:
        raise ValueError(f"no recorded cross-attention map at the resolutions {tuple(resolutions)}")
    return torch.stack(losses).mean()
