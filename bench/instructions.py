"""Instructions per request, counted by callgrind: `python -m bench.instructions`.

Why: on these shared 2-core machines a throughput run moves by 10-30% from one run to the
next, so a change worth 5% cannot be seen in requests/s. Callgrind counts the instructions the
broker executes, which does not depend on what else the machine is doing: the same code,
inputs and environment give the same count to within about 1% (timestamps, random ids and
token lengths still vary; hash randomisation is switched off).

How: the broker runs under `valgrind --tool=callgrind --instr-atstart=no` (start-up runs
uninstrumented), a client in this process sends `--warm` requests of a scenario, then the
counters are zeroed and instrumentation switched on (`callgrind_control`) for exactly
`--requests` sequential keep-alive requests, then off, and the counts are dumped. Reported:
instructions per request. They are not time (cache misses and the kernel's share of syscalls
are not in them): use this to compare CPU-bound changes in the request path (`--ref` a commit,
`--alloc` an allocator), and the full kit for figures. `--ref` swaps in only `broker/` and
`config/` of the commit; the installed packages stay. The broker's timers (loop lag, GC
freeze) fire during the counted requests too: a few hundred instructions a second, and more
of them per request on a slower machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.loadgen import Issuer, set_payload
from bench.servers import REPO, Baseline, Broker

SCENARIOS = ("oxlin_empty", "oxlin_nonempty", "ob_empty", "ob_nonempty")


class Callgrind:
    """Runs a server's command under callgrind, instrumentation off until switched on."""

    pid: int
    out: Path

    def command(self) -> list[str]:
        return [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={self.out}",
            *super().command(),  # type: ignore[misc]
        ]

    def control(self, *args: str) -> None:
        # callgrind_control exits 0 even when it reached no run: read what it says.
        done = subprocess.run(
            ["callgrind_control", *args, str(self.pid)], capture_output=True, text=True
        )
        said = done.stdout + done.stderr
        if done.returncode != 0 or "Error" in said or "No active" in said or "not detected" in said:
            raise RuntimeError(f"callgrind_control {' '.join(args)}: {said.strip()!r}")

    def dumps(self) -> set[Path]:
        return set(self.out.parent.glob(self.out.name + ".*"))

    def last_dump(self, before: set[Path]) -> tuple[int, Path]:
        """The instruction total and file of the dump that appeared since `before` was listed."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for path in self.dumps() - before:
                for line in reversed(path.read_text(errors="replace").splitlines()):
                    if line.startswith("totals:") and int(line.split()[1]) > 0:
                        return int(line.split()[1]), path
            time.sleep(0.2)  # the server process writes the dump, asynchronously
        raise RuntimeError("callgrind wrote no dump")


class CallgrindBroker(Callgrind, Broker):
    name = "broker-callgrind"

    def __init__(self, work: Path, redis_url: str, src: Path | None, alloc: str) -> None:
        # PYTHONMALLOC set here: `serve` would otherwise re-execute itself to pick its
        # allocator, and valgrind does not follow an exec. One event per Oxlin poll, as in
        # the kit's short-poll scenario.
        env = {"PYTHONMALLOC": alloc, "BROKER_QUEUES_MAX_BATCH": "1", "PYTHONHASHSEED": "0"}
        super().__init__(work, redis_url, work / "broker", env, src)
        self.out = work / "callgrind-broker.out"


class CallgrindTrivial(Callgrind, Baseline):
    def __init__(self, work: Path, alloc: str) -> None:
        super().__init__(work, "trivial")
        self.alloc = alloc
        self.out = work / "callgrind-trivial.out"

    def env(self) -> dict[str, str]:
        return {**super().env(), "PYTHONMALLOC": self.alloc, "PYTHONHASHSEED": "0"}


class Client:
    """Sequential requests on one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(
        self, method: str, path: str, token: str, body: object = None
    ) -> http.client.HTTPResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        r.read()
        return r


Request = tuple[str, str, str, object, int]  # method, path, token, body, expected status


def setup(name: str, client: Client, issuer: Issuer, total: int) -> Request:
    """Create what scenario `name` polls; the request it repeats."""
    if name.startswith("oxlin"):
        user = f"instr-{name}"
        token = issuer.user(user)
        r = client.call("POST", "/queues/subscribe", token, {"topics": ["connections"]})
        if r.status != 201:
            raise RuntimeError(f"subscribe answered {r.status}")
        path = r.headers["Location"]
        if name == "oxlin_empty":
            return "GET", path, token, None, 204
        event = {"topic": "connections", "event_type": "X", "resource_type": "CONNECTION"}
        producer = issuer.producer()
        for _ in range(0, total, 500):
            r = client.call(
                "POST",
                f"/publish/users/{user}/events",
                producer,
                [{**event, "resource": {}} for _ in range(500)],
            )
            if r.status != 202:
                raise RuntimeError(f"publish answered {r.status}")
        return "GET", path, token, None, 200
    client_id = f"instr-{name}"
    token = issuer.tpp(client_id)
    r = client.call("POST", "/event-subscriptions", token, {"Data": {"Version": "3.1"}})
    if r.status not in (200, 201):
        raise RuntimeError(f"event subscription answered {r.status}")
    if name == "ob_empty":
        return "POST", "/events", token, {"maxEvents": 100, "returnImmediately": True}, 200
    # One SET, never acked: with no redelivery lease (the default) every poll returns it, as
    # in the kit's "POST /events, non-empty (1 SET each)".
    r = client.call(
        "POST", f"/publish/clients/{client_id}/sets", issuer.producer(), set_payload("instr")
    )
    if r.status != 202:
        raise RuntimeError(f"SET publish answered {r.status}")
    return "POST", "/events", token, {"maxEvents": 1, "returnImmediately": True}, 200


