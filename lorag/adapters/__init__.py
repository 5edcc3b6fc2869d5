"""Adapters: registry (validate, version, load/unload) and LoRA training."""
