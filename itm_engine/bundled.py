"""The models shipped inside the package (trained by the project on ShapesWorld; no download).

- `"shapes"`: a small latent diffusion model, a diffusers folder at `assets/shapes/` (model card:
  its README.md; recipe and measurements: training.json). `DiffusionITM.from_pretrained("shapes")`.
- `"shapes-clip"`: a tiny open_clip CLIP trained contrastively on the same data, at
  `assets/shapes-clip/`. `ClipModel.from_name("shapes-clip", pretrained="bundled")`.

Retrain both with `itm-train pretrain --world shapes` and `itm-train pretrain-clip --world shapes`.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODELS = ("shapes",)
CLIP_MODELS = ("shapes-clip",)
CLIP_TAG = "bundled"


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"the bundled {what} is missing from this installation ({path} does not exist); "
                                "reinstall itm-engine with its package data, or retrain it (see itm_engine.bundled)")
    return path


def model_folder(name: str) -> Path:
    """The diffusers folder of bundled model `name` (one of `MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown bundled model {name!r}; bundled: {', '.join(MODELS)}")
    return _existing(ASSETS / name, f"model {name!r}")


def clip_files(name: str) -> tuple[Path, Path]:
    """(open_clip config JSON, safetensors weights) of bundled CLIP `name` (one of `CLIP_MODELS`)."""
    if name not in CLIP_MODELS:
        raise ValueError(f"unknown bundled CLIP {name!r}; bundled: {', '.join(CLIP_MODELS)}")
    folder = ASSETS / name
    return _existing(folder / f"{name}.json", f"CLIP {name!r}"), _existing(folder / f"{name}.safetensors", f"CLIP {name!r}")
