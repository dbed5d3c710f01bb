"""Plugins: packages that add named models, CLIP checkpoints, UNet classes and tasks to the engine.

A plugin is an entry point in the group ``itm_engine.plugins`` that names a function taking no
arguments; the function registers what the plugin offers with `itm_engine.models.registry`
(`register_model`, `register_clip`, `register_unet_class`) and `itm_engine.tasks.register`. The
engine never imports a plugin by name: it runs every installed plugin once, the first time it
looks up a name it does not know. The ShapesWorld lab is such a plugin (pyproject.toml:
``[project.entry-points."itm_engine.plugins"]``).
"""
from __future__ import annotations

import importlib.metadata

GROUP = "itm_engine.plugins"
_loaded = False


def load_plugins() -> None:
    """Run the registration function of every installed plugin, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before running them: a plugin may look names up while it registers
    failed = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        try:
            entry.load()()
        except Exception as err:  # every plugin gets its turn; then the failures are reported together
            failed.append(f"{entry.name!r} ({entry.value}): {type(err).__name__}: {err}")
    if failed:
        raise RuntimeError("itm_engine plugin(s) failed to load: " + "; ".join(failed))
