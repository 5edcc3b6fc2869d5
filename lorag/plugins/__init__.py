"""Plugins: pluggy hooks around every request, built-in guards, third-party domain plugins.

What a plugin author imports:

    from lorag.plugins import ContentBlocked, PluginContext, Replace, Verdict, hookimpl
"""

from lorag.plugins.errors import ContentBlocked
from lorag.plugins.hookspecs import hookimpl
from lorag.plugins.types import PluginContext, Replace, Verdict

__all__ = ["ContentBlocked", "PluginContext", "Replace", "Verdict", "hookimpl"]
