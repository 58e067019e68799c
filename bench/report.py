"""Results of a run: the JSON, a Markdown report with the issue-4 targets, and two PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = {
    "broker": "broker (1 worker, Redis)",
    "memlp": "in-memory aiohttp long poll",
    "nchan": "Nchan + Redis (1 nginx worker)",
}
MB = 1024 * 1024


def write(results: dict[str, Any], base: Path) -> list[Path]:
    files = [base.with_suffix(".json"), base.with_suffix(".md")]
    results["targets"] = check_targets(results)
    plots = plot(results, base)
    results["plots"] = [p.name for p in plots]
    files[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    files[1].write_text(markdown(results))
    return files + plots


def _lp(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = results["long_poll"].get(name)
    return r if r and "error" not in r else None


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each issue-4 target: what was measured on the broker, and whether it is met."""
    rows: list[dict[str, Any]] = []

    def row(name: str, measured: Any, target: str, met: bool | None) -> None:
        rows.append({"target": name, "measured": measured, "goal": target, "met": met})

    b = _lp(results, "broker")
    p = results["params"]
    if b is None:
        row("long-poll scenarios", "broker run failed or skipped", "", None)
    else:
        idle, wake, hy = b["idle"], b["wake"], b["hygiene"]
        n = b["waiters"]
        row(
            f"1. memory per idle waiter ({n:,} waiters)",
            f"{idle['kb_per_waiter']} KB",
            "<= 12 KB",
            idle["kb_per_waiter"] <= 12,
        )
        conns = max(idle["redis_conns"], wake["redis_conns_max"])
        row("1. Redis connections (idle, and max during the run)", conns, "<= 4", conns <= 4)
        measured = f"{idle['cpu_pct']}% of a core"
        if "wakeups_per_s" in idle:  # older results lack these
            measured += f" ({idle['wakeups_per_s']} wake-ups/s"
            if "sleeper_cpu_pct" in idle:
                measured += (
                    f"; an event loop that only sleeps, waking as often, is charged"
                    f" {idle['sleeper_cpu_pct']}% on this machine"
                )
            measured += ")"
        row("1. CPU while idle", measured, "near 0 (<= 2%)", idle["cpu_pct"] <= 2)
        lat = wake["latency_ms"]
        row(
            f"2. publish-to-response p50 ({p['rate']:.0f}/s for {p['duration_s']:.0f} s)",
            f"{lat.get('p50')} ms",
            "<= 1 ms",
            lat.get("p50", 1e9) <= 1,
        )
        row(
            "2. publish-to-response p99",
            f"{lat.get('p99')} ms",
            "<= 3 ms",
            lat.get("p99", 1e9) <= 3,
        )
        bad = {
            ("unread" if k == "unverified" else k): wake[k]
            for k in (
                "lost",
                "unverified",
                "stranded",
                "duplicates",
                "misrouted",
                "late_1s",
                "unexpected",
            )
            if wake.get(k)
        }
        fails = sum(wake["publish_failures"].values()) if wake["publish_failures"] else 0
        unstored = wake.get("unrouted", 0)
        row(
            "2. every event delivered exactly once, none lost, unread or stranded",
            f"{wake['delivered']:,}/{wake['published_ok']:,} delivered"
            + (f"; {bad}" if bad else "")
            + (f"; {fails} publishes failed" if fails else "")
            + (f"; {unstored} publishes answered as not stored" if unstored else ""),
            "all, once",
            not bad and wake["delivered"] == wake["published_ok"] and not fails and not unstored,
        )
        clear = hy["seconds_to_clear"]
        row(
            "5. vanished clients: waiters and connections released",
            f"{clear} s" if clear is not None else "not within the deadline",
            f"<= poll.max_wait_s ({hy['deadline_s']:.0f} s)",
            clear is not None and clear <= hy["deadline_s"],
        )
        grown = hy["rss_before"] - hy["rss_start"]
        kept = hy["rss_after"] - hy["rss_start"]
        row(
            "5. memory back near baseline after they vanish",
            f"{kept / MB:+.1f} MB vs start (peak {grown / MB:+.1f} MB)",
            "<= 25% of the peak growth kept",
            grown <= 0 or kept <= 0.25 * grown,
        )
        row(
            "5. Redis connections after they vanish",
            hy["redis_conns_after"],
            "<= 4",
            hy["redis_conns_after"] <= 4,
        )
    t = results["throughput"]
    triv = t.get("trivial", {}).get("rps")
    via = {"unix": ", Redis over its Unix socket", "tcp": ", Redis over TCP"}.get(
        results.get("broker_redis_transport", {}).get("throughput", ""), ""
    )
    for key, label in (
        ("broker_oxlin_nonempty", f"3. short polls, non-empty queues (Oxlin{via})"),
        ("broker_oxlin_empty", f"3. short polls, empty queues (Oxlin{via})"),
        ("broker_ob_nonempty", f"3. short polls, non-empty (OB POST /events{via})"),
        ("broker_ob_empty", f"3. short polls, empty (OB POST /events{via})"),
        ("broker_tcp_oxlin_nonempty", "3. the same over TCP: non-empty (Oxlin)"),
        ("broker_tcp_oxlin_empty", "3. the same over TCP: empty (Oxlin)"),
        ("broker_tcp_ob_nonempty", "3. the same over TCP: non-empty (OB)"),
        ("broker_tcp_ob_empty", "3. the same over TCP: empty (OB)"),
    ):
        ratio = vs_trivial(t.get(key), triv)
        if ratio is not None:
            row(
                label,
                f"{t[key]['rps']:,.0f} req/s = {ratio:.1%} of trivial",
                ">= 50%",
                ratio >= 0.5,
            )
    s = results.get("sets", {})
    if s.get("available") is False:
        row(
            "4. SET signing and delivery",
            "not available (OB endpoints not in this build)",
            "",
            None,
        )
    elif s:
        ref = s["pyjwt_ps256_per_s"]
        pub = s["publish"]["sets_per_s"]
        row(
            "4. publish with PS256 signing",
            f"{pub:,.0f} SETs/s = {pub / ref:.0%} of pyjwt ({ref:,.0f}/s)",
            ">= 80%",
            pub >= 0.8 * ref,
        )
        d = s["deliver"]
        row(
            "4. POST /events maxEvents 100 + acks",
            f"{d['sets_per_s']:,.0f} SETs/s",
            ">= 30,000 SETs/s",
            d["sets_per_s"] >= 30_000,
        )
    return rows


