"""The process's own figures for /metrics, under the names Prometheus client libraries use.

`process_resident_memory_bytes` and friends, unprefixed, so an SRE's standard dashboards and
alerts work on the broker unchanged. Each worker process reports its own; memory is read from
/proc (Linux), and left out elsewhere.

`process_open_fds` is left out on purpose: counting /proc/self/fd takes ~8 ms at 10,000 open
sockets, a stall of the event loop on every scrape. `broker_waiting_polls` (one socket each)
against `process_max_fds` tells the same story.
"""

from __future__ import annotations

import os
import resource
import time

# When this module was imported: start-up, near enough (the process's own start time would
# need the boot time and clock ticks from /proc).
_STARTED = time.time()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def gauges() -> dict[str, float]:
    times = os.times()
    out: dict[str, float] = {
        "process_cpu_seconds_total": times.user + times.system,
        "process_start_time_seconds": _STARTED,
        "process_max_fds": float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    }
    try:
        with open("/proc/self/statm", "rb") as f:
            size, resident = f.read().split()[:2]
    except OSError:
        return out
    out["process_virtual_memory_bytes"] = float(int(size) * _PAGE)
    out["process_resident_memory_bytes"] = float(int(resident) * _PAGE)
    return out
