"""LoRA on the UNet's attention projections: add, save, read and load checkpoints.

A LoRA adapts a frozen projection ``W [out, in]`` of ``to_q``, ``to_k``, ``to_v`` or ``to_out.0``
with a rank-r update: ``y = W x + scale * (alpha / r) * B (A x)`` where ``A [r, in]`` ("down",
``lora_A``) and ``B [out, r]`` ("up", ``lora_B``). Checkpoints are written in the diffusers LoRA
format (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``, the peft config
in the file's metadata), so plain diffusers loads them with ``pipe.load_lora_weights(dir)``.

`load_lora` also reads the research code's released checkpoints: ``pytorch_lora_weights.bin`` in
the legacy attention-processor format (``<block>.attn1.processor.to_q_lora.down.weight``; alpha = r,
i.e. ``y = W x + scale * up(down(x))``), converted with diffusers' own key mapping. Every key must
land on a UNet linear layer with the right shape; anything else is an error, never dropped.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from itm_engine.models.loading import read_weights

ADAPTER = "default"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_lora_weights.bin"
CONFIG_NAME = "lora_config.json"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# peft matches a string target_modules with re.fullmatch against each module's qualified name.
_TARGETS = {
    "cross": r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    "all": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
}
# MMDiT denoisers (SD3, Flux) attend to image and text tokens jointly in `attn` (the text stream's
# projections add_*_proj / to_add_out): their "cross" attention is the joint one; "all" adds SD3.5's
# second, image-only `attn2`. diffusers' SD3 and Flux LoRA trainers target these same layers.
_JOINT = r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_JOINT_TARGETS = {"cross": rf".*\.attn\.{_JOINT}", "all": rf".*\.attn2?\.{_JOINT}"}


def _targets(denoiser: torch.nn.Module, attention: str) -> str:
    """The target-module regex of `attention` for this denoiser: a UNet's or PixArt's separate
    cross-attention (``attn2``), or an MMDiT's joint attention."""
    joint = any(name.endswith(".attn.add_q_proj") for name, _ in denoiser.named_modules())
    return (_JOINT_TARGETS if joint else _TARGETS)[attention]


