"""The ShapesWorld lab: a procedural image-caption world, the small latent diffusion model and tiny
CLIP trained on it by this project, and their evaluation, shipped as the engine's offline default.

    world.py          the world generator (scenes, captions, hard negatives, splits, writer)
    tasks.py          its evaluation tasks (`itm-eval --task shapes|shapes_t2i|shapes_retrieval`)
    report.py         accuracy per subtask through those tasks, DiffusionITM and CLIP side by side
    coord_unet.py     a UNet fed x/y coordinate channels
    grounding.py      token grounding: cross-attention maps pulled onto object masks
    pretrain.py       the latent diffusion model from scratch (`itm-shapes pretrain`)
    pretrain_clip.py  the tiny CLIP baseline (`itm-shapes pretrain-clip`)
    bundle.py         a trained run installed as the bundled models (`itm-shapes bundle`)
    demo.py, cli.py   `make demo`; `itm-shapes`
    assets/           the bundled models: `shapes` (a diffusers folder with its model card) and
                      `shapes-clip`

The engine's core never imports this package: `register` (an ``itm_engine.plugins`` entry point)
adds the bundled models, the UNet class and the tasks to the engine's registries, so
`DiffusionITM.from_pretrained("shapes")`, `ClipModel.from_name("shapes-clip", pretrained="bundled")`
and `itm-eval --task shapes` find them.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODEL = "shapes"
CLIP = "shapes-clip"


def register() -> None:
    """Register the bundled model, the bundled CLIP, `CoordUNet2DConditionModel` and the
    ShapesWorld tasks with the engine (run once by `itm_engine.plugins.load_plugins`)."""
    from itm_engine.models import register_clip, register_model, register_unet_class
    from itm_engine.shapesworld import tasks  # noqa: F401  (its classes register themselves)
    from itm_engine.shapesworld.coord_unet import CoordUNet2DConditionModel

    register_model(MODEL, ASSETS / MODEL)
    register_clip(CLIP, ASSETS / CLIP / f"{CLIP}.json", ASSETS / CLIP / f"{CLIP}.safetensors")
    register_unet_class(CoordUNet2DConditionModel)
