"""Short polls measured in rounds paired with the trivial handler (bench/throughput.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench import report
from bench.loadgen import Publisher, Spec, stored
from bench.longpoll import neighbours_pct
from bench.params import QUICK
from bench.throughput import Throughput, paired_result, pooled


def run(rps: float, seconds: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {
        "tool": "wrk",
        "rps": rps,
        "requests": int(rps * seconds),
        "non_2xx_3xx": 0,
        "socket_errors": 0,
        "seconds": seconds,
        "server_cpu_pct": 90.0,
        "steal_pct": 0.0,
        "p50": "1ms",
        "p99": "3ms",
        **extra,
    }


def test_the_ratio_is_the_median_of_each_rounds_own_pair():
    # The machine halves its speed in the second round: both sides of that pair slow down,
    # and the pair's ratio is as good as the others'.
    rounds = [(run(1000), run(500)), (run(400), run(180)), (run(1000), run(600))]
    r = paired_result(rounds)
    assert r["vs_trivial"] == pytest.approx(0.5)  # of 0.5, 0.45 and 0.6
    assert r["rps"] == pytest.approx((500 + 180 + 600) / 3, abs=0.01)
    assert r["requests"] == 1280
    assert r["rounds_without_reference"] == 0
    assert r["rounds"] == [
        {"rps": 500, "trivial_rps": 1000},
        {"rps": 180, "trivial_rps": 400},
        {"rps": 600, "trivial_rps": 1000},
    ]


def test_pooled_readings_are_weighted_by_time_and_unknown_when_one_run_lacks_them():
    runs = [run(100, seconds=1.0, server_cpu_pct=50.0), run(100, seconds=3.0, server_cpu_pct=90.0)]
    assert pooled(runs)["server_cpu_pct"] == pytest.approx(80.0)
    runs[1]["steal_pct"] = None
    assert pooled(runs)["steal_pct"] is None


def test_measure_pairs_each_round_with_the_reference_first_then_last(tmp_path: Path):
    class Fake:
        pid = os.getpid()

        def __init__(self, port: int) -> None:
            self.port = port

    calls: list[int] = []
    rates = {1: [1000.0, 800.0], 2: [520.0, 400.0]}

    def fake_run(
        port: int, reqs: list[Any], seconds: float, conns: int, work: Path
    ) -> dict[str, Any]:
        calls.append(port)
        assert seconds == params.tput_round_s
        return run(rates[port].pop(0), seconds)

    params = dataclasses.replace(QUICK, tput_rounds=2)
    tp = Throughput(params, tmp_path, have_wrk=True)
    tp.run = fake_run  # type: ignore[assignment]
    tp.reference = (Fake(1), [])  # type: ignore[assignment]
    r = tp.measure(Fake(2), [])  # type: ignore[arg-type]
    assert calls == [1, 2, 2, 1]  # the order alternates: a steady drift cancels out
    assert r["vs_trivial"] == pytest.approx((0.52 + 0.5) / 2)
    assert tp.reference_result()["rps"] == pytest.approx(900.0)


def test_report_uses_the_paired_ratio_and_falls_back_for_older_results():
    paired = paired_result([(run(1000), run(500)), (run(500), run(300))])
    assert report.vs_trivial(paired, 10_000.0) == pytest.approx(0.55)
    assert report.vs_trivial({"rps": 2000.0}, 10_000.0) == pytest.approx(0.2)
    assert report.vs_trivial({"rps": 2000.0}, None) is None
    assert report.vs_trivial(None, 10_000.0) is None


def test_stored_reads_the_brokers_answer_to_a_publish():
    assert stored("oxlin", b'{"ids":["1"],"queues":1}')
    assert not stored("oxlin", b'{"ids":["1"],"queues":0}')
    assert stored("ob", b'{"jtis":["a"]}')
    skipped = b'{"jtis":[],"skipped":[{"index":0,"reason":"no_subscription"}]}'
    assert not stored("ob", skipped)


def test_the_report_names_failed_set_ups_and_the_publishes_they_turned_away():
    results = {
        "long_poll": {
            "broker": {
                "setup_errors": {"event-subscription 503": 26},
                "wake": {"unrouted": 66},
                "waves": [
                    {"wave": 2, "setup_errors": {}, "unrouted": 0},
                    {"wave": 3, "setup_errors": {}, "unrouted": 4},  # no set-up error named
                ],
            },
            "memlp": {"setup_errors": {}, "wake": {"unrouted": 0}},
        }
    }
    notes = report._setup_notes(results)
    assert len(notes) == 3 and notes[0] == ""
    assert "26 waiters failed to set up (event-subscription 503: 26)" in notes[1]
    assert "66 publishes were answered as not stored" in notes[1]
    assert notes[2].startswith("broker (1 worker, Redis), wave 3: 4 publishes were answered")
    assert "set up" not in notes[2]  # the cause is not guessed
    assert report._setup_notes({"long_poll": {"memlp": {"wake": {}}}}) == []


def test_the_method_line_says_how_the_ratios_were_paired():
    assert "3 rounds of 2 s each" in report._tput_method({"tput_rounds": 3, "tput_round_s": 2.0})
    assert "median" in report._tput_method({"tput_rounds": 3, "tput_round_s": 2.0})
    one = report._tput_method({"tput_rounds": 1, "tput_round_s": 1.0})
    assert one.startswith("one round of 1 s") and "median" not in one
    assert report._tput_method({"tput_s": 5.0}) == "5 s each"  # results from before pairing


def test_neighbours_cpu_is_a_share_of_one_core_over_the_elapsed_time():
    before = {"t": 10.0, "loadgen": 1.0, "redis": 2.0}
    after = {"t": 12.0, "loadgen": 1.5, "redis": 2.6}
    assert neighbours_pct(before, after) == {"redis_cpu_pct": 30.0, "loadgen_cpu_pct": 25.0}
    # Redis's pid unknown (not read): only the load generator
    assert neighbours_pct({"t": 1.0, "loadgen": 0.0}, {"t": 2.0, "loadgen": 0.5}) == {
        "loadgen_cpu_pct": 50.0
    }
    assert neighbours_pct(after, after) == {}


def test_the_report_lists_what_ran_beside_each_server_while_publishing():
    results = {
        "machine": {"cpus": 2},
        "long_poll": {
            "broker": {"wake": {"cpu_pct": 85.0, "redis_cpu_pct": 28.0, "loadgen_cpu_pct": 27.5}},
            "memlp": {"wake": {"cpu_pct": 41.0}},  # an older result: nothing said of it
        },
    }
    (blank, line) = report._neighbours(results)
    assert blank == ""
    assert "(2 in all)" in line
    assert "itself 85.0%, Redis 28.0%, the load generator 27.5%" in line
    assert "in-memory" not in line
    assert report._neighbours({"long_poll": {"memlp": {"wake": {}}}}) == []


async def test_a_publish_answered_as_not_stored_is_not_counted_as_published(
    aiohttp_server: Any, tmp_path: Path
):
    """Publisher.run against a stub broker: Oxlin waiters (even) get "queues": 0, OB ones
    (odd) "skipped"; none of them is an event the broker acknowledged."""
    answers = {
        "events": b'{"ids":["1"],"queues":0}',
        "sets": b'{"jtis":[],"skipped":[{"index":0,"reason":"no_subscription"}]}',
    }

    async def publish(request: web.Request) -> web.Response:
        return web.Response(status=202, body=answers[request.match_info["what"]])

    app = web.Application()
    app.router.add_post("/publish/{kind}/{who}/{what}", publish)
    server = await aiohttp_server(app)
    spec = Spec("broker", server.port, "t", data_dir=str(tmp_path), ob=True)
    pub = await Publisher(spec).run(n_waiters=10, rate=200.0, duration_s=0.1, conns=2)
    assert pub["attempted"] == 20
    assert pub["ok"] == [] and pub["unrouted"] == 20 and not pub["failures"]
    answers["events"] = b'{"ids":["1"],"queues":1}'  # stored: counted
    answers["sets"] = b'{"jtis":["a"]}'
    pub = await Publisher(spec).run(n_waiters=10, rate=200.0, duration_s=0.1, conns=2)
    assert len(pub["ok"]) == 20 and pub["unrouted"] == 0


def test_a_reference_round_that_measured_nothing_is_left_out_and_counted():
    r = paired_result([(run(0.0), run(500)), (run(1000), run(400))])
    assert r["vs_trivial"] == pytest.approx(0.4)
    assert r["rounds_without_reference"] == 1


def test_the_report_says_whether_the_short_polls_were_repeated_over_tcp():
    unix = {"broker_redis_transport": {"throughput": "unix"}}
    full = {**unix, "throughput": {"broker_oxlin_empty": {}, "broker_tcp_oxlin_empty": {}}}
    quick = {**unix, "throughput": {"broker_oxlin_empty": {}}}
    assert 'the rows "over TCP" repeat' in report._transport_note(full)[0]
    assert "did not repeat its short polls over TCP" in report._transport_note(quick)[0]
    tcp = {"broker_redis_transport": {"throughput": "tcp"}, "throughput": {}}
    assert report._transport_note(tcp) == []
