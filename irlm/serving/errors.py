"""Errors a request can get, with what each protocol makes of them.

One exception type carries the HTTP status; the OpenAI routes wrap it in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``), the KServe routes in ``{"error": msg}``
and gRPC in a status code.  ``param`` names the offending field, so a client learns what to fix.
"""
from __future__ import annotations

from typing import Optional

import grpc

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable",
                 500: "internal_error"}
_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
               404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
               503: grpc.StatusCode.UNAVAILABLE, 500: grpc.StatusCode.INTERNAL}


class ServingError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPES.get(self.status, "invalid_request_error")

    @property
    def grpc_code(self):
        return _GRPC_CODES.get(self.status, grpc.StatusCode.UNKNOWN)

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.openai_type,
                          "param": self.param, "code": self.status}}


def bad_field(param: str, message: str) -> ServingError:
    """A 400 naming the field: ``max_tokens: must be an integer >= 1``."""
    return ServingError(f"{param}: {message}", 400, param)
