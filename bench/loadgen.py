"""Load-generator worker processes: long-poll waiters and an open-loop publisher.

The runner (bench/longpoll.py's Worker) starts several of these with multiprocessing (spawn)
and drives them over a Pipe with small commands, so 10,000 connections and 1,000 publishes/s
are spread over processes and no single event loop's lag shows up as server latency.

Every published event carries a marker `BENCH.<waiter>.<seq>.<t>` where t is
time.monotonic_ns() (CLOCK_MONOTONIC, the same clock in every process of the machine) taken
just before the publish request is written. A waiter that finds markers in a response records
(waiter, seq, arrival - t, who received it): publish-to-response latency, and the raw material
to count delivered, duplicated, misrouted, lost and stranded events.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import gc
import os
import random
import re
import resource
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from bench.analysis import quantiles
from bench.httpraw import Client, ConnectionClosed, build_request, connect

# What one read of the lost/stranded sweep may take (WaiterWorker.sweep).
SWEEP_LIMIT_S = 5.0

MARK = re.compile(rb"BENCH\.(\d+)\.(\d+)\.(\d+)")
HOST = "127.0.0.1"


def raise_nofile() -> int:
    """Raise the open-file limit to the hard limit (10k+ connections need it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Spec:
    """What the workers talk to. Waiter i is an Oxlin user, an OB client, or a channel."""

    target: str  # "broker" | "memlp" | "nchan"
    port: int
    prefix: str  # names of users/clients/channels in this run
    wait_s: float = 20.0  # long-poll hold requested by the client (broker Oxlin, memlp)
    jitter: float = 0.25  # each poll asks for wait_s * uniform(1 - jitter, 1)
    # The first poll of each waiter asks for this (poll.max_wait_s): no time-out can fall in
    # the idle measurement, and the first time-outs fall inside the publish run.
    first_wait_s: float = 30.0
    data_dir: str = ""  # broker: where the dev issuer key lives
    ob: bool = False  # broker: half the waiters use OB POST /events
    oxlin_topic: str = "connections"

    def kind(self, i: int) -> str:
        if self.target == "broker":
            return "ob" if self.ob and i % 2 == 1 else "oxlin"
        return self.target

    def user(self, i: int) -> str:
        return f"{self.prefix}u{i}"

    def client_id(self, i: int) -> str:
        return f"{self.prefix}c{i}"

    def channel(self, i: int) -> str:
        return f"{self.prefix}w{i}"


def marker(w: int, s: int, t: int) -> str:
    return f"BENCH.{w}.{s}.{t}"


def set_payload(rid: str) -> dict[str, Any]:
    """An OB resource-update SET payload (spec §5.6) whose resource id carries the marker."""
    return {
        "sub": f"https://aspsp.example.com/open-banking/v3.1/pisp/domestic-payments/{rid}",
        "events": {
            "urn:uk:org:openbanking:events:resource-update": {
                "subject": {
                    "subject_type": "http://openbanking.org.uk/rid_http://openbanking.org.uk/rty",
                    "http://openbanking.org.uk/rid": rid,
                    "http://openbanking.org.uk/rty": "domestic-payment",
                    "http://openbanking.org.uk/rlk": [
                        {"version": "v3.1", "link": f"https://aspsp.example.com/{rid}"}
                    ],
                }
            }
        },
    }


def oxlin_event(mark: str) -> dict[str, Any]:
    return {
        "topic": "connections",
        "event_type": "SYNC_ALL_SUCCESS",
        "resource_type": "CONNECTION",
        "channel_definition_id": "redirect1",
        "resource": {"id": mark, "provider_id": "200", "status": "SUCCESS"},
    }


def jws_markers(sets: dict[str, str]) -> list[tuple[bytes, bytes, bytes]]:
    out: list[tuple[bytes, bytes, bytes]] = []
    for jws in sets.values():
        part = jws.split(".")[1]
        payload = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        out += set(MARK.findall(payload))  # the marker is in sub, rid and link: count once
    return out


class Issuer:
    """Dev-issuer tokens for the broker (minted in-process: fast EdDSA)."""

    def __init__(self, data_dir: str) -> None:
        from broker.auth import DevIssuer

        self._issuer = DevIssuer.load_or_create(Path(data_dir))

    def user(self, sub: str) -> str:
        return self._issuer.mint(sub, ttl_s=3 * 3600)

    def tpp(self, client_id: str) -> str:
        return self._issuer.mint(
            client_id, scopes=["accounts"], client_id=client_id, ttl_s=3 * 3600
        )

    def producer(self) -> str:
        return self._issuer.mint("bench-producer", scopes=["events:publish"], ttl_s=3 * 3600)


# ---------------------------------------------------------------------------------------------
# waiters


@dataclass(slots=True, eq=False)
class Waiter:
    i: int
    kind: str
    token: str = ""
    path: str = ""  # Oxlin queue path, memlp/nchan poll path
    client: Client | None = None
    acks: list[str] = field(default_factory=list)  # OB: jtis to ack on the next poll
    polled: bool = False
    etag: str = ""  # Nchan cursor
    last_modified: str = ""
    task: asyncio.Task[None] | None = None


class WaiterWorker:
    def __init__(self, spec: Spec, indices: list[int]) -> None:
        self.spec = spec
        self.waiters = [Waiter(i, spec.kind(i)) for i in indices]
        self.by_index = {w.i: w for w in self.waiters}
        self.rng = random.Random(indices[0] if indices else 0)
        self.received: list[tuple[int, int, int, int]] = []  # (w, seq, latency ns, receiver)
        self.recording = False
        self.timeouts: list[int] = []  # arrival times of long polls that timed out
        self.unique: set[int] = set()
        self.stopping = False
        self.started = 0
        self.first_sent = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self.connect_sem = asyncio.Semaphore(16)

    # setup ------------------------------------------------------------------------------------
    async def setup(self) -> dict[str, Any]:
        t0 = time.monotonic()
        spec = self.spec
        if spec.target == "broker":
            issuer = Issuer(spec.data_dir)
            for w in self.waiters:
                w.token = (
                    issuer.tpp(spec.client_id(w.i))
                    if w.kind == "ob"
                    else issuer.user(spec.user(w.i))
                )
            errors = await run_bounded([self._subscribe(w) for w in self.waiters], spec.port)
        else:
            for w in self.waiters:
                w.path = (
                    f"/queues/{spec.channel(w.i)}"
                    if spec.target == "memlp"
                    else f"/sub/{spec.channel(w.i)}"
                )
            errors = collections.Counter()
        return {"seconds": time.monotonic() - t0, "errors": dict(errors), "n": len(self.waiters)}

    def _subscribe(self, w: Waiter) -> Callable[[Client], Any]:
        async def go(client: Client) -> str | None:
            headers = {"Authorization": f"Bearer {w.token}", "Content-Type": "application/json"}
            if w.kind == "oxlin":
                body = orjson.dumps({"topics": [self.spec.oxlin_topic]})
                req = build_request("POST", "/queues/subscribe", HOST, body=body, headers=headers)
                resp = await client.request(req, limit_s=30)
                if resp.status != 201:
                    return f"subscribe {resp.status}"
                w.path = resp.headers[b"location"].decode()
            else:
                body = orjson.dumps({"Data": {"Version": "3.1"}})
                req = build_request(
                    "POST", "/event-subscriptions", HOST, body=body, headers=headers
                )
                resp = await client.request(req, limit_s=30)
                if resp.status not in (200, 201):
                    return f"event-subscription {resp.status}"
                w.path = "/events"
            return None

        return go

    # long polls --------------------------------------------------------------------------------
    def _poll_request(self, w: Waiter, *, immediate: bool = False) -> bytes:
        spec = self.spec
        if w.kind in ("oxlin", "memlp"):
            headers = {"Authorization": f"Bearer {w.token}"} if w.token else {}
            if immediate:
                return build_request("GET", w.path, HOST, headers=headers)
            wait = spec.wait_s * (1 - spec.jitter * self.rng.random())
            if not w.polled:
                w.polled = True
                wait = spec.first_wait_s
            return build_request("GET", f"{w.path}?wait={wait:.2f}", HOST, headers=headers)
        if w.kind == "ob":
            body: dict[str, Any] = {"maxEvents": 100, "returnImmediately": immediate}
            if w.acks:
                body["ack"] = w.acks
            return build_request(
                "POST",
                "/events",
                HOST,
                body=orjson.dumps(body),
                headers={"Authorization": f"Bearer {w.token}", "Content-Type": "application/json"},
            )
        # nchan: the cursor of the last message received, if any
        headers = {}
        if w.last_modified:
            headers["If-Modified-Since"] = w.last_modified
        if w.etag:
            headers["If-None-Match"] = w.etag
        return build_request("GET", w.path, HOST, headers=headers)

    def _handle(
        self, w: Waiter, status: int, headers: dict[bytes, bytes], body: bytes, at: int
    ) -> bool:
        marks: list[tuple[bytes, bytes, bytes]] = []
        c = self.counters
        if w.kind == "ob":
            if status != 200:
                c[f"status_{status}"] += 1
                return False
            doc = orjson.loads(body)
            sets = doc.get("sets") or {}
            w.acks = list(sets)
            if not sets:
                c["timeouts"] += 1
                if self.recording:
                    self.timeouts.append(at)
                return True
            marks = jws_markers(sets)
        elif status == 200:
            marks = MARK.findall(body)
            if w.kind == "nchan":
                w.last_modified = headers.get(b"last-modified", b"").decode()
                w.etag = headers.get(b"etag", b"").decode()
        elif status in (204, 304, 408):
            c["timeouts"] += 1
            if self.recording:
                self.timeouts.append(at)
            return True
        else:
            c[f"status_{status}"] += 1
            return False
        c["responses_with_events"] += 1
        for mw, ms, mt in marks:
            s = int(ms)
            c["events"] += 1
            if self.recording:
                self.received.append((int(mw), s, at - int(mt), w.i))
                if s in self.unique:
                    c["duplicates"] += 1
                self.unique.add(s)
        return True

    async def _run_waiter(self, w: Waiter) -> None:
        client = w.client = Client(HOST, self.spec.port)
        c = self.counters
        async with self.connect_sem:
            for attempt in range(20):
                try:
                    client.conn = await connect(HOST, self.spec.port)
                    break
                except OSError:
                    c["connect_errors"] += 1
                    await asyncio.sleep(0.05 * (attempt + 1))
            else:
                return
        first = True
        while not self.stopping:
            req = self._poll_request(w)
            if first:
                self.first_sent += 1
                first = False
            c["polls"] += 1
            try:
                resp = await client.request(req)
            except (ConnectionClosed, OSError):
                c["conn_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            if not self._handle(w, resp.status, resp.headers, resp.body, resp.received_ns):
                await asyncio.sleep(0.1)  # an error answer: back off instead of spinning

    async def open(self, k: int, timeout_s: float = 120) -> dict[str, Any]:
        """Make the first k waiters of this worker long-poll; return once each has sent."""
        t0 = time.monotonic()
        # Paced: a burst of connects overflows the server's accept queue (aiohttp's backlog is
        # 128), and dropped SYNs are retried 1-3 s later, which made opening 10,000 waiters
        # take a minute. 25 every 20 ms per worker process.
        for n, w in enumerate(self.waiters[self.started : k]):
            if n and n % 25 == 0:
                await asyncio.sleep(0.02)
            w.task = asyncio.create_task(self._run_waiter(w))
            self.started += 1
        deadline = time.monotonic() + timeout_s
        while self.first_sent < self.started and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return {"sent": self.first_sent, "seconds": time.monotonic() - t0}

    def stats(self) -> dict[str, Any]:
        return {"unique": len(self.unique), "counters": dict(self.counters)}

    def set_recording(self, on: bool) -> None:
        # Collect between measurements, never inside one (see worker_main).
        gc.collect()
        self.recording = on

    def collect(self) -> dict[str, Any]:
        return {"received": self.received, "timeouts": self.timeouts}

    async def abort(self) -> dict[str, Any]:
        """The clients vanish: every connection reset at once, no goodbye."""
        self.stopping = True
        for w in self.waiters:
            if w.client is not None:
                w.client.abort()
            if w.task is not None:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in self.waiters if w.task), return_exceptions=True)
        return {"aborted": sum(1 for w in self.waiters if w.task)}

    async def sweep(self, only: list[int]) -> dict[str, Any]:
        """Immediate polls of the queues of waiters `only` (those that were published events
        they did not receive): what is still stored but was never delivered ("found", as
        (waiter, seq, reader)), the reads that failed ("errors", by kind) and whose queues
        they were ("failed": their undelivered events are unverified, not lost).

        Each read may take SWEEP_LIMIT_S: an immediate poll answers in milliseconds, but
        Nchan's intervalpoll never answered some channels after their long-poll clients
        vanished (quick runs on a slow machine), and at 30 s each the sweep outlasted the
        load generator's time-out.
        """
        found: list[tuple[int, int, int]] = []
        chosen = set(only)
        waiters = [w for w in self.waiters if w.i in chosen]
        if self.spec.target == "nchan":
            # the same channel through an intervalpoll location: answers at once, from the
            # waiter's cursor (its last message), 304 when there is nothing newer
            for w in waiters:
                w.path = w.path.replace("/sub/", "/poll/", 1)

        failed: list[int] = []

        def one(w: Waiter) -> Callable[[Client], Any]:
            async def go(client: Client) -> str | None:
                for _ in range(100):  # bounded: each poll returns a batch (Nchan: one)
                    try:
                        resp = await client.request(
                            self._poll_request(w, immediate=True), limit_s=SWEEP_LIMIT_S
                        )
                    except (ConnectionClosed, OSError, TimeoutError):
                        failed.append(w.i)
                        raise  # counted by run_bounded
                    if resp.status != 200:
                        if resp.status in (204, 304):
                            return None
                        failed.append(w.i)
                        return f"sweep {resp.status}"
                    if w.kind == "ob":
                        sets = orjson.loads(resp.body).get("sets") or {}
                        w.acks = list(sets)
                        marks = jws_markers(sets)
                    else:
                        marks = MARK.findall(resp.body)
                    if w.kind == "nchan":
                        w.last_modified = resp.headers.get(b"last-modified", b"").decode()
                        w.etag = resp.headers.get(b"etag", b"").decode()
                    if not marks:
                        return None
                    found.extend((int(a), int(b), w.i) for a, b, _t in marks)
                return None

            return go

        errors = await run_bounded([one(w) for w in waiters], self.spec.port, concurrency=128)
        return {"found": found, "errors": dict(errors), "failed": failed}


