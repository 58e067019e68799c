"""Which memory allocator the broker's processes run on: CPython's pymalloc or the C malloc.

Why this matters: pymalloc carves small objects out of 1 MiB arenas and gives an arena back
to the OS only when every object in it is gone. After 10,000 parked polls vanish, a few
thousand small objects made during that wave outlive it (what they are is not settled: none
is reachable from a Python object), scattered over the arenas, and pin ~65% of the peak
memory until the next wave reuses it (paired benchmark runs: +114 MB kept of a +171 MB
peak). On the C malloc the same survivors pin only their 4 KiB pages, and the maintenance
collection's malloc_trim hands the rest back (+21 MB kept of +190 MB). The price: the malloc
header on each small object, ~0.6 KB more per parked poll (about 5%), and 5-7% more
instructions per short poll (`make bench-instructions`).

The allocator is fixed when the interpreter starts (PYTHONMALLOC), so `serve` re-executes
itself once with the variable set; worker processes inherit it. A PYTHONMALLOC the operator set
is left alone.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "PYTHONMALLOC"


def current() -> str:
    """The allocator this interpreter really runs on (whatever the environment says).

    pymalloc counts its blocks; on the C malloc (PYTHONMALLOC=malloc) that count stays 0.
    """
    return "pymalloc" if sys.getallocatedblocks() > 0 else "malloc"


def reexec_args(wanted: str) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment to restart this process on `wanted`, or None to go on.

    None when the interpreter already runs on it, when PYTHONMALLOC is set (the operator's
    choice, or this process was already restarted), or when the interpreter ignores the
    environment (restarting would not change anything).
    """
    if (
        wanted == current()
        or os.environ.get(ENV)
        or sys.flags.ignore_environment
        or os.name != "posix"  # no exec that keeps the process
    ):
        return None
    # orig_argv is the command line as given (`python -m broker serve ...`), so the restarted
    # process parses the same arguments; argv[0] alone would be the __main__ file.
    argv = [sys.executable, *sys.orig_argv[1:]]
    return argv, {**os.environ, ENV: wanted}


def ensure(wanted: str) -> None:
    """Restart this process on `wanted` if it runs on another allocator (never returns then).

    Call from the command line's entry point, before anything else is imported or started:
    the process image is replaced, its pid kept, and the command line run again.
    """
    restart = reexec_args(wanted)
    if restart is None:
        if current() != wanted:
            log.warning(
                "server.allocator is %s but the process runs on %s (%s=%r, -E: %s)",
                wanted,
                current(),
                ENV,
                os.environ.get(ENV),
                bool(sys.flags.ignore_environment),
            )
        return
    argv, env = restart
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:  # the interpreter moved or vanished: serve on what we have
        log.warning(
            "could not restart on the %s allocator (%s); running on %s", wanted, e, current()
        )
