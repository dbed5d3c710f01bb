"""`itm-train`: HardNeg-DiffusionITM, LoRA fine-tuning of the UNet attention with hard negatives.

    loss = L_pos - clamp(L_neg, max = lambda * L_pos.detach())

L_pos is the denoising loss of an (image, caption) pair; L_neg the denoising loss of a negative on
the same noise and timestep: the same latent under a hard-negative or random caption, or a
hard-negative image's latent under the positive caption. The clamp stops the model from
"winning" by making negatives arbitrarily bad.

    itm-train --data coco/captions_train2014.json --model stabilityai/stable-diffusion-2-1-base --out runs/hardneg
    accelerate launch --multi_gpu --num_processes 8 -m itm_engine.cli train ...

Every random choice (data order, noise, timesteps, negatives) is derived from (seed, epoch, example
index), so `--resume` from a checkpoint continues to exactly the losses of an uninterrupted run,
and N processes sharing a global batch compute the gradient one process would. `--resume` takes
the newest intact checkpoint (a damaged one is skipped with a warning) and cuts `log.jsonl` back
to its step; the main process holds a lock on the run folder for the run (a second writer is
refused), and metadata files are replaced atomically (`itm_engine.storage`).
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from itm_engine import extras, options, storage
from itm_engine.cache import LatentCache, TextCache
from itm_engine.hardneg.data import NEGATIVE_KINDS
from itm_engine.models import SDComponents, load_components
from itm_engine.models.families import Conditioning, family_of, select
from itm_engine.noise import add_noise, denoising_target
from itm_engine.options import option
from itm_engine.protocols import Protocol


def hardneg_loss(l_pos: torch.Tensor, l_neg: torch.Tensor, factor: float,
                 has_neg: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of L_pos - clamp(L_neg, max = factor * L_pos.detach()).

    l_pos, l_neg: per-example denoising losses [B]; has_neg: bool [B], False where an example
    has no negative (its term is L_pos alone). The clamp's bound carries no gradient, so once a
    negative's loss exceeds factor * L_pos it stops pushing.
    """
    bound = factor * l_pos.detach()
    neg_term = torch.minimum(l_neg, bound)
    if has_neg is not None:
        neg_term = torch.where(has_neg, neg_term, torch.zeros_like(neg_term))
    return (l_pos - neg_term).mean()


@dataclass
class TrainConfig:
    """The run's settings (saved with every checkpoint; `--resume` checks them)."""

    data: str = option(help="training pairs: COCO captions JSON, JSONL/CSV of (image, caption), or NegCLIP TSV")
    model: str = option("tiny", help="the base model: diffusers folder, cached hub id, named or built-in model")
    image_root: str | None = option(None, help="folder the image paths are relative to (default: the data "
                                               "file's folder; COCO JSON: its train2014/)")
    limit: int | None = option(None, help="only the first N training pairs")
    val_data: str | None = option(None, help="held-out pairs for validation, same formats as --data")
    val_limit: int | None = option(64, help="only the first N validation pairs")
    negatives: str = option("mixed", choices=NEGATIVE_KINDS, help="where each example's negative comes from")
    neg_prob: float = option(1.0, help="probability that an example gets a negative")
    neg_loss_factor: float = option(1.0, help="lambda of the loss L_pos - clamp(L_neg, max = lambda * L_pos)")
    clip_neighbours: int = option(0, help="hard-negative images: the k nearest images in CLIP space "
                                          "(0: only the data's own neg_image)")
    clip_model: str = option("ViT-B-32", help="open_clip model for --clip-neighbours")
    clip_pretrained: str | None = option(None, help="open_clip tag from the local cache, or a checkpoint path")
    clip_config: str | None = option(None, help="folder/JSON of extra open_clip model configs")
    rank: int = option(4, help="LoRA rank")
    alpha: float | None = option(None, help="LoRA alpha (default: the rank)")
    dropout: float = option(0.0, help="LoRA dropout")
    attention: Literal["cross", "all"] = option("cross", help="LoRA on the cross-attention only, or on all attention")
    lr: float = option(1e-4, help="peak learning rate (AdamW)")
    lr_warmup_steps: int = option(0, help="linear warm-up steps")
    weight_decay: float = option(1e-2, help="AdamW weight decay")
    epochs: int = option(8, help="passes over the training pairs")
    max_steps: int | None = option(None, help="stop after this many optimiser steps")
    batch_size: int = option(8, help="pairs per process and micro-batch (x grad-accum x processes = the global batch)")
    grad_accum: int = option(14, help="micro-batches per optimiser step (8 x 14 = 112, the research code's batch)")
    max_grad_norm: float = option(1.0, help="gradient-norm clip")
    seed: int = option(0, help="seed of every random choice: data order, noise, timesteps, negatives, LoRA init")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", help="Accelerate mixed precision")
    gradient_checkpointing: bool = option(False, help="trade compute for memory in the UNet")
    val_every: int = option(500, help="validate every N steps")
    val_samples: int = option(4, help="noise draws per pair in validation")
    checkpoint_every: int = option(500, help="save a checkpoint every N steps")


