"""What Redis promises about the events the broker has acknowledged, read once at start.

Why: a publish answered 202 is in Redis, and nowhere else. Whether it survives a Redis
restart or a host crash is Redis's configuration, not the broker's: with the append-only
file and `appendfsync everysec` (the embedded server's setting) a host crash can lose about
the last second; with no persistence at all a Redis restart loses every queue. An operator
pointing the broker at a Redis of their own should hear which of these they have, at start
and in /metrics, rather than after an outage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Persistence:
    """Redis's persistence settings as read at start; empty when Redis would not say."""

    appendonly: str = ""
    appendfsync: str = ""
    save: str = ""
    error: str = ""  # why they are unknown: CONFIG refused, a time-out, ...

    @property
    def known(self) -> bool:
        return bool(self.appendonly)

    @property
    def snapshots(self) -> bool:
        return bool(self.save.strip())

    def describe(self) -> tuple[int, str]:
        """A log level and a sentence on what an acknowledged event survives."""
        if not self.known:
            return (
                logging.WARNING,
                f"Redis persistence unknown (CONFIG GET refused or failed: {self.error or '?'}):"
                " check that its append-only file is on, or acknowledged events may not survive"
                " a Redis restart",
            )
        if self.appendonly == "yes":
            fsync = {
                "always": (
                    "fsync on every write: acknowledged events survive a host crash (unless"
                    " no-appendfsync-on-rewrite is set and a rewrite is running)"
                ),
                "everysec": (
                    "fsync every second: acknowledged events survive a Redis restart, a host"
                    " crash can lose about the last second or two of them"
                ),
                "no": (
                    "fsync left to the OS: acknowledged events survive a Redis restart, a host"
                    " crash can lose the last ~30 s of them"
                ),
            }.get(self.appendfsync, f"appendfsync {self.appendfsync}")
            return logging.INFO, f"Redis persistence: append-only file, {fsync}"
        if self.snapshots:
            return (
                logging.WARNING,
                f"Redis persistence: snapshots only (save {self.save!r}), no append-only file:"
                " a Redis crash or a host crash loses every event acknowledged since the last"
                " snapshot (a clean shutdown saves one)",
            )
        return (
            logging.WARNING,
            "Redis persistence: none (no append-only file, no snapshots): a Redis restart"
            " loses every queue and every acknowledged event",
        )

    def gauge(self) -> dict[str, float]:
        """For /metrics: broker_redis_persistence_info{appendonly,appendfsync,snapshots} 1.

        Read once at start: a later CONFIG SET or a failover is not seen here.
        """
        if not self.known:
            values = ("unknown", "unknown", "unknown")
        else:
            values = (self.appendonly, self.appendfsync, "yes" if self.snapshots else "no")
        labels = ",".join(
            f'{k}="{_label(v)}"'
            for k, v in zip(("appendonly", "appendfsync", "snapshots"), values, strict=True)
        )
        return {f"redis_persistence_info{{{labels}}}": 1}


def _label(value: str) -> str:
    """A Prometheus label value: a Redis-compatible server may answer anything."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def read(redis: Any) -> Persistence:
    """Ask Redis (redis-py client); an empty Persistence if CONFIG is refused or fails.

    Managed Redis services often rename or forbid CONFIG: that is not an error to start on.
    """
    try:
        got: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save"):
            reply = await redis.config_get(name)
            value = reply.get(name, reply.get(name.encode(), ""))
            got[name] = value.decode() if isinstance(value, bytes) else str(value)
    except Exception as e:  # any refusal means "unknown", said in the log with its reason
        return Persistence(error=f"{type(e).__name__}: {e}"[:200])
    return Persistence(**got)


def announce(p: Persistence) -> None:
    level, message = p.describe()
    log.log(level, message)
