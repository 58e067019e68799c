"""The benchmark's /proc readings that judge idle CPU: wake-ups, and the sleeper reference."""

from __future__ import annotations

import subprocess
import sys
import time

from bench import procstats
from bench.run import sleeper_cpu


def test_wakeups_count_a_process_going_to_sleep_and_waking():
    code = "import time\nfor _ in range(30): time.sleep(0.01)\ntime.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.05)
        first = procstats.wakeups(proc.pid)
        deadline = time.monotonic() + 10
        while procstats.wakeups(proc.pid) < first + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        # each time.sleep is one voluntary switch at least; the start-up adds some of its own
        assert procstats.wakeups(proc.pid) >= first + 20
    finally:
        proc.kill()
        proc.wait()


def test_wakeups_of_a_process_that_is_gone_are_zero():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procstats.wakeups(proc.pid) == 0


def test_the_sleeper_reference_is_a_share_of_one_core():
    # Only bounds: what a wake-up costs is the machine's, which is the point of measuring it.
    pct = sleeper_cpu(20, 0.5)
    assert 0.0 <= pct < 100.0