def _fmt_lat(lat: dict[str, Any]) -> str:
    if not lat:
        return "-"
    return f"{lat['p50']} / {lat['p90']} / {lat['p99']} / {lat['max']:.0f}"


def _transport_note(results: dict[str, Any]) -> list[str]:
    """How the broker reached Redis for its short polls, and whether they were repeated."""
    if results.get("broker_redis_transport", {}).get("throughput") != "unix":
        return []
    repeated = any(k.startswith("broker_tcp_") for k in results["throughput"])
    how = (
        'the rows "over TCP" repeat its polls over TCP loopback, as the long polls above ran.'
        if repeated
        else "this run did not repeat its short polls over TCP (full runs do)."
    )
    return [
        "The broker reaches Redis over its Unix socket here (as `serve` does with its "
        f"embedded server); {how}",
        "",
    ]


def _placement(placement: dict[str, list[int]] | None) -> str:
    if not placement:
        return ", placed by the kernel"
    return (
        f": each server under test on CPU {', '.join(map(str, placement['servers']))}, Redis and"
        f" the load generator on CPU {', '.join(map(str, placement['others']))}"
    )


def markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    m = results.get("machine", {})
    out = [
        f"## Benchmark results {results['date']} ({results['mode']} run)",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), Linux {m.get('kernel')}, "
        f"Python {m.get('python')}, aiohttp {m.get('aiohttp')}, uvloop {m.get('uvloop', '-')}, "
        f"{m.get('redis_server', 'Redis ?')}"
        + (f", nginx {m['nginx']} + nchan {m['nchan']}" if m.get("nginx") else "")
        + ". Load generator, servers and Redis share the machine"
        + _placement(results.get("cpu_placement"))
        + "."
        + _stolen(m.get("steal_pct")),
        "",
        f"Broker: commit {results.get('broker_commit', '?')}{_process(results)}.",
        "",
        f"Long polls: {p['waiters']:,} waiters, each on its own queue/channel; then "
        f"{p['rate']:.0f} publishes/s to random waiters for {p['duration_s']:.0f} s. A "
        f"waiter's first poll asks for {p['max_wait_s']:.0f} s, later ones "
        f"{p['wait_s'] * (1 - p['jitter']):.0f}-{p['wait_s']:.0f} s (Nchan: a "
        f"{p['max_wait_s']:.0f} s subscriber timeout); clients re-poll at once, so time-outs "
        "happen during the run. Then every client vanishes (TCP reset). Lost: not delivered "
        "by the end of the drain and not found by an immediate read afterwards"
        + (
            " (unread: that read failed or got no answer)."
            if any("unverified" in (r.get("wake") or {}) for r in results["long_poll"].values())
            else "."
        ),
        "",
        "| target | KB / waiter | Redis conns | idle CPU | latency p50 / p90 / p99 / max (ms) "
        "| CPU publishing | delivered | late >1 s | stranded | lost | dup | vanish → released "
        "| RSS kept after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("broker", "memlp", "nchan"):
        r = results["long_poll"].get(name)
        if r is None:
            continue
        if "error" in r:
            out.append(f"| {LABELS[name]} | failed: {r['error']} |||||||||||")
            continue
        i, w, h = r["idle"], r["wake"], r["hygiene"]
        conns = "-" if name == "memlp" else f"{i['redis_conns']} / {w['redis_conns_max']}"
        out.append(
            f"| {LABELS[name]} | {i['kb_per_waiter']} | {conns} | {i['cpu_pct']}% | "
            f"{_fmt_lat(w['latency_ms'])} | {w.get('cpu_pct', '?')}%"
            + (f" (machine: {w['steal_pct']}% stolen)" if w.get("steal_pct") is not None else "")
            + " | "
            f"{w['delivered']:,} / {w['published_ok']:,} | "
            f"{w['late_1s']} | {w['stranded']} | {_lost(w)} | {w['duplicates']} | "
            f"{h['seconds_to_clear']} s | {_kept(h)} |"
        )
    out += _setup_notes(results)
    out += _shortfall(results)
    out += _neighbours(results)
    by_api = ((results["long_poll"].get("broker") or {}).get("wake") or {}).get("latency_by_api_ms")
    if by_api and len(by_api) > 1:
        # Half the broker's waiters are OB: their events are SETs, signed (PS256) at publish.
        parts = [f"{api} {_fmt_lat(lat)}" for api, lat in sorted(by_api.items())]
        out += ["", "Broker latency by API, p50 / p90 / p99 / max (ms): " + "; ".join(parts) + "."]
    out += _waves(results)
    # Runs before the kit read the hypervisor's steal have no such column.
    stolen = any("steal_pct" in r for r in results["throughput"].values())
    out += [
        "",
        "Short polls (wrk, "
        f"{p['tput_conns']} connections over {p['tput_queues']} queues, {_tput_method(p)}):",
        "",
        "| scenario | req/s | vs trivial aiohttp | server CPU |" + (" stolen |" if stolen else ""),
        "|---|---|---|---|" + ("---|" if stolen else ""),
    ]
    out[-2:-2] = _transport_note(results)
    t = results["throughput"]
    triv = t.get("trivial", {}).get("rps") or 0
    names = {
        "trivial": "trivial aiohttp handler (204)",
        "broker_oxlin_nonempty": "broker GET /queues/{id}, non-empty (1 event each)",
        "broker_oxlin_empty": "broker GET /queues/{id}, empty (204)",
        "broker_ob_nonempty": "broker POST /events, non-empty (1 SET each)",
        "broker_ob_empty": "broker POST /events, empty",
        "broker_tcp_oxlin_nonempty": "broker over TCP, GET /queues/{id}, non-empty (1 event each)",
        "broker_tcp_oxlin_empty": "broker over TCP, GET /queues/{id}, empty",
        "broker_tcp_ob_nonempty": "broker over TCP, POST /events, non-empty",
        "broker_tcp_ob_empty": "broker over TCP, POST /events, empty",
        "memlp_nonempty": "in-memory aiohttp, non-empty",
        "memlp_empty": "in-memory aiohttp, empty",
        "nchan_nonempty": "Nchan intervalpoll, from its buffer",
        "nchan_empty": "Nchan intervalpoll, empty (304)",
    }
    for key, r in sorted(t.items(), key=lambda kv: kv[0] != "trivial"):
        extra = ""
        if r.get("non_2xx_3xx") or r.get("socket_errors"):
            extra = f" ({r.get('non_2xx_3xx')} non-2xx, {r.get('socket_errors')} socket errors)"
        if "events_per_poll" in r:
            extra += f" ({r['events_per_poll']} events/poll)"
        ratio = _ratio_cell(r, triv) if key != "trivial" else "100%"
        out.append(
            f"| {names.get(key, key)}{extra} | {r['rps']:,.0f} | {ratio} | "
            f"{r.get('server_cpu_pct', '-')}% |"
            + (f" {_pct(r.get('steal_pct'))} |" if stolen else "")
        )
    s = results.get("sets", {})
    out.append("")
    if s.get("available") is False:
        out.append(
            f"SETs: OB endpoints not available in this build (pyjwt PS256 reference: "
            f"{s['pyjwt_ps256_per_s']:,.0f} signatures/s on one core)."
        )
    elif s:
        pub, d = s["publish"], s["deliver"]
        out.append(
            f"SETs: publish {pub['sets']:,} SETs (batches of 100, PS256): "
            f"{pub['sets_per_s']:,.0f}/s ({pub['sets_per_cpu_s']:,.0f} per broker CPU-second; "
            f"pyjwt alone signs {s['pyjwt_ps256_per_s']:,.0f}/s on one core). "
            f"Delivery with POST /events maxEvents 100 + acks: {d['sets_per_s']:,.0f} SETs/s "
            f"({d['delivered']:,} delivered, {d['duplicates']} duplicates)."
        )
    out += _mixed(results.get("mixed"))
    out += [
        "",
        "Issue-4 targets (broker):",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for r in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        out.append(f"| {r['target']} | {r['measured']} | {r['goal']} | {met} |")
    if results.get("notes"):
        out += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    if results.get("plots"):
        out += [""] + [f"![{p}]({p})" for p in results["plots"]]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], base: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.setdefault("notes", []).append("matplotlib missing: no plots")
        return []
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("broker", "memlp", "nchan"):
        r = _lp(results, name)
        if r is None or not r["wake"]["cdf"]:
            continue
        xs = [max(x, 1e-3) for x, _f in r["wake"]["cdf"]]
        ys = [f for _x, f in r["wake"]["cdf"]]
        ax.plot(xs, ys, label=LABELS[name])
    ax.set_xscale("log")
    ax.set_xlabel("publish-to-response latency (ms, log)")
    ax.set_ylabel("fraction of events")
    p = results["params"]
    ax.set_title(
        f"Wake-up latency: {p['waiters']:,} waiters, {p['rate']:.0f} publishes/s "
        f"({results['mode']})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    f = base.with_name(base.name + "-latency-cdf.png")
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("broker", "memlp", "nchan"):
        r = _lp(results, name)
        if r is None:
            continue
        start = r["idle"]["rss_start"]
        curve = r["idle"]["curve"]
        ax.plot(
            [0] + [c["waiters"] for c in curve],
            [0] + [(c["rss"] - start) / MB for c in curve],
            marker="o",
            label=LABELS[name],
        )
    ax.set_xlabel("waiting long polls")
    ax.set_ylabel("server RSS growth (MB)")
    ax.set_title(f"Memory vs waiters ({results['mode']})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    f = base.with_name(base.name + "-memory.png")
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f)
    return files


def _process(results: dict[str, Any]) -> str:
    info = results.get("broker_process") or {}
    parts = [f"{k} {info[k]}" for k in ("allocator", "loop") if info.get(k)]
    parts += [f"{k}={v}" for k, v in (results.get("broker_env") or {}).items()]
    return f" ({', '.join(parts)})" if parts else ""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value}%"


