"""The one error type of the request path: a status, a stable reason id, a message."""

from __future__ import annotations

import orjson
from aiohttp import web


class Denied(Exception):
    """Stop the request with this status and stable reason id (SPEC §4)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """The SPEC §4 error body: {"error": {"code", "message", "request_id"}}."""
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=headers)
