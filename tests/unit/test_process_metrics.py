"""/metrics: the process's own figures under the standard names, and exact values."""

from __future__ import annotations

import os
import time

from broker import process
from broker.metrics import Metrics


def _values(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_metrics_carry_the_standard_process_figures(client):
    text = await (await client.get("/metrics")).text()
    values = {k: float(v) for k, v in _values(text).items()}
    assert "# TYPE process_resident_memory_bytes gauge" in text
    assert "# TYPE process_cpu_seconds_total counter" in text
    rss = _resident_bytes()
    # this test's process is the broker's: same memory, within what the request itself moved
    assert abs(values["process_resident_memory_bytes"] - rss) < 16 * 2**20
    assert values["process_virtual_memory_bytes"] >= values["process_resident_memory_bytes"]
    assert values["process_max_fds"] >= 3
    assert "process_open_fds" not in values  # counting them stalls the loop (process.py)
    assert 0 < values["process_cpu_seconds_total"] <= time.process_time() + 1
    assert values["process_start_time_seconds"] <= time.time()


def test_large_values_are_written_exactly():
    # %g wrote 1234567 as 1.23457e+06: counters past a million lost their last digits
    text = Metrics(queue_polls_total=1_234_567).render(
        {"hub_hints_total": 1_234_567}, {"process_start_time_seconds": 1_763_700_000.25}
    )
    values = _values(text)
    assert values["broker_queue_polls_total"] == "1234567"
    assert values["broker_hub_hints_total"] == "1234567"
    assert values["process_start_time_seconds"] == "1763700000.25"


def test_gauges_leave_out_what_proc_does_not_give(monkeypatch):
    def no_proc(*_args: object, **_kwargs: object) -> object:
        raise FileNotFoundError("/proc")

    monkeypatch.setattr("builtins.open", no_proc)
    out = process.gauges()
    assert "process_resident_memory_bytes" not in out
    assert out["process_max_fds"] > 0
