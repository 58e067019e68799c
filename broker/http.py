"""Small request helpers shared by the API modules: auth, JSON bodies, waits, shielding."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from aiohttp import hdrs, web, web_response

from broker import jsonutil
from broker.appkeys import background_key, verifier_key
from broker.auth import Principal, bearer_token
from broker.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

T = TypeVar("T")
log = logging.getLogger(__name__)
# What aiohttp calls for a route; routing.py and ob.py wrap these.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?([^\s,;\"]*)", re.IGNORECASE)


# The Server header of every answer. aiohttp's default names Python's and its own versions
# ("Python/3.11 aiohttp/3.14.5"), which security scans of a bank's endpoints flag as version
# disclosure. aiohttp puts it in with a setdefault on a module global at each answer, so
# setting that global once costs nothing per request (where aiohttp stops reading it, the
# e2e test of the header fails).
SERVER_HEADER = "broker"


def hide_versions() -> None:
    """Answer with `Server: broker`, not aiohttp's versions (see SERVER_HEADER)."""
    web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]


def authenticate(request: web.Request, app: web.Application | None = None) -> Principal:
    """The verified principal of the request, or AuthError (401).

    `app`: the request's application, when the caller has it already (request.app is two
    property look-ups, and a poll makes several).
    """
    verifier = (request.app if app is None else app)[verifier_key]
    return verifier.verify(bearer_token(request))


async def read_json(
    request: web.Request, *, lenient_type: bool = False, app: web.Application | None = None
) -> Any:
    """Parse the body as JSON.

    `lenient_type`: parse whatever the Content-Type says (Oxlin's own curl example sends none,
    so curl labels it form-urlencoded). Otherwise only JSON media types are accepted (415).
    """
    if not lenient_type:
        media = media_type(request)
        # "" (an empty Content-Type header) passes, as aiohttp's parsed value did before
        if media not in ("application/json", "") and not media.endswith("+json"):
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {media!r}")
    limit = (request.app if app is None else app)._client_max_size
    # The usual case: the whole body came in with the request. Take it as it is, with no
    # await: request.read() loops over readany() and copies into a bytearray first. Not
    # request.content: that caches itself on the request (~88 bytes per parked OB poll).
    body: Any = getattr(request, "_payload", None)
    if body is not None and body.is_eof() and not (limit and body.total_bytes > limit):
        raw = _take_whole(body)
    else:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit") from None
    if not raw.strip():
        raise InvalidRequest("body is empty; a JSON document is required")
    try:
        return jsonutil.loads(raw)
    except jsonutil.JSONDecodeError as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from None


def _take_whole(body: Any) -> bytes:
    """All of a request body that has been received in full (aiohttp's StreamReader).

    The usual case, one chunk and the connection's reading never paused, is taken from the
    buffer directly: read_nowait() would then "resume" reading, which re-enters the
    connection's data_received with b"": 2% of an OB poll's instructions (callgrind), for
    nothing. Anything else (no body, chunks, an offset, a reset connection, paused reading) goes
    through read_nowait().
    """
    # getattr: aiohttp's EMPTY_PAYLOAD (a request with no body) has no buffer at all.
    buffer = getattr(body, "_buffer", None)
    if (
        type(buffer) is deque
        and len(buffer) == 1
        and not body._buffer_offset
        and not body._http_chunk_splits
        and body._exception is None  # the client left: read_nowait() raises, and so must we
        and not body._protocol._reading_paused
    ):
        raw: bytes = buffer.popleft()
        # What _read_nowait_chunk() keeps in step: bytes buffered, and bytes read so far.
        body._size -= len(raw)
        body._cursor += len(raw)
        return raw
    data: bytes = body.read_nowait()
    return data


def media_type(request: web.Request) -> str:
    """The Content-Type's media type, lower case; application/octet-stream when absent.

    From the raw header: request.content_type parses parameters into objects it then keeps
    on the request, several hundred bytes per parked OB poll.
    """
    raw = request.headers.get(hdrs.CONTENT_TYPE)
    if raw is None:
        return "application/octet-stream"
    return raw.partition(";")[0].strip().lower()


