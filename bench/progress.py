"""Progress lines of a run, stamped with the seconds since it began."""

from __future__ import annotations

import time

_T0 = time.monotonic()


def restart() -> None:
    """Count the stamps from now (the start of a run)."""
    global _T0
    _T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line, stamped with the seconds since the run began (which phase takes how
    long differs from machine to machine)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", flush=True)
