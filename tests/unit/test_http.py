"""Request helpers: shielded Redis steps, background work, the wait parameter, bodies."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request

from broker.appkeys import background_key
from broker.errors import InvalidRequest
from broker.http import _take_whole, finish, held, in_background, requested_wait


def _request(path: str = "/", headers: dict[str, str] | None = None) -> web.Request:
    app = web.Application()
    app[background_key] = set()
    return make_mocked_request("GET", path, headers=headers or {}, app=app)


async def test_finish_completes_its_step_when_the_caller_is_cancelled():
    request = _request()
    done = []

    async def step() -> str:
        await asyncio.sleep(0.05)
        done.append(1)
        return "ok"

    caller = asyncio.ensure_future(finish(request, step))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert request.app[background_key]  # still running, tracked for shutdown
    await asyncio.sleep(0.1)
    assert done == [1] and not request.app[background_key]


async def test_a_failing_background_step_is_logged_and_forgotten(caplog):
    request = _request()

    async def boom() -> None:
        raise RuntimeError("redis went away")

    with caplog.at_level(logging.WARNING, logger="broker.http"):
        task = in_background(request, boom())
        await asyncio.sleep(0.01)
    assert task.done() and not request.app[background_key]
    assert "redis went away" in caplog.text


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/q", {}, 0.0),
        ("/q?wait=2.5", {}, 2.5),
        ("/q?x=1&wait=99", {}, 30.0),
        ("/q", {"Prefer": "respond-async, wait=4"}, 4.0),
        ("/q?wait=1", {"Prefer": "wait=4"}, 1.0),
    ],
)
def test_requested_wait(path, headers, expected):
    assert requested_wait(_request(path, headers), 30.0) == expected


@pytest.mark.parametrize("path", ["/q?wait=", "/q?wait=soon", "/q?wait=-1", "/q?wait=nan"])
def test_bad_wait_is_invalid(path):
    with pytest.raises(InvalidRequest):
        requested_wait(_request(path), 30.0)


def test_a_hold_is_spread_below_the_wait_never_above():
    assert held(30.0, 0.0) == 30.0
    holds = [held(30.0, 0.2) for _ in range(1000)]
    assert all(24.0 <= h <= 30.0 for h in holds)
    # spread over the band, so clients that time out together drift apart
    assert max(holds) - min(holds) > 3.0


class _Protocol:
    """What an aiohttp StreamReader asks of its connection: flow control, recorded."""

    def __init__(self) -> None:
        self._reading_paused = False
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.calls.append("pause")

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        self.calls.append("resume")


def _body(*chunks: bytes, limit: int = 2**16) -> tuple[StreamReader, _Protocol]:
    protocol = _Protocol()
    body = StreamReader(protocol, limit, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    for chunk in chunks:
        body.feed_data(chunk)
    body.feed_eof()
    protocol.calls.clear()  # feed_eof resumes reading itself; only the read's calls count
    return body, protocol


async def test_a_body_in_one_chunk_is_taken_without_resuming_the_connection():
    """The quick path (aiohttp's real StreamReader: a renamed attribute fails here)."""
    body, protocol = _body(b'{"maxEvents": 1}')
    assert _take_whole(body) == b'{"maxEvents": 1}'
    assert protocol.calls == []  # no resume_reading, so no data_received(b"") re-entry
    # the reader is left as read_nowait() would leave it: drained, at its end
    assert body.read_nowait() == b"" and body.at_eof() and body._size == 0
    assert body._cursor == len(b'{"maxEvents": 1}') == body.total_bytes


async def test_a_body_in_several_chunks_or_with_reading_paused_is_read_as_before():
    body, protocol = _body(b'{"ack": ', b'["a"]}')
    assert _take_whole(body) == b'{"ack": ["a"]}' and body.at_eof()
    assert "resume" in protocol.calls
    # one chunk, but over the high-water mark: reading was paused and must be resumed
    big = b"x" * 300
    body, protocol = _body(big, limit=100)
    protocol._reading_paused = True
    assert _take_whole(body) == big and body.at_eof()
    assert "resume" in protocol.calls and not protocol._reading_paused
