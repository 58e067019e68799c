"""The benchmark's /proc readings: wake-ups, the sleeper reference, the hypervisor's steal."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench import procstats
from bench.procstats import sleeper_code, sleeper_cpu


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
        # Start-up (imports) out of the count: wait until it has begun to wake, which took
        # over a second on a virtual machine whose host took most of its CPU time.
        time.sleep(0.5)
        start = procstats.wakeups(proc.pid)
        deadline = time.monotonic() + 20
        while procstats.wakeups(proc.pid) < start + 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        first, t0 = procstats.wakeups(proc.pid), time.monotonic()
        time.sleep(2.0)
        rate = (procstats.wakeups(proc.pid) - first) / (time.monotonic() - t0)
        assert proc.poll() is None  # still running: the program is valid and loops
        # 20 a second; the slack below is for a machine whose host lends its CPUs away (6.4/s
        # seen once at 80% steal with a 1 s window), above for a wrong sleep interval.
        assert 5 <= rate <= 40
    finally:
        proc.kill()
        proc.wait()


def test_steal_is_the_stolen_share_of_the_time_the_machine_s_cpus_had():
    # 50 ticks stolen in 2 s of 2 CPUs: 12.5% of their time at 100 ticks/s (Linux's usual)
    expected = round(50 * 100 / (2.0 * procstats._TICK * 2), 1)
    assert procstats.steal_pct((10, 100.0), (60, 102.0), cpus=2) == expected
    assert procstats.steal_pct((10, 100.0), (10, 100.0)) is None  # no time passed: unknown
    assert procstats.steal_pct(None, (10, 100.0)) is None  # a reading failed: unknown
    now = procstats.machine_steal()  # this machine's, from /proc/stat
    assert now is not None and now[0] >= 0


def test_steal_is_read_from_the_cpu_line_s_eighth_number():
    # user nice system idle iowait irq softirq steal guest guest_nice
    assert procstats.steal_ticks("cpu  100 5 50 800 10 1 2 30 40 0\ncpu0 1 2 3\n") == 30
    assert procstats.steal_ticks("cpu  100 5 50 800 10 1 2\n") == 0  # a kernel without it
    assert procstats.steal_ticks("intr 1 2 3 4 5 6 7 8 9\n") == 0