async def run_bounded(
    jobs: list[Callable[[Client], Any]], port: int, *, concurrency: int = 32
) -> collections.Counter[str]:
    """Run jobs (each given a keep-alive client) `concurrency` at a time; count their errors."""
    pool: asyncio.Queue[Client] = asyncio.Queue()
    for _ in range(concurrency):
        pool.put_nowait(Client(HOST, port))
    errors: collections.Counter[str] = collections.Counter()

    async def run(job: Callable[[Client], Any]) -> None:
        client = await pool.get()
        try:
            err = await job(client)
            if err:
                errors[err] += 1
        except (ConnectionClosed, OSError, TimeoutError) as e:
            errors[type(e).__name__] += 1
            client.close()
        finally:
            pool.put_nowait(client)

    await asyncio.gather(*(run(j) for j in jobs))
    while not pool.empty():
        pool.get_nowait().close()
    return errors


# ---------------------------------------------------------------------------------------------
# publisher


def stored(kind: str, body: bytes) -> bool:
    """Whether the broker's 202 to a publish says it stored the event.

    Oxlin: {"ids": [...], "queues": N}, N = 0 when no live queue took it. OB:
    {"jtis": [...], "skipped": [...]}, the SET listed under "skipped" when the client has no
    event subscription (or none for its type).
    """
    doc = orjson.loads(body)
    if kind == "oxlin":
        return bool(doc.get("queues", 1) >= 1)
    return not doc.get("skipped")


