"""A fleet of vLLM OpenAI servers behind lorag: the remote engine backend (docs/scale.md).

Kept light: lorag.config imports lorag.fleet.settings, and must not pay for HTTP clients.
"""
