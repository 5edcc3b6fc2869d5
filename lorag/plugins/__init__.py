"""Plugins: pluggy hooks around every request, built-in guards, third-party domain plugins."""