def add_lora(
    unet: torch.nn.Module, rank: int = 4, alpha: float | None = None, dropout: float = 0.0, attention: str = "cross"
) -> None:
    """Add a trainable LoRA (peft adapter ``ADAPTER``) to the attention projections of `unet`.

    attention: "cross" adapts the cross-attention layers (``attn2``) only, "all" self- and
    cross-attention (``attn1`` and ``attn2``). alpha defaults to rank (update scale alpha / rank = 1).
    A starts N(0, std 1/rank) and B = 0 (as in the research code), so the model starts unchanged.
    Base weights are frozen; only the LoRA matrices require grad.
    """
    if attention not in _TARGETS:
        raise ValueError(f"attention must be one of {tuple(_TARGETS)}, got {attention!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if ADAPTER in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet already has a LoRA adapter {ADAPTER!r}")
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
        target_modules=_targets(unet, attention), init_lora_weights="gaussian",
    )
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=ADAPTER)
    for parameter in lora_parameters(unet):
        parameter.requires_grad_(True)


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA matrices of adapter ``ADAPTER`` (A [r, in] and B [out, r] per adapted layer)."""
    return [p for name, p in unet.named_parameters() if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name]


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write the UNet's LoRA to `directory` in the diffusers format; returns the weights file.

    Files: ``pytorch_lora_weights.safetensors`` (keys ``unet.<module>.lora_{A,B}.weight``, the peft
    config as metadata, as diffusers' own trainers write it) and ``lora_config.json`` (rank, alpha,
    dropout, attention, target modules: for people; loading does not need it).
    """
    config = getattr(unet, "peft_config", {}).get(ADAPTER)
    if config is None:
        raise ValueError(f"the UNet has no LoRA adapter {ADAPTER!r} to save (see add_lora / load_lora)")
    directory = Path(directory)
    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    if isinstance(unet, UNet2DConditionModel):
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            directory, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict(), weight_name=WEIGHTS_NAME)
    else:  # a transformer denoiser: keys "transformer.<module>...", as diffusers' SD3 / Flux trainers write them
        SD3LoraLoaderMixin.save_lora_weights(
            directory, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict(),
            weight_name=WEIGHTS_NAME)
    targets = config.target_modules
    summary = {
        "rank": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
        "attention": next((name for table in (_TARGETS, _JOINT_TARGETS) for name, regex in table.items()
                           if regex == targets), None),
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return directory / WEIGHTS_NAME


def read_lora(path: str | os.PathLike, unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a LoRA checkpoint, convert it to peft keys and check it against `unet`.

    path: a directory (``pytorch_lora_weights.safetensors`` preferred, else the legacy
    ``pytorch_lora_weights.bin``) or a file. Returns the state dict with keys
    ``<module>.lora_A.weight`` [r, in] / ``<module>.lora_B.weight`` [out, r] and the stored peft
    config (None for files without one). Only reads shapes from `unet`, so a UNet on the meta
    device validates a checkpoint without materialising any weights.

    Raises FileNotFoundError for a missing file, WeightsFileError (a ValueError, `read_weights`)
    naming a file that is not valid safetensors, not a readable checkpoint, or a pickle refused as
    unsafe, and ValueError naming every key (as written in the file) that does not map onto a
    linear layer of `unet`, lacks its A/B partner, or has the wrong shape.
    """
    file = _weights_file(Path(path))
    raw = read_weights(file)
    config = None
    if file.suffix == ".safetensors":
        with safetensors.safe_open(file, framework="pt") as handle:
            config = json.loads((handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "null"))
        for prefix in ("unet.", "transformer."):  # pipeline files; not unet.save_lora_adapter's
            if config and any(k.startswith(prefix) for k in config):
                config = {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{file}: not a LoRA state dict (a mapping of names to tensors)")
    # diffusers' mapping: drop ".processor.", "to_q_lora.down" -> "to_q.lora_A", "to_out_lora" -> "to_out.0", ...
    original = {_peft_key(key): key for key in raw}
    if len(original) != len(raw):
        raise ValueError(f"{file}: several keys convert to the same LoRA weight")
    state = {new: raw[old] for new, old in original.items()}
    _check(state, original, unet, file)
    return state, config or None


def load_lora(unet: torch.nn.Module, path: str | os.PathLike, scale: float = 1.0) -> None:
    """Load a LoRA checkpoint (see `read_lora`) into `unet` as adapter ``ADAPTER``, at `scale`.

    The projections then compute ``W x + scale * (alpha / r) * B (A x)``; scale 0 gives exactly
    the base model's outputs, 1 the checkpoint's model. Loading goes through diffusers'
    ``unet.load_lora_adapter`` (as ``pipe.load_lora_weights`` does), after `read_lora`'s checks.
    """
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    if ADAPTER in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet already has a LoRA adapter {ADAPTER!r}; load onto a fresh UNet")
    state, config = read_lora(path, unet)
    unet.load_lora_adapter(state, prefix=None, adapter_name=ADAPTER, metadata=config)
    loaded = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    if loaded.keys() != state.keys():  # a guard: peft 0.21 injects by the state dict's keys, whatever the config
        missed = sorted(state.keys() - loaded.keys()) + sorted(loaded.keys() - state.keys())
        unet.delete_adapters(ADAPTER)
        raise ValueError(f"{path}: the stored LoRA config does not match its weights: {', '.join(missed)}")
    unet.set_adapters(ADAPTER, weights=float(scale))


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no LoRA weights in {path} (expected {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    return path


def _peft_key(key: str) -> str:
    return next(iter(convert_unet_state_dict_to_peft({key.removeprefix("unet.").removeprefix("transformer."): None})))


def _check(state: dict[str, torch.Tensor], original: dict[str, str], unet: torch.nn.Module, file: Path) -> None:
    """Raise ValueError unless every weight is the A or B of a linear layer of `unet`, paired, of
    shapes A [r, in] and B [out, r]."""
    modules = dict(unet.named_modules())
    unmatched, mismatched = [], []
    for key, tensor in state.items():
        name, _, kind = key.rpartition(".lora_")
        layer = getattr(modules.get(name), "base_layer", modules.get(name))  # an already-adapted layer
        if kind not in ("A.weight", "B.weight") or not isinstance(layer, torch.nn.Linear):
            unmatched.append(original[key])
            continue
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            mismatched.append(f"{original[key]} (its {'A/down' if a is None else 'B/up'} partner is missing)")
            continue
        rank = a.shape[0] if a.ndim == 2 else "r"
        want = [rank, layer.in_features] if kind == "A.weight" else [layer.out_features, rank]
        if list(tensor.shape) != want:
            mismatched.append(f"{original[key]} (shape {list(tensor.shape)}, expected {want})")
    if unmatched or mismatched:
        lines = [f"{file}: {len(unmatched) + len(mismatched)} of {len(state)} LoRA weights do not fit the UNet"]
        if unmatched:
            lines.append(f"  unmatched keys (no such linear layer): {', '.join(sorted(unmatched))}")
        if mismatched:
            lines.append(f"  shape mismatches: {', '.join(sorted(mismatched))}")
        raise ValueError("\n".join(lines))
