"""Every error leaves the server in OpenAI's error shape, never as a stack trace."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.server.metrics import count_error

log = get_logger("lorag.errors")


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def log_unexpected(err: BaseException) -> None:
    log.error("unhandled_error", error=repr(err), exc_info=err)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    first_param = None
    for problem in err.errors():
        loc = [str(p) for p in problem.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        first_param = first_param or param
        if problem.get("type") == "json_invalid":
            return "The request body is not valid JSON.", None
        problems.append(f"{param or 'body'}: {problem.get('msg')}")
    return "Invalid request: " + "; ".join(problems), first_param


def _counted(request: Request, response: JSONResponse) -> JSONResponse:
    count_error(request, response.status_code)
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoragError)
    async def lorag_error(request: Request, err: LoragError) -> JSONResponse:
        return _counted(request, error_response(err.status_code, err.message, err.error_type, err.param, err.code,
                                                headers=getattr(err, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return _counted(request, error_response(400, message, "invalid_request_error", param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _counted(request, error_response(err.status_code, str(err.detail), error_type,
                                                headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log_unexpected(err)
        return _counted(request, error_response(500, "Internal server error; see the server log.", "server_error"))
