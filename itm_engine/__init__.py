"""itm-engine: Stable Diffusion as a fast, faithful zero-shot image-text matcher (DiffusionITM)."""
from itm_engine.noise import NoiseBank
from itm_engine.scoring import DiffusionITM

__all__ = ["DiffusionITM", "NoiseBank"]
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
