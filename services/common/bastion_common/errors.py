"""One error hierarchy for every service, each class mapped once to an HTTP
status, a gRPC status code and OpenAI's error body."""

from __future__ import annotations

from typing import Any, ClassVar

import grpc


class BastionError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequestError(BastionError):
    status = 400
    type = "invalid_request_error"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class AuthenticationError(BastionError):
    status = 401
    type = "authentication_error"
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    default_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="bastion"'}


class PermissionDeniedError(BastionError):
    status = 403
    type = "permission_error"
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ContentBlockedError(BastionError):
    """The guard refused the input."""

    status = 400
    type = "invalid_request_error"
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    default_code = "content_blocked"


class NotFoundError(BastionError):
    status = 404
    type = "invalid_request_error"
    grpc_code = grpc.StatusCode.NOT_FOUND


class MethodNotAllowedError(BastionError):
    status = 405
    type = "invalid_request_error"
    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    default_code = "method_not_allowed"


class PayloadTooLargeError(BastionError):
    status = 413
    type = "invalid_request_error"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_code = "request_too_large"


class RateLimitError(BastionError):
    status = 429
    type = "rate_limit_error"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int = 1,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.extra_headers = headers or {}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s), **self.extra_headers}


class ServiceUnavailableError(BastionError):
    status = 503
    type = "service_unavailable"
    grpc_code = grpc.StatusCode.UNAVAILABLE


class TimeoutError_(BastionError):
    status = 504
    type = "timeout"
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_code = "timeout"


class InternalError(BastionError):
    pass


# Errors that cross the queue travel as (type name, message); this maps them back.
BY_NAME: dict[str, type[BastionError]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequestError,
        ContentBlockedError,
        NotFoundError,
        ServiceUnavailableError,
        TimeoutError_,
        InternalError,
    )
}


def from_name(
    name: str, message: str, code: str | None = None, param: str | None = None
) -> BastionError:
    return BY_NAME.get(name, InternalError)(message, code=code, param=param)
