"""Fused ops of the engine's hot path: noisy-latent construction and per-item error reduction.

Each op has a plain PyTorch reference (`reference.py`); faster backends plug in here.
"""
from itm_engine.kernels.reference import item_error, noisy_latents

__all__ = ["item_error", "noisy_latents"]
