"""Every error the broker raises on purpose, as one tree.

    BrokerError
    ├── ConfigError            a setting is missing or has a bad value (fails at start)
    ├── StoreError             Redis answered with an error
    │   └── StoreUnavailable   Redis could not be reached in time
    ├── SigningError           a key could not be loaded or a token could not be signed
    └── RequestError           the client's request cannot be served (has an HTTP status)
        ├── InvalidRequest         400: malformed body or parameter
        ├── AuthError              401: missing, malformed, expired or untrusted bearer token
        ├── Forbidden              403: the token lacks the scope this operation needs
        ├── NotFound               404: unknown, expired or foreign resource
        ├── MethodNotAllowed       405
        ├── Conflict               409: the resource already exists
        ├── PayloadTooLarge        413
        └── UnsupportedMediaType   415

The HTTP layer maps a RequestError to its status and a JSON body; anything else is a 500
whose body never carries a traceback.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base class of every error the broker raises deliberately."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ConfigError(BrokerError):
    """A configuration key is missing or has a value the broker cannot use."""


class StoreError(BrokerError):
    """Redis answered a command with an error."""


class StoreUnavailable(StoreError):
    """Redis could not be reached, or did not answer in time."""


class SigningError(BrokerError):
    """A signing key could not be loaded or used."""


class RequestError(BrokerError):
    """The request cannot be served; carries the HTTP status and a machine-readable code."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.path = path

    def headers(self) -> dict[str, str]:
        """Headers the answer needs whatever its body's format (Oxlin JSON or OB)."""
        return {}


def from_http_status(status: int, reason: str) -> RequestError:
    """An HTTP error raised by aiohttp itself (e.g. 413 from request.read()) as one of ours."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    error = RequestError(reason, code=codes.get(status, "http_error"))
    error.status = status
    return error


class InvalidRequest(RequestError):
    """The body or a parameter is malformed or breaks a constraint."""

    status = 400
    code = "invalid_request"


class AuthError(RequestError):
    """The bearer token is missing, malformed, expired or not signed by a trusted key."""

    status = 401
    code = "invalid_token"
    # No credentials at all: RFC 6750 §3.1, the challenge then carries no error code.
    missing = False

    def headers(self) -> dict[str, str]:
        if self.missing:
            return {"WWW-Authenticate": 'Bearer realm="broker"'}
        return {"WWW-Authenticate": f'Bearer error="{self.code}"'}


class MissingToken(AuthError):
    """The request carries no Authorization header."""

    missing = True


class Forbidden(RequestError):
    """The token is valid but does not grant this operation."""

    status = 403
    code = "insufficient_scope"


class NotFound(RequestError):
    """The resource does not exist for this caller (unknown, expired or someone else's)."""

    status = 404
    code = "not_found"


class MethodNotAllowed(RequestError):
    """The resource exists but not with this HTTP method."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)} if self.allow else {}


class Conflict(RequestError):
    """The resource already exists."""

    status = 409
    code = "conflict"


class PayloadTooLarge(RequestError):
    """The body, or one event in it, is over the configured size cap."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestError):
    """The Content-Type is not one this endpoint accepts."""

    status = 415
    code = "unsupported_media_type"
