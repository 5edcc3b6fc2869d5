"""The HTTP-free request path: resolution, prompt, tools, domains, routing, the protocol."""
