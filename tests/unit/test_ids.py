"""broker.ids: random identifiers in the standard UUID text form."""

from __future__ import annotations

import os
import threading
import uuid

from broker import ids


def test_uuid4_is_a_random_rfc_uuid_in_canonical_text():
    seen = set()
    for _ in range(2000):
        text = ids.uuid4()
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower-case hex, dashes at 8-4-4-4-12
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        seen.add(text)
    assert len(seen) == 2000
    # every variant nibble (8, 9, a, b) appears: the random bits are not stuck
    assert {t[19] for t in seen} == set("89ab")


def test_a_forked_child_never_hands_out_its_parents_ids():
    """The pool of random bytes is dropped in a child: parent and child ids differ."""
    ids.uuid4()  # the pool now holds the rest of a chunk
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out without running pytest's teardown
        os.write(write, ",".join(ids.uuid4() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split(",")
    os.close(read)
    os.waitpid(pid, 0)
    parent = [ids.uuid4() for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(parent)


def test_ids_from_many_threads_are_all_distinct():
    """Refills racing in several threads never hand one piece of randomness out twice."""
    out: list[str] = []

    def make() -> None:
        out.extend(ids.uuid4() for _ in range(3000))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 12000 and len(set(out)) == 12000


def test_token_hex_is_128_random_bits_never_repeated():
    seen = {ids.token_hex() for _ in range(5000)}
    assert len(seen) == 5000
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in seen)
    # every hex digit appears in every position: no fixed bits (as a UUID's version has)
    assert all({t[i] for t in seen} == set("0123456789abcdef") for i in range(32))
