"""Scenarios 1, 2 and 5 of issue 4 on one server: idle capacity, wake-up latency under
publishing, and disconnect hygiene, driven through load-generator processes (bench.loadgen)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.context import SpawnContext
from typing import Any

from bench import loadgen, procstats
from bench.analysis import analyze, merge, timeline
from bench.loadgen import Spec
from bench.params import Params
from bench.progress import say
from bench.servers import Broker, Server


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
    server: Server,
    spec: Spec,
    p: Params,
    ctx: SpawnContext,
    redis_port: int,
    label: str,
    *,
    redis_pid: int | None = None,
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
        out["setup_errors"] = merge([r["errors"] for r in setup])
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
        idle_before = merge([r["counters"] for r in call_all(workers, "stats")])
        s_full = sampler.sample()
        # Wake-ups read apart from the samples, whose /metrics requests wake the server too.
        w0, tw0 = procstats.wakeups(server.pid), time.monotonic()
        time.sleep(p.idle_s)
        w1, tw1 = procstats.wakeups(server.pid), time.monotonic()
        s_idle = sampler.sample()
        idle_after = merge([r["counters"] for r in call_all(workers, "stats")])
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
        # What shares the two cores with the server meanwhile: Redis and the load generator.
        neighbours0 = _neighbours_cpu(redis_pid, [*workers, publisher])
        publisher.send("publish", n, p.rate, p.duration_s, p.pub_conns)
        samples = [sampler.sample()]
        deadline = time.monotonic() + p.duration_s + 90
        while not publisher.conn.poll(1.0):
            samples.append(sampler.sample())
            if time.monotonic() > deadline:
                raise TimeoutError("publisher did not finish")
        pub = publisher.recv()
        publish_steal = procstats.steal_pct(steal0, procstats.machine_steal())
        neighbours1 = _neighbours_cpu(redis_pid, [*workers, publisher])
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
        sweep_errors = merge([part["errors"] for part in swept])
        unread = {i for part in swept for i in part["failed"]}
        say(
            f"  {label}: read the queues of {len(unfinished)} waiters missing events"
            f" in {time.monotonic() - t_sweep:.1f} s"
            + (f" (failed reads: {sweep_errors})" if sweep_errors else "")
        )
        counters = merge([a["counters"] for a in after])
        counters_before = merge([b["counters"] for b in before])
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
                **neighbours_pct(neighbours0, neighbours1),
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


def _neighbours_cpu(redis_pid: int | None, workers: list[Worker]) -> dict[str, float]:
    """CPU seconds so far of Redis (if its pid is known) and of the load generator's
    processes, with the monotonic time they were read at."""
    out = {"t": time.monotonic()}
    out["loadgen"] = sum(
        procstats.cpu_seconds(w.proc.pid, tree=False) for w in workers if w.proc.pid is not None
    )
    if redis_pid is not None:
        out["redis"] = procstats.cpu_seconds(redis_pid, tree=False)
    return out


def neighbours_pct(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """`redis_cpu_pct` and `loadgen_cpu_pct` between two _neighbours_cpu() readings, in % of
    one core (the machine has os.cpu_count() of them)."""
    elapsed = after["t"] - before["t"]
    if elapsed <= 0:
        return {}
    return {
        f"{k}_cpu_pct": round((after[k] - before[k]) / elapsed * 100, 1)
        for k in ("redis", "loadgen")
        if k in before and k in after
    }


def later_waves(
    server: Server,
    spec: Spec,
    p: Params,
    ctx: SpawnContext,
    redis_port: int,
    waves: int,
    notes: list[str],
    scenario: Callable[..., dict[str, Any]] | None = None,
    rates: list[float] | None = None,
) -> list[dict[str, Any]]:
    """Waves 2 to `waves` of the long polls (`scenario`, long_poll_scenario's signature) on
    the same server process: new clients and queues each (their own Spec prefix), a wave
    starting only once the server holds at most 1% of the polls (else its ramp would count
    the last wave's). A wave that fails or cannot start ends the series with a note; the
    waves before it stand. `rates`: wave k publishes at rates[k - 2] events/s (`--rates`)."""
    run = scenario or long_poll_scenario
    limit = max(5, p.waiters // 100)  # as the vanish's "released"
    out: list[dict[str, Any]] = []
    for k in range(2, waves + 1):
        label = f"{spec.target} wave {k}"
        deadline = time.monotonic() + p.max_wait_s
        held = _held(server)
        while held is not None and held > limit and time.monotonic() < deadline:
            time.sleep(0.25)
            held = _held(server)
        if held is not None and held > limit:
            notes.append(f"{label} not run: the server still held {held} polls")
            break
        again = replace(spec, prefix=f"{spec.prefix}w{k}")
        pk = replace(p, rate=rates[k - 2]) if rates and k - 2 < len(rates) else p
        try:
            out.append(wave_summary(k, run(server, again, pk, ctx, redis_port, label)))
        except Exception as e:
            say(f"  {label}: FAILED: {type(e).__name__}: {e}")
            notes.append(f"{label} failed: {type(e).__name__}: {e}")
            break
    return out


def _held(server: Server) -> int | None:
    """The polls the server holds; None if it does not say (or cannot now: the wave that
    follows then fails on its own, with its note)."""
    with contextlib.suppress(Exception):
        return server.waiting()
    return None


def wave_summary(wave: int, r: dict[str, Any]) -> dict[str, Any]:
    """What a later wave of long polls is kept for: its memory from its start to its peak
    to after the vanish, whether its events were delivered once, and what went wrong."""
    w, h = r["wake"], r["hygiene"]
    kept = (
        "published_ok",
        "unrouted",
        "delivered",
        "late_1s",
        "stranded",
        "lost",
        "unverified",
        "duplicates",
        "misrouted",
        "unexpected",
        "publish_failures",
        "sweep_errors",
        "client_errors",
    )
    return {
        "wave": wave,
        "rss_start": h["rss_start"],
        "rss_before": h["rss_before"],
        "rss_after": h["rss_after"],
        "seconds_to_clear": h["seconds_to_clear"],
        "kb_per_waiter": r["idle"]["kb_per_waiter"],
        "waiting": r["idle"]["waiting"],
        "setup_errors": r.get("setup_errors", {}),
        "latency_ms": w["latency_ms"],
        "rate": w.get("rate"),
        # What the publisher reached: it waits for a free connection, so a saturated server
        # is offered less than the nominal rate.
        "achieved_rate": (w.get("publish") or {}).get("achieved_rate"),
        "cpu_pct": w.get("cpu_pct"),
        # The broker's Oxlin events and SETs apart (a SET is signed at publish).
        "latency_by_api_ms": w.get("latency_by_api_ms"),
        **{k: w.get(k) for k in kept},
    }
