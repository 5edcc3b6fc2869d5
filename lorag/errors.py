"""Errors whose message is complete and meant for a person.

The CLI prints them as one line and exits non-zero; the server maps them to
OpenAI-shaped errors with the status code each carries.
"""

from __future__ import annotations


class LoragError(Exception):
    """Base: a readable message plus the HTTP status and OpenAI error type it maps to."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class NotFoundError(LoragError):
    status_code = 404
    error_type = "not_found_error"
    code = "model_not_found"


class PermissionDenied(LoragError):
    status_code = 403
    error_type = "permission_error"


class AuthenticationError(LoragError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ConflictError(LoragError):
    status_code = 409
    error_type = "conflict_error"


class EngineUnavailable(LoragError):
    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"
