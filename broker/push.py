"""Real-time push: each SET queued for a subscription with a CallbackUrl is POSTed there too.

The OB event-notification profile (spec §5.10, §8 case 59): `POST {CallbackUrl}` with
`Content-Type: application/jwt`, the compact SET as the body and an `x-fapi-interaction-id`;
the TPP acknowledges with 202. A 5xx, a time-out or no connection is retried with an
exponential backoff up to `push.max_attempts`, after which the callback is declared
unresponsive for that SET.

Why on top of the polling store, not instead of it: the SET is stored (and acknowledged to
the producer) before any push, and stays pollable until the push succeeds, which acks it.
A push lost to a crash, a refused one (4xx) or one given up on leaves the SET where the TPP
can still poll it ("the TPP may fall back to aggregated polling"). The schedule is in Redis
(keyspace.PUSH_TPPS and a queue per TPP), shared by every worker: a claim is a lease, so a
worker that dies with pushes in hand only delays them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from redis.asyncio import Redis

from broker import callbacks, ids, keyspace
from broker.config import PushSettings
from broker.metrics import Metrics
from broker.sets import SetStore

log = logging.getLogger(__name__)

_CLAIM = 32  # pushes one worker has in flight at most
_PER_TPP = 4  # of which to one TPP at most (push_claim.lua): a hanging endpoint holds 4 slots
# Statuses below 500 that still mean "try again later": a time-out, too many requests.
_RETRIED = frozenset({408, 429})


class Pusher:
    def __init__(
        self,
        redis: Redis,
        sets: SetStore,
        settings: PushSettings,
        metrics: Metrics,
        *,
        redis_timeout_s: float = 5.0,
    ) -> None:
        self.redis = redis
        # A claim's lease outlasts one attempt: the POST's time-out, and the Redis steps around
        # it, each of which may wait for a pooled connection and then for its reply.
        self._lease_ms = int((settings.timeout_s + 3 * 2 * redis_timeout_s + 5) * 1000)
        self.sets = sets
        self.settings = settings
        self.metrics = metrics
        self._claim = redis.register_script(keyspace.lua("push_claim"))
        self._set = redis.register_script(keyspace.lua("push_set"))
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # Ours to close: a connector does not close a resolver it was given.
        self._resolver: callbacks.PublicOnlyResolver | None = None

    async def schedule(self, client_id: str, jtis: Sequence[str]) -> None:
        """Make these SETs due for a push now (the client's subscription has a callback)."""
        if not jtis or not self.settings.enabled:
            return
        await self._schedule(client_id, _now_ms(), jtis)
        self._wake.set()

    async def _schedule(
        self, client_id: str, at_ms: int | str, jtis: Sequence[str], *, held_until: int | str = ""
    ) -> None:
        """Due at `at_ms`, or off the schedule with their attempt counts if it is "".
        With `held_until`, only while the claim that ends then still holds them."""
        keys = [keyspace.PUSH_TPPS, keyspace.push_queue(client_id), keyspace.PUSH_TRIES]
        await self._set(keys=keys, args=[client_id, at_ms, held_until, *jtis])

    def start(self) -> None:
        if self.settings.enabled:
            if not self.settings.allow_private_addresses:
                self._resolver = callbacks.PublicOnlyResolver()
            connector = aiohttp.TCPConnector(resolver=self._resolver)
            self._session = aiohttp.ClientSession(connector=connector)
            self._task = asyncio.create_task(self._run(), name="broker-push")

    async def gauges(self) -> dict[str, float]:
        """The schedule as every worker sees it (it is shared): TPPs with pushes scheduled
        (due, in flight, or waiting out a backoff), those with a push due and not yet taken,
        and how long the oldest due push has waited past its time: a backlog an operator can
        alert on. Empty if Redis does not answer: a scrape is not failed for it."""
        if not self.settings.enabled:
            return {}
        now = _now_ms()
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(keyspace.PUSH_TPPS)
            pipe.zcount(keyspace.PUSH_TPPS, "-inf", now)
            pipe.zrange(keyspace.PUSH_TPPS, 0, 0, withscores=True)
            async with asyncio.timeout(2):
                scheduled, due, first = await pipe.execute()
        except Exception as e:
            log.debug("push: reading the schedule for /metrics failed: %s", e)
            return {}
        oldest = max(0.0, (now - first[0][1]) / 1000) if first and due else 0.0
        return {
            "push_tpps_scheduled": int(scheduled),
            "push_tpps_due": int(due),
            "push_oldest_due_seconds": round(oldest, 3),
        }

    async def aclose(self) -> None:
        try:
            if self._task is not None:
                # Let the loop leave at its next turn rather than cancel it in a Redis call:
                # a command cut off there can leave the shared pool's connection waiting.
                self._stopping = True
                self._wake.set()
                await asyncio.wait({self._task}, timeout=2)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            if self._session is not None:
                await self._session.close()
            if self._resolver is not None:
                await self._resolver.close()

    async def _run(self) -> None:
        """Keep up to _CLAIM pushes in flight, claiming more as each one ends, and at most
        _PER_TPP of them to one TPP: an endpoint that hangs, with any number of SETs due,
        holds _PER_TPP slots for push.timeout_s, not every other TPP's pushes."""
        inflight: set[asyncio.Task[None]] = set()
        busy: collections.Counter[str] = collections.Counter()  # pushes in flight per TPP

        def start(member: str, lease_end: int) -> None:
            client_id = member.rpartition("\n")[0]
            busy[client_id] += 1
            task = asyncio.create_task(self._push(member, lease_end))
            inflight.add(task)

            def ended(_t: asyncio.Task[None]) -> None:
                busy[client_id] -= 1
                if busy[client_id] <= 0:
                    del busy[client_id]

            task.add_done_callback(ended)

        try:
            while not self._stopping:
                self._wake.clear()  # before the claim: a schedule after it wakes the wait
                members: list[bytes | str] = []
                room = _CLAIM - len(inflight)
                if room > 0:
                    claimed_at = _now_ms()
                    args: list[str | int] = [claimed_at, self._lease_ms, room, _PER_TPP]
                    for tpp, n in busy.items():
                        args += [tpp, n]
                    try:
                        members = await self._claim(keys=[keyspace.PUSH_TPPS], args=args)
                    except Exception as e:  # Redis away: try again at the next turn
                        log.warning("push: claiming due pushes failed: %s", e)
                for tpp_id, jti in zip(members[::2], members[1::2], strict=True):
                    if self._stopping:  # claimed as shutdown began: due again now, not
                        with contextlib.suppress(Exception):  # after the lease
                            await self._schedule(_text(tpp_id), _now_ms(), [_text(jti)])
                    else:
                        start(f"{_text(tpp_id)}\n{_text(jti)}", claimed_at + self._lease_ms)
                if members and len(inflight) < _CLAIM and not self._stopping:
                    continue  # there may be more due
                waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._wake.wait())}
                try:
                    await asyncio.wait(
                        inflight | waits,
                        timeout=self.settings.interval_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for w in waits:
                        w.cancel()
                inflight = {t for t in inflight if not t.done()}
        finally:
            # Stopped (shutdown): end the pushes in flight before the session closes. Their
            # SETs keep their lease and are pushed again once it is over, or polled.
            for t in inflight:
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _push(self, member: str, lease_end: int) -> None:
        """One attempt, under a claim held until `lease_end`; never raises (a failure leaves
        the lease to expire: tried again)."""
        client_id, _, jti = member.rpartition("\n")
        try:
            # The callback and the SET in one round trip (the same hash slot).
            tag = keyspace.client_tag(client_id)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(keyspace.subscription(tag), "callback")
            pipe.hget(keyspace.sets_jws(tag), jti)
            callback, jws = await pipe.execute()
            url = _text(callback) if callback is not None else None
            if not url or jws is None:  # the subscription lost its callback, or the SET is gone
                await self._done(member)
                return
            if urlsplit(url).scheme.lower() != "https" and not self.settings.allow_http:
                log.warning(
                    "push: %s's callback is not https; not pushed (push.allow_http)", client_id
                )
                self.metrics.sets_push_refused_total += 1
                await self._done(member)
                return
            status = await self._post(url, jws)
            if isinstance(status, str):  # not sent: no attempt can reach this address
                log.warning("push: %s's callback refused: %s; not pushed", client_id, status)
                self.metrics.sets_push_refused_total += 1
                await self._done(member)
            elif status is not None and 200 <= status < 300:
                # Off the schedule first: if the ack below fails, the SET is polled again,
                # never pushed again.
                await self._done(member)
                self.metrics.sets_pushed_total += 1
                await self.sets.poll(client_id, limit=0, ack=[jti])  # delivered: acked
            elif status is not None and status not in _RETRIED and status < 500:
                # The TPP refused it (a 4xx, or a redirect, which is not followed): retrying
                # will not help; it stays pollable.
                log.warning("push: %s answered %s for SET %s; not retried", client_id, status, jti)
                self.metrics.sets_push_refused_total += 1
                await self._done(member)
            else:
                await self._retry_later(member, client_id, jti, status, lease_end)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("push: SET %s of %s", jti, client_id)
            # Counted as an attempt, so that a fault that persists ends at max_attempts.
            with contextlib.suppress(Exception):
                await self._retry_later(member, client_id, jti, None, lease_end)

    async def _post(self, url: str, jws: bytes | str) -> int | str | None:
        """The callback's status; None if it gave none (time-out, no connection); or why no
        attempt can reach it (an invalid URL, an address the guard refuses)."""
        if not self.settings.allow_private_addresses:
            # aiohttp connects to an IP literal without asking the resolver: judged here.
            reason = callbacks.refusal(url)
            if reason is not None:
                return f"{reason} (push.allow_private_addresses)"
        headers = {"Content-Type": "application/jwt", "x-fapi-interaction-id": ids.uuid4()}
        if self.settings.financial_id:
            headers["x-fapi-financial-id"] = self.settings.financial_id
        assert self._session is not None
        try:
            async with self._session.post(
                url,
                data=jws,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                allow_redirects=False,  # the registered URL, nowhere else
            ) as r:
                return r.status
        except aiohttp.InvalidURL as e:
            return f"invalid URL ({e})"
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, callbacks.ForbiddenAddress):
                return str(e.os_error.strerror)
            return None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _retry_later(
        self, member: str, client_id: str, jti: str, status: int | None, lease_end: int
    ) -> None:
        tries = int(await self.redis.hincrby(keyspace.PUSH_TRIES, member, 1))
        if tries >= self.settings.max_attempts:
            log.warning(
                "push: %s's callback unresponsive for SET %s after %d attempts (last: %s);"
                " it stays pollable",
                client_id,
                jti,
                tries,
                status or "no answer",
            )
            self.metrics.sets_push_abandoned_total += 1
            await self._done(member)
            return
        wait_s = min(self.settings.backoff_s * 2 ** min(tries - 1, 30), self.settings.max_backoff_s)
        # Only while this claim still holds it: once the lease is over another worker may have
        # claimed it, and moving it now would let a third push it again beside that one.
        at = _now_ms() + int(wait_s * 1000)
        await self._schedule(client_id, at, [jti], held_until=lease_end)
        self.metrics.sets_push_retries_total += 1

    async def _done(self, member: str) -> None:
        client_id, _, jti = member.rpartition("\n")
        await self._schedule(client_id, "", [jti])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
