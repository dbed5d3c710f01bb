"""Shared test helpers: generated images, a UNet item counter, relative differences."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import PIL.Image
import PIL.ImageDraw
import torch


def make_images(n: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[PIL.Image.Image]:
    """n distinct RGB images of random coloured boxes on noise (not square: exercises the crop)."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
        image = PIL.Image.fromarray(pixels.numpy(), mode="RGB")
        x0, y0 = torch.randint(0, size[0] // 2, (2,), generator=gen).tolist()
        colour = tuple(torch.randint(0, 256, (3,), generator=gen).tolist())
        PIL.ImageDraw.Draw(image).rectangle((x0, y0, x0 + size[0] // 2, y0 + size[1] // 2), fill=colour)
        images.append(image)
    return images


def max_rel_diff(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float | None = None) -> float:
    """max |a - b| / scale, where scale defaults to max |b| (safe when some entries are near zero)."""
    scale = b.abs().max() if scale is None else torch.as_tensor(scale)
    return ((a - b).abs().max() / scale.clamp_min(1e-12)).item()


@dataclass
class UnetCount:
    items: int = 0
    calls: int = 0


@contextmanager
def count_unet_items(unet: torch.nn.Module):
    """Count the UNet's forward calls and the batch items they carried."""
    count = UnetCount()

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        count.items += sample.shape[0]
        count.calls += 1

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()
