"""The real `python -m broker serve` process: embedded Redis, CLI token and publish, workers."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from broker.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


def _env(data_dir: Path) -> dict[str, str]:
    # PYTHONMALLOC too: the broker picks its allocator itself (server.allocator)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("BROKER_") and k != "PYTHONMALLOC"
    }
    env["BROKER_REDIS_DATA_DIR"] = str(data_dir)
    env["BROKER_REDIS_URL"] = ""
    return env


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args, "--config", "config/test.toml"],
        cwd=ROOT,
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(*extra: str, **env: str) -> tuple[str, subprocess.Popen[str]]:
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "serve",
                "--config",
                "config/test.toml",
                "--port",
                str(port),
                *extra,
            ],
            cwd=ROOT,
            env={**_env(tmp_path), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        return f"http://127.0.0.1:{port}", proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


async def _wait_ready(base: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                async with s.get(base + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("broker did not become ready")


def _embedded_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    for _ in range(20):
        line = proc.stdout.readline()
        if "embedded Redis-compatible server on redis://127.0.0.1:" in line:
            # the broker itself connects over the server's Unix socket, where its path fits
            data = Path(line.split("(data in ")[1].split(")")[0])
            short = len(os.fsencode(data / "redis.sock")) <= 100
            assert ("; the broker uses unix://" if short else "; the broker uses redis://") in line
            return int(line.split("127.0.0.1:")[1].split("/")[0])
    raise AssertionError("no embedded server line")


async def _process_info(s: aiohttp.ClientSession, base: str) -> dict[str, str]:
    """The labels of broker_process_info in /metrics, and the pid from /healthz."""
    async with s.get(base + "/metrics") as r:
        text = await r.text()
    (line,) = [x for x in text.splitlines() if x.startswith("broker_process_info{")]
    labels = dict(kv.split("=", 1) for kv in line.split("{", 1)[1].split("}", 1)[0].split(","))
    async with s.get(base + "/healthz") as r:
        pid = (await r.json())["pid"]
    return {k: v.strip('"') for k, v in labels.items()} | {"pid": str(pid)}


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_serve_runs_the_readme_walkthrough_and_stops_its_redis(serve, tmp_path):
    base, proc = serve()
    redis_port = _embedded_port(proc)
    await _wait_ready(base, proc)
    token = _cli(tmp_path, "token", "--sub", "alice").stdout.strip()
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        # the default allocator, by one re-exec of the same process (the pid is kept)
        info = await _process_info(s, base)
        assert info["allocator"] == "malloc"
        assert info["pid"] == str(proc.pid)
        # the README's curl: no Content-Type
        async with s.post(
            base + "/queues/subscribe", data=b'{"topics":["connections"]}', headers=auth
        ) as r:
            assert r.status == 201
            loc = r.headers["Location"]
        async with s.get(base + loc, headers=auth) as r:
            assert r.status == 204
        event = {
            "topic": "connections",
            "event_type": "SYNC_ALL_SUCCESS",
            "resource_type": "CONNECTION",
            "channel_definition_id": "redirect1",
            "resource": {
                "id": "c1",
                "provider_id": "200",
                "name": "WBX Test Bank",
                "status": "SUCCESS",
                "channels": [],
            },
        }
        published = await asyncio.to_thread(
            _cli, tmp_path, "publish", "--url", base, "--user", "alice", json.dumps(event)
        )
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["queues"] == 1
        async with s.get(base + loc + "?wait=5", headers=auth) as r:
            assert r.status == 200
            assert [e["event_type"] for e in await r.json()] == ["SYNC_ALL_SUCCESS"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert not _port_open(redis_port)  # the embedded server stopped with the broker


async def test_two_workers_share_the_port_and_deliver_an_event_once(serve, tmp_path):
    base, proc = serve("--workers", "2")
    await _wait_ready(base, proc)
    token = _cli(tmp_path, "token", "--sub", "bob").stdout.strip()
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.post(
            base + "/queues/subscribe", json={"topics": ["connections"]}, headers=auth
        ) as r:
            loc = r.headers["Location"]

        async def long_poll() -> list[str]:
            # its own connection, so the kernel may hand it to either worker
            async with (
                aiohttp.ClientSession() as own,
                own.get(base + loc + "?wait=4", headers=auth) as r,
            ):
                return [e["id"] for e in await r.json()] if r.status == 200 else []

        polls = [asyncio.ensure_future(long_poll()) for _ in range(6)]
        await asyncio.sleep(0.8)
        event = {
            "topic": "connections",
            "event_type": "X",
            "resource_type": "CONNECTION",
            "resource": {},
        }
        published = await asyncio.to_thread(
            _cli, tmp_path, "publish", "--url", base, "--user", "bob", json.dumps(event)
        )
        assert published.returncode == 0, published.stderr
        got = [i for ids in await asyncio.gather(*polls) for i in ids]
        assert got == json.loads(published.stdout)["ids"]
        pids = set()
        for _ in range(30):
            async with s.get(base + "/healthz") as r:
                pids.add((await r.json())["pid"])
        assert len(pids) == 2  # both workers answer on the one port
        allocators = set()
        for _ in range(30):
            allocators.add((await _process_info(s, base))["allocator"])
        assert allocators == {"malloc"}  # the workers inherit it from the re-executed parent
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


async def test_pymalloc_can_be_chosen(serve):
    base, proc = serve(BROKER_SERVER_ALLOCATOR="pymalloc")
    await _wait_ready(base, proc)
    async with aiohttp.ClientSession() as s:
        info = await _process_info(s, base)
    assert info["allocator"] == "pymalloc"
    assert info["pid"] == str(proc.pid)
    assert info["loop"] == ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_cli_errors_are_clear(tmp_path):
    r = _cli(tmp_path, "publish", "--user", "u", "not json")
    assert r.returncode == 2 and "not JSON" in r.stderr
    env = _env(tmp_path)
    env["BROKER_POLL_MAX_WAIT_S"] = "soon"
    r = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", "config/test.toml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "poll.max_wait_s" in r.stderr and "soon" in r.stderr
