"""The forward diffusion process, written once, and the noise bank of its shared draws.

    x_t    = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                       (`add_noise`)
    target = eps (epsilon prediction), or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0   (`denoising_target`)

The fused ops' reference (`kernels.reference`), HardNeg training and ShapesWorld pretraining all
use these two functions.

DiffusionITM compares candidates on the *same* draws (a paired comparison), so one bank of S draws
(t_s, eps_s) is made per query (or per call) and shared by every candidate. Draws come from a CPU
generator, so a seed gives the same bank on every device and every machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from itm_engine.protocols import Protocol, Schedule


def forward_coefficients(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(abar_t) and sqrt(1 - abar_t) for timesteps Long [B]: float32 [B, 1, 1, 1] each, on the
    timesteps' device (`alphas_cumprod` [T] is the scheduler's abar)."""
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)


def add_noise(z0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t [B, C, H, W] = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, for z0 and eps [B, C, H, W]."""
    a, s = forward_coefficients(timesteps, alphas_cumprod)
    return a * z0 + s * eps


def denoising_target(z0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What the denoiser learns to predict from x_t, [B, C, H, W]: eps ("epsilon") or
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 ("v_prediction")."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    a, s = forward_coefficients(timesteps, alphas_cumprod)
    return a * eps - s * z0


def draw_timesteps(schedule: Schedule, samples: int, num_train_timesteps: int = 1000,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The timesteps of S = `samples` draws, LongTensor [S'] (S' = S except for "diffusion-itm").

    - "uniform": uniform draws from [0, T) (with `generator`);
    - "stratified": Diffusion Classifier's evenly spaced midpoints, in its integer arithmetic:
      t_k = T // S // 2 + k * (T // S) (`eval_prob_adaptive.py`);
    - "diffusion-itm": the DiffusionITM research code's `range(10, 990, 1000 // S)`, written for
      any T as `range(10, T - 10, T // S)`: 10, 110, ..., 910 for S = 10; 49 draws for S = 50.
    """
    T = num_train_timesteps
    if schedule == "uniform":
        return torch.randint(0, T, (samples,), generator=generator)
    if schedule == "stratified":
        return T // samples // 2 + torch.arange(samples) * (T // samples)
    if schedule == "diffusion-itm":
        return torch.tensor(list(range(10, T - 10, max(1, T // samples))), dtype=torch.long)
    raise ValueError(f"schedule must be 'uniform', 'stratified' or 'diffusion-itm', got {schedule!r}")


@dataclass(frozen=True)
class NoiseBank:
    """S draws of (timestep, noise).

    Attributes:
        timesteps: LongTensor [S], values in [0, T).
        noise: float32 Tensor [S, C, h, w], standard normal, on the CPU.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor

    def __post_init__(self) -> None:
        t, eps = self.timesteps, self.noise
        if t.dim() != 1 or t.dtype != torch.long:
            raise ValueError(f"NoiseBank timesteps must be a LongTensor [S], got {t.dtype} {tuple(t.shape)}")
        if eps.dim() != 4 or eps.shape[0] != t.shape[0]:
            raise ValueError(
                f"NoiseBank noise must be [S, C, h, w] with S = len(timesteps) = {t.shape[0]}, "
                f"got {tuple(eps.shape)}"
            )
        if t.shape[0] == 0:
            raise ValueError("NoiseBank needs at least one sample (S >= 1)")
        if (t < 0).any():
            raise ValueError("NoiseBank timesteps must be >= 0")
        if not eps.is_floating_point() or not bool(torch.isfinite(eps).all()):
            raise ValueError("NoiseBank noise must be finite floating-point values (NaN or infinite found)")

    @classmethod
    def sample(
        cls,
        samples: int,
        latent_shape: Sequence[int],
        seed: int = 0,
        schedule: Schedule = "uniform",
        num_train_timesteps: int = 1000,
    ) -> "NoiseBank":
        """Draw a bank reproducibly from `seed` on a CPU generator.

        Args:
            samples: S, the number of draws asked for (>= 1).
            latent_shape: (C, h, w) of the model's latents.
            schedule: the timesteps (`timesteps`): "uniform", "stratified" (Diffusion Classifier's)
                or "diffusion-itm" (the DiffusionITM research code's; its count can differ from S).
            num_train_timesteps: T of the noise scheduler.
        """
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        timesteps = draw_timesteps(schedule, samples, num_train_timesteps, gen)
        noise = torch.randn((len(timesteps), *latent_shape), generator=gen, dtype=torch.float32)
        return cls(timesteps.long(), noise)

    @classmethod
    def for_protocol(cls, protocol: Protocol, latent_shape: Sequence[int], num_train_timesteps: int,
                     seed: int | None = None) -> NoiseBank:
        """The draws of `protocol` (its samples and schedule) from `seed` (default: its seed; per
        query: `protocol.query_seed(key)`)."""
        return cls.sample(protocol.samples, latent_shape, seed=protocol.seed if seed is None else seed,
                          schedule=protocol.schedule, num_train_timesteps=num_train_timesteps)

    @classmethod
    def from_tensors(cls, timesteps: torch.Tensor, noise: torch.Tensor) -> "NoiseBank":
        """Wrap given draws: timesteps [S] (integers; a float tensor only with whole values),
        noise Tensor [S, C, h, w]."""
        timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point() and not bool((timesteps == timesteps.round()).all()):
            raise ValueError("NoiseBank timesteps must be whole numbers (a fractional timestep would be truncated)")
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"NoiseBank noise must be a tensor [S, C, h, w], got {type(noise).__name__}")
        return cls(timesteps.long().cpu(), noise.detach().float().cpu())

    def spread(self) -> "NoiseBank":
        """The same draws reordered so that every prefix spreads over the bank's timesteps
        (farthest-first: the median timestep, then each time the draw whose timestep is farthest
        from those taken; ties to the earlier draw). Adaptive scoring takes draws in bank order,
        and a stratified bank's own order is ascending, so its prefixes would be low-t only."""
        t = self.timesteps.double()
        order = [int(torch.argsort(t, stable=True)[len(t) // 2])]
        distance = (t - t[order[0]]).abs()
        distance[order[0]] = -1
        while len(order) < len(t):
            nxt = int(torch.argmax(distance))  # first maximum: ties to the earlier draw
            order.append(nxt)
            distance = torch.minimum(distance, (t - t[nxt]).abs())
            distance[order] = -1
        index = torch.tensor(order)
        return NoiseBank(self.timesteps[index], self.noise[index])

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one noise draw."""
        return tuple(self.noise.shape[1:])  # type: ignore[return-value]

    def check_fits(self, latent_shape: Sequence[int], num_train_timesteps: int) -> None:
        """Raise ValueError unless this bank's draws fit a model with these latents and T."""
        if tuple(latent_shape) != self.latent_shape:
            raise ValueError(
                f"NoiseBank latent shape {self.latent_shape} does not fit the model's latents "
                f"{tuple(latent_shape)}"
            )
        if int(self.timesteps.max()) >= num_train_timesteps:
            raise ValueError(
                f"NoiseBank has timestep {int(self.timesteps.max())} but the scheduler has only "
                f"{num_train_timesteps} train timesteps"
            )
