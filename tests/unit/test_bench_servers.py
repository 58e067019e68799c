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
