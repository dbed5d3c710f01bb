"""GPU fast-path options for the UNet: attention backend, memory format, compilation, batch size.

All are off-by-default-safe: the defaults (SDPA attention, contiguous NCHW, eager mode) run
everywhere and give the reference scores.
"""
from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from itm_engine.models import SDComponents
from itm_engine.models.families import family_of

Attention = Literal["sdpa", "xformers", "math"]
ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


def set_attention(unet: torch.nn.Module, backend: Attention = "sdpa") -> None:
    """Route every attention layer of `unet` through `backend`.

    "sdpa": PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU);
    "xformers": xformers' memory-efficient attention (an optional extra: `pip install
    itm-engine[xformers]`); "math": the plain softmax(QK^T)V implementation. A transformer
    denoiser (SD3, ...) keeps its own attention processors, which use SDPA: only "sdpa" applies.
    """
    if not isinstance(unet, UNet2DConditionModel):
        if backend != "sdpa":
            raise ValueError(f"attention={backend!r} applies to UNet denoisers only; {type(unet).__name__} keeps "
                             "its own SDPA attention processors (attention='sdpa')")
        return
    if backend == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "math":
        unet.set_attn_processor(AttnProcessor())
    elif backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise RuntimeError("attention='xformers' needs the xformers package: pip install 'itm-engine[xformers]'")
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")


def use_channels_last(module: torch.nn.Module) -> None:
    """Store the module's 4-d weights channels-last (NHWC), which tensor cores prefer for convs."""
    module.to(memory_format=torch.channels_last)


def compile_unet(unet: torch.nn.Module, cuda_graphs: bool = False) -> torch.nn.Module:
    """`torch.compile` the UNet for fixed shapes (the executor pads every batch to one size).

    `cuda_graphs=True` uses mode "reduce-overhead": inductor captures the compiled UNet in CUDA
    graphs and replays them, removing per-kernel launch overhead.
    """
    return torch.compile(unet, mode="reduce-overhead" if cuda_graphs else "default", dynamic=False)


def auto_batch_size(components: SDComponents, cap: int = 512) -> int:
    """The largest denoiser batch that fits: measured from one probe forward on CUDA, 64 elsewhere.

    The probe's peak memory per item, against the free memory (keeping 20% headroom), gives the
    size, rounded down to a multiple of 8 and capped at `cap`. The executor still halves the batch
    on out-of-memory, so an estimate that proves too large costs a retry, never a crash.
    """
    family, device = family_of(components), components.device
    if device.type != "cuda":
        return 64
    probe = 8
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        family.denoise(components, *family.example_inputs(components, probe))
    per_item = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(cap, (0.8 * free // per_item) // 8 * 8)))
