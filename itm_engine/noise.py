"""The forward diffusion process, written once, and the noise bank of its shared draws.

Every model family the engine scores noises a clean latent z0 with a draw eps and learns a target
that is a linear combination of the two; per draw the engine needs four coefficients:

    x_t    = a z0 + b eps                                                   (`add_noise`)
    target = c z0 + d eps                                                   (`denoising_target`)

    kind            a               b                c                 d
    "epsilon"       sqrt(abar_t)    sqrt(1 - abar_t) 0                 1      (SD 1.x/2.x, SDXL, PixArt)
    "v_prediction"  sqrt(abar_t)    sqrt(1 - abar_t) -sqrt(1 - abar_t) sqrt(abar_t)   (SD 2.x-v)
    "flow"          1 - sigma       sigma            -1                1      (SD3, Flux: v = eps - z0)

A draw's *timestep* is what the denoiser is called with: an integer DDPM step t in [0, T) for the
variance-preserving kinds (abar_t = alphas_cumprod[t]), a float t = T sigma in (0, T] for flow
matching (diffusers' FlowMatchEulerDiscreteScheduler: `timesteps = sigmas * T`, `scale_noise`). A
`ForwardProcess` turns timesteps into coefficients; the fused ops (`kernels`), the reference loops,
HardNeg training and ShapesWorld pretraining all take the coefficients it gives.

DiffusionITM compares candidates on the *same* draws (a paired comparison), so one bank of S draws
(t_s, eps_s) is made per query (or per call) and shared by every candidate. Draws come from a CPU
generator, so a seed gives the same bank on every device and every machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from itm_engine.protocols import Protocol, Schedule

FORWARD_KINDS: tuple[str, ...] = ("epsilon", "v_prediction", "flow")


@dataclass(frozen=True, eq=False)
class ForwardProcess:
    """A model's forward process: timesteps -> the coefficients (a, b, c, d) of the module docstring.

    Attributes:
        kind: one of `FORWARD_KINDS`.
        num_train_timesteps: T.
        grid: float64 [T], the model timesteps of the training grid in order of increasing noise:
            0, 1, ..., T - 1 for the variance-preserving kinds; the scheduler's (shifted) training
            timesteps T sigma, ascending, for flow matching (shifted for one image size where the
            shift depends on it: Flux). Draw schedules pick grid positions.
        alphas_cumprod: float32 [T], abar of the variance-preserving kinds (None for flow).
    """

    kind: str
    num_train_timesteps: int
    grid: torch.Tensor
    alphas_cumprod: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in FORWARD_KINDS:
            raise ValueError(f"forward process kind must be one of {', '.join(FORWARD_KINDS)}, got {self.kind!r}")
        if self.kind != "flow" and self.alphas_cumprod is None:
            raise ValueError(f"a {self.kind!r} forward process needs alphas_cumprod")

    @classmethod
    def from_scheduler(cls, scheduler, prediction_type: str | None = None,
                       image_seq_len: int | None = None) -> ForwardProcess:
        """The process of a diffusers training scheduler: a DDPM-style one (`alphas_cumprod`, its
        config's or the given `prediction_type`) or `FlowMatchEulerDiscreteScheduler` (its shifted
        training timesteps; "flow"). A flow scheduler shifted by resolution (`use_dynamic_shifting`:
        FLUX.1-dev) gives the grid of images of `image_seq_len` tokens (`resolution_shifted`);
        other schedulers ignore it."""
        T = int(scheduler.config.num_train_timesteps)
        if hasattr(scheduler, "alphas_cumprod"):
            kind = prediction_type or scheduler.config.prediction_type
            return cls(kind, T, torch.arange(T, dtype=torch.float64), scheduler.alphas_cumprod.float().cpu())
        if prediction_type not in (None, "flow"):
            raise ValueError(f"{type(scheduler).__name__} is a flow-matching scheduler; prediction_type "
                             f"{prediction_type!r} does not apply")
        if scheduler.config.get("use_dynamic_shifting", False):
            scheduler = resolution_shifted(scheduler, image_seq_len)
        return cls("flow", T, scheduler.timesteps.double().cpu().flip(0))

    @property
    def discrete(self) -> bool:
        """True when timesteps are integer DDPM steps (variance-preserving kinds)."""
        return self.kind != "flow"

    def check_timesteps(self, timesteps: torch.Tensor) -> None:
        """Raise ValueError unless `timesteps` [S] are model timesteps of this process."""
        T = self.num_train_timesteps
        if self.discrete:
            if timesteps.is_floating_point():
                raise ValueError(f"a {self.kind!r} model takes integer timesteps in [0, {T}), got {timesteps.dtype}")
            if int(timesteps.min()) < 0 or int(timesteps.max()) >= T:
                raise ValueError(f"timesteps must lie in [0, {T}) for this model, got "
                                 f"{int(timesteps.min())}..{int(timesteps.max())}")
        elif not bool(((timesteps > 0) & (timesteps <= T)).all()):
            raise ValueError(f"flow-matching timesteps must lie in (0, {T}], got "
                             f"{float(timesteps.min())}..{float(timesteps.max())}")

    def from_grid(self, positions: torch.Tensor) -> torch.Tensor:
        """Model timesteps [S] at training-grid positions Long [S] in [0, T): the positions
        themselves (Long) for the variance-preserving kinds, float64 `grid[positions]` for flow."""
        return positions if self.discrete else self.grid[positions]

    def coefficients(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(a, b, c, d) of each timestep [S]: float32 [S, 4] on the timesteps' device."""
        self.check_timesteps(timesteps)
        if self.discrete:
            abar = self.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
            a, b = abar.sqrt(), (1 - abar).sqrt()
            if self.kind == "epsilon":
                c, d = torch.zeros_like(a), torch.ones_like(a)
            else:
                c, d = -b, a
        else:
            b = (timesteps.double() / self.num_train_timesteps).float()
            a, c, d = 1 - b, -torch.ones_like(b), torch.ones_like(b)
        return torch.stack([a, b, c, d], dim=1)


