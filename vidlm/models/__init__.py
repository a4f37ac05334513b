"""Assembled models and a registry by name (`config.model.name`); each model registers itself (registry.py)."""

from vidlm.models.registry import build_model, model_config_class, register_model, registered_models

__all__ = ["build_model", "model_config_class", "register_model", "registered_models"]