def _stolen(pct: float | None) -> str:
    """The machine line's note of CPU time the hypervisor gave to other guests."""
    if pct is None:
        return ""
    return (
        f" Over the run the hypervisor gave {pct}% of the machine's CPU time to other guests"
        " (steal, /proc/stat; per scenario in the tables)."
    )


def _lost(w: dict[str, Any]) -> str:
    """Lost events, and beside them those whose queue could not be read afterwards."""
    unread = w.get("unverified", 0)
    return f"{w['lost']}" + (f" (+{unread} unread)" if unread else "")


def _mixed(m: dict[str, Any] | None) -> list[str]:
    """Wake-ups alone and beside a producer's SET batches (bench/mixed.py), one paragraph."""
    if not m:
        return []

    def phase(r: dict[str, Any]) -> str:
        errors = sum(r["errors"].values())
        return (
            f"{_fmt_lat(r['latency_ms'])} ms, {r['delivered']:,} of {r['published']:,} delivered"
            + (f", {errors} errors {r['errors']}" if errors else "")
        )

    alone, batches = m["alone"], m["batches"]
    return [
        "",
        f"Wake-ups beside SET batches ({m['users']} Oxlin long polls, {m['rate']:g} events/s"
        f" for {m['seconds']:g} s, p50 / p90 / p99 / max): alone {phase(alone)}; while a"
        f" producer publishes SETs in batches of {batches['batch']} back to back"
        f" ({batches['sets_per_s']:,.0f} SETs/s) {phase(batches)}.",
    ]


