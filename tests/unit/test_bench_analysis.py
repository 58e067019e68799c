"""The benchmark kit's per-event accounting: delivered, stranded, unread (unverified), lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from bench import report
from bench.analysis import analyze
from bench.loadgen import Spec


def _pub(*pairs: tuple[int, int]) -> dict[str, object]:
    return {"ok": [list(p) for p in pairs], "attempted": len(pairs), "failures": {}, "unrouted": 0}


def test_undelivered_events_are_stranded_unverified_or_lost_by_what_the_sweep_saw():
    # events 1-4 for waiters 0-3; only event 1 arrives (1 ms late, at its own waiter)
    pub = _pub((0, 1), (1, 2), (2, 3), (3, 4))
    received = [(0, 1, 1_000_000, 0)]
    sweep = [(1, 2, 1)]  # the sweep found event 2 still stored in waiter 1's queue
    spec = Spec(target="memlp", port=0, prefix="t")
    w = analyze(pub, received, sweep, spec, unread={2})  # waiter 2's queue could not be read
    assert (w["delivered"], w["stranded"], w["unverified"], w["lost"]) == (1, 1, 1, 1)
    assert w["duplicates"] == w["misrouted"] == w["unexpected"] == 0
    # without failed reads, what is neither delivered nor found is lost, as before
    w = analyze(pub, received, sweep, spec)
    assert (w["stranded"], w["unverified"], w["lost"]) == (1, 0, 2)


def test_the_lost_column_shows_unread_events_beside_the_lost_ones():
    assert report._lost({"lost": 3, "unverified": 0}) == "3"
    assert report._lost({"lost": 0, "unverified": 156}) == "0 (+156 unread)"
    assert report._lost({"lost": 2}) == "2"  # results written before the split


def test_stolen_cpu_time_is_shown_when_it_was_read():
    assert report._stolen(None) == "" and report._pct(None) == "-"
    assert "gave 12.5% of the machine's CPU time to other guests" in report._stolen(12.5)
    assert report._pct(3.0) == "3.0%"


async def test_the_sweep_reports_the_queues_it_could_not_read(monkeypatch):
    """Found events come back with their reader; failed reads name their waiters."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from bench import loadgen

    served: dict[str, list[int]] = {"/q3": [200, 204]}
    seen: list[str] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path == "/q1":
            await asyncio.sleep(30)  # never answers within the sweep's limit
        if request.path == "/q2":
            return web.Response(status=500)
        if served.get(request.path) and served[request.path].pop(0) == 200:
            return web.Response(body=b'[{"resource": {"id": "BENCH.3.7.123"}}]')
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/{q}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    monkeypatch.setattr(loadgen, "SWEEP_LIMIT_S", 0.5)
    try:
        worker = loadgen.WaiterWorker(
            Spec(target="memlp", port=server.port or 0, prefix="t"), [0, 1, 2, 3, 4]
        )
        for w in worker.waiters:
            w.path = f"/q{w.i}"
        out = await worker.sweep([0, 1, 2, 3])  # waiter 4 missed nothing: not read
    finally:
        await server.close()
    assert out["found"] == [(3, 7, 3)]
    assert sorted(out["failed"]) == [1, 2]
    assert out["errors"] == {"TimeoutError": 1, "sweep 500": 1}
    assert "/q4" not in seen and seen.count("/q3") == 2  # read until it had nothing more


def _wave_run(start_mb: int, before_mb: int, after_mb: int, lost: int) -> dict[str, object]:
    mb = 2**20
    return {
        "idle": {"kb_per_waiter": 9.1, "waiting": 2000},
        "wake": {
            "latency_ms": {"p50": 0.8, "p90": 1.5, "p99": 4.0, "max": 9.0},
            "published_ok": 5000,
            "delivered": 5000 - lost,
            "stranded": 0,
            "lost": lost,
            "unverified": 0,
            "duplicates": 0,
        },
        "hygiene": {
            "rss_start": start_mb * mb,
            "rss_before": before_mb * mb,
            "rss_after": after_mb * mb,
            "seconds_to_clear": 0.6,
        },
    }


