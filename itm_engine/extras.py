"""Optional dependencies: the scorer needs none of them; a feature that does says which extra to install.

    accelerate  [eval], [train]   itm-eval's processes and devices, itm-train
    peft        [eval], [train]   LoRA adapters (scoring with a LoRA, HardNeg training)
    psutil      [bench]           itm-bench's peak-memory sampling
    matplotlib  [bench], [shapes] itm-bench's --plot, the demo's figure
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"accelerate": "eval", "peft": "eval", "psutil": "bench", "matplotlib": "bench"}


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import optional dependency `module`, or raise ImportError saying that `feature` needs it and
    which extra installs it (`extra`, default the one `EXTRAS` names)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{feature} needs the optional package {module!r}: "
                          f"pip install 'itm-engine[{extra or EXTRAS[module]}]' (or '[all]')") from err
