"""Triton kernels of the fused ops (CUDA; CPU tensors only under the interpreter, for tests).

Same signatures and contracts as `reference.py`. Shapes: N cached latents, S noise draws, B work
items, n = C*H*W elements per latent; Q queries, G gallery rows, D dims; coefficients float32
[B, 4] = (a, b, c, d) per item. Importing this module raises ImportError when Triton is missing
(the dispatcher then skips it).

Shapes, dtypes and devices are checked; values are not: indices (img_idx, sample_idx) are not
range-checked, and without latents the c column is not read (target d eps), since either check
would cost a device sync.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from itm_engine.kernels.reference import check_coefficients, check_target_latents, check_topk_args

# `triton.jit` builds interpreted kernels when TRITON_INTERPRET=1 at decoration time, i.e. now.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

NOISY_BLOCK = 1024  # elements per noisy_latents program
ERROR_BLOCK = 1024  # elements per item_error loop step
ERROR_ELEMS_PER_PROGRAM = 4096  # item_error split: one program per 4096 elements of an item...
ERROR_MAX_SPLIT = 64  # ...and at most 64 programs per item
TOPK_BLOCK_Q, TOPK_BLOCK_G, TOPK_BLOCK_D = 64, 128, 32
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1 (gallery blocks per chunk)
_MAX_INDEX = 2**31 - 1  # gallery indices live in the low 31 bits of the top-k keys
_EMPTY_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every real key: padding and taken slots


def supports(device: torch.device) -> bool:
    """CUDA when a GPU is present; the CPU only when the kernels were built by the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _INTERPRETED


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x in contiguous layout (a copy only when it is not already)."""
    return x if x.is_contiguous() else x.contiguous()


def _long(idx: torch.Tensor) -> torch.Tensor:
    """An index tensor as contiguous int64 (int32 is accepted and converted)."""
    return _dense(idx.long())


@triton.jit
def _noisy_latents_kernel(
    latents_ptr, noise_ptr, img_idx_ptr, sample_idx_ptr, coef_ptr, coef_stride, out_ptr, n, BLOCK: tl.constexpr
):
    """Program (b, j): elements [j*BLOCK, (j+1)*BLOCK) of item b's x_t = a z0 + b eps."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a, s = tl.load(coef_ptr + b * coef_stride), tl.load(coef_ptr + b * coef_stride + 1)
    z0 = tl.load(latents_ptr + tl.load(img_idx_ptr + b) * n + offs, mask=mask).to(tl.float32)
    eps = tl.load(noise_ptr + tl.load(sample_idx_ptr + b) * n + offs, mask=mask).to(tl.float32)
    x_t = a * z0 + s * eps
    tl.store(out_ptr + b * n + offs, x_t.to(out_ptr.dtype.element_ty), mask=mask)


