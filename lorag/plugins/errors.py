"""Errors the plugin layer raises; each maps to an OpenAI error shape on the API.

Plugins raise `ContentBlocked` (or any other `LoragError`) on purpose, and lorag
passes it through. Anything else a plugin raises is a bug in the plugin: lorag
wraps it in `PluginError`, names the plugin and the hook, and refuses the request
(plugins fail closed: a filter that crashed never lets text through unfiltered).
"""

from __future__ import annotations

from lorag.errors import LoragError


class ContentBlocked(LoragError):
    """A filter refused the text; `message` is what the client is told.

    Raised from `request_received`, `context_retrieved` or `output_chunk`. On the
    output side the response ends with finish_reason "content_filter"; on the
    input side the request is refused before generation.
    """

    status_code = 400
    error_type = "invalid_request_error"
    code = "content_filter"

    def __init__(self, message: str, *, plugin: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class PluginError(LoragError):
    """A plugin crashed, timed out or returned something lorag cannot use."""

    status_code = 500
    error_type = "server_error"
    code = "plugin_error"

    def __init__(self, message: str, *, plugin: str, hook: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook


class PluginUnavailable(PluginError):
    """A domain needs a plugin that is not installed, not loaded, or failed to load."""

    status_code = 503
    code = "plugin_unavailable"


class OutputRejected(LoragError):
    """The validators still rejected the output after every allowed retry."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "output_validation_failed"
