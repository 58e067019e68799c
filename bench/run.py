"""Benchmark runner for issue 4: `python -m bench.run [--quick]` (see bench/README.md).

One run measures, side by side on this machine, the broker (one worker process), an in-memory
aiohttp long-poll baseline, a trivial aiohttp handler and Nchan (nginx + libnginx-mod-nchan,
Redis-backed), all against one embedded Redis-compatible server started here. It writes
bench/results/<date>[-quick].json, .md and two PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson

from bench import loadgen, mixed, procstats, progress, report
from bench.loadgen import Issuer, Spec
from bench.longpoll import later_waves, long_poll_scenario
from bench.params import FULL, QUICK
from bench.progress import say
from bench.servers import (
    REPO,
    Baseline,
    Broker,
    Nchan,
    Server,
    ensure_tools,
    pin_servers,
    plan_cpus,
)
from bench.throughput import (
    ReqSpec,
    Throughput,
    broker_queues,
    drain_sets,
    json_req,
    ob_clients,
    preload_oxlin,
    publish_sets,
    pyjwt_ps256_rate,
    setup_requests,
)
from broker.config import sections as config_sections

RESULTS = REPO / "bench" / "results"


def has_ob_routes(broker: Broker) -> bool:
    """Whether this broker build serves OB polls and SET publishing (older commits did not)."""
    return broker.has_route("POST", "/events") and broker.has_route(
        "POST", "/publish/clients/x/sets"
    )


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every check included: a mistake stops the run before it starts.

    `rates` comes back as a list of floats, `broker_env` as a dict.
    """
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
    parser.add_argument(
        "--waves",
        type=int,
        default=1,
        help="run each target's long polls this many times on one server process (default 1):"
        " is the memory a wave of vanished clients leaves reused by the next?",
    )
    parser.add_argument(
        "--rates",
        help="after the first wave, one more wave per publish rate (events/s, comma-separated,"
        " e.g. 250,500,1500) on the same server process: where does one worker saturate?",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the kernel place every process (default: the server under test on the first"
        " CPU, Redis and the load generator on the others)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    parser.add_argument(
        "--broker-ref",
        help="bench the broker of this git commit (git archive into the work dir) instead of "
        "the working tree, e.g. HEAD",
    )
    args = parser.parse_args(argv)
    if args.waves < 1:
        parser.error("--waves takes 1 or more")
    args.rates = _rates(parser, args.rates)
    if args.rates and args.waves > 1:
        parser.error("--rates sets the waves itself (one per rate): leave out --waves")
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
    args.broker_env = extra_env
    return args


def _rates(parser: argparse.ArgumentParser, text: str | None) -> list[float]:
    if not text:
        return []
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        parser.error(f"--rates takes numbers separated by commas, not {text!r}")
    if not all(math.isfinite(r) and r > 0 for r in rates):
        parser.error(f"--rates takes finite rates above 0, not {text!r}")
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rates: list[float] = args.rates
    extra_env: dict[str, str] = args.broker_env
    p = QUICK if args.quick else FULL
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
    progress.restart()
    started = time.monotonic()
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
    placement = plan_cpus(not args.no_pin)
    if placement is not None:
        # The runner first: Redis, the load generator's processes and wrk inherit its CPUs.
        os.sched_setaffinity(0, placement[1])
        pin_servers(placement[0])

    results: dict[str, Any] = {
        "date": stamp.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "params": asdict(p),
        "broker_commit": commit + (" + uncommitted changes" if dirty else ""),
        "broker_env": extra_env,
        "cpu_placement": (
            {"servers": sorted(placement[0]), "others": sorted(placement[1])}
            if placement is not None
            else None
        ),
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
                    server,
                    spec,
                    p,
                    ctx,
                    redis.port,
                    name,
                    redis_pid=redis.process.pid if redis.process else None,
                )
                results["long_poll"][name]["waves"] = later_waves(
                    server,
                    spec,
                    p,
                    ctx,
                    redis.port,
                    1 + len(rates) if rates else args.waves,
                    notes,
                    rates=rates,
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
                r["idle"]["sleeper_cpu_pct"] = procstats.sleeper_cpu(rate, p.idle_s)
                say(
                    f"  {r['target']}: an event loop that only sleeps, waking {rate}/s: "
                    f"{r['idle']['sleeper_cpu_pct']}% CPU"
                )

        # scenario 3: poll throughput, and 4: SET throughput
        say("bench: throughput")
        tp = Throughput(p, work, have_wrk=not tools["wrk"])
        tput = results["throughput"]
        # The trivial handler stays up: each scenario's rounds are paired with rounds of it.
        trivial = start(Baseline(work, "trivial"))
        tp.reference = (trivial, [("GET", "/", {}, b"")])

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
        per_queue = math.ceil(30_000 * p.tput_scenario_s / q)  # more than one core can poll
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
        if redis.unix_socket and p.tput_tcp_repeat:
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
            say("bench: wake-ups beside SET batches")
            try:
                results["mixed"] = mixed.run(broker.port, issuer, p.mixed_s)
            except Exception as e:  # the rest of the run's results stand
                say(f"  wake-ups beside SET batches: FAILED: {type(e).__name__}: {e}")
                notes.append(f"wake-ups beside SET batches failed: {type(e).__name__}: {e}")
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
        stop(trivial)
        tput["trivial"] = tp.reference_result()
        for k, v in tput.items():
            vs = f" ({v['vs_trivial']:.1%} of trivial)" if v.get("vs_trivial") else ""
            say(f"  {k}: {v['rps']:.0f} req/s{vs}")
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
