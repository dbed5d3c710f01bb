"""Model loading: built-in architectures, named models that plugins register, local diffusers
folders and hub ids in the local cache, all offline (`load_components`)."""
from itm_engine.models.architectures import (
    ARCHITECTURES,
    architecture_configs,
    build_random_components,
    clip_tokenizer,
    ddpm_scheduler,
)
from itm_engine.models.components import PREDICTION_TYPES, SDComponents, latent_channels
from itm_engine.models.loading import load_components, save_components, save_random_model
from itm_engine.models.registry import register_clip, register_model, register_unet_class

__all__ = [
    "ARCHITECTURES", "PREDICTION_TYPES", "SDComponents", "architecture_configs", "build_random_components",
    "clip_tokenizer", "ddpm_scheduler", "latent_channels", "load_components", "register_clip", "register_model",
    "register_unet_class", "save_components", "save_random_model",
]
