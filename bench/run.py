"""Benchmark runner for issue 4: `python -m bench.run [--quick]` (see bench/README.md).

One run measures, side by side on this machine, the broker (one worker process), an in-memory
aiohttp long-poll baseline, a trivial aiohttp handler and Nchan (nginx + libnginx-mod-nchan,
Redis-backed), all against one embedded Redis-compatible server started here. It writes
bench/results/<date>[-quick].json, .md and two PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass, replace
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

import orjson

from bench import loadgen, procstats, report
from bench.httpraw import Client, build_request
from bench.loadgen import HOST, Issuer, Spec
from bench.servers import REPO, Baseline, Broker, Nchan, Server, ensure_tools
from broker.config import sections as config_sections

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Params:
    waiters: int = 10_000
    waiter_procs: int = 2
    ramp_steps: int = 5
    idle_s: float = 5.0
    rate: float = 1000.0
    duration_s: float = 30.0
    wait_s: float = 25.0  # long-poll hold asked by clients (Nchan: its subscriber timeout)
    jitter: float = 0.2
    max_wait_s: float = 30.0  # the broker's poll.max_wait_s, also the hygiene deadline
    pub_conns: int = 32
    tput_s: float = 5.0
    tput_conns: int = 64
    tput_queues: int = 64
    sets_total: int = 40_000
    sets_clients: int = 8
    sign_s: float = 2.0
    drain_s: float = 27.0  # after the last publish, wait this long at most for deliveries
    # After the vanished clients are released, go on sampling this long: the broker's
    # maintenance collection (and heap trim) comes a second or two later, later on a slow
    # machine (2.2 s after the vanish with 2,000 waiters, 3.3 s with 10,000 on a slow one).
    settle_s: float = 5.0


FULL = Params()
QUICK = Params(
    waiters=2000,
    ramp_steps=4,
    idle_s=2.0,
    rate=500.0,
    duration_s=10.0,
    wait_s=10.0,
    max_wait_s=12.0,
    tput_s=2.0,
    sets_total=5000,
    sign_s=1.0,
    drain_s=5.0,
    settle_s=3.0,
)


# ---------------------------------------------------------------------------------------------
# worker processes


class Worker:
    def __init__(self, ctx: SpawnContext, role: str, spec: Spec, indices: list[int]) -> None:
        self.role = role
        self.last = ""  # the command awaiting an answer, named when it times out
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=loadgen.worker_main, args=(child, role, spec, indices), daemon=True
        )
        self.proc.start()
        child.close()

    def send(self, cmd: str, *args: Any) -> None:
        self.last = cmd
        self.conn.send((cmd, list(args)))

    def recv(self, timeout: float = 180) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(
                f"load generator ({self.role}) did not answer {self.last!r} within {timeout:g} s"
            )
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"load generator: {result}")
        return result

    def call(self, cmd: str, *args: Any, timeout: float = 180) -> Any:
        self.send(cmd, *args)
        return self.recv(timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call("exit", timeout=20)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


_T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line, stamped with the seconds since the run began (which phase takes how
    long differs from machine to machine)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", flush=True)


def has_ob_routes(broker: Broker) -> bool:
    """Whether this broker build serves OB polls and SET publishing (older commits did not)."""
    return broker.has_route("POST", "/events") and broker.has_route(
        "POST", "/publish/clients/x/sets"
    )


def call_all(
    workers: list[Worker],
    cmd: str,
    *args: Any,
    per: list[Any] | None = None,
    timeout: float = 180,
) -> list[Any]:
    for k, w in enumerate(workers):
        w.send(cmd, *(per[k] if per is not None else args))
    return [w.recv(timeout) for w in workers]


# ---------------------------------------------------------------------------------------------
# sampling the server


class Sampler:
    def __init__(self, server: Server, redis_port: int) -> None:
        self.server = server
        self.redis_port = redis_port

    def sample(self) -> dict[str, Any]:
        pid = self.server.pid
        waiting = None
        with contextlib.suppress(Exception):
            waiting = self.server.waiting()
        return {
            "t": time.monotonic(),
            "rss": procstats.rss_bytes(pid),
            "cpu_s": procstats.cpu_seconds(pid),
            "redis_conns": procstats.tcp_connections(pid, remote_port=self.redis_port),
            "client_conns": procstats.tcp_connections(pid, local_port=self.server.port),
            "fds": sum(procstats.open_fds(p) for p in procstats.process_tree(pid)),
            "waiting": waiting,
        }


def sleeper_code(rate_hz: float) -> str:
    """The sleeper's program: an event loop whose one task sleeps 1/rate_hz at a time."""
    return (
        "import asyncio\n"
        "try:\n    import uvloop\n    run = uvloop.run\n"
        "except ImportError:\n    run = asyncio.run\n"
        "async def main():\n    while True:\n"
        f"        await asyncio.sleep({1 / rate_hz!r})\n"
        "run(main())\n"
    )