def _waves(results: dict[str, Any]) -> list[str]:
    """Later waves of long polls on the same server process (`--waves`), one row each."""
    rows = []
    for name in ("broker", "memlp", "nchan"):
        first = (results["long_poll"].get(name) or {}).get("wake") or {}
        for w in (results["long_poll"].get(name) or {}).get("waves") or []:
            rate = _wave_rate(w, first.get("rate") or results.get("params", {}).get("rate"))
            cpu = f"{w['cpu_pct']}%" if w.get("cpu_pct") is not None else "-"
            rows.append(
                f"| {LABELS[name]} | {w['wave']} | {rate} | {w['rss_start'] / 2**20:.0f} MB | "
                f"{w['kb_per_waiter']} | {_fmt_lat(w['latency_ms'])} | {cpu} | "
                f"{w['delivered']:,} / {w['published_ok']:,} | {w['stranded']} | {_lost(w)} | "
                f"{w['duplicates']} | {w['seconds_to_clear']} s | {_kept(w)} |"
            )
    if not rows:
        return []
    return [
        "",
        "Later waves on the same server process (`--waves`, or `--rates`: one wave per publish"
        " rate): new clients and queues, the same steps; memory is counted from the RSS each"
        " wave starts at, what the last one left.",
        "",
        "| target | wave | publishes | RSS at start | KB / waiter "
        "| latency p50 / p90 / p99 / max (ms) | CPU publishing "
        "| delivered | stranded | lost | dup | vanish → released | RSS kept after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _wave_rate(w: dict[str, Any], first_rate: float | None) -> str:
    """A later wave's publish rate, and what the publisher reached when it fell short.

    Waves from before --rates did not record theirs: it was the first wave's.
    """
    rate = w.get("rate") or first_rate
    if not rate:
        return "-"
    out = f"{rate:,g}/s"
    got = w.get("achieved_rate")
    if got and got < 0.95 * rate:
        out += f" (reached {got:,.0f})"
    return out


def _kept(h: dict[str, Any]) -> str:
    """RSS after the vanish against the start, as a share of the peak growth."""
    grown = h["rss_before"] - h["rss_start"]
    kept = h["rss_after"] - h["rss_start"]
    if grown <= 0:
        return "-"
    if grown < 2**20:  # a later wave that reused what the last one left: no share to speak of
        return f"{kept / 2**20:+.1f} MB (it grew {grown / 2**20:.1f} MB)"
    return f"+{kept / 2**20:.0f} of +{grown / 2**20:.0f} MB ({kept / grown:.0%})"


def vs_trivial(r: dict[str, Any] | None, trivial_rps: float | None) -> float | None:
    """A short-poll scenario's rate as a share of the trivial handler's: the median of its
    paired rounds (bench/throughput.py), or, in results from before the pairing, against
    the one trivial measurement of the run."""
    if not r:
        return None
    if r.get("vs_trivial") is not None:
        return float(r["vs_trivial"])
    return r["rps"] / trivial_rps if trivial_rps else None


def _ratio_cell(r: dict[str, Any], trivial_rps: float) -> str:
    ratio = vs_trivial(r, trivial_rps)
    if ratio is None:
        return "-"
    rounds = [x["rps"] / x["trivial_rps"] for x in r.get("rounds", []) if x["trivial_rps"]]
    if len(rounds) < 2:
        return f"{ratio:.0%}"
    return f"{ratio:.1%} (rounds {min(rounds):.0%}-{max(rounds):.0%})"


def _tput_method(p: dict[str, Any]) -> str:
    if "tput_rounds" not in p:  # results from before the pairing
        return f"{p['tput_s']:.0f} s each"
    n, secs = p["tput_rounds"], f"{p['tput_round_s']:g} s"
    if n == 1:
        return f"one round of {secs}, right after one of the trivial handler, its ratio to it"
    return (
        f"{n} rounds of {secs} each, every round beside one of the trivial handler (after it,"
        " then before it, in turn); "
        "vs trivial: the median of the rounds' ratios"
    )


def _setup_notes(results: dict[str, Any]) -> list[str]:
    """Waiters whose set-up failed, and the publishes that reached them: the broker answered
    those as not stored (no live queue, or no event subscription), so they are counted
    neither as published nor as lost."""
    notes = []
    for name, r in results["long_poll"].items():
        runs = [(LABELS.get(name, name), r.get("setup_errors"), (r.get("wake") or {}))]
        runs += [
            (f"{LABELS.get(name, name)}, wave {w['wave']}", w.get("setup_errors"), w)
            for w in r.get("waves") or []
        ]
        for label, errors, wake in runs:
            errors = errors or {}
            unstored = wake.get("unrouted") or 0
            if not errors and not unstored:
                continue
            failed = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
            note = f"{label}: "
            if errors:
                note += f"{sum(errors.values())} waiters failed to set up ({failed})"
            if unstored:
                note += "; " if errors else ""
                # Oxlin: no live queue took it; OB: listed under "skipped" (no subscription).
                note += (
                    f"{unstored} publishes were answered as not stored (no live queue or no"
                    " event subscription) and are not counted as published"
                )
            notes.append(note + ".")
    return ["", *notes] if notes else []


def _shortfall(results: dict[str, Any]) -> list[str]:
    """Targets whose publisher fell behind its schedule in the first wave.

    The publisher waits for a free connection, so a server slower to answer its publishes
    than they fall due is offered less than the nominal rate; latencies run from each
    publish's actual send, so the queueing before it is not in them.
    """
    notes = []
    for name, r in results["long_poll"].items():
        wake = r.get("wake") or {}
        pub = wake.get("publish") or {}
        rate, got = wake.get("rate"), pub.get("achieved_rate")
        if rate and got and got < 0.95 * rate:
            lag = pub.get("max_schedule_lag_ms") or 0
            notes.append(
                f"{LABELS.get(name, name)}: the publisher reached {got:,.0f} of {rate:,g}"
                f" events/s, up to {lag / 1000:.1f} s behind its schedule (the server answered"
                " publishes more slowly than they fell due: offered less than the nominal load,"
                " and the wait before each send is not in the latencies)."
            )
    return ["", *notes] if notes else []


def _neighbours(results: dict[str, Any]) -> list[str]:
    """What else ran on the machine's cores while each target's events were published."""
    parts = []
    for name, r in results["long_poll"].items():
        w = r.get("wake") or {}
        if "loadgen_cpu_pct" not in w:  # results from before the kit read it
            continue
        redis = f"Redis {w['redis_cpu_pct']}%, " if "redis_cpu_pct" in w else ""
        parts.append(
            f"{LABELS.get(name, name)}: itself {w.get('cpu_pct', '?')}%, {redis}"
            f"the load generator {w['loadgen_cpu_pct']}%"
        )
    if not parts:
        return []
    cpus = results.get("machine", {}).get("cpus", "?")
    return [
        "",
        f"CPU while publishing, in % of one core ({cpus} in all): " + "; ".join(parts) + ".",
    ]
