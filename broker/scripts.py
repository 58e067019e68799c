"""Running the broker's Lua scripts: by EVALSHA, loading a script only when Redis lacks it.

Two runners with one interface: `RespRunner` on the pipelined RespClient (the server's
hot path), and `RedisPyRunner` on a redis-py client (an injected client: fakeredis in unit
tests, or a caller's own). Both send a script and its wake-up hint in one round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.exceptions
from redis.asyncio import Redis

from broker import keyspace
from broker.resp import Arg, PackedArgs, RespClient, bulk, encode_command

# A script's arguments: plain, or packed once for calls that repeat them (resp.PackedArgs).
Args = Sequence[Arg] | PackedArgs


@dataclass(eq=False)
class Script:
    """A Lua script of broker/lua/ and its SHA1 (what EVALSHA names it by)."""

    name: str
    text: str = field(repr=False)
    sha: str = ""

    def __post_init__(self) -> None:
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()

    @classmethod
    def load(cls, name: str) -> Script:
        return cls(name, keyspace.lua(name))


def _wake(tag: str) -> tuple[Arg, ...]:
    return ("XADD", keyspace.WAKE_STREAM, "MAXLEN", "~", keyspace.WAKE_MAXLEN, "*", "t", tag)


class ScriptRunner(Protocol):
    async def run(self, script: Script, keys: Sequence[str], args: Args) -> Any:
        """The script's reply; Redis errors raised as redis-py exceptions."""

    async def run_with_wake(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg], tag: str
    ) -> Any:
        """Run the script, then append the wake-up hint for `tag`, in one round trip."""

    async def aclose(self) -> None: ...


class RespRunner:
    def __init__(self, client: RespClient) -> None:
        self.client = client
        # "EVALSHA <sha> <numkeys>" with its array header, by (sha, keys, arguments): what
        # goes before the keys of a call with packed arguments.
        self._heads: dict[tuple[str, int, int], bytes] = {}

    async def run(self, script: Script, keys: Sequence[str], args: Args) -> Any:
        if isinstance(args, PackedArgs):
            data = self._packed_call(script, keys, args)
            try:
                return await self.client.execute_packed(data)
            except redis.exceptions.NoScriptError:
                await self.client.execute("SCRIPT", "LOAD", script.text)
                return await self.client.execute_packed(data)
        try:
            return await self.client.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # Not run (a restarted or flushed Redis forgot it): load and run it again.
            await self.client.execute("SCRIPT", "LOAD", script.text)
            return await self.client.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    def _packed_call(self, script: Script, keys: Sequence[str], args: PackedArgs) -> bytes:
        """The whole EVALSHA command, encoded: only the keys are encoded here."""
        shape = (script.sha, len(keys), len(args.args))
        head = self._heads.get(shape)
        if head is None:
            call = encode_command(("EVALSHA", script.sha, len(keys)))
            head = b"*%d\r\n%b" % (3 + len(keys) + len(args.args), call.partition(b"\r\n")[2])
            self._heads[shape] = head  # bounded: a few scripts, each called in one shape
        encoded_keys = bulk(keys[0]) if len(keys) == 1 else b"".join(map(bulk, keys))
        return head + encoded_keys + args.resp

    async def run_with_wake(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg], tag: str
    ) -> Any:
        call = ("EVALSHA", script.sha, len(keys), *keys, *args)
        reply, wake = await self.client.pipeline(call, _wake(tag))
        if isinstance(reply, redis.exceptions.NoScriptError):
            await self.client.execute("SCRIPT", "LOAD", script.text)
            reply, wake = await self.client.pipeline(call, _wake(tag))
        for part in (reply, wake):
            if isinstance(part, Exception):
                raise part
        return reply

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisPyRunner:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._loaded: set[str] = set()

    async def run(self, script: Script, keys: Sequence[str], args: Args) -> Any:
        if isinstance(args, PackedArgs):
            args = args.args
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.client.script_load(script.text)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)

    async def run_with_wake(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg], tag: str
    ) -> Any:
        # A bare EVALSHA: a redis-py pipeline given a Script object asks SCRIPT EXISTS first.
        if script.sha not in self._loaded:  # first use: load it, one wake hint per call
            await self.client.script_load(script.text)
            self._loaded.add(script.sha)
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command(*_wake(tag))
            reply = await pipe.execute(raise_on_error=False)
            if isinstance(reply[0], redis.exceptions.NoScriptError) and attempt == 0:
                await self.client.script_load(script.text)
                continue
            for part in reply:
                if isinstance(part, Exception):
                    raise part
            return reply[0]
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        return None  # the redis-py client is closed by its owner (QueueStore.aclose)
