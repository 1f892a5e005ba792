"""Checkpoint formats: GGUF to HuggingFace conversion and the registry of named models."""