@dataclass
class TrainRun:
    """Where `itm-train` writes (not part of the run's configuration)."""

    out: str = option(help="run folder: checkpoints/, log.jsonl, lora/", identity=False)
    resume: bool = option(False, help="continue from the latest checkpoint under --out", identity=False)


class Trainer:
    """One HardNeg LoRA run: data, model, optimiser, the step, checkpoints and validation."""

    def __init__(self, config: TrainConfig, out: Path) -> None:
        Accelerator = extras.require("accelerate", "itm-train").Accelerator
        extras.require("peft", "itm-train")

        from itm_engine.hardneg.data import NegativeSampler, clip_nearest_images, read_pairs
        from itm_engine.models.lora import add_lora, lora_parameters

        if config.negatives not in NEGATIVE_KINDS:
            raise ValueError(f"negatives must be one of {NEGATIVE_KINDS}, got {config.negatives!r}")
        self.config, self.out = config, out
        out.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
            cpu=cpu_only(), step_scheduler_with_optimizer=False,
        )
        self.pairs = read_pairs(config.data, config.image_root, config.limit)
        self.val_pairs = read_pairs(config.val_data, config.image_root, config.val_limit) if config.val_data else []
        neighbours = None
        if config.clip_neighbours:  # hard-negative images: nearest neighbours in CLIP image space
            from itm_engine.clip import ClipModel

            clip = ClipModel.from_name(config.clip_model, pretrained=config.clip_pretrained,
                                       model_config=config.clip_config, device=self.accelerator.device)
            neighbours = clip_nearest_images(self.pairs, clip, k=config.clip_neighbours)
        self.sampler = None if config.negatives == "none" else NegativeSampler(
            self.pairs, config.negatives, config.neg_prob, config.seed, neighbours=neighbours)

        self.components: SDComponents = load_components(config.model, device=self.accelerator.device)
        unet = self.components.unet
        with torch.random.fork_rng(devices=[]):  # the LoRA's random init follows the seed, not the RNG's history
            torch.manual_seed(config.seed)
            add_lora(unet, rank=config.rank, alpha=config.alpha, dropout=config.dropout, attention=config.attention)
        unet.train()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # One item per encoder call: an embedding never depends on which others shared its batch,
        # so a resumed run (with cold caches) sees bit-identical latents and text embeddings.
        self.latents = LatentCache(self.components, batch_size=1)
        self.texts = TextCache(self.components, batch_size=1)
        self._latent_by_path: dict[str, torch.Tensor] = {}
        self._image_conditioning_by_path: dict[str, dict[str, torch.Tensor]] = {}
        if len(self.pairs) < config.batch_size * self.accelerator.num_processes:
            raise ValueError(f"{config.data}: {len(self.pairs)} pairs, fewer than one global batch "
                             f"({config.batch_size} x {self.accelerator.num_processes} processes)")
        optimizer = torch.optim.AdamW(lora_parameters(unet), lr=config.lr, weight_decay=config.weight_decay)
        schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps)
        self.unet, self.optimizer, self.lr_schedule = self.accelerator.prepare(unet, optimizer, schedule)
        self.process = self.components.process
        self.step = 0  # optimiser steps done
        self.log_file = out / "log.jsonl"
        self.tensorboard = _tensorboard_writer(out / "tensorboard") if self.accelerator.is_main_process else None

    # -- data order -----------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.pairs) // self.global_batch

    @property
    def total_steps(self) -> int:
        steps = self.config.epochs * self.micro_batches_per_epoch // self.config.grad_accum
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    def micro_batch(self, micro: int) -> tuple[int, list[int]]:
        """(epoch, this process's example indices) of global micro-batch number `micro`."""
        epoch, position = divmod(micro, self.micro_batches_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
        order = torch.randperm(len(self.pairs), generator=generator)
        batch = order[position * self.global_batch : (position + 1) * self.global_batch].tolist()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return epoch, batch[rank::world]

    def draws(self, epoch: int, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example timestep and noise, from (seed, epoch, index): [B] (the model's timesteps at
        uniform training-grid positions: LongTensor DDPM steps, or flow-matching floats), [B, C, h, w]."""
        positions, noise = [], []
        for index in indices:
            gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + epoch) * 1_000_003 + index)
            positions.append(torch.randint(0, self.process.num_train_timesteps, (1,), generator=gen))
            noise.append(torch.randn(self.components.latent_shape, generator=gen))
        device = self.accelerator.device
        return self.process.from_grid(torch.cat(positions)).to(device), torch.stack(noise).to(device)

    # -- the step -------------------------------------------------------------------------

    def denoising_loss(self, z0: torch.Tensor, cond: Conditioning, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example MSE of the denoiser's prediction against its target (eps, v or the flow
        velocity): [B]; `cond` holds each example's conditioning row."""
        coefficients = self.process.coefficients(t)
        x_t = add_noise(z0, eps, coefficients)
        target = denoising_target(z0, eps, coefficients)
        pred = family_of(self.components).denoise(self.components, x_t, t, cond, self.unet)
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)

    def encode(self, images: list[str], captions: list[str]) -> tuple[torch.Tensor, Conditioning]:
        """Cached latents [B, C, h, w] and conditioning rows {name: [B, ...]} (frozen encoders,
        cached once).

        Latents are also remembered by file path, so an image file is read and hashed for the
        content-keyed cache once, not at every step it appears in."""
        new = list(dict.fromkeys(p for p in images if p not in self._latent_by_path))
        if new:
            protocol = Protocol()  # the latent cache's conventions: posterior mean, crop
            keys, rows = self.latents.encode(new, protocol=protocol)
            image_rows = family_of(self.components).image_conditioning(  # e.g. SDXL's time_ids
                self.components, self.latents.sizes(keys, protocol), protocol.resize)
            latents = self.latents.latents(keys, protocol)
            for path, row in zip(new, rows.tolist()):
                self._latent_by_path[path] = latents[row]
                self._image_conditioning_by_path[path] = {name: value[row] for name, value in image_rows.items()}
        conditioning, text_rows = self.texts.get(captions)
        rows = {name: value.clone() for name, value in select(conditioning, text_rows).items()}
        device = self.accelerator.device
        rows.update({name: torch.stack([self._image_conditioning_by_path[p][name] for p in images]).to(device)
                     for name in self._image_conditioning_by_path[images[0]]})
        return torch.stack([self._latent_by_path[p] for p in images]).clone(), rows

    def micro_step(self, micro: int) -> dict[str, float]:
        """Forward + backward of one micro-batch; returns its local losses (means)."""
        epoch, indices = self.micro_batch(micro)
        pairs = [self.pairs[i] for i in indices]
        t, eps = self.draws(epoch, indices)
        z0, cond = self.encode([p.image for p in pairs], [p.caption for p in pairs])
        l_pos = self.denoising_loss(z0, cond, t, eps)
        negatives = [self.sampler.negative(i, epoch) if self.sampler else None for i in indices]
        has_neg = torch.tensor([n is not None for n in negatives], device=l_pos.device)
        l_neg = torch.zeros_like(l_pos)
        if has_neg.any():  # same noise and timestep; the negative's image (or the pair's own) and caption
            which = has_neg.nonzero().flatten()
            chosen = [negatives[i] for i in which.tolist()]
            z_neg, c_neg = self.encode([n.image for n in chosen], [n.caption for n in chosen])
            l_neg = l_neg.index_put((which,), self.denoising_loss(z_neg, c_neg, t[which], eps[which]))
        loss = hardneg_loss(l_pos, l_neg, self.config.neg_loss_factor, has_neg)
        self.accelerator.backward(loss)
        return {"loss": loss.item(), "l_pos": l_pos.mean().item(),
                "l_neg": (l_neg[has_neg].mean().item() if has_neg.any() else float("nan"))}

    def train(self) -> list[dict]:
        """Run to `total_steps`; returns the log rows of this call."""
        from itm_engine.models.lora import lora_parameters

        rows = []
        bar = tqdm(total=self.total_steps, initial=self.step, desc="itm-train", unit="step",
                   disable=not self.accelerator.is_main_process)
        while self.step < self.total_steps:
            started = time.perf_counter()
            losses = []
            for k in range(self.config.grad_accum):
                with self.accelerator.accumulate(self.unet):
                    losses.append(self.micro_step(self.step * self.config.grad_accum + k))
                    if self.accelerator.sync_gradients:
                        grad_norm = self.accelerator.clip_grad_norm_(lora_parameters(self.unet),
                                                                     self.config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
            self.lr_schedule.step()  # once per optimiser step, whatever the number of processes
            self.step += 1
            local = {key: sum(row[key] for row in losses) / len(losses) for key in ("loss", "l_pos")}
            local_means = torch.tensor([local["loss"], local["l_pos"]], device=self.accelerator.device)
            gathered = self.accelerator.reduce(local_means, "mean")
            row = {"step": self.step, "loss": gathered[0].item(), "l_pos": gathered[1].item(),
                   "grad_norm": float(grad_norm), "lr": self.optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - started}
            if self.val_pairs and self.step % self.config.val_every == 0:
                row["val_accuracy"] = self.validate()
            rows.append(row)
            self.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if self.step % self.config.checkpoint_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.save_lora()
        return rows

    # -- validation, logs, checkpoints ------------------------------------------------------

    def validate(self) -> float:
        """ITM accuracy on held-out pairs against a hard-negative caption (2-way, I2T)."""
        from itm_engine import metrics
        from itm_engine.hardneg.data import hard_negative_captions
        from itm_engine.scoring import DiffusionITM

        examples = [(p, list(p.neg_captions) + hard_negative_captions(p.caption, self.config.seed))
                    for p in self.val_pairs]
        examples = [(p, negs[0]) for p, negs in examples if negs]
        if not examples:
            return float("nan")
        scorer = DiffusionITM(self.components, progress=False)
        self.unet.eval()
        scores = scorer.score_candidates([p.image for p, _ in examples], [[p.caption, n] for p, n in examples],
                                         samples=self.config.val_samples, seed=self.config.seed)
        self.unet.train()
        return metrics.accuracy(scores, [0] * len(examples))

    def log(self, row: dict) -> None:
        """Append the step's row to OUT/log.jsonl (and to TensorBoard when it is installed)."""
        if self.accelerator.is_main_process:
            with open(self.log_file, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            if self.tensorboard is not None:
                for key, value in row.items():
                    if key != "step":
                        self.tensorboard.add_scalar(key, value, row["step"])
                self.tensorboard.flush()

    def save_checkpoint(self) -> None:
        """Accelerate state (LoRA weights, optimiser, RNG) + step and config, atomically named."""
        folder = self.out / "checkpoints" / f"step-{self.step:07d}"
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            state = {"step": self.step, "config": options.identity(self.config)}
            storage.atomic_write_text(folder / "trainer.json", json.dumps(state))
        self.accelerator.wait_for_everyone()

    def resume(self, folder: Path | None = None) -> None:
        """Continue from `folder` (default: the newest intact checkpoint under OUT/checkpoints).

        A checkpoint whose trainer.json is missing (a crash while saving: it is written last) or
        unreadable, or whose state does not load, is skipped with a warning naming it, for the
        one before. A different configuration is refused (ValueError), not skipped. The log is cut
        back to the checkpoint's step, so the steps after it are logged once."""
        root = self.out / "checkpoints"
        candidates = [folder] if folder is not None else sorted(root.glob("step-*"), reverse=True)
        for candidate in candidates:
            try:
                state = storage.read_json(candidate / "trainer.json", hint="a checkpoint torn by a crash")
            except (FileNotFoundError, ValueError) as err:
                warnings.warn(f"--resume: skipping checkpoint {candidate}: {err}", stacklevel=2)
                continue
            options.check_same_config(state["config"], options.identity(self.config), candidate)
            try:
                self.accelerator.load_state(str(candidate))
            except Exception as err:  # torn or missing weights: safetensors, torch.load and OS errors alike
                warnings.warn(f"--resume: skipping checkpoint {candidate}: its state does not load "
                              f"({type(err).__name__}: {err})", stacklevel=2)
                continue
            self.step = state["step"]
            self._truncate_log()
            return
        if folder is not None:
            raise FileNotFoundError(f"--resume: checkpoint {folder} does not load")
        raise FileNotFoundError(f"--resume: no {'intact ' if candidates else ''}checkpoint under {root}")

    def _truncate_log(self) -> None:
        """Drop the log rows after the current step (logged after the checkpoint resumed from, so
        about to be logged again) and a torn last row, in one atomic rewrite."""
        if self.accelerator.is_main_process and self.log_file.exists():
            rows = [row for row in storage.read_jsonl(self.log_file) if row.get("step", 0) <= self.step]
            storage.atomic_write_text(self.log_file, "".join(json.dumps(row) + "\n" for row in rows))
        self.accelerator.wait_for_everyone()

    def save_lora(self) -> Path | None:
        from itm_engine.models.lora import save_lora

        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        return save_lora(self.accelerator.unwrap_model(self.unet), self.out / "lora")


def _tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def cpu_only() -> bool:
    """Whether Accelerate runs on the CPU (no CUDA device)."""
    return not torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """`itm-train [options]`: HardNeg LoRA fine-tuning."""
    parser = options.parser("itm-train", __doc__.splitlines()[0])
    options.add_options(parser, TrainConfig)
    options.add_options(parser, TrainRun)
    args = parser.parse_args(argv)
    config, run = options.from_args(TrainConfig, args), options.from_args(TrainRun, args)
    out = Path(run.out)
    # the process state the Trainer's Accelerator will share: the main process locks the folder
    # before anything is written to it
    main_process = extras.require("accelerate", "itm-train").PartialState(cpu=cpu_only()).is_main_process
    try:
        with storage.folder_lock(out, "itm-train", enabled=main_process):
            trainer = Trainer(config, out)
            if run.resume:
                trainer.resume()
            elif any((out / "checkpoints").glob("step-*")):
                raise FileExistsError(f"{out} already holds checkpoints: pass --resume or choose another --out")
            trainer.train()
    except Exception as err:
        code = storage.report_failure("itm-train", err, out)
        if code is None:
            raise
        return code
    if trainer.accelerator.is_main_process:
        print(f"wrote {out / 'lora'} and {trainer.log_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
