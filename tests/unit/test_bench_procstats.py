"""The benchmark's /proc readings: wake-ups, the sleeper reference, the hypervisor's steal."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench import procstats
from bench.run import sleeper_code, sleeper_cpu


def test_wakeups_count_a_process_going_to_sleep_and_waking():
    # The child blocks on its stdin until told: its count is read before any of its sleeps.
    code = "import sys, time\nsys.stdin.readline()\nfor _ in range(30): time.sleep(0.01)\n"
    code += "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        time.sleep(0.3)
        first = procstats.wakeups(proc.pid)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while procstats.wakeups(proc.pid) < first + 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procstats.wakeups(proc.pid) >= first + 30  # each time.sleep is one at least
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()


def test_wakeups_of_a_process_that_is_gone_are_zero():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procstats.wakeups(proc.pid) == 0


def test_the_sleeper_reference_is_its_cpu_time_over_the_window_in_percent(
    monkeypatch: pytest.MonkeyPatch,
):
    readings = iter([1.0, 1.05])  # 50 ms of CPU over the 0.5 s window: 10% of a core
    monkeypatch.setattr(procstats, "cpu_seconds", lambda _pid: next(readings))
    pct = sleeper_cpu(20, 0.5)
    assert 9.0 <= pct <= 10.0  # the window is a little longer than asked, never shorter


def test_the_sleeper_wakes_about_as_often_as_asked():
    proc = subprocess.Popen([sys.executable, "-c", sleeper_code(20)])
    try:
        time.sleep(1.0)  # start-up (imports) out of the count
        first, t0 = procstats.wakeups(proc.pid), time.monotonic()
        time.sleep(1.0)
        rate = (procstats.wakeups(proc.pid) - first) / (time.monotonic() - t0)
        assert proc.poll() is None  # still running: the program is valid and loops
        assert 10 <= rate <= 40  # 20 a second, with slack for a loaded machine
    finally:
        proc.kill()
        proc.wait()


def test_steal_is_the_share_of_the_machine_s_cpu_time_given_away():
    assert procstats.steal_pct((10, 1000), (60, 2000)) == 5.0
    assert procstats.steal_pct((10, 1000), (10, 1000)) is None  # no time passed: unknown
    steal, total = procstats.machine_cpu()  # this machine's, read from /proc/stat
    assert total > 0 and 0 <= steal <= total
    later = procstats.machine_cpu()
    assert later[1] >= total and later[0] >= steal
