"""What a publish run's records mean: per event delivered, late, duplicated, stranded or lost,
and latency quantiles, per second and as a CDF."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: the load generator imports quantiles() from here
    from bench.loadgen import Spec
    from bench.params import Params


def analyze(
    pub: dict[str, Any],
    received: list[tuple[int, int, int, int]],
    sweep: list[tuple[int, int, int]],
    spec: Spec,
    unread: set[int] | frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Per published event: delivered (first time), late, duplicated, misrouted; of those never
    delivered, stranded (found by the sweep), unverified (their queue's sweep read failed,
    waiters `unread`) or lost."""
    ok = {s: w for w, s in pub["ok"]}
    first: dict[int, int] = {}
    duplicates = misrouted = unexpected = 0
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for w, s, lat, receiver in received:
        if w != receiver:
            misrouted += 1
        if s not in ok:
            unexpected += 1
        if s in first:
            duplicates += 1
            continue
        first[s] = lat
        by_kind[spec.kind(w)].append(lat)
    lats = sorted(first.values())
    swept = {s for _w, s, _r in sweep}
    stranded = sum(1 for s in swept if s in ok and s not in first)
    missing = [s for s in ok if s not in first and s not in swept]
    unverified = sum(1 for s in missing if ok[s] in unread)
    lost = len(missing) - unverified
    result = {
        "published_attempted": pub["attempted"],
        "published_ok": len(ok),
        "publish_failures": pub["failures"],
        "unrouted": pub["unrouted"],
        "delivered": sum(1 for s in first if s in ok),
        "late_1s": sum(1 for x in lats if x > 1_000_000_000),
        "stranded": stranded,
        "lost": lost,
        "unverified": unverified,
        "duplicates": duplicates,
        "misrouted": misrouted,
        "unexpected": unexpected,
        "latency_ms": quantiles(lats),
        "latency_by_api_ms": {k: quantiles(sorted(v)) for k, v in by_kind.items()},
        "cdf": cdf_points(lats),
    }
    return result


def timeline(
    pub: dict[str, Any], received: list[tuple[int, int, int, int]], timeouts: list[int], p: Params
) -> list[dict[str, Any]]:
    """Per second of the publish run: events, their p50/p99/max latency, long-poll time-outs."""
    seconds = int(p.duration_s) + 1
    lat: list[list[int]] = [[] for _ in range(seconds)]
    seen: set[int] = set()
    for _w, s, ns, _r in received:
        if s in seen:
            continue
        seen.add(s)
        lat[min(seconds - 1, int(s / p.rate))].append(ns)
    tos = [0] * seconds
    for t in timeouts:
        k = (t - pub["t0_ns"]) // 1_000_000_000
        if 0 <= k < seconds:
            tos[k] += 1
    out = []
    for k in range(seconds):
        q = quantiles(sorted(lat[k]))
        out.append({"s": k, "events": len(lat[k]), "timeouts": tos[k], **q})
    return out


def quantiles(sorted_ns: list[int]) -> dict[str, float]:
    if not sorted_ns:
        return {}
    n = len(sorted_ns)

    def q(p: float) -> float:
        return round(sorted_ns[min(n - 1, int(p * n))] / 1e6, 3)

    return {
        "n": n,
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": round(sorted_ns[-1] / 1e6, 3),
    }


def cdf_points(sorted_ns: list[int], points: int = 400) -> list[tuple[float, float]]:
    """A downsampled CDF (latency ms, fraction), denser in the tail, for the plot and JSON."""
    n = len(sorted_ns)
    if not n:
        return []
    fracs = sorted(
        {i / points for i in range(points)}
        | {1 - 10 ** (-k / 20) for k in range(20, 100)}
        | {1.0 - 1 / n}
    )
    return [(round(sorted_ns[min(n - 1, int(f * n))] / 1e6, 4), round(f, 6)) for f in fracs]


def merge(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    total: collections.Counter[str] = collections.Counter()
    for d in dicts:
        total.update(d)
    return dict(total)
