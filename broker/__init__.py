"""Event-notification broker for open banking.

Producers publish events; every consumer polls its own Redis-stream queue, long-polling until
an event arrives. Two public APIs share one engine: the Oxlin/Linxo "Queues & events" API and
UK Open Banking aggregated polling (RFC 8936).
"""

__version__ = "0.1.0"
