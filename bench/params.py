"""The two sizes of a benchmark run: full (issue 4's figures) and quick (under two minutes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Params:
    waiters: int = 10_000
    waiter_procs: int = 2
    ramp_steps: int = 5
    idle_s: float = 5.0
    rate: float = 1000.0
    duration_s: float = 30.0
    wait_s: float = 25.0  # long-poll hold asked by clients (Nchan: its subscriber timeout)
    jitter: float = 0.2
    max_wait_s: float = 30.0  # the broker's poll.max_wait_s, also the hygiene deadline
    pub_conns: int = 32
    # Short polls are measured in rounds, each beside a round of the trivial handler
    # (bench/throughput.py: these machines change speed within seconds).
    tput_rounds: int = 3
    tput_round_s: float = 2.0
    # The broker's short polls again over TCP loopback (its Redis on another host); full runs
    # only: in a quick run that phase was a twelfth of the two minutes.
    tput_tcp_repeat: bool = True
    tput_conns: int = 64
    tput_queues: int = 64
    sets_total: int = 40_000
    sets_clients: int = 8
    sign_s: float = 2.0
    mixed_s: float = 10.0  # wake-ups alone, then beside SET batches (bench/mixed.py), each
    drain_s: float = 27.0  # after the last publish, wait this long at most for deliveries
    # After the vanished clients are released, go on sampling this long: the broker's
    # maintenance collection (and heap trim) comes a second or two later, later on a slow
    # machine (2.2 s after the vanish with 2,000 waiters, 3.3 s with 10,000 on a slow one).
    settle_s: float = 5.0

    @property
    def tput_scenario_s(self) -> float:
        """How long one short-poll scenario is measured in all (its rounds)."""
        return self.tput_rounds * self.tput_round_s


FULL = Params()
QUICK = Params(
    waiters=2000,
    ramp_steps=4,
    idle_s=1.5,
    rate=500.0,
    duration_s=10.0,
    wait_s=10.0,
    max_wait_s=12.0,
    tput_rounds=1,  # one pair of 1 s each: under two minutes in all
    tput_round_s=1.0,
    tput_tcp_repeat=False,
    sets_total=5000,
    sign_s=1.0,
    mixed_s=3.0,
    drain_s=5.0,
    settle_s=3.0,
)
