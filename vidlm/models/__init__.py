"""Assembled models and a registry by name (`config.model.name`)."""

from vidlm.models.registry import build_model, register_model

__all__ = ["build_model", "register_model"]