def noisy_latents(
    latents: torch.Tensor,
    noise: torch.Tensor,
    img_idx: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t [B, C, H, W] = coefficients[:, 0] * latents[img_idx] + coefficients[:, 1] * noise[sample_idx].

    latents [N, C, H, W], noise [S, C, H, W] (fp32/fp16/bf16); img_idx, sample_idx [B] (int64, or
    int32 converted); coefficients float32 [B, 4]. Computed in float32, stored in `out`'s dtype
    (else the latents'); `out` is written and returned (a non-contiguous one, e.g. channels-last,
    through a contiguous temporary). Grid (B, C*H*W / BLOCK).
    """
    check_coefficients(coefficients, img_idx.shape[0], latents.device, "noisy_latents")
    coefficients = _dense(coefficients)
    shape = (img_idx.shape[0], *latents.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=latents.dtype, device=latents.device)
    elif out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    target = out if out.is_contiguous() else torch.empty(shape, dtype=out.dtype, device=out.device)
    n = latents[0].numel()
    grid = (shape[0], triton.cdiv(n, NOISY_BLOCK))
    _noisy_latents_kernel[grid](
        _dense(latents), _dense(noise), _long(img_idx), _long(sample_idx), coefficients, coefficients.stride(0),
        target, n, BLOCK=NOISY_BLOCK,
        enable_fp_fusion=False,  # no FMA contraction: x_t bitwise equal to the reference's
    )
    return out if target is out else out.copy_(target)


@triton.jit
def _item_error_kernel(
    pred_ptr, noise_ptr, sample_idx_ptr, coef_ptr, coef_stride, latents_ptr, img_idx_ptr, partial_ptr,
    n, span, hw, pred_stride_b, pred_stride_c, pred_stride_hw,
    SPLIT: tl.constexpr, WITH_LATENTS: tl.constexpr, PRED_NCHW: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b, s): sum of squared errors of item b over elements [s*span, (s+1)*span) -> partial[b, s].

    The target is c z0 + d eps, or d eps without latents (`WITH_LATENTS` false: c is not read).

    Elements are counted in NCHW order; pred may be laid out otherwise (channels-last) when its
    (H, W) plane is dense: element (c, i) of the plane sits at c * pred_stride_c + i * pred_stride_hw.
    """
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    eps_row = noise_ptr + tl.load(sample_idx_ptr + b) * n
    d = tl.load(coef_ptr + b * coef_stride + 3)
    if WITH_LATENTS:
        z0_row = latents_ptr + tl.load(img_idx_ptr + b) * n
        c = tl.load(coef_ptr + b * coef_stride + 2)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(split * span, (split + 1) * span, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n  # masked lanes load 0 everywhere and add 0
        goal = d * tl.load(eps_row + offs, mask=mask, other=0.0).to(tl.float32)
        if WITH_LATENTS:
            goal = c * tl.load(z0_row + offs, mask=mask, other=0.0).to(tl.float32) + goal
        pred_offs = offs if PRED_NCHW else (offs // hw) * pred_stride_c + (offs % hw) * pred_stride_hw
        diff = tl.load(pred_ptr + b * pred_stride_b + pred_offs, mask=mask, other=0.0).to(tl.float32) - goal
        acc += diff * diff
    tl.store(partial_ptr + b * SPLIT + split, tl.sum(acc, axis=0))


def item_error(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    latents: torch.Tensor | None = None,
    img_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item mean squared error against c z0 + d eps, float32 [B]; see `reference.item_error`.

    pred [B, C, H, W] (NCHW or channels-last, read in place), noise [S, C, H, W], sample_idx [B],
    coefficients float32 [B, 4]; latents [N, C, H, W] and img_idx [B] when the target has a latent
    term (None: the target is d eps, c is not read).
    Grid (B, SPLIT): each program sums one slice of an item into partial [B, SPLIT], then a plain
    sum over SPLIT (deterministic, no atomics). SPLIT depends on C*H*W only, so an item's error
    does not depend on the batch it ran in.
    """
    check_coefficients(coefficients, pred.shape[0], pred.device, "item_error")
    check_target_latents(latents, img_idx, "item_error")
    with_latents = latents is not None
    if pred.stride(2) != pred.shape[3] * pred.stride(3):  # neither NCHW nor channels-last
        pred = pred.contiguous()
    batch, n = pred.shape[0], pred[0].numel()
    split = max(1, min(ERROR_MAX_SPLIT, triton.cdiv(n, ERROR_ELEMS_PER_PROGRAM)))
    span = triton.cdiv(triton.cdiv(n, split), ERROR_BLOCK) * ERROR_BLOCK
    partial = torch.empty((batch, split), dtype=torch.float32, device=pred.device)
    coefficients = _dense(coefficients)
    z0_args = (_dense(latents), _long(img_idx)) if with_latents else (None, None)
    _item_error_kernel[(batch, split)](
        pred, _dense(noise), _long(sample_idx), coefficients, coefficients.stride(0), *z0_args, partial, n, span,
        pred.shape[2] * pred.shape[3], pred.stride(0), pred.stride(1), pred.stride(3),
        SPLIT=split, WITH_LATENTS=with_latents, PRED_NCHW=pred.is_contiguous(), BLOCK=ERROR_BLOCK,
    )
    return partial.sum(dim=1) / n


@triton.jit
def _topk_candidates_kernel(
    q_ptr, g_ptr, keys_ptr, Q, G, D, first_index, stride_q, stride_g,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, CAND: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Program (i, j): the CAND best keys of queries block i within gallery block j -> keys [Q, n_blocks*CAND].

    key = (order-preserving int32 of the fp32 score) << 32 | (2^31 - 1 - gallery index): comparing
    keys compares scores, and equal scores order by index, lower first.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    scores = tl.zeros([BLOCK_Q, BLOCK_G], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < Q) & (dims[None, :] < D)
        g_mask = (cols[:, None] < G) & (dims[None, :] < D)
        q = tl.load(q_ptr + rows[:, None] * stride_q + dims[None, :], mask=q_mask, other=0.0)
        g = tl.load(g_ptr + cols[:, None] * stride_g + dims[None, :], mask=g_mask, other=0.0)
        scores = tl.dot(q, tl.trans(g), scores, input_precision=INPUT_PRECISION)
    bits = scores.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - (first_index + cols))[None, :]
    keys = tl.where(cols[None, :] < G, keys, _EMPTY_KEY)
    out = keys_ptr + rows * (tl.num_programs(1) * CAND) + tl.program_id(1) * CAND
    if CAND == BLOCK_G:
        tl.store(out[:, None] + tl.arange(0, BLOCK_G)[None, :], keys, mask=rows[:, None] < Q)
    else:
        for i in range(CAND):  # take the best, then remove it (keys are unique within a row)
            best = tl.max(keys, axis=1)
            tl.store(out + i, best, mask=rows < Q)
            keys = tl.where(keys == best[:, None], _EMPTY_KEY, keys)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys [Q, k] -> (values float32 [Q, k], indices int64 [Q, k])."""
    bits = (keys >> 32).to(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.view(torch.float32), _MAX_INDEX - (keys & 0xFFFFFFFF)


def topk_similarity(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k gallery rows with the largest fp32-accumulated dot product with each query.

    queries [Q, D], gallery [G, D] (fp32/fp16/bf16; mixed dtypes compute in fp32); 1 <= k <= G.
    Returns (values float32 [Q, k], indices int64 [Q, k]), best first; ties: lower index first.
    Per gallery chunk of `chunk_size` rows, a kernel keeps each query's best min(k, BLOCK_G) keys
    per block of BLOCK_G rows, and torch.topk merges them into the running top-k: memory is
    O(Q * chunk_size * min(k, BLOCK_G) / BLOCK_G), never [Q, G].
    """
    check_topk_args(queries, gallery, k)
    if gallery.shape[0] + TOPK_BLOCK_G > _MAX_INDEX:
        raise ValueError(f"the Triton top-k handles galleries of fewer than {_MAX_INDEX - TOPK_BLOCK_G} rows")
    dot_dtype = queries.dtype if queries.dtype == gallery.dtype else torch.float32
    if _INTERPRETED and dot_dtype == torch.bfloat16:
        dot_dtype = torch.float32  # numpy, under the interpreter, has no bf16 matmul; bf16 products are exact in fp32
    queries = _dense(queries.to(dot_dtype))
    cand = min(k, TOPK_BLOCK_G)
    block_q = min(TOPK_BLOCK_Q, max(16, triton.next_power_of_2(queries.shape[0])))
    chunk_size = min(chunk_size, _MAX_GRID_Y * TOPK_BLOCK_G)
    best = torch.full((queries.shape[0], k), _EMPTY_KEY.value, dtype=torch.int64, device=queries.device)
    for start in range(0, gallery.shape[0], chunk_size):
        chunk = _dense(gallery[start : start + chunk_size].to(dot_dtype))
        n_blocks = triton.cdiv(chunk.shape[0], TOPK_BLOCK_G)
        keys = torch.empty((queries.shape[0], n_blocks * cand), dtype=torch.int64, device=queries.device)
        grid = (triton.cdiv(queries.shape[0], block_q), n_blocks)
        _topk_candidates_kernel[grid](
            queries, chunk, keys, queries.shape[0], chunk.shape[0], queries.shape[1], start,
            queries.stride(0), chunk.stride(0),
            BLOCK_Q=block_q, BLOCK_G=TOPK_BLOCK_G, BLOCK_D=TOPK_BLOCK_D, CAND=cand,
            INPUT_PRECISION="ieee" if dot_dtype == torch.float32 else None, num_warps=8,
        )
        best = torch.cat([best, keys], dim=1).topk(k, dim=1).values
    return _decode(best)
