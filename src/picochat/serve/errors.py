"""Every error the API answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`add_error_handlers` turns the API's own errors (`APIError`), FastAPI's validation errors (400,
not 422) and Starlette's HTTP errors (404, 405, 413) into that shape, and installs `InternalErrors`
for everything else: a 500 that leaves the connection open. (Starlette's last-resort handler
re-raises after answering, and uvicorn then closes the connection, so a client's next request on
its pooled connection failed with "connection reset".)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.serve.limits import TOO_LARGE
from picochat.serve.schemas import APIError

logger = logging.getLogger("picochat.serve")


class InternalErrors:
    """ASGI middleware: an exception that no handler took becomes a logged 500 in the API's shape.
    Once a response has started (a stream), only closing the connection can end it: re-raised."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as error:
            if started:
                raise
            logger.exception("internal error in %s %s", scope["method"], scope["path"])
            detail = f"{type(error).__name__}: {error}".encode("utf-8", "backslashreplace").decode()
            body = APIError(500, f"internal error: {detail}", type="server_error").body()
            await JSONResponse(body, status_code=500)(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    app.add_middleware(InternalErrors)  # the outermost middleware added: it sees every other one's errors

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = [str(part) for part in first["loc"] if part != "body"]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", first["msg"])
            message, param = f"the request body is not valid JSON: {reason}", None
        elif first["type"] == "model_attributes_type":
            message, param = "the request body must be a JSON object", None
        else:
            message, param = f"{'.'.join(where) or 'body'}: {first['msg']}", ".".join(where) or None
        more = len(error.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = f"no such endpoint: {request.method} {request.url.path}" if error.status_code == 404 else str(error.detail)
        code = {404: "not_found", 413: TOO_LARGE}.get(error.status_code)
        return JSONResponse(APIError(error.status_code, message, code=code).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))
