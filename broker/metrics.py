"""Counters for operators, served in Prometheus text format at /metrics."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Metrics:
    """Process-local counters (each worker process reports its own)."""

    events_published_total: int = 0
    queue_polls_total: int = 0
    queue_events_delivered_total: int = 0
    queue_events_dropped_total: int = 0
    queue_rewinds_total: int = 0
    sets_published_total: int = 0
    sets_delivered_total: int = 0
    sets_acked_total: int = 0
    sets_nacked_total: int = 0
    sets_expired_total: int = 0
    event_polls_total: int = 0
    # Real-time push (broker/push.py): delivered (a 2xx, then acked), retries scheduled,
    # refused (a 4xx, a redirect, or a callback that is not https), given up after
    # push.max_attempts, and queued SETs whose push could not be scheduled (still pollable).
    sets_pushed_total: int = 0
    sets_push_retries_total: int = 0
    sets_push_refused_total: int = 0
    sets_push_abandoned_total: int = 0
    sets_push_unscheduled_total: int = 0

    def render(self, gauges: dict[str, float], standard: dict[str, float] | None = None) -> str:
        """The counters and `gauges` under broker_, then `standard` (process_*) as they are."""
        lines = []
        for f in fields(self):
            lines.append(f"# TYPE broker_{f.name} counter")
            lines.append(f"broker_{f.name} {getattr(self, f.name)}")
        typed = set()
        for prefix, values in (("broker_", gauges), ("", standard or {})):
            for name, value in values.items():
                family = prefix + name.split("{", 1)[0]
                if family not in typed:
                    typed.add(family)
                    kind = "counter" if family.endswith("_total") else "gauge"
                    lines.append(f"# TYPE {family} {kind}")
                # repr, not :g: a start time in epoch seconds needs more than 6 digits
                lines.append(f"{prefix}{name} {value!r}")
        return "\n".join(lines) + "\n"
