"""broker.ids: random identifiers in the standard UUID text form."""

from __future__ import annotations

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