class Publisher:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.token = Issuer(spec.data_dir).producer() if spec.target == "broker" else ""

    def request(self, w: int, s: int) -> bytes:
        """The publish request of event `s` for waiter `w`, stamped now."""
        spec = self.spec
        mark = marker(w, s, time.monotonic_ns())
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        kind = spec.kind(w)
        if kind == "oxlin":
            path = f"/publish/users/{urllib.parse.quote(spec.user(w), safe='')}/events"
            body = orjson.dumps(oxlin_event(mark))
        elif kind == "ob":
            path = f"/publish/clients/{urllib.parse.quote(spec.client_id(w), safe='')}/sets"
            body = orjson.dumps(set_payload(mark))
        elif kind == "memlp":
            path = f"/publish/{spec.channel(w)}"
            body = orjson.dumps(oxlin_event(mark))
        else:
            path = f"/pub/{spec.channel(w)}"
            body = orjson.dumps(oxlin_event(mark))
        return build_request("POST", path, HOST, body=body, headers=headers)

    async def run(
        self, n_waiters: int, rate: float, duration_s: float, conns: int, seed: int = 1
    ) -> dict[str, Any]:
        """Publish `rate`/s for `duration_s` to random waiters, open loop; check every status."""
        rng = random.Random(seed)
        pool: asyncio.Queue[Client] = asyncio.Queue()
        for _ in range(conns):
            pool.put_nowait(Client(HOST, self.spec.port))
        ok: list[tuple[int, int]] = []
        failures: collections.Counter[str] = collections.Counter()
        ack_ns: list[int] = []
        unrouted = 0
        max_lag = 0.0
        tasks: set[asyncio.Task[None]] = set()

        async def one(client: Client, w: int, s: int) -> None:
            nonlocal unrouted
            req = self.request(w, s)
            t = time.monotonic_ns()
            try:
                resp = await client.request(req, limit_s=10, retry=False)
            except (ConnectionClosed, OSError, TimeoutError) as e:
                failures[type(e).__name__] += 1
                client.close()
                return
            finally:
                pool.put_nowait(client)
            ack_ns.append(resp.received_ns - t)
            if not 200 <= resp.status < 300:
                failures[f"status_{resp.status}"] += 1
                return
            if self.spec.target == "broker" and not stored(self.spec.kind(w), resp.body):
                # The broker said it kept nothing (the waiter's set-up failed): not an event
                # it acknowledged, so it can be neither delivered nor lost.
                unrouted += 1
                return
            ok.append((w, s))

        total = int(rate * duration_s)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        t0_ns = time.monotonic_ns() + 50_000_000
        for s in range(total):
            due = t0 + s / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            client = await pool.get()
            task = asyncio.create_task(one(client, rng.randrange(n_waiters), s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elapsed = loop.time() - t0
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        while not pool.empty():
            pool.get_nowait().close()
        ack_ns.sort()
        return {
            "attempted": total,
            "t0_ns": t0_ns,
            "ok": ok,
            "failures": dict(failures),
            "unrouted": unrouted,
            "seconds": elapsed,
            "achieved_rate": total / elapsed if elapsed else 0.0,
            "max_schedule_lag_ms": max_lag * 1000,
            "publish_ack_ms": quantiles(ack_ns),
        }


# ---------------------------------------------------------------------------------------------
# process entry point


def worker_main(conn: Connection, role: str, spec: Spec, indices: list[int]) -> None:
    """Entry of a worker process: serve the runner's commands until 'exit'."""
    raise_nofile()
    # No automatic collections: a waiter process holds 5,000 connections, and a collection of
    # the older generations walks them all. Pauses of tens of ms in the process that reads
    # the answers would count as the server's latency (seen: 10-30 ms stalls in the broker's
    # p90/p99 while the broker's own loop never lagged). What cycles form are collected
    # between measurements (set_recording).
    gc.disable()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_serve(conn, role, spec, indices))
    loop.close()


async def _serve(conn: Connection, role: str, spec: Spec, indices: list[int]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    waiters = WaiterWorker(spec, indices) if role == "waiters" else None
    publisher = Publisher(spec) if role == "publisher" else None
    background: set[asyncio.Task[None]] = set()

    async def handle(cmd: str, args: list[Any]) -> None:
        try:
            result: Any
            if cmd == "exit":
                result = None
            elif publisher is not None and cmd == "publish":
                result = await publisher.run(*args)
            elif waiters is not None:
                if cmd == "setup":
                    result = await waiters.setup()
                elif cmd == "open":
                    result = await waiters.open(*args)
                elif cmd == "stats":
                    result = waiters.stats()
                elif cmd == "record":
                    waiters.set_recording(*args)
                    result = None
                elif cmd == "collect":
                    result = waiters.collect()
                elif cmd == "abort":
                    result = await waiters.abort()
                elif cmd == "sweep":
                    result = await waiters.sweep(*args)
                else:
                    raise ValueError(f"unknown command {cmd}")
            else:
                raise ValueError(f"unknown command {cmd} for {role}")
            conn.send(("ok", result))
        except Exception as e:  # reported to the runner, which decides
            conn.send(("error", f"{type(e).__name__}: {e}"))
        if cmd == "exit" and not done.done():
            done.set_result(None)

    def on_readable() -> None:
        try:
            cmd, args = conn.recv()
        except EOFError:
            if not done.done():
                done.set_result(None)
            return
        task = loop.create_task(handle(cmd, args))
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_reader(conn.fileno(), on_readable)
    # uvloop makes a watched fd non-blocking; the pipe is duplex (one fd), so a large reply
    # (the publisher's list of events) would fail with EAGAIN. Reads only happen when readable.
    os.set_blocking(conn.fileno(), True)
    await done
    loop.remove_reader(conn.fileno())
    if waiters is not None and not waiters.stopping:
        await waiters.abort()
