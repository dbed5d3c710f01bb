"""Planner and batched executor: (latent, text, sample) work items -> per-item denoising errors.

A work item is one denoiser evaluation: cached latent `z0 = latents[l]`, the conditioning row
`m` of a text (its family's tensors, `models.families`), noise draw `(t_s, eps_s)` of the bank.
Items of any mix of images, texts and timesteps share one denoiser call, made by the model's
family adapter (`Family.denoise`); the executor fills batches of `batch_size` items, builds
x_t and reduces each item's squared error with the fused ops of `itm_engine.kernels`, on the
forward-process coefficients of the bank's timesteps (`noise.ForwardProcess`, computed once per run).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from itm_engine import fastpath, kernels
from itm_engine.kernels import reference
from itm_engine.models import SDComponents
from itm_engine.models.families import Conditioning, family_of, select, to_device
from itm_engine.noise import NoiseBank
from itm_engine.protocols import Error
from itm_engine.stats import RunStats


@dataclass(frozen=True)
class WorkPlan:
    """Flat work items, all LongTensor [B]: `latent_idx`, `text_idx`, `sample_idx`."""

    latent_idx: torch.Tensor
    text_idx: torch.Tensor
    sample_idx: torch.Tensor

    def __len__(self) -> int:
        return self.latent_idx.shape[0]


def plan_items(pairs: torch.Tensor, samples: int, per_draw_latents: bool = False) -> WorkPlan:
    """Every (image, text, bank block) triple of `pairs` (Long [P, 3]) under each of its block's S
    draws: P * S items. Item `p * S + s` is triple p under draw s, so errors reshape to [P, S].

    Draw s of block b is row `b * S + s` of the bank; the latent of image u is row u, or
    `u * S + s` when every draw has its own latent (`per_draw_latents`).
    """
    n_pairs = pairs.shape[0]
    draw = torch.arange(samples).repeat(n_pairs)
    image = pairs[:, 0].repeat_interleave(samples)
    return WorkPlan(
        latent_idx=image * samples + draw if per_draw_latents else image,
        text_idx=pairs[:, 1].repeat_interleave(samples),
        sample_idx=pairs[:, 2].repeat_interleave(samples) * samples + draw,
    )


def check_batch_size(batch_size: int | str, name: str = "batch_size") -> None:
    """Raise unless `batch_size` is a positive int (not a bool) or "auto" (TypeError for another type)."""
    if batch_size == "auto":
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"{name} must be a positive integer or 'auto', got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"{name} must be a positive integer or 'auto', got {batch_size!r}")


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Executor:
    """Runs work plans through the UNet in batches and returns float32 errors.

    On CUDA out-of-memory it halves the batch size (down to 1) and retries the same items, so no
    item is lost or scored twice; the smaller size is kept for later calls. With fixed shapes
    (implied by `compile`) every batch is padded to the batch size by repeating its last item,
    and the padded rows' results are dropped.
    """

    def __init__(
        self,
        components: SDComponents,
        batch_size: int | str = 64,
        progress: bool | None = None,
        kernels: str | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        fixed_shapes: bool | None = None,
    ) -> None:
        """
        Args:
            batch_size: UNet items per call, or "auto" (the largest that fits, see
                `fastpath.auto_batch_size`; measured on first use).
            kernels: fused-op backend ("reference", "triton", "ext", "auto"; None reads ITM_KERNELS).
            compile: `torch.compile` the UNet (fixed batch shapes, compiled once per size).
            cuda_graphs: compile in "reduce-overhead" mode: CUDA graph replay (implies compile).
            fixed_shapes: pad every batch to the batch size (default: when compiling).
        """
        check_batch_size(batch_size)
        self.components = components
        self.batch_size = batch_size
        self.progress = progress
        self.kernels = kernels
        compile = compile or cuda_graphs
        self.fixed_shapes = compile if fixed_shapes is None else fixed_shapes
        self.compiled_unet = fastpath.compile_unet(components.denoiser, cuda_graphs) if compile else None

    def resolved_batch_size(self) -> int:
        """The batch size in use, measuring it first when it is "auto"."""
        if self.batch_size == "auto":
            self.batch_size = fastpath.auto_batch_size(self.components)
        return self.batch_size

    @torch.inference_mode()
    def run(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        bank: NoiseBank,
        plan: WorkPlan,
        stats: RunStats,
        batch_size: int | str | None = None,
        error: Error = "mse",
        image_conditioning: Conditioning | None = None,
        protocol_inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Errors of every item of `plan`, float32 [len(plan)] on the model's device.

        Args:
            latents: z0 [U, C, h, w]; conditioning: {name: [V, ...]}, the texts' rows (`TextCache`);
            bank: the draws; plan: the items.
            batch_size: items per UNet call for this run (None or "auto": the executor's).
            error: the reduction of an item's error (`protocols.Protocol.error`): "mse" and "l2"
                (sqrt(mse * numel), the norm) from the fused op, "l1" and "huber" from the
                reference reduction (`kernels.reference.item_loss`).
            image_conditioning: conditioning from the images ({name: [U, ...]}, rows aligned with
                `latents`; e.g. SDXL's time_ids), joined to each item's text rows.
            protocol_inputs: keyword arguments of every denoiser call that the protocol sets
                (`Family.protocol_inputs`: FLUX.1-dev's guidance).
        """
        denoiser, family = self.components.denoiser, family_of(self.components)
        device, dtype = denoiser.device, denoiser.dtype
        size = batch_size if isinstance(batch_size, int) else self.resolved_batch_size()
        if not self.fixed_shapes:  # no buffer larger than the work (fixed shapes pad every batch to the size)
            size = max(1, min(size, len(plan)))
        latents = latents.to(device)
        conditioning = to_device(conditioning, device, dtype)
        image_conditioning = to_device(image_conditioning or {}, device, dtype)
        noise = bank.noise.to(device)
        bank_timesteps = bank.timesteps.to(device)
        process = self.components.process
        coefficients = process.coefficients(bank_timesteps)  # [S, 4]: (a, b, c, d) of each draw
        target_latents = None if process.kind == "epsilon" else latents  # an eps target reads no latent
        latent_idx = plan.latent_idx.to(device)
        text_idx = plan.text_idx.to(device)
        sample_idx = plan.sample_idx.to(device)

        backend = kernels.resolve_backend(device, self.kernels)
        fused_error = error in ("mse", "l2")
        stats.kernels = {"noisy_latents": backend, "item_error": backend if fused_error else f"reference ({error})"}
        numel = latents[0].numel()
        errors = torch.empty(len(plan), dtype=torch.float32, device=device)
        x_t_buffer = torch.empty((size, *latents.shape[1:]), dtype=dtype, device=device)
        bar = tqdm(total=len(plan), desc="UNet items", unit="item", disable=self._bar_disabled(len(plan), size))
        start = 0
        while start < len(plan):
            stop = min(start + size, len(plan))
            items = torch.arange(start, stop, device=device)
            if self.fixed_shapes and stop - start < size:  # pad with the last item, results dropped
                items = torch.cat([items, items[-1:].expand(size - (stop - start))])
            li, ti, si = latent_idx[items], text_idx[items], sample_idx[items]
            coef = coefficients[si]
            try:
                with stats.timer("reduction", device):
                    x_t = kernels.noisy_latents(latents, noise, li, si, coef, out=x_t_buffer[: len(items)],
                                                backend=backend)
                with stats.timer("unet", device):
                    rows = {**select(conditioning, ti), **select(image_conditioning, li)}
                    pred = family.denoise(self.components, x_t, bank_timesteps[si], rows, self.compiled_unet,
                                          **(protocol_inputs or {}))
            except RuntimeError as err:
                if not _is_out_of_memory(err) or size == 1:
                    raise
                size = max(1, size // 2)
                self.batch_size = size if self.batch_size == "auto" else min(self.batch_size, size)
                x_t_buffer = x_t_buffer[:size]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(f"out of memory: UNet batch size reduced to {size}", stacklevel=2)
                continue
            with stats.timer("reduction", device):
                if fused_error:
                    item_errors = kernels.item_error(pred, noise, si, coef, target_latents, li, backend=backend)
                    if error == "l2":
                        item_errors = (item_errors * numel).sqrt()
                else:
                    item_errors = reference.item_loss(pred, noise, si, coef, target_latents, li, error)
                errors[start:stop] = item_errors[: stop - start]
            stats.unet_items += stop - start
            stats.padded_items += len(items) - (stop - start)
            stats.unet_calls += 1
            bar.update(stop - start)
            start = stop
        bar.close()
        stats.batch_size = size
        return errors

    def _bar_disabled(self, n_items: int, batch_size: int) -> bool | None:
        if self.progress is not None:
            return not self.progress
        # Automatic: only for runs of several batches, and only on a terminal (tqdm's None).
        return True if n_items <= 4 * batch_size else None
