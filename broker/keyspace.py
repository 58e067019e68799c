"""Every Redis key name and every Lua script of the broker.

Layout (all keys of one user, or of one OB client, share a hash tag so each script touches a
single Redis Cluster slot):

    brk:{u:<user>}:queues        ZSET   queue id -> idle deadline (ms); the user's live queues
    brk:{u:<user>}:qm:<qid>      HASH   queue meta: topics, cursor (last delivered id), dropped,
                                        ptok/pprev (token and start of the last poll)
    brk:{u:<user>}:q:<qid>       STREAM the queue's events: fields i (event id), e (JSON body)
    brk:{u:<user>}:seq           STRING last event id assigned for the user (ids increase)
    brk:{u:<user>}:pub:<token>   HASH   answer of one publish request (ids, queues), kept for
                                        retries: 60 s, or publish.idempotency_ttl_s for a
                                        producer's Idempotency-Key
    brk:{wake}                   STREAM wake-up hints: field t = the tag whose data changed
    brk:{c:<client>}:sets        ZSET   every unacked SET's jti -> order score (publish ms * 1000
                                        + n: oldest first, and the publish time for retention)
    brk:{c:<client>}:sets:ready  ZSET   jti -> order score; the SETs a poll may deliver now
    brk:{c:<client>}:sets:lease  ZSET   jti -> lease end (ms); delivered, held back until then
    brk:{c:<client>}:sets:jws    HASH   jti -> compact JWS, signed once at publish
    brk:{c:<client>}:sets:seq    STRING last order score given out (scores only increase)
    brk:{c:<client>}:sets:nacked HASH   jti -> {"set","err","description","at"} JSON; TTL'd
    brk:{c:<client>}:sub         HASH   the client's event subscription: id, version,
                                        callback, types (",Code,Code," or "*" for all)
    brk:{push}:tpps              ZSET   client -> when its earliest push falls due (ms): the
                                        lowest score in its queue below (broker/push.py)
    brk:{push}:q:<client>        ZSET   jti -> when its push falls due (ms), or until when a
                                        worker's claim holds it
    brk:{push}:tries             HASH   "<client>\n<jti>" -> push attempts made

The queue scripts build the per-queue key names from the tag they are given in KEYS, and
sets_poll.lua the names of a client's SET keys from its `sets` key (one argument to encode
per poll instead of five), and push_claim.lua each TPP's queue from the TPPs zset (the
names come from its members, so they cannot be declared beforehand); those names carry the
same hash tag, so they always live in the slot of the declared keys. The suffixes are
spelled here and in those scripts: the tests read the keys by the functions below after the
scripts wrote them.
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


def publish_record(tag: str, token: str) -> str:
    return f"{base(tag)}:pub:{token}"


def lua(name: str) -> str:
    """The text of broker/lua/<name>.lua."""
    return resources.files("broker").joinpath("lua", f"{name}.lua").read_text("utf-8")


def sets_all(tag: str) -> str:
    return base(tag) + ":sets"


def sets_ready(tag: str) -> str:
    return base(tag) + ":sets:ready"


def sets_leased(tag: str) -> str:
    return base(tag) + ":sets:lease"


def sets_jws(tag: str) -> str:
    return base(tag) + ":sets:jws"


def sets_seq(tag: str) -> str:
    return base(tag) + ":sets:seq"


def sets_nacked(tag: str) -> str:
    return base(tag) + ":sets:nacked"


def subscription(tag: str) -> str:
    return base(tag) + ":sub"


# Real-time push (broker/push.py): per TPP, its SETs due to be pushed (jti scored by the ms
# they fall due); the TPPs scored by their earliest due push, so that a claim walks TPPs, and
# one TPP's backlog cannot hide the others' pushes behind it; the attempts made per SET. One
# hash tag: the scripts name a TPP's queue after PUSH_TPPS (push_queue).
PUSH_TPPS = "brk:{push}:tpps"
PUSH_TRIES = "brk:{push}:tries"


def push_queue(client_id: str) -> str:
    return PUSH_TPPS.removesuffix(":tpps") + ":q:" + client_id