def count(
    server: Callgrind, client: Client, req: Request, warm: int, n: int, keep: Path | None = None
) -> int:
    """Instructions per request over `n` requests, after `warm` uncounted ones.

    `keep`: where to copy the dump, for `callgrind_annotate` (which functions the count is).
    """
    method, path, token, body, status = req
    for i in range(warm + n):
        if i == warm:
            before = server.dumps()
            server.control("-z")
            server.control("-i", "on")
        r = client.call(method, path, token, body)
        if r.status != status:
            raise RuntimeError(f"{method} {path} answered {r.status}, not {status}")
    server.control("-i", "off")
    server.control("--dump")
    total, dump = server.last_dump(before)
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dump, keep)
    return total // n


def measure(
    src: Path | None,
    alloc: str,
    scenarios: list[str],
    warm: int,
    n: int,
    keep: Path | None = None,
) -> dict[str, int]:
    """Instructions per request of each scenario (and the trivial handler); `keep`: a folder
    to copy each scenario's callgrind dump into, as <scenario>.<allocator>.callgrind."""

    def kept(name: str) -> Path | None:
        return keep / f"{name}.{alloc}.callgrind" if keep is not None else None

    from broker.embedded import EmbeddedRedis

    out: dict[str, int] = {}
    with contextlib.ExitStack() as stack:  # every server stopped, the folder removed, on errors too
        work = Path(tempfile.mkdtemp(prefix="instr-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        trivial = CallgrindTrivial(work, alloc)
        stack.callback(trivial.stop)
        trivial.start(timeout_s=300)
        out["trivial"] = count(
            trivial, Client(trivial.port), ("GET", "/", "", None, 204), warm, n, kept("trivial")
        )
        trivial.stop()
        redis = EmbeddedRedis(work / "redis")
        stack.callback(redis.stop)
        url = redis.start()
        Issuer(str(work / "broker"))  # the dev issuer key, before the broker reads it
        broker = CallgrindBroker(work, url, src, alloc)
        stack.callback(broker.stop)
        broker.start(timeout_s=300)
        issuer = Issuer(str(work / "broker"))
        for name in scenarios:
            client = Client(broker.port)
            req = setup(name, client, issuer, warm + n)
            out[name] = count(broker, client, req, warm, n, kept(name))
    return out


def snapshot(ref: str) -> Path:
    """broker/ and config/ of commit `ref`, in a temporary folder (as bench.run --broker-ref)."""
    dest = Path(tempfile.mkdtemp(prefix="instr-src-"))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "broker", "config"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", help="commits to compare, comma-separated (default: work tree)")
    parser.add_argument("--alloc", default="pymalloc", help="PYTHONMALLOC values, comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--warm", type=int, default=300)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument(
        "--keep", type=Path, help="copy each callgrind dump here (for callgrind_annotate)"
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print(
            "bench.instructions needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr
        )
        return 2
    scenarios = args.scenarios.split(",")
    if args.requests < 1 or args.warm < 0:
        parser.error("--requests must be 1 or more, --warm 0 or more")
    if "oxlin_nonempty" in scenarios and args.warm + args.requests > 9000:
        parser.error("oxlin_nonempty keeps warm + requests events in a queue: at most 9,000")
    refs = args.ref.split(",") if args.ref else [""]
    rows = []
    for ref in refs:
        src = snapshot(ref) if ref else None  # an empty entry is the work tree
        try:
            for alloc in args.alloc.split(","):
                keep = args.keep / (ref or "worktree") if args.keep else None
                counts = measure(src, alloc, scenarios, args.warm, args.requests, keep)
                rows.append((ref or "work tree", alloc, counts))
                print(
                    f"{ref or 'work tree'} {alloc}: "
                    + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
                    flush=True,
                )
        finally:
            if src is not None:
                shutil.rmtree(src, ignore_errors=True)
    # Several commits: each against the first commit on the same allocator; else the first row.
    same_alloc = len(refs) > 1
    against = "the first row with the same allocator" if same_alloc else "the first row"
    print(
        f"\ninstructions per request ({args.requests} after {args.warm} warm-up); in brackets,"
        f" against {against}:"
    )
    scenarios = ["trivial", *scenarios]
    print("| broker | allocator | " + " | ".join(scenarios) + " |")
    print("|---|---|" + "---|" * len(scenarios))
    bases: dict[str, dict[str, int]] = {}
    for ref, alloc, counts in rows:
        base = bases.setdefault(alloc if same_alloc else "", counts)
        cells = [
            f"{counts[s]:,}" + (f" ({counts[s] / base[s] - 1:+.1%})" if counts is not base else "")
            for s in scenarios
        ]
        print(f"| {ref} | {alloc} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
