"""RespClient against a real server: writes, errors, time-outs, reconnects, SELECT/AUTH."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis

from broker.embedded import EmbeddedRedis
from broker.resp import PackedArgs, RespClient, encode_command, number
from broker.scripts import RedisPyRunner, RespRunner, Script


def test_commands_are_encoded_as_resp_bulk_arrays():
    assert encode_command(("SET", b"k", 5)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    assert encode_command(("X", "é")) == b"*2\r\n$1\r\nX\r\n$2\r\n\xc3\xa9\r\n"
    assert encode_command(("A", 1.5, -2)) == b"*3\r\n$1\r\nA\r\n$3\r\n1.5\r\n$2\r\n-2\r\n"


@pytest.fixture
async def resp(real_redis):
    client = RespClient(real_redis.url, timeout_s=1.0)
    yield client
    await client.aclose()


async def test_concurrent_commands_share_one_connection_and_keep_order(resp, real_redis):
    replies = await asyncio.gather(*[resp.execute("INCR", "n") for _ in range(500)])
    assert replies == list(range(1, 501))
    admin = real_redis.client()
    clients = [c for c in await admin.client_list() if c["cmd"] != "client|list"]
    assert len(clients) == 1  # one pipelined connection, whatever the concurrency


class _RecordingTransport:
    """Wraps the client's transport and keeps every write."""

    def __init__(self, inner):
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        self.inner.write(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_command_is_written_at_once_and_a_pipeline_in_one_write(resp):
    await resp.execute("PING")  # connected
    proto = resp._proto
    recorder = _RecordingTransport(proto.transport)
    proto.transport = recorder
    first = asyncio.ensure_future(resp.execute("SET", "w", "1"))
    second = asyncio.ensure_future(resp.execute("GET", "w"))
    await asyncio.sleep(0)  # both callers ran up to their reply, no further
    # Written as issued, not gathered at the end of the loop iteration: Redis starts on the
    # first while the broker is still busy with whatever came next.
    assert recorder.writes == [encode_command(("SET", "w", "1")), encode_command(("GET", "w"))]
    assert await first in (b"OK", "OK") and await second == b"1"
    recorder.writes.clear()
    assert await resp.pipeline(("INCR", "p"), ("INCR", "p")) == [1, 2]
    assert recorder.writes == [encode_command(("INCR", "p")) + encode_command(("INCR", "p"))]


async def test_a_caller_cancelled_while_connecting_does_not_strand_the_others(resp):
    # The first caller starts the connection and is cancelled (its HTTP client left)
    # before it is made; the next caller still gets a connection, not a hang.
    first = asyncio.ensure_future(resp.execute("PING"))
    await asyncio.sleep(0)
    first.cancel()
    second = asyncio.ensure_future(resp.execute("INCR", "after-cancel"))
    assert await asyncio.wait_for(second, 5) == 1
    assert first.cancelled()


async def test_a_command_that_cannot_be_encoded_leaves_the_replies_in_step(resp):
    with pytest.raises(TypeError):
        await resp.execute("SET", "k", None)
    with pytest.raises(TypeError):
        await resp.pipeline(("SET", "p", "1"), ("SET", "q", None))
    assert await asyncio.wait_for(resp.execute("GET", "p"), 5) == b"1"
    assert await asyncio.wait_for(resp.execute("INCR", "n"), 5) == 1
    assert not resp._pending and not resp._out


async def test_error_replies_raise_and_leave_the_connection_usable(resp):
    await resp.execute("SET", "s", "x")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await resp.execute("LPUSH", "s", "y")
    with pytest.raises(redis.exceptions.NoScriptError):
        await resp.execute("EVALSHA", "0" * 40, 0)
    replies = await resp.pipeline(("GET", "s"), ("LPUSH", "s", "y"), ("PING",))
    assert replies[0] == b"x" and isinstance(replies[1], redis.exceptions.ResponseError)
    assert replies[2] in (b"PONG", "PONG")


async def test_runner_loads_a_missing_script_and_runs_it(resp, real_redis):
    runner = RespRunner(resp)
    script = Script("t", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await real_redis.client().script_flush()
    assert await runner.run(script, ["k"], [3]) == 3
    assert await runner.run_with_wake(script, ["k"], [4], "u:x") == 7
    assert await real_redis.client().xlen("brk:{wake}") == 1


async def test_a_cancelled_caller_does_not_shift_replies(resp):
    await resp.execute("SET", "a", "1")
    slow = asyncio.ensure_future(resp.execute("GET", "a"))
    slow.cancel()
    assert await resp.execute("INCR", "b") == 1
    assert await resp.execute("GET", "a") == b"1"


async def test_an_unanswered_command_times_out_and_the_next_one_reconnects(resp, real_redis):
    await resp.execute("PING")
    admin = real_redis.client()
    await admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")
    with pytest.raises(redis.exceptions.TimeoutError):
        await resp.execute("PING")
    await asyncio.sleep(2.6)
    assert await resp.execute("INCR", "after") == 1


async def test_a_restarted_server_fails_pending_commands_then_reconnects(tmp_path):
    server = EmbeddedRedis(tmp_path / "r", appendonly=False)
    url = server.start()
    port = server.port
    client = RespClient(url, timeout_s=2.0, connect_timeout_s=1.0)
    try:
        assert await client.execute("INCR", "x") == 1
        server.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.execute("INCR", "x")
        server.port = port
        server.start()
        assert await client.execute("INCR", "x") == 1  # a fresh server (no AOF)
    finally:
        await client.aclose()
        server.stop()


async def test_url_database_and_password_are_applied(tmp_path):
    server = EmbeddedRedis(
        tmp_path / "pw", appendonly=False, extra_args=("--requirepass", "s3cret")
    )
    server.start()
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    client = RespClient(url)
    try:
        await client.execute("SET", "where", "db3")
        admin = Redis.from_url(url)
        assert await admin.get("where") == b"db3"
        assert await admin.execute_command("CLIENT", "INFO") is not None
        await admin.aclose()
        wrong = RespClient(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(redis.exceptions.ResponseError):
            await wrong.execute("GET", "where")
        await wrong.aclose()
    finally:
        await client.aclose()
        server.stop()


async def test_closed_client_refuses_commands(real_redis):
    client = RespClient(real_redis.url)
    await client.execute("PING")
    await client.aclose()
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.execute("PING")


async def test_unix_url_with_password_and_database_in_its_query(tmp_path):
    """unix://...?db=N&password=P, as redis-py reads it: the same server, the same database."""
    base = Path(tempfile.mkdtemp(prefix="brk-", dir="/tmp"))
    server = EmbeddedRedis(
        base / "pw", appendonly=False, unix_socket=True, extra_args=("--requirepass", "s3cret")
    )
    server.start()
    url = f"unix://{server.socket_path}?db=2&password=s3cret"
    client = RespClient(url)
    try:
        await client.execute("SET", "where", "db2")
        admin = Redis.from_url(url)
        assert await admin.get("where") == b"db2"
        await admin.aclose()
    finally:
        await client.aclose()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_commands_on_a_connection_do_not_look_up_the_loop(real_redis, monkeypatch):
    """On 3.11 each get_running_loop() is a getpid system call: none per command once connected."""
    client = RespClient(real_redis.url)
    try:
        await client.execute("PING")  # connects
        calls = 0
        real = asyncio.get_running_loop

        def counting() -> asyncio.AbstractEventLoop:
            nonlocal calls
            calls += 1
            return real()

        monkeypatch.setattr("broker.resp.asyncio.get_running_loop", counting)
        for i in range(10):
            assert await client.execute("INCR", "looked-up") == i + 1
        assert await client.pipeline(("INCR", "looked-up"), ("GET", "looked-up")) == [11, b"11"]
        assert calls == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize("n", [0, 1, 100, 1023, 1024, 86_400_000, -1])
def test_a_number_is_sent_as_the_int_would_be(n):
    assert encode_command(("EVALSHA", number(n))) == encode_command(("EVALSHA", n))
    assert number(n) == str(n).encode()


@pytest.mark.parametrize("keys", [["k"], ["k1", "{é}:k2"]])
def test_a_call_with_packed_arguments_is_the_command_encoded_whole(keys):
    script = Script("t", "return 1")
    args = (number(5), b"30000", "jti-1", 7)
    packed = RespRunner(RespClient("redis://localhost"))._packed_call(
        script, keys, PackedArgs(args)
    )
    assert packed == encode_command(("EVALSHA", script.sha, len(keys), *keys, *args))
    assert PackedArgs(()).resp == b""


async def test_packed_arguments_run_as_plain_ones_and_a_missing_script_is_loaded(resp, real_redis):
    runner = RespRunner(resp)
    script = Script("t", "return {KEYS[1], ARGV[1], ARGV[2], redis.call('INCR', KEYS[1])}")
    await real_redis.client().script_flush()
    twice = PackedArgs((b"a", number(2)))
    assert await runner.run(script, ["n"], twice) == [b"n", b"a", b"2", 1]
    assert await runner.run(script, ["n"], twice) == [b"n", b"a", b"2", 2]
    assert await runner.run(script, ["n"], [b"a", 2]) == [b"n", b"a", b"2", 3]
    # redis-py's runner (fakeredis in unit tests) takes the same packed arguments
    assert await RedisPyRunner(real_redis.client()).run(script, ["n"], twice) == [
        b"n",
        b"a",
        b"2",
        4,
    ]
