"""Inference: greedy generation with a KV cache (`generate`); a StreamingSession comes later (DESIGN section 7)."""

from vidlm.infer.generate import Generation, generate, generate_cached

__all__ = ["Generation", "generate", "generate_cached"]
