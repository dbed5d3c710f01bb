"""Plain PyTorch fused-op references: the oracle every faster backend is tested against.

Shapes: N cached latents, S noise draws, B work items. Every op takes the items' forward-process
coefficients float32 [B, 4] = (a, b, c, d) (`noise.ForwardProcess.coefficients` of the items'
timesteps, gathered per item): x_t = a z0 + b eps and target = c z0 + d eps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from itm_engine.noise import add_noise, denoising_target


def noisy_latents(
    latents: torch.Tensor,
    noise: torch.Tensor,
    img_idx: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t[b] = coefficients[b, 0] * latents[img_idx[b]] + coefficients[b, 1] * noise[sample_idx[b]].

    Args:
        latents: [N, C, H, W]; noise: [S, C, H, W]; img_idx, sample_idx: Long [B];
        coefficients: float32 [B, 4] (`check_coefficients`); out: optional [B, C, H, W] buffer to
        write into (its dtype wins).
    Returns:
        x_t [B, C, H, W], computed in float32, in `out`'s dtype (else the latents' dtype).
    """
    check_coefficients(coefficients, img_idx.shape[0], latents.device, "noisy_latents")
    x_t = add_noise(latents[img_idx].float(), noise[sample_idx].float(), coefficients)
    if out is None:
        return x_t.to(latents.dtype)
    return out.copy_(x_t)


def item_error(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    latents: torch.Tensor | None = None,
    img_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of each item's prediction against its target, float32 [B].

    Args:
        pred: the denoiser's output [B, C, H, W] (fp32/fp16/bf16/fp64).
        noise: [S, C, H, W]; sample_idx: Long [B].
        coefficients: float32 [B, 4]; the target is c z0 + d eps.
        latents, img_idx: z0 [N, C, H, W] and Long [B], needed when a c is not 0 (v, flow). None:
            the target is d eps and no latent is read (epsilon models); a c != 0 is a ValueError.
    """
    goal = _target(noise, sample_idx, coefficients, latents, img_idx, "item_error")
    return (pred.float() - goal).square().flatten(1).mean(dim=1)


def item_loss(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    latents: torch.Tensor | None,
    img_idx: torch.Tensor | None,
    loss: str,
) -> torch.Tensor:
    """Mean absolute ("l1") or mean Huber (delta 1, "huber") error of each item's prediction
    against its target, float32 [B], as Diffusion Classifier's `F.l1_loss` / `F.huber_loss`
    reduced per item (arguments as `item_error`). No fused version: these reductions run here."""
    goal = _target(noise, sample_idx, coefficients, latents, img_idx, "item_loss")
    if loss == "l1":
        per_element = F.l1_loss(pred.float(), goal, reduction="none")
    elif loss == "huber":
        per_element = F.huber_loss(pred.float(), goal, reduction="none", delta=1.0)
    else:
        raise ValueError(f"loss must be 'l1' or 'huber', got {loss!r}")
    return per_element.flatten(1).mean(dim=1)


def _target(noise: torch.Tensor, sample_idx: torch.Tensor, coefficients: torch.Tensor, latents: torch.Tensor | None,
            img_idx: torch.Tensor | None, op: str) -> torch.Tensor:
    """Each item's target c z0 + d eps, float32 [B, C, H, W] (see `item_error`)."""
    check_coefficients(coefficients, sample_idx.shape[0], noise.device, op)
    check_target_latents(latents, img_idx, op)
    eps = noise[sample_idx].float()
    if latents is None:
        if bool((coefficients[:, 2] != 0).any()):
            raise ValueError(f"{op}: a target with a latent term (coefficients[:, 2] != 0: v or flow) needs "
                             "latents and img_idx")
        return coefficients[:, 3].view(-1, 1, 1, 1) * eps  # c z0 + d eps with c = 0
    return denoising_target(latents[img_idx].float(), eps, coefficients)


def check_coefficients(coefficients: torch.Tensor, batch: int, device: torch.device, op: str) -> None:
    """Raise ValueError unless `coefficients` are float32 [batch, >= 4] on `device` (columns past
    the fourth are ignored; any strides)."""
    if not isinstance(coefficients, torch.Tensor):
        raise ValueError(f"{op}: coefficients must be a float32 tensor [B, 4], got {type(coefficients).__name__}")
    if coefficients.dtype != torch.float32 or coefficients.dim() != 2 or coefficients.shape[0] != batch \
            or coefficients.shape[1] < 4:
        raise ValueError(f"{op}: coefficients must be float32 [B, 4] with B = {batch} items (ForwardProcess."
                         f"coefficients, gathered per item), got {coefficients.dtype} {tuple(coefficients.shape)}")
    if coefficients.device != device:
        raise ValueError(f"{op}: coefficients are on {coefficients.device} but the other inputs are on {device}")


def check_target_latents(latents: torch.Tensor | None, img_idx: torch.Tensor | None, op: str) -> None:
    """Raise ValueError when `latents` come without `img_idx` (an `img_idx` alone is ignored)."""
    if latents is not None and img_idx is None:
        raise ValueError(f"{op}: latents need img_idx, the latent row of each item")


def topk_similarity(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k gallery rows with the largest dot product with each query, streamed over the gallery.

    Similarities are float32-accumulated dot products of the inputs as given (normalise them
    first for cosine similarity). The gallery is visited in chunks of `chunk_size` rows with a
    running top-k, so `[Q, G]` is never materialised. Ties: the lower gallery index wins.

    Args:
        queries: [Q, D]; gallery: [G, D] (fp32/fp16/bf16); k: 1 <= k <= G.
    Returns:
        (values float32 [Q, k], indices int64 [Q, k]), best first.
    """
    check_topk_args(queries, gallery, k)
    q = queries.float()
    best_values = q.new_empty((q.shape[0], 0))
    best_indices = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, gallery.shape[0], chunk_size):
        chunk = gallery[start : start + chunk_size].float()
        values = torch.cat([best_values, q @ chunk.T], dim=1)
        indices = torch.cat(
            [best_indices, torch.arange(start, start + chunk.shape[0], device=q.device).expand(q.shape[0], -1)], dim=1
        )
        # Stable sort: among equal values the earlier column (the lower gallery index) stays first.
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_values, best_indices = values.gather(1, order), indices.gather(1, order)
    return best_values, best_indices


def check_topk_args(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> None:
    """Raise ValueError for shapes or k that `topk_similarity` cannot serve."""
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"topk_similarity needs queries [Q, D] and gallery [G, D], got {tuple(queries.shape)} "
            f"and {tuple(gallery.shape)}"
        )
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k must be between 1 and the gallery size {gallery.shape[0]}, got k={k}")
