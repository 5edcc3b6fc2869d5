"""The HTTP layer: FastAPI app, OpenAI, admin and knowledge routes, auth, keys, limits, metrics, `lorag serve`."""