def sleeper_cpu(rate_hz: float, seconds: float) -> float:
    """% of a core charged to an event loop that only sleeps, waking `rate_hz` times a second.

    Why: on some virtual machines each wake-up of an idle process is charged milliseconds of
    CPU (seen here: an idle uvloop loop charged 1.2% of a core at 1 wake-up/s, 3-6% at ten,
    with the host's time taken counted as the process's own). A server's idle CPU is read
    against this, measured in the same run, so a machine's price for a timer is not taken
    for the server's work. An event loop (uvloop when installed, as the broker), not
    time.sleep: a loop's wake-up (epoll, timer heap, a task step) cost about three times a
    bare sleep's on that machine.
    """
    proc = subprocess.Popen([sys.executable, "-c", sleeper_code(rate_hz)])
    try:
        time.sleep(0.5)
        c0, t0 = procstats.cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        return round((procstats.cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100, 2)
    finally:
        proc.kill()
        proc.wait()


def wait_waiting(server: Server, target: int, timeout_s: float) -> int | None:
    """Wait until the server holds at least 99.5% of `target` polls; return the count."""
    deadline = time.monotonic() + timeout_s
    count = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            count = server.waiting()
        if count is None or count >= target * 0.995:
            return count
        time.sleep(0.1)
    return count


# ---------------------------------------------------------------------------------------------
# scenarios 1, 2, 5: idle capacity, wake-up latency, disconnect hygiene


def long_poll_scenario(
    server: Server, spec: Spec, p: Params, ctx: SpawnContext, redis_port: int, label: str
) -> dict[str, Any]:
    n = p.waiters
    shares = [list(range(k, n, p.waiter_procs)) for k in range(p.waiter_procs)]
    sampler = Sampler(server, redis_port)
    workers = [Worker(ctx, "waiters", spec, idx) for idx in shares]
    publisher = Worker(ctx, "publisher", spec, [])
    out: dict[str, Any] = {"target": label, "waiters": n}
    try:
        time.sleep(0.5)
        s0 = sampler.sample()
        t = time.monotonic()
        setup = call_all(workers, "setup")
        out["setup_s"] = round(time.monotonic() - t, 2)
        out["setup_errors"] = _merge([r["errors"] for r in setup])
        s_setup = sampler.sample()
        curve = [{"waiters": 0, "rss": s_setup["rss"], "waiting": s_setup["waiting"]}]
        for step in range(1, p.ramp_steps + 1):
            k = n * step // p.ramp_steps
            per = [[sum(1 for i in idx if i < k)] for idx in shares]
            call_all(workers, "open", per=per)
            got = wait_waiting(server, k, 30)
            time.sleep(0.5)
            s = sampler.sample()
            curve.append({"waiters": k, "rss": s["rss"], "waiting": got})
            say(f"  {label}: {k} waiters open (server holds {got})")
        time.sleep(1.0)  # let the last connections settle before measuring idle CPU
        idle_before = _merge([r["counters"] for r in call_all(workers, "stats")])
        s_full = sampler.sample()
        # Wake-ups read apart from the samples, whose /metrics requests wake the server too.
        w0, tw0 = procstats.wakeups(server.pid), time.monotonic()
        time.sleep(p.idle_s)
        w1, tw1 = procstats.wakeups(server.pid), time.monotonic()
        s_idle = sampler.sample()
        idle_after = _merge([r["counters"] for r in call_all(workers, "stats")])
        idle_cpu = (s_idle["cpu_s"] - s_full["cpu_s"]) / (s_idle["t"] - s_full["t"])
        idle_wakeups = (w1 - w0) / (tw1 - tw0)
        out["idle"] = {
            "rss_start": s0["rss"],
            "rss_after_setup": s_setup["rss"],
            "rss_full": s_idle["rss"],
            "kb_per_waiter": round((s_idle["rss"] - s0["rss"]) / n / 1024, 2),
            "kb_per_parked_poll": round((s_idle["rss"] - s_setup["rss"]) / n / 1024, 2),
            "waiting": s_idle["waiting"],
            "client_conns": s_idle["client_conns"],
            "redis_conns_start": s0["redis_conns"],
            "redis_conns": s_idle["redis_conns"],
            "cpu_pct": round(idle_cpu * 100, 2),
            "wakeups_per_s": round(idle_wakeups, 1),
            "polls_during_idle": idle_after.get("polls", 0) - idle_before.get("polls", 0),
            "fds": s_idle["fds"],
            "curve": curve,
        }
        say(
            f"  {label}: idle {out['idle']['kb_per_waiter']} KB/waiter, "
            f"cpu {out['idle']['cpu_pct']}% ({out['idle']['wakeups_per_s']} wake-ups/s), "
            f"redis conns {s_idle['redis_conns']}"
        )

        # wake-up latency under publishing, with time-outs and re-polls during the run
        call_all(workers, "record", True)
        before = call_all(workers, "stats")
        m0 = server.metrics() if isinstance(server, Broker) else {}
        say(f"  {label}: publishing {p.rate:g}/s for {p.duration_s:g} s")
        steal0 = procstats.machine_steal()
        publisher.send("publish", n, p.rate, p.duration_s, p.pub_conns)
        samples = [sampler.sample()]
        deadline = time.monotonic() + p.duration_s + 90
        while not publisher.conn.poll(1.0):
            samples.append(sampler.sample())
            if time.monotonic() > deadline:
                raise TimeoutError("publisher did not finish")
        pub = publisher.recv()
        publish_steal = procstats.steal_pct(steal0, procstats.machine_steal())
        samples.append(sampler.sample())
        ok_count = len(pub["ok"])
        t_drain = time.monotonic()
        drain_deadline = t_drain + p.drain_s
        while time.monotonic() < drain_deadline:
            unique = sum(r["unique"] for r in call_all(workers, "stats"))
            if unique >= ok_count:
                break
            time.sleep(0.25)
        drain_s = time.monotonic() - t_drain
        call_all(workers, "record", False)
        m1 = server.metrics() if isinstance(server, Broker) else {}
        after = call_all(workers, "stats")
        parts = call_all(workers, "collect")
        received = [r for part in parts for r in part["received"]]
        timeouts = [t for part in parts for t in part["timeouts"]]
        run_samples = samples
        cpu_run = (run_samples[-1]["cpu_s"] - run_samples[0]["cpu_s"]) / (
            run_samples[-1]["t"] - run_samples[0]["t"]
        )

        # disconnect hygiene: every client vanishes at once
        say(f"  {label}: drained in {drain_s:.1f} s; every client vanishes")
        wait_waiting(server, n, 10)
        pre = sampler.sample()
        t_abort = time.monotonic()
        call_all(workers, "abort")
        hygiene = [pre]
        cleared_at = None
        limit = max(5, n // 100)
        while time.monotonic() - t_abort < p.max_wait_s:
            time.sleep(0.25)
            s = sampler.sample()
            hygiene.append(s)
            clear = (s["waiting"] is None or s["waiting"] <= limit) and s["client_conns"] <= limit
            if clear and cleared_at is None:
                cleared_at = s["t"] - t_abort
            if cleared_at is not None and s["t"] - t_abort > cleared_at + p.settle_s:
                break
        post = hygiene[-1]
        out["hygiene"] = {
            "seconds_to_clear": None if cleared_at is None else round(cleared_at, 2),
            "deadline_s": p.max_wait_s,
            "waiting_before": pre["waiting"],
            "waiting_after": post["waiting"],
            "client_conns_after": post["client_conns"],
            "redis_conns_after": post["redis_conns"],
            "rss_start": s0["rss"],
            "rss_before": pre["rss"],
            "rss_after": post["rss"],
            "fds_after": post["fds"],
            "samples": [
                {
                    "t": round(s["t"] - t_abort, 2),
                    "waiting": s["waiting"],
                    "rss": s["rss"],
                    "client_conns": s["client_conns"],
                }
                for s in hygiene
            ],
        }
        # Only the queues of waiters that were sent events they never received: the others
        # have nothing to find, and reading 10,000 Nchan channels one by one took minutes on
        # a slow machine (past the load generator's time-out).
        delivered = {s for _w, s, _lat, _r in received}
        unfinished = sorted({w for w, s in pub["ok"] if s not in delivered})
        t_sweep = time.monotonic()
        swept = call_all(workers, "sweep", unfinished, timeout=600)
        sweep = [r for part in swept for r in part["found"]]
        sweep_errors = _merge([part["errors"] for part in swept])
        unread = {i for part in swept for i in part["failed"]}
        say(
            f"  {label}: read the queues of {len(unfinished)} waiters missing events"
            f" in {time.monotonic() - t_sweep:.1f} s"
            + (f" (failed reads: {sweep_errors})" if sweep_errors else "")
        )
        counters = _merge([a["counters"] for a in after])
        counters_before = _merge([b["counters"] for b in before])
        out["wake"] = analyze(pub, received, sweep, spec, unread)
        out["wake"]["timeline"] = timeline(pub, received, timeouts, p)
        out["wake"].update(
            {
                "rate": p.rate,
                "duration_s": p.duration_s,
                "hold_s": p.wait_s,
                "drain_s": round(drain_s, 2),
                "sweep_waiters": len(unfinished),
                "sweep_errors": sweep_errors,
                "cpu_pct": round(cpu_run * 100, 1),
                "steal_pct": publish_steal,
                "rss_max": max(s["rss"] for s in run_samples),
                "redis_conns_max": max(s["redis_conns"] for s in run_samples),
                "waiting_min": min((s["waiting"] or 0) for s in run_samples),
                "timeouts": counters.get("timeouts", 0) - counters_before.get("timeouts", 0),
                "polls": counters.get("polls", 0) - counters_before.get("polls", 0),
                "client_errors": {
                    k: v
                    for k, v in counters.items()
                    if k.startswith(("status_", "conn", "connect")) and v
                },
                "publish": {k: v for k, v in pub.items() if k != "ok"},
                "server_counters": {
                    k: v - m0.get(k, 0) for k, v in m1.items() if k.endswith("_total")
                },
            }
        )
        w = out["wake"]
        say(
            f"  {label}: wake p50 {w['latency_ms'].get('p50')} p99 {w['latency_ms'].get('p99')} ms,"
            f" delivered {w['delivered']}/{w['published_ok']}, late {w['late_1s']},"
            f" stranded {w['stranded']}, lost {w['lost']}, dup {w['duplicates']};"
            f" hygiene {out['hygiene']['seconds_to_clear']} s"
        )
    finally:
        for wk in [*workers, publisher]:
            wk.stop()
    return out


def analyze(
    pub: dict[str, Any],
    received: list[tuple[int, int, int, int]],
    sweep: list[tuple[int, int, int]],
    spec: Spec,
    unread: set[int] | frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Per published event: delivered (first time), late, duplicated, misrouted; of those never
    delivered, stranded (found by the sweep), unverified (their queue's sweep read failed,
    waiters `unread`) or lost."""
    ok = {s: w for w, s in pub["ok"]}
    first: dict[int, int] = {}
    duplicates = misrouted = unexpected = 0
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for w, s, lat, receiver in received:
        if w != receiver:
            misrouted += 1
        if s not in ok:
            unexpected += 1
        if s in first:
            duplicates += 1
            continue
        first[s] = lat
        by_kind[spec.kind(w)].append(lat)
    lats = sorted(first.values())
    swept = {s for _w, s, _r in sweep}
    stranded = sum(1 for s in swept if s in ok and s not in first)
    missing = [s for s in ok if s not in first and s not in swept]
    unverified = sum(1 for s in missing if ok[s] in unread)
    lost = len(missing) - unverified
    result = {
        "published_attempted": pub["attempted"],
        "published_ok": len(ok),
        "publish_failures": pub["failures"],
        "unrouted": pub["unrouted"],
        "delivered": sum(1 for s in first if s in ok),
        "late_1s": sum(1 for x in lats if x > 1_000_000_000),
        "stranded": stranded,
        "lost": lost,
        "unverified": unverified,
        "duplicates": duplicates,
        "misrouted": misrouted,
        "unexpected": unexpected,
        "latency_ms": quantiles(lats),
        "latency_by_api_ms": {k: quantiles(sorted(v)) for k, v in by_kind.items()},
        "cdf": cdf_points(lats),
    }
    return result


def timeline(
    pub: dict[str, Any], received: list[tuple[int, int, int, int]], timeouts: list[int], p: Params
) -> list[dict[str, Any]]:
    """Per second of the publish run: events, their p50/p99/max latency, long-poll time-outs."""
    seconds = int(p.duration_s) + 1
    lat: list[list[int]] = [[] for _ in range(seconds)]
    seen: set[int] = set()
    for _w, s, ns, _r in received:
        if s in seen:
            continue
        seen.add(s)
        lat[min(seconds - 1, int(s / p.rate))].append(ns)
    tos = [0] * seconds
    for t in timeouts:
        k = (t - pub["t0_ns"]) // 1_000_000_000
        if 0 <= k < seconds:
            tos[k] += 1
    out = []
    for k in range(seconds):
        q = quantiles(sorted(lat[k]))
        out.append({"s": k, "events": len(lat[k]), "timeouts": tos[k], **q})
    return out


def quantiles(sorted_ns: list[int]) -> dict[str, float]:
    if not sorted_ns:
        return {}
    n = len(sorted_ns)

    def q(p: float) -> float:
        return round(sorted_ns[min(n - 1, int(p * n))] / 1e6, 3)

    return {
        "n": n,
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": round(sorted_ns[-1] / 1e6, 3),
    }


def cdf_points(sorted_ns: list[int], points: int = 400) -> list[tuple[float, float]]:
    """A downsampled CDF (latency ms, fraction), denser in the tail, for the plot and JSON."""
    n = len(sorted_ns)
    if not n:
        return []
    fracs = sorted(
        {i / points for i in range(points)}
        | {1 - 10 ** (-k / 20) for k in range(20, 100)}
        | {1.0 - 1 / n}
    )
    return [(round(sorted_ns[min(n - 1, int(f * n))] / 1e6, 4), round(f, 6)) for f in fracs]


def _merge(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    total: collections.Counter[str] = collections.Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


# ---------------------------------------------------------------------------------------------
# scenario 3: poll throughput (wrk, or a Python closed-loop generator without wrk)

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
    def __init__(self, p: Params, work: Path, have_wrk: bool) -> None:
        self.p = p
        self.work = work
        self.run = wrk if have_wrk else pygen

    def measure(self, server: Server, reqs: list[ReqSpec]) -> dict[str, Any]:
        c0 = procstats.cpu_seconds(server.pid)
        m0 = procstats.machine_steal()
        t0 = time.monotonic()
        r = self.run(server.port, reqs, self.p.tput_s, self.p.tput_conns, self.work)
        r["server_cpu_pct"] = round(
            (procstats.cpu_seconds(server.pid) - c0) / (time.monotonic() - t0) * 100, 1
        )
        r["steal_pct"] = procstats.steal_pct(m0, procstats.machine_steal())
        return r


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


# ---------------------------------------------------------------------------------------------
# orchestration


def machine_info(redis_url: str) -> dict[str, Any]:
    import aiohttp

    info: dict[str, Any] = {
        "loadavg_at_start": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "cpu_model": "",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        import redis

        r = redis.Redis.from_url(redis_url)
        srv = r.info("server")
        info["redis_server"] = (
            f"valkey {srv['valkey_version']}"
            if "valkey_version" in srv
            else f"redis {srv.get('redis_version')}"
        )
        r.close()
    with contextlib.suppress(ImportError):
        import uvloop

        info["uvloop"] = getattr(uvloop, "__version__", "?")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 waiters, short runs (<2 min)")
    parser.add_argument(
        "--targets",
        default="broker,memlp,nchan",
        help="long-poll targets, comma-separated (default: broker,memlp,nchan)",
    )
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument(
        "--no-ob", action="store_true", help="broker waiters use Oxlin only (not half OB)"
    )
    parser.add_argument(
        "--broker-env",
        action="append",
        default=[],
        metavar="BROKER_SECTION_KEY=VALUE",
        help="a setting for the broker's processes (repeatable), e.g. BROKER_SIGNING_PROCESSES=1",
    )
    parser.add_argument("--waiters", type=int, help="override the number of waiters")
    parser.add_argument("--duration", type=float, help="override the publish duration (s)")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    parser.add_argument(
        "--broker-ref",
        help="bench the broker of this git commit (git archive into the work dir) instead of "
        "the working tree, e.g. HEAD",
    )
    args = parser.parse_args(argv)

    p = QUICK if args.quick else FULL
    extra_env: dict[str, str] = {}
    for item in args.broker_env:
        key, sep, value = item.partition("=")
        section = key.removeprefix("BROKER_").partition("_")[0].lower()
        if not sep or not key.startswith("BROKER_") or section not in config_sections():
            parser.error(
                f"--broker-env takes BROKER_SECTION_KEY=VALUE with a section of"
                f" {sorted(config_sections())}, not {item!r}"
            )
        extra_env[key] = value
    if extra_env:  # a broker that refuses its settings would fail the run minutes in
        from broker.config import load_settings
        from broker.errors import ConfigError

        try:
            load_settings(REPO / "config" / "broker.toml", environ=extra_env)
        except ConfigError as e:
            parser.error(f"--broker-env: {e}")
    if args.waiters:
        p = replace(p, waiters=args.waiters)
    if args.duration:
        p = replace(p, duration_s=args.duration)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    loadgen.raise_nofile()

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: stop every child we started

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    global _T0
    started = _T0 = time.monotonic()
    machine0 = procstats.machine_steal()
    stamp = dt.datetime.now(dt.UTC)
    work = REPO / "bench" / "work" / stamp.strftime("%Y%m%dT%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    notes: list[str] = []
    src = None
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "broker", "config"))
    if args.broker_ref:
        src = work / "src"
        src.mkdir()
        commit = _git("rev-parse", args.broker_ref)
        archive = subprocess.run(
            ["git", "archive", commit, "broker", "config"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        dirty = False
    tools = ensure_tools(install=not args.no_install)
    if tools["nginx"] and "nchan" in targets:
        notes.append(f"Nchan skipped: {tools['nginx']}.")
        targets.remove("nchan")
    if tools["wrk"]:
        notes.append(f"wrk unavailable ({tools['wrk']}): throughput measured by a Python client.")

    results: dict[str, Any] = {
        "date": stamp.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "params": asdict(p),
        "broker_commit": commit + (" + uncommitted changes" if dirty else ""),
        "broker_env": extra_env,
        "notes": notes,
        "long_poll": {},
        "throughput": {},
    }
    from broker.embedded import EmbeddedRedis

    # Also on a Unix socket: the broker's short polls run over it (how a broker beside its
    # Redis connects; serve's embedded server does the same), and again over TCP to compare.
    redis = EmbeddedRedis(work / "redis", unix_socket=True)
    servers: list[Server] = []

    def start(server: Server) -> Server:
        servers.append(server)
        server.start()
        return server

    def stop(server: Server) -> None:
        server.stop()
        servers.remove(server)
        if isinstance(server, Nchan):
            for crash in server.crashes():
                notes.append(f"Nchan's nginx worker crashed during the run: {crash}.")

    try:
        redis_url = redis.start()
        assert redis.port is not None
        results["machine"] = machine_info(redis_url)
        from bench.servers import nchan_version, nginx_version

        if "nchan" in targets:
            results["machine"]["nginx"] = nginx_version()
            results["machine"]["nchan"] = nchan_version()
        say(f"bench: {results['mode']} run, Redis at {redis_url}, work dir {work}")
        broker_data = work / "broker"
        Issuer(str(broker_data))  # create the dev issuer key before any process reads it
        broker_env = {
            "BROKER_POLL_MAX_WAIT_S": str(p.max_wait_s),
            # OB long polls cannot ask for a hold: they get the server default, the maximum
            "BROKER_POLL_DEFAULT_WAIT_S": str(p.max_wait_s),
            **extra_env,
        }
        ob_available = False

        # scenarios 1, 2, 5 per long-poll target
        for name in targets:
            say(f"bench: long polls on {name}")
            if name == "broker":
                server: Server = start(Broker(work, redis_url, broker_data, broker_env, src))
                assert isinstance(server, Broker)
                results["broker_process"] = server.process_info()
                ob_available = has_ob_routes(server)
                if not ob_available:
                    notes.append(
                        "OB endpoints (POST /events, /publish/clients/{id}/sets) are not "
                        "available in this broker build: OB scenarios marked not available; "
                        "all waiters use Oxlin."
                    )
            elif name == "memlp":
                server = start(Baseline(work, "memlp"))
            elif name == "nchan":
                server = start(Nchan(work, redis.port, int(p.max_wait_s)))
            else:
                raise SystemExit(f"unknown target {name}")
            spec = Spec(
                target=name,
                port=server.port,
                prefix=f"lp{name[:2]}",
                wait_s=p.wait_s,
                first_wait_s=p.max_wait_s,
                jitter=p.jitter if name != "nchan" else 0.0,
                data_dir=str(broker_data),
                ob=ob_available and name == "broker" and not args.no_ob,
            )
            try:
                results["long_poll"][name] = long_poll_scenario(
                    server, spec, p, ctx, redis.port, name
                )
                failed = results["long_poll"][name]["wake"].get("sweep_errors")
                if failed:
                    notes.append(
                        f"{name}: {sum(failed.values())} immediate reads of queues with missing"
                        f" events failed or got no answer within {loadgen.SWEEP_LIMIT_S:g} s"
                        f" ({failed}); their undelivered events are shown as unread beside"
                        " the lost ones: neither delivered nor found."
                    )
            except Exception as e:  # one target failing must not lose the others' results
                say(f"  {name}: FAILED: {type(e).__name__}: {e}")
                results["long_poll"][name] = {"target": name, "error": f"{type(e).__name__}: {e}"}
            finally:
                stop(server)
        results["ob_available"] = ob_available
        # What waking as often as each server did while idle costs an event loop that does
        # nothing else, on this machine (after the long polls: their timing is left alone).
        for r in results["long_poll"].values():
            rate = r.get("idle", {}).get("wakeups_per_s", 0)
            if rate >= 1:
                r["idle"]["sleeper_cpu_pct"] = sleeper_cpu(rate, p.idle_s)
                say(
                    f"  {r['target']}: an event loop that only sleeps, waking {rate}/s: "
                    f"{r['idle']['sleeper_cpu_pct']}% CPU"
                )

        # scenario 3: poll throughput, and 4: SET throughput
        say("bench: throughput")
        tp = Throughput(p, work, have_wrk=not tools["wrk"])
        tput = results["throughput"]
        trivial = start(Baseline(work, "trivial"))
        tput["trivial"] = tp.measure(trivial, [("GET", "/", {}, b"")])
        stop(trivial)
        say(f"  trivial aiohttp: {tput['trivial']['rps']:.0f} req/s")

        tput_env = {**broker_env, "BROKER_QUEUES_MAX_BATCH": "1"}
        results["broker_redis_transport"] = {
            "long_poll": "tcp",
            "throughput": "unix" if redis.unix_socket else "tcp",
        }
        broker = start(Broker(work, redis.client_url, broker_data, tput_env, src))
        assert isinstance(broker, Broker)
        if "broker" not in targets:  # not asked yet: its long polls were not run
            ob_available = has_ob_routes(broker)
            results["ob_available"] = ob_available
        issuer = Issuer(str(broker_data))
        producer = issuer.producer()
        q = p.tput_queues
        full_users = [f"tpfull{i}" for i in range(q)]
        empty_users = [f"tpempty{i}" for i in range(q)]
        full_q = broker_queues(broker, issuer, full_users)
        empty_q = broker_queues(broker, issuer, empty_users)
        per_queue = math.ceil(30_000 * p.tput_s / q)  # more than one core can poll
        preload_oxlin(broker, producer, full_users, per_queue)

        def gets(qs: list[tuple[str, str]]) -> list[ReqSpec]:
            return [("GET", path, {"Authorization": f"Bearer {t}"}, b"") for path, t in qs]

        def ob_polls(tokens: list[str], max_events: int) -> list[ReqSpec]:
            body = orjson.dumps({"maxEvents": max_events, "returnImmediately": True})
            return [
                (
                    "POST",
                    "/events",
                    {"Authorization": f"Bearer {t}", "Content-Type": "application/json"},
                    body,
                )
                for t in tokens
            ]

        tok_full: list[str] = []
        tok_empty: list[str] = []
        if ob_available:
            clients_full = [f"tpobfull{i}" for i in range(q)]
            clients_empty = [f"tpobempty{i}" for i in range(q)]
            tok_full = ob_clients(broker, issuer, clients_full)
            tok_empty = ob_clients(broker, issuer, clients_empty)
            publish_sets(broker, producer, clients_full, 1, batch=1)

        def short_polls(server: Broker, prefix: str) -> None:
            m0 = server.metrics()
            nonempty = tp.measure(server, gets(full_q))
            m1 = server.metrics()
            polls = m1.get("broker_queue_polls_total", 0) - m0.get("broker_queue_polls_total", 0)
            evs = m1.get("broker_queue_events_delivered_total", 0) - m0.get(
                "broker_queue_events_delivered_total", 0
            )
            nonempty["events_per_poll"] = round(evs / polls, 3) if polls else 0
            tput[prefix + "oxlin_nonempty"] = nonempty
            tput[prefix + "oxlin_empty"] = tp.measure(server, gets(empty_q))
            if ob_available:
                tput[prefix + "ob_nonempty"] = tp.measure(server, ob_polls(tok_full, 1))
                tput[prefix + "ob_empty"] = tp.measure(server, ob_polls(tok_empty, 100))

        say(f"  broker: short polls (Redis over {'Unix socket' if redis.unix_socket else 'TCP'})")
        short_polls(broker, "broker_")
        if redis.unix_socket:
            # Right after, the same polls with the broker on TCP loopback (as with a Redis on
            # another host); then back on the socket for the SETs.
            stop(broker)
            broker = start(Broker(work, redis_url, broker_data, tput_env, src))
            assert isinstance(broker, Broker)
            preload_oxlin(broker, producer, full_users, per_queue)
            say("  broker: short polls over TCP")
            short_polls(broker, "broker_tcp_")
            stop(broker)
            broker = start(Broker(work, redis.client_url, broker_data, tput_env, src))
            assert isinstance(broker, Broker)

        if ob_available:
            # scenario 4: SET signing and delivery
            say("bench: SET throughput")
            sets: dict[str, Any] = {"pyjwt_ps256_per_s": round(pyjwt_ps256_rate(p.sign_s), 1)}
            names = [f"setc{i}" for i in range(p.sets_clients)]
            tokens = ob_clients(broker, issuer, names)
            sets["publish"] = publish_sets(broker, producer, names, p.sets_total // p.sets_clients)
            sets["deliver"] = drain_sets(broker, tokens)
            results["sets"] = sets
        else:
            results["sets"] = {"available": False}
            results["sets"]["pyjwt_ps256_per_s"] = round(pyjwt_ps256_rate(p.sign_s), 1)
        stop(broker)

        say("  in-memory aiohttp: short polls")
        memlp = start(Baseline(work, "memlp", "--max-batch", "1"))
        reqs = []
        for i in range(q):
            left = per_queue
            while left > 0:
                k = min(1000, left)
                body = [loadgen.oxlin_event(loadgen.marker(0, 0, 0)) for _ in range(k)]
                reqs.append(json_req(f"/publish/tpfull{i}", "", body))
                left -= k
        setup_requests(memlp.port, reqs, 8)
        tput["memlp_nonempty"] = tp.measure(
            memlp, [("GET", f"/queues/tpfull{i}", {}, b"") for i in range(q)]
        )
        tput["memlp_empty"] = tp.measure(
            memlp, [("GET", f"/queues/tpempty{i}", {}, b"") for i in range(q)]
        )
        stop(memlp)

        if "nchan" in targets:
            say("  Nchan: short polls")
            nchan = start(Nchan(work, redis.port, int(p.max_wait_s)))
            setup_requests(
                nchan.port,
                [
                    json_req(f"/pub/tpfull{i}", "", loadgen.oxlin_event(loadgen.marker(0, 0, 0)))
                    for i in range(q)
                ],
            )
            tput["nchan_nonempty"] = tp.measure(
                nchan, [("GET", f"/poll/tpfull{i}", {}, b"") for i in range(q)]
            )
            tput["nchan_empty"] = tp.measure(
                nchan, [("GET", f"/poll/tpempty{i}", {}, b"") for i in range(q)]
            )
            stop(nchan)
        for k, v in tput.items():
            say(f"  {k}: {v['rps']:.0f} req/s")
    finally:
        for s in list(servers):
            with contextlib.suppress(Exception):
                s.stop()
        redis.stop()

    results["elapsed_s"] = round(time.monotonic() - started, 1)
    # A virtual machine's CPUs can be lent to other guests: a run with much stolen time
    # measured the neighbours as much as the servers.
    results.setdefault("machine", {})["steal_pct"] = procstats.steal_pct(
        machine0, procstats.machine_steal()
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stamp.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
    base = out_dir / name
    n = 2
    while base.with_suffix(".json").exists():  # a second run that day keeps the first
        base, n = out_dir / f"{name}-{n}", n + 1
    files = report.write(results, base)
    print(f"bench: done in {results['elapsed_s']} s; wrote {', '.join(str(f) for f in files)}")
    print(Path(files[1]).read_text())
    with contextlib.suppress(OSError):
        shutil.rmtree(work / "redis")  # the AOF of the run; logs stay for a post-mortem
    return 0


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
