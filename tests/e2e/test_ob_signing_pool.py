"""SETs signed off the event loop (signing.threads, signing.processes) verify like inline ones."""

from __future__ import annotations

import os
import threading

import pytest

from broker.appkeys import signer_key, signing_pool_key
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


@pytest.mark.parametrize(("threads", "off_loop"), [(1, True), (0, False)])
async def test_signing_threads_take_the_rsa_work_off_the_event_loop(
    make_client, auth, monkeypatch, threads, off_loop
):
    client = await make_client(signing={"threads": threads})
    signer = client.app[signer_key]
    signed_on: list[int] = []
    real = signer.sign_set

    def spy(claims):
        signed_on.append(threading.get_ident())
        return real(claims)

    monkeypatch.setattr(signer, "sign_set", spy)
    tpp = TPP(client, auth, "tpp-threads")
    await tpp.subscribe()
    jtis = await tpp.publish(*[resource_update(f"R{i}") for i in range(5)])
    assert len(signed_on) == 5
    assert all((t != threading.get_ident()) is off_loop for t in signed_on)
    sets, _ = await tpp.poll_ok({"returnImmediately": True, "maxEvents": 100})
    assert list(sets) == jtis
    keys = await fetch_jwks(client)
    for jti, token in sets.items():
        verify_set(keys, token, jti=jti, aud="tpp-threads")
