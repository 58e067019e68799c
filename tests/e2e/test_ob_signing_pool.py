"""SETs signed in worker processes (signing.processes > 0) verify like inline ones."""

from __future__ import annotations

import os

from broker.appkeys import signing_pool_key
from tests.ob_helpers import TPP, fetch_jwks, resource_update, verify_set


async def test_sets_signed_in_a_worker_process_verify_against_the_jwks(make_client, auth):
    client = await make_client(signing={"processes": 1})
    pool = client.app[signing_pool_key]
    assert pool is not None
    # the signature really comes from another process
    workers = list(pool._pool._processes.values())
    assert workers and all(p.pid != os.getpid() for p in workers)
    tpp = TPP(client, auth, "tpp-pool")
    await tpp.subscribe()
    jtis = await tpp.publish(*[resource_update(f"R{i}") for i in range(20)])
    sets, more = await tpp.poll_ok({"returnImmediately": True, "maxEvents": 100})
    assert list(sets) == jtis and more is False
    keys = await fetch_jwks(client)
    for jti, token in sets.items():
        verify_set(keys, token, jti=jti, aud="tpp-pool")
