"""SetStore: the signed SETs awaiting each OB client (TPP), kept in Redis until acked.

Per client (hash tag `c:<client>`, so every script touches one Cluster slot; see keyspace.py):
a zset of every unacked jti ordered by publish time, a zset of the jtis a poll may deliver
now, a zset of delivered jtis held back by a lease (only when `events.redelivery_s` > 0), a
hash jti -> compact JWS, and a hash of nacked SETs with their error, kept for the operator.

Two scripts do all the work, each one atomic step:
- sets_publish: check the client's subscription, queue the SETs, apply the retention;
- sets_poll: ack, nack (setErrs), end leases, apply the retention, select the oldest ready
  SETs and tell whether more remain. Concurrent polls of one client are serialised by Redis.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from broker import jsonutil, keyspace
from broker.resp import Arg, PackedArgs, number
from broker.scripts import Args, RedisPyRunner, Script, ScriptRunner
from broker.store import UNAVAILABLE, fail_if_busy, guard

QUEUED = 1
NO_SUBSCRIPTION = 0
NOT_SUBSCRIBED = -1


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and one is made per request
class SignedSet:
    """A SET ready to store: its jti, compact JWS and the OB codes of its events."""

    jti: str
    jws: str
    event_codes: tuple[str, ...]


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and one is made per request
class PublishOutcome:
    flags: list[int]  # per SET: QUEUED, NO_SUBSCRIPTION or NOT_SUBSCRIBED
    expired: int  # unacked SETs dropped past the retention by this step
    callback: str = ""  # the subscription's CallbackUrl: its SETs are pushed there too


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and one is made per request
class PollOutcome:
    flat: list[bytes]  # jti, compact JWS, jti, JWS, ... oldest first, as Redis returned them
    more: bool  # deliverable SETs remain beyond these
    acked: int
    nacked: int
    expired: int
    next_lease_s: float | None  # seconds until a leased SET is deliverable again

    @property
    def count(self) -> int:
        return len(self.flat) // 2

    @property
    def sets(self) -> dict[str, str]:
        """jti -> compact JWS, oldest first."""
        flat = self.flat
        return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}

    def body(self) -> bytes:
        """The RFC 8936 answer, {"sets": {jti: JWS, ...}, "moreAvailable": ...}, as JSON.

        Joined from the stored bytes, not decoded and encoded again (a JWS is ~1 KB): both
        are the broker's own ASCII, a random UUID and a compact JWS (base64url and dots),
        which JSON needs no escape for; SetStore.publish refuses to store anything else.
        """
        flat = self.flat
        members = b",".join(
            [b'"' + flat[i] + b'":"' + flat[i + 1] + b'"' for i in range(0, len(flat), 2)]
        )
        return b'{"sets":{' + members + (b'},"moreAvailable":true}' if self.more else _NO_MORE)


_NO_MORE = b'},"moreAvailable":false}'
# What a jti (a UUID) and a compact JWS (base64url segments and dots) are made of.
_JSON_SAFE = re.compile(r"[A-Za-z0-9_.\-]+")

# The outcome of every poll that acked, nacked, expired and found nothing: never changed by its
# users (its empty `flat` is only read).
NOTHING = PollOutcome(flat=[], more=False, acked=0, nacked=0, expired=0, next_lease_s=None)


class SetStore:
    def __init__(
        self,
        redis: Redis,
        *,
        retention_s: int,
        redelivery_s: float,
        runner: ScriptRunner | None = None,
    ) -> None:
        self.redis = redis
        self.runner: ScriptRunner = runner or RedisPyRunner(redis)
        self.retention_ms = retention_s * 1000
        self.lease_ms = int(redelivery_s * 1000)
        # What every poll sends, encoded once (resp.number).
        self._poll_settings = (number(self.lease_ms), number(self.retention_ms))
        # The whole argument list of a poll with no acks or nacks (most polls), by limit:
        # packed once (resp.PackedArgs).
        self._plain_polls: dict[int, PackedArgs] = {}
        self._publish = Script.load("sets_publish")
        self._poll = Script.load("sets_poll")

    async def publish(self, client_id: str, sets: Sequence[SignedSet]) -> PublishOutcome:
        """Queue the SETs the client's subscription accepts, and wake its parked polls.

        The wake-up hint is pipelined behind the script: one round trip.
        """
        tag = keyspace.client_tag(client_id)
        args: list[Any] = [self.retention_ms, len(sets)]
        for s in sets:
            if not (_JSON_SAFE.fullmatch(s.jti) and _JSON_SAFE.fullmatch(s.jws)):
                # A bug, not bad input (both are made by the broker): polls put them into
                # JSON unescaped (PollOutcome.body).
                raise ValueError(f"SET {s.jti!r}: a jti and a JWS are base64url, '-' and '.'")
            args += (s.jti, s.jws, "," + ",".join(s.event_codes) + ",")
        keys = [
            keyspace.sets_all(tag),
            keyspace.sets_ready(tag),
            keyspace.sets_leased(tag),
            keyspace.sets_jws(tag),
            keyspace.sets_seq(tag),
            keyspace.subscription(tag),
        ]
        flags, expired, callback = await guard(
            self.runner.run_with_wake(self._publish, keys, args, tag)
        )
        if isinstance(callback, bytes):
            callback = callback.decode()
        return PublishOutcome(
            flags=[int(f) for f in flags], expired=int(expired), callback=str(callback)
        )

    async def poll(
        self,
        client_id: str,
        *,
        limit: int,
        ack: Sequence[str] = (),
        set_errs: dict[str, tuple[str, str]] | None = None,
    ) -> PollOutcome:
        """Apply `ack` then `set_errs`, then select up to `limit` SETs: one atomic step."""
        tag = keyspace.client_tag(client_id)
        args: Args
        if ack or set_errs:
            args = self._poll_args(limit, ack, set_errs)
        else:
            plain = self._plain_polls.get(limit)
            if plain is None:
                plain = PackedArgs(tuple(self._poll_args(limit)))
                # The handler caps limit at events.max_events; other callers may not.
                if len(self._plain_polls) < 1024:
                    self._plain_polls[limit] = plain
            args = plain
        # One key: the script names the client's other keys after it (keyspace.py).
        keys = [keyspace.sets_all(tag)]
        # Safe to repeat: acks and nacks are idempotent, and a SET selected by a poll whose
        # answer was lost is unacked, so it is delivered again (at once, or after its lease).
        # (idempotent() by hand: no closure and no extra coroutine on every poll.)
        try:
            reply = await self.runner.run(self._poll, keys, args)
        except UNAVAILABLE as e:
            fail_if_busy(e)
            reply = await guard(self.runner.run(self._poll, keys, args))
        acked, nacked, expired, more, next_ms, flat = reply
        if not flat and not (acked or nacked or expired or more) and int(next_ms) < 0:
            # Shared: a parked poll holds its last (empty) outcome for as long as it waits.
            return NOTHING
        return PollOutcome(
            flat=flat,
            more=bool(more),
            acked=int(acked),
            nacked=int(nacked),
            expired=int(expired),
            next_lease_s=None if int(next_ms) < 0 else int(next_ms) / 1000,
        )

    def _poll_args(
        self,
        limit: int,
        ack: Sequence[str] = (),
        errs: dict[str, tuple[str, str]] | None = None,
    ) -> list[Arg]:
        """sets_poll.lua's arguments: limit, lease, retention, acks, then nacks."""
        args: list[Arg] = [number(limit), *self._poll_settings, number(len(ack)), *ack]
        args.append(number(len(errs or ())))
        if errs:
            now_ms = int(time.time() * 1000)
            for jti, (err, description) in errs.items():
                # Escaped here, where a JSON encoder is at hand (the script only adds the JWS).
                record = {"err": err, "description": description, "at": now_ms}
                args += (jti, jsonutil.dumps(record))
        return args

    async def pending(self, client_id: str) -> int:
        """Unacked SETs of the client (leased ones included)."""
        n: int = await guard(self.redis.zcard(keyspace.sets_all(keyspace.client_tag(client_id))))
        return n

    async def nacked(self, client_id: str) -> dict[str, dict[str, Any]]:
        """The client's nacked SETs: jti -> {"set", "err", "description", "at"} (operators)."""
        raw: dict[Any, Any] = await guard(
            self.redis.hgetall(keyspace.sets_nacked(keyspace.client_tag(client_id)))
        )
        return {k.decode(): jsonutil.loads(v) for k, v in raw.items()}
