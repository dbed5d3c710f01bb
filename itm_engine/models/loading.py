"""Load the Stable Diffusion parts DiffusionITM needs: VAE, UNet, text encoder, tokenizer, scheduler.

Four kinds of source, all offline (nothing is ever downloaded):

- a built-in architecture with random weights (``"tiny"``, ``"sd15-arch"``, ``"sd21-arch"``), for
  tests and benchmarks without checkpoints;
- a named model a plugin registered (`itm_engine.models.registry`), such as ``"shapes"``, the
  trained ShapesWorld model shipped in the package;
- a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ...);
- a Hugging Face hub id (``"stabilityai/stable-diffusion-2-1-base"``), resolved only from the local
  HF cache.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub
import safetensors.torch
import torch
import transformers
from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
from safetensors import SafetensorError

from itm_engine.models import registry
from itm_engine.models.architectures import ARCHITECTURES, build_random_components
from itm_engine.models.components import SDComponents, frozen, quiet
from itm_engine.models.families import FAMILIES, PIPELINE_FAMILIES
from itm_engine.storage import read_json

_COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The safetensors file that replaces a PyTorch .bin: transformers' name, else the same name (diffusers, LoRA).
DAMAGED = "the model folder is damaged; copy or save it again"
_SAFETENSORS_NAMES = {"pytorch_model.bin": "model.safetensors"}


class WeightsFileError(ValueError):
    """A weights file that cannot be read: not valid safetensors, not a readable PyTorch checkpoint,
    or a pickle that ``torch.load(weights_only=True)`` refuses as unsafe; the message names the file."""


def read_weights(file: str | os.PathLike) -> dict[str, Any]:
    """The state dict in a weights file: a ``.safetensors`` file, any other a PyTorch checkpoint read
    with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only (no
    code in the file runs).

    Raises WeightsFileError naming the file when it is not valid safetensors (e.g. truncated), not
    a readable checkpoint, or a pickle refused as unsafe (the message says how to convert a
    trusted one to safetensors).
    """
    file = Path(file)
    if file.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(file, device="cpu")
        except SafetensorError as err:
            raise WeightsFileError(f"{file} is not a valid safetensors file (truncated?): {err}") from err
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch wraps the unpickler's own error (its __context__) in a long generic message
        inner = err.__context__ if isinstance(err.__context__, pickle.UnpicklingError) else err
        reason = str(inner).strip().split(". ")[0].rstrip(".")
        target = _SAFETENSORS_NAMES.get(file.name, file.with_suffix(".safetensors").name)
        raise WeightsFileError(
            f"{file} was refused as unsafe: torch.load(weights_only=True) will not unpickle it ({reason}); "
            "unpickling it could run code from the file. If you trust where it came from, convert it to "
            f"safetensors once: state = torch.load({str(file)!r}, weights_only=False), then "
            f"safetensors.torch.save_file(state, {str(file.with_name(target))!r}) (or load the model with it and "
            "save_pretrained(folder, safe_serialization=True)), and load that instead."
        ) from err
    except (RuntimeError, OSError, EOFError) as err:  # what torch raises for a damaged zip or pickle
        raise WeightsFileError(f"{file} is not a readable PyTorch checkpoint (truncated?): {err}") from err


def save_random_model(
    arch: str, path: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Write ``build_random_components(arch, seed, prediction_type)`` as a complete diffusers
    pipeline folder of its family (safetensors weights); returns the folder's path."""
    return save_components(build_random_components(arch, seed, prediction_type), path)


def save_components(components: SDComponents, path: str | os.PathLike) -> Path:
    """Write ``components`` as a complete diffusers pipeline folder of its family
    (StableDiffusionPipeline without a safety checker, StableDiffusion3Pipeline, ...; safetensors
    weights); returns the folder's path."""
    path = Path(path)
    family = FAMILIES[components.family]
    index: dict[str, Any] = {"_class_name": family.pipeline_class.__name__, "_diffusers_version": diffusers.__version__}
    if family.name == "sd":
        index["requires_safety_checker"] = False
        index.update({name: [None, None] for name in ("safety_checker", "feature_extractor", "image_encoder")})
    with quiet():
        for name, part in _parts(components).items():
            part.save_pretrained(path / name)
            index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def _parts(components: SDComponents) -> dict[str, Any]:
    """Every component of `components` under its folder name in its family's pipeline."""
    family = FAMILIES[components.family]
    return {"vae": components.vae, family.denoiser_folder: components.denoiser, "text_encoder": components.text_encoder,
            "tokenizer": components.tokenizer, "scheduler": components.scheduler, **components.extras}


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder, from its model_index.json's pipeline class ("sd" when the
    file is absent or names an SD 1.x/2.x pipeline variant)."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return "sd"
    name = read_json(index_file, DAMAGED).get("_class_name", "")
    if name in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[name]
    for prefix, family in (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("StableDiffusion", "sd")):
        if name.startswith(prefix):  # Img2Img, Inpaint, ... variants of a pipeline share its components
            return family
    raise ValueError(f"{index_file}: pipeline {name!r} is not a supported model family; supported: "
                     f"{', '.join(sorted(PIPELINE_FAMILIES))}")


