"""Wake-ups while SETs are signed: Oxlin long polls woken at a steady rate, first alone, then
while a producer publishes SETs in batches back to back.

Why: a SET is signed with PS256 at publish (~0.3 ms each, on the event loop unless
`signing.processes` is set), so a batch of 100 is ~30 ms of RSA work in the process that
also wakes every parked poll. The long-poll scenario publishes one SET per request and
does not show what a batching producer does to the other clients' latency; this does.
Broker only (the references sign nothing). The client runs in the runner's process: its
load (200 polls, 100 events/s, one batch in flight) is light next to the broker's.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
from typing import Any

import aiohttp

from bench import loadgen
from bench.analysis import quantiles
from bench.loadgen import Issuer


async def _phase(
    port: int, issuer: Issuer, prefix: str, seconds: float, users: int, rate: float, batch: int
) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    producer = {"Authorization": f"Bearer {issuer.producer()}"}
    latencies: list[int] = []
    errors: dict[str, int] = {}
    stop = asyncio.Event()

    def count(what: str) -> None:
        errors[what] = errors.get(what, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        queues = []
        for i in range(users):
            auth = {"Authorization": f"Bearer {issuer.user(f'{prefix}u{i}')}"}
            async with http.post(
                f"{base}/queues/subscribe", headers=auth, json={"topics": ["connections"]}
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"subscribe answered {r.status}")
                queues.append((r.headers["Location"], auth))
        client = f"{prefix}batcher"
        tpp = {"Authorization": f"Bearer {issuer.tpp(client)}"}
        async with http.post(
            f"{base}/event-subscriptions", headers=tpp, json={"Data": {"Version": "3.1"}}
        ) as r:
            if r.status not in (200, 201):
                raise RuntimeError(f"event subscription answered {r.status}")

        async def waiter(path: str, auth: dict[str, str]) -> None:
            while not stop.is_set():
                try:
                    async with http.get(f"{base}{path}?wait=5", headers=auth) as r:
                        if r.status == 200:
                            now = time.monotonic_ns()
                            for event in await r.json():
                                latencies.append(now - int(event["resource"]["t"]))
                        elif r.status != 204:
                            count(f"poll_{r.status}")
                except (aiohttp.ClientError, TimeoutError) as e:
                    count(f"poll_{type(e).__name__}")
                    await asyncio.sleep(0.1)

        sets = 0

        async def batcher() -> None:
            nonlocal sets
            path = f"{base}/publish/clients/{urllib.parse.quote(client)}/sets"
            while not stop.is_set():
                body = [loadgen.set_payload(f"r-{prefix}-{sets + j}") for j in range(batch)]
                try:
                    async with http.post(path, headers=producer, json=body) as r:
                        if r.status == 202:
                            sets += batch
                        else:
                            count(f"sets_{r.status}")
                except (aiohttp.ClientError, TimeoutError) as e:
                    count(f"sets_{type(e).__name__}")
                    await asyncio.sleep(0.1)

        accepted = 0

        async def publish(user: str) -> None:
            nonlocal accepted
            event = {
                "topic": "connections",
                "event_type": "BENCH",
                "resource_type": "CONNECTION",
                # monotonic_ns: the same clock as the waiter's, in this process
                "resource": {"t": str(time.monotonic_ns())},
            }
            path = f"{base}/publish/users/{urllib.parse.quote(user)}/events"
            try:
                async with http.post(path, headers=producer, json=event) as r:
                    if r.status == 202:
                        accepted += 1
                    else:
                        count(f"publish_{r.status}")
            except (aiohttp.ClientError, TimeoutError) as e:
                count(f"publish_{type(e).__name__}")

        tasks = [asyncio.create_task(waiter(path, auth)) for path, auth in queues]
        await asyncio.sleep(1.0)  # every poll parked
        if batch:
            tasks.append(asyncio.create_task(batcher()))
        pubs = []
        rng = random.Random(7)
        t0 = time.monotonic()
        for k in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
            pubs.append(asyncio.create_task(publish(f"{prefix}u{rng.randrange(users)}")))
        await asyncio.gather(*pubs)
        await asyncio.sleep(0.5)  # the last deliveries; one still parked after that is undelivered
        elapsed = time.monotonic() - t0
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    return {
        "batch": batch,
        "published": accepted,  # answered 202
        "delivered": len(latencies),
        "latency_ms": quantiles(latencies),
        "sets_per_s": round(sets / elapsed, 1),
        "errors": errors,
    }


def run(port: int, issuer: Issuer, seconds: float, batch: int = 100) -> dict[str, Any]:
    """Both phases on one broker: without the batches, then with them."""
    users, rate = 200, 100.0
    out: dict[str, Any] = {"users": users, "rate": rate, "seconds": seconds}
    for name, size in (("alone", 0), ("batches", batch)):
        out[name] = asyncio.run(_phase(port, issuer, f"mx{name}", seconds, users, rate, size))
    return out
