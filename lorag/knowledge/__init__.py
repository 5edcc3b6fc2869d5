"""Knowledge bases: ingestion with llama-index, Chroma storage, hybrid retrieval, citations."""
