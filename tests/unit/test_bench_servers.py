"""The benchmark kit reports an Nchan worker that crashed, instead of silently scoring it."""

from __future__ import annotations

from pathlib import Path

from bench.servers import Nchan

CRASH_LOG = """\
2026/11/21 14:03:30 [warn] 11126#11126: 60000 worker_connections exceed open file resource limit
ker process: ././src/store/redis/redis_nodeset.c:3615: nodeset_node_associate_pubsub_chanhead: \
Assertion `x == 0' failed.
2026/11/21 14:03:37 [alert] 11126#11126: worker process 11127 exited on signal 6
"""


def test_nchan_crashes_name_the_dead_worker_and_its_assertion(tmp_path: Path) -> None:
    nchan = Nchan(tmp_path, redis_port=6379, hold_s=30)
    nchan.dir.mkdir()
    (nchan.dir / "error.log").write_text(CRASH_LOG)
    assert nchan.crashes() == [
        "worker process 11127 exited on signal 6 (src/store/redis/redis_nodeset.c:3615: "
        "nodeset_node_associate_pubsub_chanhead: Assertion `x == 0' failed.)"
    ]


def test_nchan_without_a_crash_reports_none(tmp_path: Path) -> None:
    nchan = Nchan(tmp_path, redis_port=6379, hold_s=30)
    assert nchan.crashes() == []  # no log at all
    nchan.dir.mkdir()
    (nchan.dir / "error.log").write_text(CRASH_LOG.splitlines()[0] + "\n")
    assert nchan.crashes() == []


def test_an_assertion_is_blamed_only_for_the_first_death_after_it(tmp_path: Path) -> None:
    nchan = Nchan(tmp_path, redis_port=6379, hold_s=30)
    nchan.dir.mkdir()
    later = "2026/11/21 14:05:00 [alert] 11126#11126: worker process 11200 exited on signal 9\n"
    (nchan.dir / "error.log").write_text(CRASH_LOG + later)
    first, second = nchan.crashes()
    assert "Assertion" in first
    assert second == "worker process 11200 exited on signal 9"


def test_a_new_nchan_on_the_same_directory_starts_a_fresh_log(tmp_path: Path) -> None:
    nchan = Nchan(tmp_path, redis_port=6379, hold_s=30)
    nchan.dir.mkdir()
    (nchan.dir / "error.log").write_text(CRASH_LOG)
    nchan.command()  # what start() runs before nginx opens its log
    assert nchan.crashes() == []


def test_pinning_puts_servers_on_the_first_cpu_and_the_rest_on_the_others(monkeypatch) -> None:
    from bench import servers

    monkeypatch.setattr("bench.servers.os.sched_getaffinity", lambda _pid: {3, 1, 2})
    assert servers.plan_cpus(True) == ({1}, {2, 3})
    assert servers.plan_cpus(False) is None  # --no-pin
    monkeypatch.setattr("bench.servers.os.sched_getaffinity", lambda _pid: {0})
    assert servers.plan_cpus(True) is None  # one CPU: nothing to separate


def test_a_pinned_server_process_runs_on_the_servers_cpus(tmp_path: Path) -> None:
    import os
    import sys

    from bench import servers

    class Probe(servers.Server):
        name = "probe"

        def command(self) -> list[str]:
            # A server that answers /healthz with the CPUs it may run on.
            return [
                sys.executable,
                "-c",
                "import http.server, os\n"
                "class H(http.server.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        body = repr(sorted(os.sched_getaffinity(0))).encode()\n"
                "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
                f"http.server.HTTPServer(('127.0.0.1', {self.port}), H).serve_forever()\n",
            ]

    mine = sorted(os.sched_getaffinity(0))
    servers.pin_servers({mine[-1]})
    probe = Probe(tmp_path)
    try:
        probe.start()
        assert servers.http_get(probe.port, "/healthz")[1] == repr([mine[-1]]).encode()
    finally:
        probe.stop()
        servers.pin_servers(None)
    assert sorted(os.sched_getaffinity(0)) == mine  # the runner itself is left alone


def test_the_report_says_where_the_processes_ran() -> None:
    from bench.report import _placement

    assert _placement(None) == ", placed by the kernel"  # older results, and --no-pin
    text = _placement({"servers": [0], "others": [1]})
    assert "server under test on CPU 0" in text and "load generator on CPU 1" in text