def resolution_shifted(scheduler, image_seq_len: int | None):
    """A fresh copy of a flow scheduler shifted by resolution (`use_dynamic_shifting`) whose
    timesteps [T] are its training sigmas shifted for images of `image_seq_len` tokens as its
    pipeline shifts them (`FluxPipeline`): mu = calculate_shift(image_seq_len, base_image_seq_len,
    max_image_seq_len, base_shift, max_shift), then `set_timesteps(sigmas, mu=mu)`, which applies
    the scheduler's time_shift(mu, 1, sigma) (exponential: e^mu / (e^mu + 1 / sigma - 1))."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # the pipeline's own formula

    if image_seq_len is None:
        raise ValueError(f"{type(scheduler).__name__} shifts its timesteps by the image's size "
                         "(use_dynamic_shifting): image_seq_len, the image's token count, is needed")
    config = scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    shifted = type(scheduler).from_config(config)
    shifted.set_timesteps(sigmas=shifted.sigmas.numpy(), mu=mu)  # a fresh scheduler's sigmas: the training ones
    return shifted


def _columns(coefficients: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns `first` and `first + 1` of [B, 4] coefficients, shaped [B, 1, 1, 1] to broadcast."""
    return coefficients[:, first].view(-1, 1, 1, 1), coefficients[:, first + 1].view(-1, 1, 1, 1)


