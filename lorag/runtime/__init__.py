"""Serving core: vLLM engine, request path, OpenAI-compatible server, auth."""
