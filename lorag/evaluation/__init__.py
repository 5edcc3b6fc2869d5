"""`lorag eval`: which strategy (base, few-shot, RAG, adapter, or a mix) answers a domain best."""
