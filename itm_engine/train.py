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
and N processes sharing a global batch compute the gradient one process would.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from itm_engine.cache import LatentCache, TextCache
from itm_engine.models import SDComponents, load_components
from itm_engine.train_data import NEGATIVE_KINDS

def hardneg_loss(l_pos: torch.Tensor, l_neg: torch.Tensor, factor: float, has_neg: torch.Tensor | None = None) -> torch.Tensor:
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

    data: str
    model: str = "tiny"
    image_root: str | None = None
    limit: int | None = None
    val_data: str | None = None
    val_limit: int | None = 64
    negatives: str = "mixed"
    neg_prob: float = 1.0
    neg_loss_factor: float = 1.0
    clip_neighbours: int = 0  # k: hard-negative images = the k nearest images in CLIP space (0: only given neg_image)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = None
    clip_config: str | None = None
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    attention: str = "cross"
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    epochs: int = 8
    max_steps: int | None = None
    batch_size: int = 8  # per process and micro-batch; x grad_accum x processes = the global batch
    grad_accum: int = 14  # 8 x 14 = 112, the research code's batch
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    val_every: int = 500
    val_samples: int = 4
    checkpoint_every: int = 500


class Trainer:
    """One HardNeg LoRA run: data, model, optimiser, the step, checkpoints and validation."""

    def __init__(self, config: TrainConfig, out: Path) -> None:
        from accelerate import Accelerator

        from itm_engine.lora import add_lora, lora_parameters
        from itm_engine.train_data import NegativeSampler, clip_nearest_images, read_pairs

        if config.negatives not in NEGATIVE_KINDS:
            raise ValueError(f"negatives must be one of {NEGATIVE_KINDS}, got {config.negatives!r}")
        self.config, self.out = config, out
        out.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
            cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False,
        )
        self.pairs = read_pairs(config.data, config.image_root, config.limit)
        self.val_pairs = read_pairs(config.val_data, config.image_root, config.val_limit) if config.val_data else []
        neighbours = None
        if config.clip_neighbours:  # hard-negative images: nearest neighbours in CLIP image space
            from itm_engine.prefilter import ClipModel

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
        if len(self.pairs) < config.batch_size * self.accelerator.num_processes:
            raise ValueError(f"{config.data}: {len(self.pairs)} pairs, fewer than one global batch "
                             f"({config.batch_size} x {self.accelerator.num_processes} processes)")
        optimizer = torch.optim.AdamW(lora_parameters(unet), lr=config.lr, weight_decay=config.weight_decay)
        schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps)
        self.unet, self.optimizer, self.lr_schedule = self.accelerator.prepare(unet, optimizer, schedule)
        self.alphas_cumprod = self.components.scheduler.alphas_cumprod.to(self.accelerator.device)
        self.num_train_timesteps = self.components.scheduler.config.num_train_timesteps
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
        order = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
        batch = order[position * self.global_batch : (position + 1) * self.global_batch].tolist()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return epoch, batch[rank::world]

    def draws(self, epoch: int, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example timestep and noise, from (seed, epoch, index): LongTensor [B], [B, C, h, w]."""
        timesteps, noise = [], []
        for index in indices:
            gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + epoch) * 1_000_003 + index)
            timesteps.append(torch.randint(0, self.num_train_timesteps, (1,), generator=gen))
            noise.append(torch.randn(self.components.latent_shape, generator=gen))
        device = self.accelerator.device
        return torch.cat(timesteps).to(device), torch.stack(noise).to(device)

    # -- the step -------------------------------------------------------------------------

    def denoising_loss(self, z0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example MSE of the UNet's prediction against eps (or v): [B]."""
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        target = eps if self.components.prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * z0
        pred = self.unet(x_t, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)

    def encode(self, images: list[str], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached latents [B, C, h, w] and text embeddings [B, L, D] (frozen encoders, cached once).

        Latents are also remembered by file path, so an image file is read and hashed for the
        content-keyed cache once, not at every step it appears in."""
        new = list(dict.fromkeys(p for p in images if p not in self._latent_by_path))
        if new:
            latents, rows = self.latents.get(new)
            self._latent_by_path.update(zip(new, latents[rows]))
        embeddings, text_rows = self.texts.get(captions)
        return torch.stack([self._latent_by_path[p] for p in images]).clone(), embeddings[text_rows].clone()

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
        from itm_engine.lora import lora_parameters

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
                        grad_norm = self.accelerator.clip_grad_norm_(lora_parameters(self.unet), self.config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
            self.lr_schedule.step()  # once per optimiser step, whatever the number of processes
            self.step += 1
            local = {key: sum(l[key] for l in losses) / len(losses) for key in ("loss", "l_pos")}
            gathered = self.accelerator.reduce(torch.tensor([local["loss"], local["l_pos"]], device=self.accelerator.device), "mean")
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
        from itm_engine.scoring import DiffusionITM
        from itm_engine.train_data import hard_negative_captions

        examples = [(p, list(p.neg_captions) + hard_negative_captions(p.caption, self.config.seed)) for p in self.val_pairs]
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
            (folder / "trainer.json").write_text(json.dumps({"step": self.step, "config": asdict(self.config)}))
        self.accelerator.wait_for_everyone()

    def resume(self, folder: Path | None = None) -> None:
        """Continue from `folder` (default: the latest checkpoint under OUT/checkpoints)."""
        if folder is None:
            found = sorted((self.out / "checkpoints").glob("step-*/trainer.json"))
            if not found:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
            folder = found[-1].parent
        state = json.loads((folder / "trainer.json").read_text())
        if state["config"] != asdict(self.config):
            changed = sorted(k for k in state["config"] if state["config"][k] != asdict(self.config).get(k))
            raise ValueError(f"--resume with a different configuration than {folder} (changed: {', '.join(changed)})")
        self.accelerator.load_state(str(folder))
        self.step = state["step"]

    def save_lora(self) -> Path | None:
        from itm_engine.lora import save_lora

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


CHOICES = {
    "negatives": NEGATIVE_KINDS,
    "attention": ("cross", "all"),
    "mixed_precision": ("no", "fp16", "bf16"),
}


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, Path, bool]:
    defaults = TrainConfig(data="")
    parser = argparse.ArgumentParser(prog="itm-train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="COCO captions JSON, JSONL/CSV of (image, caption), or NegCLIP TSV")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    for name, value in asdict(defaults).items():
        if name == "data":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            kind = type(value) if value is not None else (float if name == "alpha" else int if "limit" in name or "steps" in name else str)
            parser.add_argument(flag, type=kind, default=value, choices=CHOICES.get(name))
    args = vars(parser.parse_args(argv))
    out, resume = Path(args.pop("out")), args.pop("resume")
    return TrainConfig(**args), out, resume


PRETRAIN_COMMANDS = {"pretrain": "itm_engine.pretrain", "pretrain-clip": "itm_engine.pretrain_clip"}


def main(argv: list[str] | None = None) -> int:
    """`itm-train [options]` (HardNeg LoRA), or `itm-train pretrain|pretrain-clip --world shapes ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PRETRAIN_COMMANDS:
        import importlib

        return importlib.import_module(PRETRAIN_COMMANDS[argv[0]]).main(argv[1:])
    config, out, resume = parse_args(argv)
    try:
        trainer = Trainer(config, out)
        if resume:
            trainer.resume()
        elif any((out / "checkpoints").glob("step-*")):
            raise FileExistsError(f"{out} already holds checkpoints: pass --resume or choose another --out")
        trainer.train()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"itm-train: error: {err}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(f"wrote {out / 'lora'} and {trainer.log_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
