"""What a server process costs, read from /proc: RSS, CPU time, TCP connections to Redis."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx master + workers, a broker and its children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def rss_bytes(pid: int, *, tree: bool = True) -> int:
    """Resident memory of the process (and its descendants), from /proc/<pid>/statm."""
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
    return total


def steal_ticks(stat: str) -> int:
    """The "steal" clock ticks of all CPUs in /proc/stat's text: time the hypervisor ran
    other guests while this machine's CPUs had work (the 8th number of the "cpu" line)."""
    fields = stat.split("\n", 1)[0].split()
    return int(fields[8]) if len(fields) > 8 and fields[0] == "cpu" else 0


def machine_steal() -> tuple[int, float] | None:
    """(steal ticks so far, monotonic time) for steal_pct(); None without /proc/stat."""
    try:
        return steal_ticks(Path("/proc/stat").read_text()), time.monotonic()
    except (OSError, ValueError):
        return None


def steal_pct(
    before: tuple[int, float] | None, after: tuple[int, float] | None, cpus: int | None = None
) -> float | None:
    """CPU time stolen between two machine_steal() readings, in % of what the machine's CPUs
    had in that time (elapsed time x CPUs); None if unknown.

    Elapsed time, not the sum of /proc/stat's counters: on one virtual machine those summed to
    ~35% more than the time that had passed while it was idle.
    """
    if before is None or after is None or after[1] <= before[1]:
        return None
    capacity = (after[1] - before[1]) * _TICK * (cpus or os.cpu_count() or 1)
    return round((after[0] - before[0]) * 100 / capacity, 1)


def cpu_seconds(pid: int, *, tree: bool = True) -> float:
    """user + system CPU seconds consumed so far by the process (and its descendants)."""
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / _TICK


def wakeups(pid: int, *, tree: bool = True) -> int:
    """Times the main threads of the process (and its descendants: nginx's workers) went to
    sleep and were woken (voluntary context switches).

    An event loop sleeps in epoll_wait between timers and I/O, so while it is idle this counts
    its timer wake-ups.
    """
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
                    break
    return total


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def tcp_connections(pid: int, remote_port: int | None = None, local_port: int | None = None) -> int:
    """ESTABLISHED TCP sockets owned by the process tree, optionally by remote/local port."""
    inodes: set[int] = set()
    for p in process_tree(pid):
        inodes |= _socket_inodes(p)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "01" or int(f[9]) not in inodes:
                continue
            if remote_port is not None and int(f[2].rsplit(":", 1)[1], 16) != remote_port:
                continue
            if local_port is not None and int(f[1].rsplit(":", 1)[1], 16) != local_port:
                continue
            count += 1
    return count


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def sleeper_code(rate_hz: float) -> str:
    """The sleeper's program: an event loop whose one task sleeps 1/rate_hz at a time."""
    return (
        "import asyncio\n"
        "try:\n    import uvloop\n    run = uvloop.run\n"
        "except ImportError:\n    run = asyncio.run\n"
        "async def main():\n    while True:\n"
        f"        await asyncio.sleep({1 / rate_hz!r})\n"
        "run(main())\n"
    )


def sleeper_cpu(rate_hz: float, seconds: float) -> float:
    """% of a core charged to an event loop that only sleeps, waking `rate_hz` times a second.

    Why: on some virtual machines each wake-up of an idle process is charged milliseconds of
    CPU (seen here: an idle uvloop loop charged 1.2% of a core at 1 wake-up/s, 3-6% at ten,
    with the host's time taken counted as the process's own). A server's idle CPU is read
    against this, measured in the same run, so a machine's price for a timer is not taken
    for the server's work. An event loop (uvloop when installed, as the broker), not
    time.sleep: a loop's wake-up (epoll, timer heap, a task step) cost about three times a
    bare sleep's on that machine.
    """
    proc = subprocess.Popen([sys.executable, "-c", sleeper_code(rate_hz)])
    try:
        time.sleep(0.5)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        return round((cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100, 2)
    finally:
        proc.kill()
        proc.wait()
