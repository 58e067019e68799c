"""JSON encoding and decoding: the one module that imports orjson."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

JSONDecodeError = orjson.JSONDecodeError


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialised by orjson (about 14x faster than json.dumps on events)."""
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def raw_json_response(
    body: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A response whose JSON body is already encoded (events are stored as JSON bytes)."""
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")
