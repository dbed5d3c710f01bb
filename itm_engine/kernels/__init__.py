"""Fused ops of the engine's hot path, each with several backends and one dispatch function.

Ops (same signatures in every backend; see `reference.py` for the exact contracts):

- `noisy_latents`: gather each item's latent and noise draw, x_t = a z0 + b eps;
- `item_error`: per-item mean squared error against the target c z0 + d eps (eps, v or the flow
  velocity), float32, no [B, C, H, W] temporary;
- `topk_similarity`: streaming top-k of query-gallery dot products (the CLIP prefilter's step).

Backends:

- `reference`: plain PyTorch, the oracle, runs everywhere;
- `triton`: Triton kernels for CUDA tensors (CPU tensors only under `TRITON_INTERPRET=1`, for tests);
- `ext`: the csrc/ C++ extension (`itm_engine._C`, ops in `torch.ops.itm_engine`): OpenMP CPU
  code, and CUDA code when it was built with a CUDA toolkit.

The per-item coefficients (a, b, c, d), float32 [B, 4], are computed once in Python by the model's
`noise.ForwardProcess` and gathered per item by the caller, so every backend combines the same
values.

`backend=None` reads `ITM_KERNELS` (`reference|triton|ext|auto`, default `auto`). `auto` picks,
per device, the fastest backend available: on CUDA `triton`, else `ext`, else `reference`; on the
CPU `ext`, else `reference`. A forced backend that cannot serve the tensors is an error, never a
silent fallback. `last_backend[op]` records what each op last ran on.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from itm_engine.kernels import reference

BACKENDS = ("reference", "triton", "ext")
OPS = ("noisy_latents", "item_error", "topk_similarity")
last_backend: dict[str, str] = {}


def _triton() -> ModuleType | None:
    try:
        from itm_engine.kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def _extension() -> ModuleType | None:
    from itm_engine.kernels import extension

    return extension if extension.load() else None


def available(backend: str, device: torch.device) -> bool:
    """Whether `backend` can run the ops on tensors of `device`."""
    if backend == "reference":
        return True
    if backend == "triton":
        module = _triton()
        return module is not None and module.supports(device)
    if backend == "ext":
        module = _extension()
        return module is not None and module.supports(device)
    raise ValueError(f"unknown kernel backend {backend!r}; choose from {BACKENDS} or 'auto'")


def resolve_backend(device: torch.device | str, requested: str | None = None) -> str:
    """The backend to use for tensors on `device` (`requested` or `ITM_KERNELS`, default auto)."""
    device = torch.device(device)
    requested = requested or os.environ.get("ITM_KERNELS", "auto")
    if requested == "auto":
        preference = ("triton", "ext", "reference") if device.type == "cuda" else ("ext", "reference")
        return next(b for b in preference if available(b, device))
    if not available(requested, device):
        raise RuntimeError(
            f"kernel backend {requested!r} was asked for (ITM_KERNELS or kernels=...) but cannot run on "
            f"{device.type} tensors here; available: {[b for b in BACKENDS if available(b, device)]}"
        )
    return requested


def _implementation(op: str, device: torch.device, backend: str | None):
    name = resolve_backend(device, backend)
    module = {"reference": reference, "triton": _triton, "ext": _extension}[name]
    module = module if isinstance(module, ModuleType) else module()
    last_backend[op] = name
    return getattr(module, op)


def noisy_latents(
    latents: torch.Tensor,
    noise: torch.Tensor,
    img_idx: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """x_t [B, C, H, W] = a latents[img_idx] + b noise[sample_idx], coefficients float32 [B, 4];
    see `reference.noisy_latents`."""
    fn = _implementation("noisy_latents", latents.device, backend)
    return fn(latents, noise, img_idx, sample_idx, coefficients, out=out)


def item_error(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    latents: torch.Tensor | None = None,
    img_idx: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-item MSE against c z0 + d eps, float32 [B]; see `reference.item_error`.

    Without `latents` the target is d eps (epsilon models, no latent read), and a c other than 0
    is an error: the reference and the extension's CPU code raise, the extension's CUDA kernel
    asserts on the device, and the Triton kernels do not read c (a check would cost a device sync).
    """
    fn = _implementation("item_error", pred.device, backend)
    return fn(pred, noise, sample_idx, coefficients, latents, img_idx)


def topk_similarity(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [Q, k], indices int64 [Q, k]); see `reference.topk_similarity`."""
    reference.check_topk_args(queries, gallery, k)
    fn = _implementation("topk_similarity", queries.device, backend)
    return fn(queries, gallery, k)


__all__ = ["BACKENDS", "OPS", "available", "item_error", "last_backend", "noisy_latents", "resolve_backend",
           "topk_similarity"]
