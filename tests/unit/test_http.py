"""Request helpers: shielded Redis steps, background work, the wait parameter, bodies."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
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


def _several_chunks() -> tuple[StreamReader, _Protocol, bytes]:
    body, protocol = _body(b'{"ack": ', b'["a"]}')
    return body, protocol, b'{"ack": ["a"]}'


def _chunked() -> tuple[StreamReader, _Protocol, bytes]:
    """Transfer-Encoding: chunked, in one piece: its chunk boundaries are kept."""
    protocol = _Protocol()
    body = StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    body.begin_http_chunk_receiving()
    body.feed_data(b'{"a": 1}')
    body.end_http_chunk_receiving()
    body.feed_eof()
    return body, protocol, b'{"a": 1}'


def _partly_read() -> tuple[StreamReader, _Protocol, bytes]:
    body, protocol = _body(b'{"a": 1}')
    assert body.read_nowait(1) == b"{"
    return body, protocol, b'"a": 1}'


def _paused() -> tuple[StreamReader, _Protocol, bytes]:
    """One chunk, with the connection's reading paused (another pipelined request's doing)."""
    body, protocol = _body(b'{"a": 1}')
    protocol._reading_paused = True
    return body, protocol, b'{"a": 1}'


@pytest.mark.parametrize("make", [_several_chunks, _chunked, _partly_read, _paused])
async def test_other_bodies_are_read_by_read_nowait_as_before(make):
    body, protocol, expected = make()
    protocol.calls.clear()
    assert _take_whole(body) == expected and body.at_eof()
    assert "resume" in protocol.calls  # read_nowait() ran, with its flow control


async def test_no_body_reads_as_empty_and_a_reset_connection_raises():
    assert _take_whole(EMPTY_PAYLOAD) == b""
    body, _ = _body(b'{"a": 1}')
    body.set_exception(ConnectionResetError("client gone"))
    with pytest.raises(ConnectionResetError):
        _take_whole(body)


def test_the_flag_the_quick_path_reads_is_aiohttp_s():
    """_Protocol stands in for aiohttp's connection: the attribute must be the real one's."""
    assert "_reading_paused" in BaseProtocol.__slots__