def requested_wait(request: web.Request, max_wait_s: float) -> float:
    """Seconds to hold a poll: `?wait=N` or `Prefer: wait=N` (RFC 7240), capped; 0 if none."""
    # From the raw request target: request.query (and .query_string) would cache parsed
    # objects on every parked request.
    raw = _query_param(request.raw_path.partition("?")[2], "wait")
    source = "wait"
    if raw is None:
        m = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
        if m is None:
            return 0.0
        raw, source = m.group(1), "Prefer: wait"
    try:
        wait = float(raw)
    except ValueError:
        raise InvalidRequest(
            f"{source} must be a number of seconds, got {raw!r}", path="wait"
        ) from None
    if not wait >= 0:  # also rejects NaN
        raise InvalidRequest(f"{source} must be >= 0, got {raw!r}", path="wait")
    return min(wait, max_wait_s)


def held(wait: float, jitter: float) -> float:
    """How long to hold a poll asked to wait `wait` s: up to `jitter` of it less, at random.

    Never longer than asked, so a client's own time-out is never overrun.
    """
    return wait * (1.0 - jitter * random.random()) if jitter else wait


def _query_param(query: str, name: str) -> str | None:
    if not query:
        return None
    prefix = name + "="
    for part in query.split("&"):
        if part.startswith(prefix):
            return unquote_plus(part[len(prefix) :])
        if part == name:
            return ""
    return None


def in_background(request: web.Request, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run `work` to completion whatever happens to the request; shutdown waits for it."""
    tasks = request.app[background_key]
    task = asyncio.ensure_future(work)
    tasks.add(task)

    def settled(done: asyncio.Future[Any]) -> None:
        tasks.discard(done)
        # Nobody may be left to await it (its request was cancelled): report failures here.
        if not done.cancelled() and done.exception() is not None:
            log.warning("background Redis step failed: %r", done.exception())

    task.add_done_callback(settled)
    return task


async def finish(request: web.Request, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a Redis step that must complete even if the client goes away meanwhile.

    aiohttp cancels the handler when its client disconnects (handler_cancellation); a cancel
    landing inside a script call would leave us not knowing whether it ran (and a redis-py
    pipeline cut short can leak its connection). The step runs shielded, in the background.
    """
    return await asyncio.shield(in_background(request, factory()))


class _MessageQueue(list[Any]):
    """What aiohttp's RequestHandler needs of its queue of pipelined requests, on a list.

    Its own is a deque, and an empty deque still holds a 64-slot block: ~760 bytes. An empty
    list holds no item storage at all.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


# What a fully read request body keeps as its buffer while its poll is parked: an empty
# tuple reads as an empty buffer everywhere aiohttp reads one, and writing to it raises (no
# write is expected after the body's end; were one to come, it must not vanish silently).
_DRAINED: Any = ()


def parked(request: web.Request) -> None:
    """Trim what aiohttp keeps for a request that is waiting, not being worked on.

    A parked poll holds its connection's state for up to a minute, and 10,000 of them
    make every hundred bytes a megabyte. Three things are dropped or shrunk here, all in
    private attributes of aiohttp (where one is missing, that step does nothing; the
    e2e tests check that they are there):
    - the idle (keep-alive) timer: aiohttp arms one on every new connection and after every
      answer, and while a request is in progress it can only fire and drop itself. A uvloop
      timer costs ~600 bytes. aiohttp arms a fresh one when the answer has been sent.
    - the connection's queue of pipelined requests (empty: this request was taken from it)
      moves from a deque (~760 bytes even empty) to a list, for the connection's life.
    - the request body's buffer (an OB poll's), once read to its end: aiohttp's parser feeds
      nothing more into it, so its empty deque gives way to an empty tuple.
    The queue is left alone when a pipelined request already waits in it, and a chunked body
    keeps a second small deque (its chunk boundaries). aiohttp is pinned below 3.15 for this.
    """
    protocol = request.protocol
    handle = getattr(protocol, "_keepalive_handle", None)
    # uvloop's timer handles are not asyncio.TimerHandle instances: duck-typed.
    if handle is not None and callable(getattr(handle, "cancel", None)):
        handle.cancel()
        protocol._keepalive_handle = None
    messages = getattr(protocol, "_messages", None)
    if type(messages) is deque and not messages:
        protocol._messages = _MessageQueue()  # type: ignore[assignment]  # duck-typed deque
    # request._payload, not request.content: that caches itself on the request (~88 bytes).
    body: Any = getattr(request, "_payload", None)
    if type(getattr(body, "_buffer", None)) is deque and body.is_eof() and not body._buffer:
        body._buffer = _DRAINED


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
