"""Every Redis key name and every Lua script of the broker.

Layout (all keys of one user, or of one OB client, share a hash tag so each script touches a
single Redis Cluster slot):

    brk:{u:<user>}:queues        ZSET   queue id -> idle deadline (ms); the user's live queues
    brk:{u:<user>}:qm:<qid>      HASH   queue meta: topics, cursor (last delivered id), dropped
    brk:{u:<user>}:q:<qid>       STREAM the queue's events: fields i (event id), e (JSON body)
    brk:{u:<user>}:seq           STRING last event id assigned for the user (ids increase)
    brk:{wake}                   STREAM wake-up hints: field t = the tag whose data changed

The queue scripts build the per-queue key names from the tag they are given in KEYS; those
names carry the same hash tag, so they always live in the slot of the declared keys.
"""

from __future__ import annotations

from importlib import resources

PREFIX = "brk:"
WAKE_STREAM = "brk:{wake}"
# Wake-up hints kept for a reconnecting hub; thousands of seconds of traffic at 1k events/s.
WAKE_MAXLEN = 100_000


def _escape(ident: str) -> str:
    # A '}' inside the tag would end the hash tag early; '%' is escaped so the mapping is 1:1.
    return ident.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def user_tag(user_id: str) -> str:
    """The hub key and hash tag of one Oxlin user."""
    return "u:" + _escape(user_id)


def client_tag(client_id: str) -> str:
    """The hub key and hash tag of one Open Banking client (TPP)."""
    return "c:" + _escape(client_id)


def base(tag: str) -> str:
    return f"{PREFIX}{{{tag}}}"


def queue_registry(tag: str) -> str:
    return base(tag) + ":queues"


def queue_meta(tag: str, queue_id: str) -> str:
    return f"{base(tag)}:qm:{queue_id}"


def queue_stream(tag: str, queue_id: str) -> str:
    return f"{base(tag)}:q:{queue_id}"


def event_seq(tag: str) -> str:
    return base(tag) + ":seq"


def lua(name: str) -> str:
    """The text of broker/lua/<name>.lua."""
    return resources.files("broker").joinpath("lua", f"{name}.lua").read_text("utf-8")
