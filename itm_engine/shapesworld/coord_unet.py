"""A `diffusers.UNet2DConditionModel` that knows where each latent pixel is (CoordConv).

A plain UNet is translation-equivariant: apart from faint zero-padding effects, a pixel cannot tell
whether it lies on the left or the right of the image, so "a red circle on the left" and "... on the
right" condition it identically. `CoordUNet2DConditionModel` appends two fixed coordinate channels
(x and y, from -1 at the first pixel to 1 at the last) to the noisy latent before `conv_in`, as
CoordConv does (Liu et al., 2018), so position words can be grounded. Everything else, weights
layout, config, saving and loading, attention processors, `torch.compile`, is the parent's; its
config's ``in_channels`` counts the two coordinate channels (latent channels + 2, which the class
attribute ``extra_input_channels`` declares) and its ``_class_name`` names this class: registered
with `itm_engine.models.register_unet_class` by the lab's plugin, a saved folder loads as it.
"""
from __future__ import annotations

from typing import Any

import diffusers
import torch

COORDINATE_CHANNELS = 2


def coordinate_grid(sample: torch.Tensor) -> torch.Tensor:
    """Coordinate channels for `sample` [B, C, H, W]: [B, 2, H, W] holding x (varying along W) and
    y (along H), each from -1 to 1, on the sample's device and dtype."""
    batch, _, height, width = sample.shape
    ys = torch.linspace(-1, 1, height, device=sample.device, dtype=sample.dtype)
    xs = torch.linspace(-1, 1, width, device=sample.device, dtype=sample.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, H, W]: x then y
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


class CoordUNet2DConditionModel(diffusers.UNet2DConditionModel):
    """`UNet2DConditionModel` fed [noisy latent, x, y]: call it like the parent with a latent
    `sample` [B, in_channels - 2, H, W]; returns the parent's output ([B, out_channels, H, W])."""

    extra_input_channels = COORDINATE_CHANNELS

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                *args: Any, **kwargs: Any) -> Any:
        expected = self.config.in_channels - COORDINATE_CHANNELS
        if sample.shape[1] != expected:
            raise ValueError(f"{type(self).__name__} takes latents with {expected} channels (it adds the "
                             f"{COORDINATE_CHANNELS} coordinate channels itself), got {sample.shape[1]}")
        sample = torch.cat([sample, coordinate_grid(sample)], dim=1)
        return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
