"""Named models, CLIP checkpoints and UNet classes that plugins add (see `itm_engine.plugins`).

    register_model("shapes", folder)                 # from_pretrained("shapes") loads the diffusers folder
    register_clip("shapes-clip", config, weights)    # ClipModel.from_name("shapes-clip", pretrained="bundled")
    register_unet_class(CoordUNet2DConditionModel)   # folders whose unet/config.json names it load as it

A look-up of a name nobody registered runs the installed plugins once and looks again, so the
engine finds what a plugin offers without importing it by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers

from itm_engine.plugins import load_plugins

_MODELS: dict[str, Path] = {}
_CLIPS: dict[str, tuple[Path, Path]] = {}
_UNET_CLASSES: dict[str, type] = {}


def register_model(name: str, folder: str | Path) -> None:
    """Make `from_pretrained(name)` load the diffusers folder `folder`."""
    _MODELS[name] = Path(folder)


def register_clip(name: str, config: str | Path, weights: str | Path) -> None:
    """Make open_clip model `name` known (its JSON `config`) with registered weights `weights`
    (a safetensors file), loaded by `ClipModel.from_name(name, pretrained="bundled")`."""
    _CLIPS[name] = (Path(config), Path(weights))


def register_unet_class(cls: type) -> None:
    """Load UNet folders whose config's ``_class_name`` is ``cls.__name__`` as `cls` (a subclass
    of diffusers' `UNet2DConditionModel`; a class attribute ``extra_input_channels`` says how many
    channels it adds to the latent itself)."""
    if not issubclass(cls, diffusers.UNet2DConditionModel):
        raise TypeError(f"{cls.__name__} is not a diffusers.UNet2DConditionModel")
    _UNET_CLASSES[cls.__name__] = cls


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"the {what} is missing from this installation ({path} does not exist); "
                                "reinstall itm-engine with its package data")
    return path


def _lookup(table: dict[str, Any], name: str) -> Any:
    if name not in table:
        load_plugins()
    return table.get(name)


def model_folder(name: str) -> Path | None:
    """The folder registered as model `name`, or None when no plugin registers that name."""
    folder = _lookup(_MODELS, name)
    return None if folder is None else _existing(folder, f"registered model {name!r}")


def clip_files(name: str) -> tuple[Path, Path] | None:
    """(open_clip config JSON, safetensors weights) registered as CLIP `name`, or None."""
    files = _lookup(_CLIPS, name)
    return None if files is None else tuple(_existing(f, f"registered CLIP {name!r}") for f in files)


def unet_class(config: dict[str, Any]) -> type[diffusers.UNet2DConditionModel]:
    """The class a saved UNet config names (``_class_name``): a registered class, else diffusers'
    `UNet2DConditionModel`."""
    name = config.get("_class_name") or diffusers.UNet2DConditionModel.__name__
    if name == diffusers.UNet2DConditionModel.__name__:
        return diffusers.UNet2DConditionModel
    return _lookup(_UNET_CLASSES, name) or diffusers.UNet2DConditionModel
