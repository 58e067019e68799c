"""Routes without middleware: every handler wrapped once so that errors answer as JSON.

Why not an aiohttp middleware: with any middleware at all, aiohttp runs each request through
one coroutine per middleware plus one of its own (`_fix_request_current_app`). A parked long
poll keeps those frames alive for its whole wait, about 400 bytes each, at tens of thousands
of polls, and every short poll pays for the extra calls. Here a request holds one wrapper
frame, chosen when the route is added: Oxlin-style JSON errors, or Open Banking's
(OBErrorResponse1 and x-fapi-interaction-id, from ob.py).

Unknown paths and methods cannot reach a handler, so they get routes of their own: each path
answers the methods it lacks with a 405 naming the ones it has, and a last catch-all route
answers 404.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp import hdrs, web

from broker import jsonutil, ob
from broker.errors import (
    MethodNotAllowed,
    NotFound,
    RequestError,
    SigningError,
    StoreUnavailable,
    from_http_status,
)
from broker.http import Handler

log = logging.getLogger(__name__)


def error_body(code: str, message: str, path: str | None = None) -> dict[str, str]:
    body = {"error": code, "message": message}
    if path:
        body["path"] = path
    return body


def answer_error(request: web.Request, e: Exception) -> web.Response:
    """The JSON answer to an error raised while serving `request`; re-raises what is not one.

    Never a traceback: unexpected failures are logged here and answer a bare 500.
    """
    if isinstance(e, web.HTTPException):
        if e.status < 400:
            raise e
        e = from_http_status(e.status, e.reason)
    if isinstance(e, RequestError):
        return jsonutil.json_response(
            error_body(e.code, e.message, e.path), status=e.status, headers=e.headers()
        )
    # Transient: nothing was stored, and a retry may well succeed.
    if isinstance(e, StoreUnavailable):
        log.warning("store unavailable: %s", e)
        return _retry_later("unavailable", "the event store is unavailable; retry shortly")
    if isinstance(e, SigningError):  # a signing process died or failed; the next is fresh
        log.warning("SET signing failed: %s", e)
        return _retry_later("signing_unavailable", "SETs could not be signed; nothing was stored")
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=e)
    return jsonutil.json_response(error_body("internal_error", "internal error"), status=500)


def _retry_later(code: str, message: str) -> web.Response:
    return jsonutil.json_response(
        error_body(code, message), status=503, headers={"Retry-After": "1"}
    )


def endpoint(handler: Handler) -> Handler:
    """Wrap a handler so that every error it raises is answered by answer_error."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as e:  # CancelledError is a BaseException: it goes through
            return answer_error(request, e)

    guarded.__name__ = getattr(handler, "__name__", "guarded")
    guarded.__doc__ = handler.__doc__
    return guarded


def guards_itself(handler: Handler) -> Handler:
    """Mark a handler that answers its own errors, so install() adds no wrapper frame.

    For the long-poll handlers only: a parked poll would otherwise hold the wrapper's frame
    (~250 bytes) for its whole wait. Such a handler wraps its body in
    `try: ... except Exception as e: return answer_error(request, e)` (ob.answer_error on
    OB paths, which also sets the interaction id).
    """
    handler.__broker_guards_itself__ = True  # type: ignore[attr-defined]
    return handler


def install(app: web.Application, tables: Iterable[web.RouteTableDef]) -> None:
    """Add every route of `tables`, wrapped, then the 405 and 404 answers."""
    methods: dict[str, list[str]] = {}
    defs: dict[str, list[web.RouteDef]] = {}
    for table in tables:
        for route in table:
            if not isinstance(route, web.RouteDef):
                raise TypeError(f"only plain routes are supported, got {route!r}")
            defs.setdefault(route.path, []).append(route)
            allowed = methods.setdefault(route.path, [])
            allowed.append(route.method)
            if route.method == hdrs.METH_GET and route.kwargs.get("allow_head", True):
                allowed.append(hdrs.METH_HEAD)
    # Each path's routes are added together, then its catch-all for the other methods, so
    # they share one resource (aiohttp reuses the last resource for an equal path).
    for path, routes in defs.items():
        wrap = ob.endpoint if ob.is_ob_path(path) else endpoint
        for route in routes:
            handler = route.handler
            if not getattr(handler, "__broker_guards_itself__", False):
                handler = wrap(handler)
            # add_get and friends, as RouteDef.register does: add_get also answers HEAD.
            add = getattr(app.router, "add_" + route.method.lower())
            add(path, handler, **route.kwargs)
        app.router.add_route(hdrs.METH_ANY, path, wrap(_method_not_allowed(methods[path])))
    app.router.add_route(hdrs.METH_ANY, "/{tail:.*}", _not_found)


def _method_not_allowed(methods: list[str]) -> Handler:
    allow = tuple(sorted(set(methods)))

    async def method_not_allowed(request: web.Request) -> web.StreamResponse:
        raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}", allow=allow)

    return method_not_allowed


async def _not_found_raw(request: web.Request) -> web.StreamResponse:
    raise NotFound(f"no resource at {request.path}")


_ob_not_found = ob.endpoint(_not_found_raw)
_json_not_found = endpoint(_not_found_raw)


async def _not_found(request: web.Request) -> web.StreamResponse:
    if ob.is_ob_path(request.raw_path.partition("?")[0]):
        return await _ob_not_found(request)
    return await _json_not_found(request)
