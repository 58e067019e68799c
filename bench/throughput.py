"""Scenarios 3 and 4 of issue 4: short-poll throughput (wrk, or a Python closed-loop
generator without wrk) and SET signing and delivery; the set-up requests they need."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import statistics
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from bench import loadgen, procstats
from bench.httpraw import Client, build_request
from bench.loadgen import HOST, Issuer
from bench.params import Params
from bench.servers import Broker, Server

ReqSpec = tuple[str, str, dict[str, str], bytes]


def _lua_str(s: str | bytes) -> str:
    if isinstance(s, bytes):
        s = s.decode()
    assert "]==]" not in s
    return "[==[" + s + "]==]"


def wrk(
    port: int, reqs: list[ReqSpec], duration_s: float, conns: int, work: Path
) -> dict[str, Any]:
    lines = []
    for method, path, headers, body in reqs:
        # spaces inside [ ... ]: "[[" would open a Lua long string
        h = ", ".join(f"[ {_lua_str(k)} ] = {_lua_str(v)}" for k, v in headers.items())
        b = _lua_str(body) if body else "nil"
        lines.append(f"    wrk.format({_lua_str(method)}, {_lua_str(path)}, {{{h}}}, {b}),")
    script = (
        "local reqs = {}\nlocal i = 0\n"
        "init = function(args)\n  reqs = {\n" + "\n".join(lines) + "\n  }\nend\n"
        "request = function()\n  i = i % #reqs + 1\n  return reqs[i]\nend\n"
    )
    fd, path = tempfile.mkstemp(suffix=".lua", dir=work)
    with os.fdopen(fd, "w") as f:
        f.write(script)
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(duration_s))}s",
        "--latency",
        "-s",
        path,
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"50%\s+([\d.]+\w+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    return {
        "tool": "wrk",
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(total.group(1)) if total else 0,
        "non_2xx_3xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in errs.groups()) if errs else 0,
        "p50": p50.group(1) if p50 else None,
        "p99": p99.group(1) if p99 else None,
    }


def pygen(
    port: int, reqs: list[ReqSpec], duration_s: float, conns: int, work: Path
) -> dict[str, Any]:
    """Closed-loop fallback generator when wrk is missing (reports lower rates than wrk)."""
    raw = [build_request(m, p, HOST, headers=h, body=b) for m, p, h, b in reqs]

    async def main() -> dict[str, Any]:
        counts: collections.Counter[str] = collections.Counter()
        stop = time.monotonic() + duration_s

        async def one(k: int) -> None:
            client = Client(HOST, port)
            i = k
            while time.monotonic() < stop:
                resp = await client.request(raw[i % len(raw)], limit_s=10)
                counts["ok" if resp.status < 400 else "non_2xx_3xx"] += 1
                i += conns
            client.close()

        t0 = time.monotonic()
        await asyncio.gather(*(one(k) for k in range(conns)))
        total = sum(counts.values())
        return {
            "tool": "python",
            "rps": total / (time.monotonic() - t0),
            "requests": total,
            "non_2xx_3xx": counts["non_2xx_3xx"],
            "socket_errors": 0,
        }

    return asyncio.run(main())


class Throughput:
    """Runs the short-poll measurements; each scenario in rounds paired with the reference.

    Why pairs: these machines change speed by up to 2x within seconds (a pure-Python loop
    timed every 0.2 s took 19 or 35 ms), so a scenario measured a minute after the trivial
    handler could be judged against a different machine. Each round runs the trivial handler
    and the scenario back to back for `tput_round_s` each (each first in turn); the ratio
    reported is the median of the rounds' ratios, and every round is kept in the results.
    """

    def __init__(self, p: Params, work: Path, have_wrk: bool) -> None:
        self.p = p
        self.work = work
        self.run = wrk if have_wrk else pygen
        self.reference: tuple[Server, list[ReqSpec]] | None = None
        self.reference_rounds: list[dict[str, Any]] = []

    def once(self, server: Server, reqs: list[ReqSpec], seconds: float) -> dict[str, Any]:
        c0 = procstats.cpu_seconds(server.pid)
        m0 = procstats.machine_steal()
        t0 = time.monotonic()
        r = self.run(server.port, reqs, seconds, self.p.tput_conns, self.work)
        r["seconds"] = round(time.monotonic() - t0, 3)
        r["server_cpu_pct"] = round(
            (procstats.cpu_seconds(server.pid) - c0) / (time.monotonic() - t0) * 100, 1
        )
        r["steal_pct"] = procstats.steal_pct(m0, procstats.machine_steal())
        return r

    def measure(self, server: Server, reqs: list[ReqSpec]) -> dict[str, Any]:
        """The scenario's rates over all its rounds, and its ratio to the reference."""
        if self.reference is None:
            return self.once(server, reqs, self.p.tput_scenario_s)
        ref_server, ref_reqs = self.reference
        rounds = []
        for k in range(self.p.tput_rounds):
            # The order alternates: a machine drifting one way over a few seconds would
            # otherwise bias every pair alike, which the median does not undo.
            if k % 2 == 0:
                ref = self.once(ref_server, ref_reqs, self.p.tput_round_s)
                run = self.once(server, reqs, self.p.tput_round_s)
            else:
                run = self.once(server, reqs, self.p.tput_round_s)
                ref = self.once(ref_server, ref_reqs, self.p.tput_round_s)
            self.reference_rounds.append(ref)
            rounds.append((ref, run))
        return paired_result(rounds)

    def reference_result(self) -> dict[str, Any]:
        """The reference's own row: all its rounds so far, pooled."""
        return pooled(self.reference_rounds)


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one scenario, all as long, as one: the mean of their rates (each the load
    generator's own, over its run), CPU and steal weighted by time, percentiles per run."""
    seconds = sum(r["seconds"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    out: dict[str, Any] = {
        "tool": runs[0]["tool"],
        "rps": round(statistics.fmean(r["rps"] for r in runs), 2),
        "requests": requests,
        "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "server_cpu_pct": _weighted(runs, "server_cpu_pct", seconds),
        "steal_pct": _weighted(runs, "steal_pct", seconds),
    }
    if all(r.get("p50") for r in runs):
        out["p50_per_round"] = [r["p50"] for r in runs]
        out["p99_per_round"] = [r["p99"] for r in runs]
    return out


def _weighted(runs: list[dict[str, Any]], key: str, seconds: float) -> float | None:
    """The time-weighted mean of a reading; None if a run lacks it (no /proc/stat)."""
    if not seconds or any(r.get(key) is None for r in runs):
        return None
    total: float = sum(float(r[key]) * r["seconds"] for r in runs)
    return round(total / seconds, 1)


def paired_result(rounds: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """A scenario measured in rounds, each paired with one of the reference: pooled, plus
    `vs_trivial`, the median of the rounds' ratios (a round is compared with its own pair)."""
    out = pooled([r for _ref, r in rounds])
    ratios = [r["rps"] / ref["rps"] for ref, r in rounds if ref["rps"]]
    out["vs_trivial"] = round(statistics.median(ratios), 4) if ratios else None
    # A reference round that measured nothing (wrk printed no rate) judges nothing: said so.
    out["rounds_without_reference"] = len(rounds) - len(ratios)
    out["rounds"] = [
        {"rps": round(r["rps"], 1), "trivial_rps": round(ref["rps"], 1)} for ref, r in rounds
    ]
    return out


async def _requests(port: int, reqs: list[bytes], concurrency: int = 16) -> list[Any]:
    """Send setup requests over a few keep-alive connections; answers in order."""
    results: list[Any] = [None] * len(reqs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(reqs)):
        queue.put_nowait(i)

    async def run() -> None:
        client = Client(HOST, port)
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await client.request(reqs[i], limit_s=60)
        client.close()

    await asyncio.gather(*(run() for _ in range(concurrency)))
    return results


def setup_requests(port: int, reqs: list[bytes], concurrency: int = 16) -> list[Any]:
    return asyncio.run(_requests(port, reqs, concurrency))


def json_req(path: str, token: str, body: Any, method: str = "POST") -> bytes:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return build_request(method, path, HOST, body=orjson.dumps(body), headers=headers)


def broker_queues(broker: Broker, issuer: Issuer, names: list[str]) -> list[tuple[str, str]]:
    """Subscribe one queue per user; returns (queue path, token)."""
    tokens = [issuer.user(u) for u in names]
    resps = setup_requests(
        broker.port, [json_req("/queues/subscribe", t, {"topics": ["connections"]}) for t in tokens]
    )
    out = []
    for t, r in zip(tokens, resps, strict=True):
        if r.status != 201:
            raise RuntimeError(f"subscribe failed: {r.status} {r.body[:200]!r}")
        out.append((r.headers[b"location"].decode(), t))
    return out


def preload_oxlin(broker: Broker, producer: str, users: list[str], per_queue: int) -> None:
    reqs = []
    for u in users:
        left = per_queue
        while left > 0:
            k = min(1000, left)
            body = [loadgen.oxlin_event(loadgen.marker(0, 0, 0)) for _ in range(k)]
            path = f"/publish/users/{urllib.parse.quote(u, safe='')}/events"
            reqs.append(json_req(path, producer, body))
            left -= k
    for r in setup_requests(broker.port, reqs, 8):
        if r.status != 202:
            raise RuntimeError(f"preload publish failed: {r.status} {r.body[:200]!r}")


def ob_clients(broker: Broker, issuer: Issuer, names: list[str]) -> list[str]:
    tokens = [issuer.tpp(c) for c in names]
    resps = setup_requests(
        broker.port,
        [json_req("/event-subscriptions", t, {"Data": {"Version": "3.1"}}) for t in tokens],
    )
    for r in resps:
        if r.status not in (200, 201):
            raise RuntimeError(f"event subscription failed: {r.status} {r.body[:200]!r}")
    return tokens


def publish_sets(
    broker: Broker, producer: str, clients: list[str], per_client: int, batch: int = 100
) -> dict[str, Any]:
    reqs = []
    for c in clients:
        left = per_client
        while left > 0:
            k = min(batch, left)
            body = [loadgen.set_payload(f"r-{c}-{left - j}") for j in range(k)]
            path = f"/publish/clients/{urllib.parse.quote(c, safe='')}/sets"
            reqs.append(json_req(path, producer, body))
            left -= k
    c0 = procstats.cpu_seconds(broker.pid)
    t0 = time.monotonic()
    resps = setup_requests(broker.port, reqs, 8)
    elapsed = time.monotonic() - t0
    cpu = procstats.cpu_seconds(broker.pid) - c0
    bad = collections.Counter(r.status for r in resps if r.status != 202)
    total = len(clients) * per_client
    return {
        "sets": total,
        "seconds": round(elapsed, 2),
        "sets_per_s": round(total / elapsed, 1),
        "broker_cpu_s": round(cpu, 2),
        "sets_per_cpu_s": round(total / cpu, 1) if cpu else None,
        "failures": dict(bad),
    }


def drain_sets(broker: Broker, tokens: list[str]) -> dict[str, Any]:
    """Every client polls maxEvents 100 + acks of the previous batch until nothing is left."""

    async def main() -> dict[str, Any]:
        seen: set[str] = set()
        dup = 0
        polls = 0
        bad: collections.Counter[int] = collections.Counter()

        async def one(token: str) -> None:
            nonlocal dup, polls
            client = Client(HOST, broker.port)
            acks: list[str] = []
            for _ in range(100_000):  # bounded; ends when the backlog is drained
                body: dict[str, Any] = {"maxEvents": 100, "returnImmediately": True}
                if acks:
                    body["ack"] = acks
                resp = await client.request(json_req("/events", token, body), limit_s=60)
                polls += 1
                if resp.status != 200:
                    bad[resp.status] += 1
                    break
                doc = orjson.loads(resp.body)
                sets = doc.get("sets") or {}
                for jti in sets:
                    if jti in seen:
                        dup += 1
                    seen.add(jti)
                acks = list(sets)
                if not sets and not doc.get("moreAvailable"):
                    break
            client.close()

        t0 = time.monotonic()
        await asyncio.gather(*(one(t) for t in tokens))
        elapsed = time.monotonic() - t0
        return {
            "delivered": len(seen),
            "duplicates": dup,
            "polls": polls,
            "seconds": round(elapsed, 2),
            "sets_per_s": round(len(seen) / elapsed, 1),
            "failures": dict(bad),
        }

    c0 = procstats.cpu_seconds(broker.pid)
    r = asyncio.run(main())
    r["broker_cpu_s"] = round(procstats.cpu_seconds(broker.pid) - c0, 2)
    return r


def pyjwt_ps256_rate(seconds: float) -> float:
    """pyjwt's raw PS256 signing rate on one core, key object loaded once (the reference)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    payload = dict(loadgen.set_payload("r-1"), iss="https://aspsp.example.com/", iat=1, jti="x")
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            jwt.encode(payload, key, algorithm="PS256", headers={"kid": "k"})
        n += 50
    return n / (time.perf_counter() - t0)
