"""The request body size limit: an ASGI middleware that answers 413 to a body larger than it.

A declared Content-Length over the limit is refused before any of the body is read; a body sent
without one (chunked) is refused as soon as what arrived passes the limit. The error has the API's
OpenAI shape and names the limit and the `picochat serve` flag that sets it.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from picochat.serve.schemas import APIError

DEFAULT_MAX_BODY_MB = 4.0  # a conversation filling a 128k-token context is about 0.5 MB of JSON
TOO_LARGE = "request_too_large"  # the error code


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes:,} bytes "
                         "(picochat serve --max-body-mb sets it)", code=TOO_LARGE)


class BodyLimit:
    """ASGI middleware: HTTP request bodies of at most `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = _too_large(self.max_bytes)
            return await JSONResponse(error.body(), status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while it reads the body on to the handlers.
                    raise HTTPException(413, _too_large(self.max_bytes).message)
            return message

        await self.app(scope, limited_receive, send)