def _load_folder(folder: Path, source: str) -> SDComponents:
    """Load every component of the folder's family (`folder_family`) from its subfolders (an SD
    UNet as the class its config names: a class a plugin registered, else diffusers'
    `UNet2DConditionModel`)."""
    family = FAMILIES[folder_family(folder)]
    parts = family.encoder_classes()
    required = [family.denoiser_folder, "scheduler", "vae", *family.required_parts]
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete diffusers folder: missing subfolder(s) {', '.join(missing)}"
        )

    def weights(cls: Any, name: str) -> Any:
        use_safetensors = any((folder / name).glob("*.safetensors"))
        try:
            return cls.from_pretrained(folder, subfolder=name, use_safetensors=use_safetensors)
        except Exception:
            # diffusers and transformers report a damaged or refused weights file without its cause
            # or without its name: read each file `from_pretrained` would have read to find the one
            # (read_weights raises WeightsFileError naming it); nothing wrong there, the error stands
            for file in sorted((folder / name).glob("*.safetensors" if use_safetensors else "*.bin")):
                read_weights(file)
            raise

    def config(name: str, file: str) -> dict[str, Any]:
        path = folder / name / file
        return read_json(path, DAMAGED) if path.is_file() else {}

    denoiser_class = family.denoiser_class(config(family.denoiser_folder, "config.json"))
    scheduler_class = family.scheduler_class_for(config("scheduler", "scheduler_config.json"))
    with quiet():
        loaded = {name: weights(cls, name) for name, cls in parts.items() if (folder / name).is_dir()}
        loaded.update({name: transformers.AutoTokenizer.from_pretrained(folder, subfolder=name)
                       for name in family.tokenizers if (folder / name).is_dir()})
        return SDComponents(
            vae=weights(diffusers.AutoencoderKL, "vae"),
            denoiser=weights(denoiser_class, family.denoiser_folder),
            text_encoder=loaded.pop("text_encoder"),
            tokenizer=loaded.pop("tokenizer"),
            scheduler=scheduler_class.from_pretrained(folder, subfolder="scheduler"),
            source=source,
            family=family.name,
            extras=loaded,
        )


def _cached_snapshot(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    """The folder of ``repo_id`` in the local Hugging Face cache; FileNotFoundError when absent."""
    cache = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE).expanduser()
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except IncompleteSnapshotError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is only partly downloaded in the Hugging Face cache at {cache}: {err}"
        ) from None
    except HFValidationError:
        raise FileNotFoundError(
            f"cannot load {repo_id!r}: not a local folder, a built-in architecture {ARCHITECTURES} "
            "or a hub id"
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"cannot load {repo_id!r}: it is not a local folder, not a built-in architecture "
            f"{ARCHITECTURES}, and not in the Hugging Face cache at {cache}. Nothing is downloaded at "
            f"run time. To get it, run `hf download {repo_id}` on a machine with network access and "
            f"point HF_HOME (or HF_HUB_CACHE) at that cache, or pass the path of a local diffusers folder."
        ) from None


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be paths, never ``name`` or ``org/name`` hub ids."""
    return source.startswith((".", "~", os.sep)) or source.count("/") > 1 or "\\" in source


def load_components(
    source: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> SDComponents:
    """Load Stable Diffusion components from a built-in architecture, a folder or a cached hub id.

    ``source`` is tried as, in order:

    1. one of ``ARCHITECTURES``: random weights from ``build_random_components(source)``; or a
       named model a plugin registered (``"shapes"``: the trained ShapesWorld model shipped in
       the package; `itm_engine.models.registry`);
    2. an existing local diffusers folder with ``unet/``, ``vae/``, ``text_encoder/``,
       ``tokenizer/`` and ``scheduler/`` subfolders. Weights are read from ``*.safetensors`` when
       a subfolder has them, else from PyTorch ``.bin`` files, which diffusers 0.42 and
       transformers 5.x open with ``torch.load(weights_only=True)`` (no arbitrary code runs).
       The scheduler is read as a ``DDPMScheduler`` whatever class the folder names (only its
       betas and prediction_type are used), except a ``FlowMatchEulerDiscreteScheduler``, read as
       itself: the denoiser was trained by flow matching (`Family.scheduler_class_for`);
    3. a hub id such as ``"stabilityai/stable-diffusion-2-1-base"``, looked up only in the local
       Hugging Face cache (``cache_dir``, default ``HF_HUB_CACHE``/``HF_HOME``), then loaded as 2.

    Raises FileNotFoundError when the source cannot be found (the message says how to get it)
    or a folder lacks a component, WeightsFileError (a ValueError) naming a weights file that is
    not valid safetensors, not a readable checkpoint, or a pickle refused as unsafe (with how to
    convert it to safetensors), and ValueError for a prediction type other than
    ``"epsilon"``/``"v_prediction"``. The result is on ``device``/``dtype``, in eval mode,
    with gradients off. ``image_size`` builds a built-in architecture at another native size.
    """
    name = os.fspath(source)
    if name in ARCHITECTURES:  # on "meta" built there: no memory, for counting FLOPs
        built_on = "meta" if torch.device(device).type == "meta" else "cpu"
        return frozen(build_random_components(name, device=built_on, image_size=image_size), device, dtype)
    if image_size is not None:
        raise ValueError(f"image_size applies to the built-in architectures {ARCHITECTURES}, not to {name!r}")
    named = registry.model_folder(name) if not _looks_like_path(name) and "/" not in name else None
    if named is not None:
        return frozen(_load_folder(named, f"builtin:{name}"), device, dtype)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return frozen(_load_folder(folder, name), device, dtype)
    if isinstance(source, os.PathLike) or _looks_like_path(name):
        raise FileNotFoundError(f"no such folder: {folder}")
    return frozen(_load_folder(_cached_snapshot(name, cache_dir), name), device, dtype)