def test_later_waves_are_counted_from_the_memory_the_wave_before_left():
    from bench.longpoll import wave_summary

    results = {
        "long_poll": {
            "broker": {
                "waves": [
                    wave_summary(2, _wave_run(72, 90, 74, 0)),
                    wave_summary(3, _wave_run(74, 90, 74, 2)),
                ]
            },
            "memlp": {},
        }
    }
    rows = [line for line in report._waves(results) if line.startswith("| broker")]
    assert len(rows) == 2
    # no rate of their own (waves before --rates): "-"
    assert "| 2 | - | 72 MB |" in rows[0] and "+2 of +18 MB (11%)" in rows[0]
    assert "| 3 | - | 74 MB |" in rows[1] and "+0 of +16 MB (0%)" in rows[1]
    assert "4,998 / 5,000" in rows[1] and "| 2 |" in rows[1]  # lost events shown
    # a wave that grew by less than a MB (it reused what the last one left): no percentage
    mb = 2**20
    tiny = {"rss_start": 64 * mb, "rss_before": 64 * mb + mb // 4, "rss_after": 64 * mb + mb // 2}
    assert report._kept(tiny) == "+0.5 MB (it grew 0.2 MB)"
    # one wave (the default): no table at all
    assert report._waves({"long_poll": {"broker": {"waves": []}}}) == []


class _Server:
    """Holds `held` polls until asked `clears_after` times."""

    def __init__(self, held: int, clears_after: int = 0) -> None:
        self.held, self.asked, self.clears_after = held, 0, clears_after

    def waiting(self) -> int:
        self.asked += 1
        return 0 if self.asked > self.clears_after else self.held


def _later_waves(
    server: _Server, scenario: Callable[[int], dict[str, object]], waves: int = 3
) -> tuple[list[dict[str, object]], list[str], list[tuple[str, str]]]:
    from dataclasses import replace

    from bench.longpoll import later_waves
    from bench.params import QUICK

    p = replace(QUICK, waiters=2000, max_wait_s=2.0)
    notes: list[str] = []
    seen: list[tuple[str, str]] = []

    def run(srv: object, spec: Spec, params: object, ctx: object, port: int, label: str) -> Any:
        seen.append((spec.prefix, label))
        return scenario(len(seen))

    spec = Spec(target="broker", port=0, prefix="lpbr")
    out = later_waves(server, spec, p, None, 0, waves, notes, scenario=run)  # type: ignore[arg-type]
    return out, notes, seen


def test_each_later_wave_has_clients_and_queues_of_its_own():
    out, notes, seen = _later_waves(_Server(0), lambda k: _wave_run(70 + k, 90, 71 + k, 0))
    assert [prefix for prefix, _ in seen] == ["lpbrw2", "lpbrw3"]
    assert [label for _, label in seen] == ["broker wave 2", "broker wave 3"]
    assert [w["wave"] for w in out] == [2, 3] and notes == []

    # and their users, clients and channels do not collide with the first wave's
    def names(prefix: str) -> set[str]:
        s = Spec(target="broker", port=0, prefix=prefix)
        return {f(i) for i in range(3000) for f in (s.user, s.client_id, s.channel)}

    assert len(names("lpbr")) == 9000 and not names("lpbr") & names("lpbrw2")


def test_rates_give_each_later_wave_its_own_publish_rate_and_the_report_shows_it():
    from dataclasses import replace

    from bench.longpoll import later_waves
    from bench.params import QUICK

    p = replace(QUICK, waiters=2000, max_wait_s=2.0)
    asked: list[float] = []

    def run(srv: object, spec: Spec, params: Any, ctx: object, port: int, label: str) -> Any:
        asked.append(params.rate)
        r = _wave_run(70, 90, 71, 0)
        by_api = {"ob": {"p50": 2.0}, "oxlin": {"p50": 1.0}}
        r["wake"].update(rate=params.rate, cpu_pct=params.rate / 20, latency_by_api_ms=by_api)  # type: ignore[attr-defined]
        return r

    spec = Spec(target="broker", port=0, prefix="lpbr")
    notes: list[str] = []
    rates = [250.0, 1500.0]
    out = later_waves(_Server(0), spec, p, None, 0, 3, notes, scenario=run, rates=rates)  # type: ignore[arg-type]
    assert asked == rates and notes == []
    got = [(w["wave"], w["rate"], w["cpu_pct"]) for w in out]
    assert got == [(2, 250.0, 12.5), (3, 1500.0, 75.0)]
    assert out[0]["latency_by_api_ms"]["ob"]["p50"] == 2.0  # SETs and Oxlin events apart
    rows = [
        line
        for line in report._waves({"long_poll": {"broker": {"waves": out}}})
        if line.startswith("| broker")
    ]
    assert "| 2 | 250/s |" in rows[0] and "| 12.5% |" in rows[0]
    assert "| 3 | 1,500/s |" in rows[1] and "| 75.0% |" in rows[1]


def test_a_failed_wave_ends_the_series_and_keeps_the_waves_before_it():
    def scenario(k: int) -> dict[str, object]:
        if k == 2:
            raise TimeoutError("publisher did not finish")
        return _wave_run(70, 90, 71, 0)

    out, notes, seen = _later_waves(_Server(0), scenario, waves=4)
    assert [w["wave"] for w in out] == [2] and len(seen) == 2  # wave 4 never started
    assert notes == ["broker wave 3 failed: TimeoutError: publisher did not finish"]


def test_a_wave_waits_for_the_last_ones_polls_and_is_skipped_if_they_stay():
    server = _Server(held=1500, clears_after=2)  # released while the runner waits
    out, notes, _ = _later_waves(server, lambda k: _wave_run(70, 90, 71, 0), waves=2)
    assert len(out) == 1 and notes == [] and server.asked == 3
    out, notes, seen = _later_waves(_Server(held=1500, clears_after=10**6), lambda k: {}, 2)
    assert out == [] and seen == []
    assert notes == ["broker wave 2 not run: the server still held 1500 polls"]


def test_wake_ups_beside_set_batches_are_reported_in_one_paragraph():
    def phase(batch: int, p99: float, errors: dict[str, int]) -> dict[str, object]:
        lat = {"p50": 1.9, "p90": 2.5, "p99": p99, "max": 9.0}
        return {"batch": batch, "published": 400, "delivered": 400, "latency_ms": lat,
                "sets_per_s": 2630.4 if batch else 0.0, "errors": errors}  # fmt: skip

    mixed = {"users": 200, "rate": 100.0, "seconds": 4.0}
    lines = report._mixed({**mixed, "alone": phase(0, 3.5, {}), "batches": phase(100, 8.8, {})})
    text = "".join(lines)
    assert "alone 1.9 / 2.5 / 3.5 / 9 ms, 400 of 400 delivered;" in text
    assert "batches of 100 back to back (2,630 SETs/s) 1.9 / 2.5 / 8.8 / 9 ms" in text
    assert "errors" not in text
    bad = report._mixed(
        {**mixed, "alone": phase(0, 3.5, {}), "batches": phase(100, 9, {"sets_503": 2})}
    )
    assert "2 errors {'sets_503': 2}" in "".join(bad)
    assert report._mixed(None) == []  # runs before the scenario, or without OB


def test_rates_are_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]):
    from bench.run import parse_args

    assert parse_args(["--rates", "250,1500"]).rates == [250.0, 1500.0]
    assert parse_args([]).rates == []
    for argv, said in (
        (["--rates", "fast"], "numbers separated by commas"),
        (["--rates", "0,500"], "finite rates above 0"),
        (["--rates", "nan"], "finite rates above 0"),
        (["--rates", "500", "--waves", "2"], "leave out --waves"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert said in capsys.readouterr().err


def test_a_waves_rate_says_when_the_publisher_fell_short_and_older_waves_take_the_first():
    assert report._wave_rate({"rate": 1500.0, "achieved_rate": 1210.4}, None) == (
        "1,500/s (reached 1,210)"
    )
    assert report._wave_rate({"rate": 1500.0, "achieved_rate": 1490.0}, None) == "1,500/s"
    assert report._wave_rate({}, 1000.0) == "1,000/s"  # recorded before --rates: the first's
    assert report._wave_rate({}, None) == "-"


def test_a_publisher_that_fell_behind_is_named_with_what_it_reached():
    def target(achieved: float, lag_ms: float) -> dict[str, Any]:
        return {
            "wake": {
                "rate": 1000.0,
                "publish": {"achieved_rate": achieved, "max_schedule_lag_ms": lag_ms},
            }
        }

    results = {"long_poll": {"broker": target(898.2, 3401.0), "nchan": target(999.9, 9.0)}}
    (blank, line) = report._shortfall(results)
    assert blank == "" and line.startswith("broker (1 worker, Redis): the publisher reached 898")
    assert "of 1,000 events/s, up to 3.4 s behind" in line
    assert report._shortfall({"long_poll": {"nchan": target(999.9, 9.0)}}) == []
