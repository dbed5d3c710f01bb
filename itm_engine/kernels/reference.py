"""Plain PyTorch fused-op references: the oracle every faster backend is tested against.

Shapes: N cached latents, S noise draws, B work items, T train timesteps.
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
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t[b] = sqrt(abar[t_b]) * latents[img_idx[b]] + sqrt(1 - abar[t_b]) * noise[sample_idx[b]].

    Args:
        latents: [N, C, H, W]; noise: [S, C, H, W]; img_idx, sample_idx, timesteps: Long [B];
        alphas_cumprod: [T]; out: optional [B, C, H, W] buffer to write into (its dtype wins).
    Returns:
        x_t [B, C, H, W], computed in float32, in `out`'s dtype (else the latents' dtype).
    """
    x_t = add_noise(latents[img_idx].float(), noise[sample_idx].float(), timesteps, alphas_cumprod)
    if out is None:
        return x_t.to(latents.dtype)
    return out.copy_(x_t)


def item_error(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    latents: torch.Tensor | None = None,
    img_idx: torch.Tensor | None = None,
    target: str = "epsilon",
    timesteps: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of each item's prediction against its target, float32 [B].

    Args:
        pred: UNet output [B, C, H, W] (fp32/fp16/bf16).
        noise: [S, C, H, W]; sample_idx: Long [B].
        target: "epsilon" (target = eps) or "v" (target = sqrt(abar) eps - sqrt(1 - abar) z0, which
            needs latents [N, C, H, W], img_idx [B], timesteps [B] and alphas_cumprod [T]).
    """
    goal = _target(noise, sample_idx, latents, img_idx, target, timesteps, alphas_cumprod)
    return (pred.float() - goal).square().flatten(1).mean(dim=1)


def item_loss(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    latents: torch.Tensor | None,
    img_idx: torch.Tensor | None,
    target: str,
    timesteps: torch.Tensor | None,
    alphas_cumprod: torch.Tensor | None,
    loss: str,
) -> torch.Tensor:
    """Mean absolute ("l1") or mean Huber (delta 1, "huber") error of each item's prediction
    against its target, float32 [B], as Diffusion Classifier's `F.l1_loss` / `F.huber_loss`
    reduced per item (arguments as `item_error`). No fused version: these reductions run here."""
    goal = _target(noise, sample_idx, latents, img_idx, target, timesteps, alphas_cumprod)
    if loss == "l1":
        per_element = F.l1_loss(pred.float(), goal, reduction="none")
    elif loss == "huber":
        per_element = F.huber_loss(pred.float(), goal, reduction="none", delta=1.0)
    else:
        raise ValueError(f"loss must be 'l1' or 'huber', got {loss!r}")
    return per_element.flatten(1).mean(dim=1)


def _target(noise: torch.Tensor, sample_idx: torch.Tensor, latents: torch.Tensor | None,
            img_idx: torch.Tensor | None, target: str, timesteps: torch.Tensor | None,
            alphas_cumprod: torch.Tensor | None) -> torch.Tensor:
    """Each item's target, float32 [B, C, H, W]: its noise draw, or v (see `item_error`)."""
    eps = noise[sample_idx].float()
    if target == "epsilon":
        return eps
    if target == "v":
        if latents is None or img_idx is None or timesteps is None or alphas_cumprod is None:
            raise ValueError("target='v' needs latents, img_idx, timesteps and alphas_cumprod")
        return denoising_target(latents[img_idx].float(), eps, timesteps, alphas_cumprod, "v_prediction")
    raise ValueError(f"target must be 'epsilon' or 'v', got {target!r}")


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
