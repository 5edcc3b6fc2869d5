"""lorag's own plugins, registered like third-party ones: pii, blocklist, json_schema, formatting."""