def add_noise(z0: torch.Tensor, eps: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """x_t [B, C, H, W] = a z0 + b eps, for z0 and eps [B, C, H, W] and coefficients [B, 4]
    (`ForwardProcess.coefficients`)."""
    a, b = _columns(coefficients, 0)
    return a * z0 + b * eps


def denoising_target(z0: torch.Tensor, eps: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """What the denoiser learns to predict from x_t, [B, C, H, W]: c z0 + d eps (eps, v or the
    flow velocity eps - z0; coefficients [B, 4])."""
    c, d = _columns(coefficients, 2)
    return c * z0 + d * eps


def draw_timesteps(schedule: Schedule, samples: int, num_train_timesteps: int = 1000,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The timesteps of S = `samples` draws, LongTensor [S'] (S' = S except for "diffusion-itm").

    - "uniform": uniform draws from [0, T) (with `generator`);
    - "stratified": Diffusion Classifier's evenly spaced midpoints, in its integer arithmetic:
      t_k = T // S // 2 + k * (T // S) (`eval_prob_adaptive.py`);
    - "diffusion-itm": the DiffusionITM research code's `range(10, 990, 1000 // S)`, written for
      any T as `range(10, T - 10, T // S)`: 10, 110, ..., 910 for S = 10; 49 draws for S = 50.
    - "jeong2025": Jeong et al.'s `scheduler.timesteps[np.arange(20, 980, 1000 // S)]` reversed:
      grid positions T - 1 - i, ascending (30 draws for S = 30, 22 ... 979; on SD3's shifted grid
      model timesteps 65.97 ... 993.24, the values its code lists).
    """
    T = num_train_timesteps
    if schedule == "uniform":
        return torch.randint(0, T, (samples,), generator=generator)
    if schedule == "stratified":
        return T // samples // 2 + torch.arange(samples) * (T // samples)
    if schedule == "diffusion-itm":
        return torch.tensor(list(range(10, T - 10, max(1, T // samples))), dtype=torch.long)
    if schedule == "jeong2025":  # indices into the descending grid, as positions in increasing noise
        return (T - 1 - torch.arange(20, T - 20, max(1, T // samples))).flip(0)
    raise ValueError(f"schedule must be 'uniform', 'stratified', 'diffusion-itm' or 'jeong2025', got {schedule!r}")


@dataclass(frozen=True)
class NoiseBank:
    """S draws of (timestep, noise).

    Attributes:
        timesteps: [S] model timesteps (see the module docstring): LongTensor DDPM steps in [0, T)
            for the variance-preserving kinds, or float T sigma in (0, T] for flow matching.
        noise: float32 Tensor [S, C, h, w], standard normal, on the CPU.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor

    def __post_init__(self) -> None:
        t, eps = self.timesteps, self.noise
        if t.dim() != 1 or not (t.dtype == torch.long or t.is_floating_point()):
            raise ValueError(f"NoiseBank timesteps must be a LongTensor or float tensor [S], got {t.dtype} "
                             f"{tuple(t.shape)}")
        if eps.dim() != 4 or eps.shape[0] != t.shape[0]:
            raise ValueError(
                f"NoiseBank noise must be [S, C, h, w] with S = len(timesteps) = {t.shape[0]}, "
                f"got {tuple(eps.shape)}"
            )
        if t.shape[0] == 0:
            raise ValueError("NoiseBank needs at least one sample (S >= 1)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("NoiseBank timesteps must be finite")
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
        process: ForwardProcess | None = None,
    ) -> "NoiseBank":
        """Draw a bank reproducibly from `seed` on a CPU generator.

        Args:
            samples: S, the number of draws asked for (>= 1).
            latent_shape: (C, h, w) of the model's latents.
            schedule: the training-grid positions (`draw_timesteps`): "uniform", "stratified"
                (Diffusion Classifier's) or "diffusion-itm" (the DiffusionITM research code's;
                its count can differ from S).
            num_train_timesteps: T of the noise scheduler (the process's, when one is given).
            process: the model's forward process; its grid turns positions into model timesteps
                (None: the positions themselves, integer DDPM steps).
        """
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
        T = num_train_timesteps if process is None else process.num_train_timesteps
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        positions = draw_timesteps(schedule, samples, T, gen).long()
        noise = torch.randn((len(positions), *latent_shape), generator=gen, dtype=torch.float32)
        return cls(positions if process is None else process.from_grid(positions), noise)

    @classmethod
    def for_protocol(cls, protocol: Protocol, latent_shape: Sequence[int], process: ForwardProcess,
                     seed: int | None = None) -> NoiseBank:
        """The draws of `protocol` (its samples and schedule) on `process`'s grid from `seed`
        (default: its seed; per query: `protocol.query_seed(key)`)."""
        return cls.sample(protocol.samples, latent_shape, seed=protocol.seed if seed is None else seed,
                          schedule=protocol.schedule, process=process)

    @classmethod
    def from_tensors(cls, timesteps: torch.Tensor, noise: torch.Tensor) -> "NoiseBank":
        """Wrap given draws: timesteps [S] (integers, or whole-valued floats, are DDPM steps; other
        floats are kept as continuous flow-matching timesteps, never truncated), noise Tensor
        [S, C, h, w]."""
        timesteps = torch.as_tensor(timesteps)
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"NoiseBank noise must be a tensor [S, C, h, w], got {type(noise).__name__}")
        whole = not timesteps.is_floating_point() or bool((timesteps == timesteps.round()).all())
        timesteps = timesteps.long() if whole else timesteps.double()
        return cls(timesteps.cpu(), noise.detach().float().cpu())

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

    def check_fits(self, latent_shape: Sequence[int], process: ForwardProcess) -> "NoiseBank":
        """This bank with timesteps fit for `process` (whole-valued timesteps as float model
        timesteps of a flow-matching model); ValueError unless its draws fit the model's latents
        and timesteps."""
        if tuple(latent_shape) != self.latent_shape:
            raise ValueError(
                f"NoiseBank latent shape {self.latent_shape} does not fit the model's latents "
                f"{tuple(latent_shape)}"
            )
        bank = self if process.discrete else NoiseBank(self.timesteps.double(), self.noise)
        try:
            process.check_timesteps(bank.timesteps)
        except ValueError as err:
            raise ValueError(f"NoiseBank timesteps do not fit the model: {err}") from None
        return bank
