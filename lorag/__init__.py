"""lorag: one runtime for domain-specialised LLMs (LoRA adapters + RAG + guards)."""

__version__ = "0.1.0"
