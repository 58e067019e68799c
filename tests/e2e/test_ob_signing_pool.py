"""SETs signed in signing processes (signing.processes > 0) verify like inline ones."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from broker.appkeys import signer_key, signing_pool_key
from broker.config import SigningSettings
from broker.errors import SigningError
from broker.signing import Signer, key_path
from broker.signproc import SigningProcesses, _Child
from tests.ob_helpers import TPP, fetch_jwks, resource_update, verify_set


async def test_sets_signed_in_a_signing_process_verify_against_the_jwks(
    make_client, auth, monkeypatch
):
    client = await make_client(signing={"processes": 2})
    procs = client.app[signing_pool_key]
    assert procs is not None
    children = [c for c in procs._children if c is not None]
    assert len(children) == 2 and all(c.proc.pid != os.getpid() for c in children)
    # the loop never signs: the signer's own key is not used
    signer = client.app[signer_key]

    def not_here(_data):
        raise AssertionError("signed on the event loop")

    monkeypatch.setattr("broker.signing.sign_ps256", not_here)
    tpp = TPP(client, auth, "tpp-pool")
    await tpp.subscribe()
    jtis = await tpp.publish(*[resource_update(f"R{i}") for i in range(20)])
    jtis += await tpp.publish(resource_update("R20"))  # the other child's turn
    sets, more = await tpp.poll_ok({"returnImmediately": True, "maxEvents": 100})
    assert list(sets) == jtis and more is False
    keys = await fetch_jwks(client)
    for jti, token in sets.items():
        verify_set(keys, token, jti=jti, aud="tpp-pool")
    assert signer.kid in {k["kid"] for k in keys["keys"]}


async def test_a_signing_process_that_dies_fails_its_sets_and_is_replaced(tmp_path):
    procs = await _started(tmp_path)
    try:
        child = await _kill_the_child(procs)
        sigs = await procs.sign([b"a.b", b"c.d"])  # a new child answers
        assert [len(s) for s in sigs] == [256, 256]
        assert procs._children[0] is not child
        # a child killed with SETs in flight fails them, it does not hang
        new = procs._children[0]
        assert new is not None and new.proc.stdin is not None
        new.proc.stdin.write(b"\x00\x00\x10\x00")  # a frame the child waits on forever
        pending = asyncio.ensure_future(procs.sign([b"e.f"]))
        await asyncio.sleep(0.1)
        os.kill(new.proc.pid, signal.SIGKILL)
        with pytest.raises(SigningError, match="exited"):
            await asyncio.wait_for(pending, 5)
    finally:
        await procs.aclose()
    with pytest.raises(SigningError, match="closed"):
        await procs.sign([b"x.y"])


async def test_a_bad_key_file_fails_at_start(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    procs = SigningProcesses(bad, 1)
    with pytest.raises(SigningError):
        await asyncio.wait_for(procs.start(), 20)
    await procs.aclose()


async def test_every_signature_comes_back_whatever_its_first_byte(tmp_path):
    """Signatures are random bytes: none may be mistaken for an error reply."""
    procs = await _started(tmp_path)
    try:
        inputs = [f"h.{i}".encode() for i in range(1500)]
        sigs = await procs.sign(inputs)
    finally:
        await procs.aclose()
    assert len(sigs) == 1500 and all(len(s) == 256 for s in sigs)
    assert len({s[0] for s in sigs}) > 100  # first bytes of many kinds came through


async def test_a_publish_whose_signing_fails_is_a_503_and_stores_nothing(
    make_client, auth, monkeypatch
):
    client = await make_client(signing={"processes": 1})
    procs = client.app[signing_pool_key]
    assert procs is not None
    tpp = TPP(client, auth, "tpp-fail")
    await tpp.subscribe()

    async def dead(_inputs):
        raise SigningError("the signing process exited (IncompleteReadError)")

    monkeypatch.setattr(procs, "sign", dead)
    r = await client.post(
        "/publish/clients/tpp-fail/sets",
        json=resource_update("R1"),
        headers=auth("producer", scopes=["events:publish"]),
    )
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert (await r.json())["error"] == "signing_unavailable"
    sets, _ = await tpp.poll_ok({"returnImmediately": True})
    assert sets == {}


async def test_callers_that_find_a_dead_child_start_one_replacement(tmp_path):
    procs = await _started(tmp_path)
    spawned = []
    real_spawn = procs._spawn

    async def counting_spawn():
        child = await real_spawn()
        spawned.append(child)
        return child

    procs._spawn = counting_spawn  # type: ignore[method-assign]
    try:
        old = await _kill_the_child(procs)
        results = await asyncio.gather(*(procs.sign([b"a.b"]) for _ in range(5)))
        assert all(len(r[0]) == 256 for r in results)
        assert len(spawned) == 1
    finally:
        await procs.aclose()
    for child in [old, *spawned]:
        assert child.proc.returncode is not None  # none left running


async def test_a_child_that_does_not_answer_times_out_and_is_killed(tmp_path):
    procs = await _started(tmp_path)  # the start-up's warm-up sign has the usual 10 s
    try:
        (child,) = procs._children
        assert child is not None
        procs.timeout_s = 0.5
        os.kill(child.proc.pid, signal.SIGSTOP)
        with pytest.raises(SigningError, match="did not answer"):
            await procs.sign([b"a.b"])
        await asyncio.wait_for(child.proc.wait(), 5)  # killed, not left stopped
        procs.timeout_s = 10  # the replacement's first answer waits on its start-up
        assert len((await procs.sign([b"c.d"]))[0]) == 256  # a new child answers
    finally:
        await procs.aclose()


async def _started(tmp_path, **kwargs) -> SigningProcesses:
    """One signing process over the dev key (created here, as the app would)."""
    Signer.from_settings(SigningSettings(), tmp_path)
    procs = SigningProcesses(key_path(SigningSettings(), tmp_path), 1, **kwargs)
    await procs.start()
    return procs


async def _kill_the_child(procs: SigningProcesses) -> _Child:
    """SIGKILL the only child and wait until it is gone; the child, for later checks."""
    (child,) = procs._children
    assert child is not None
    os.kill(child.proc.pid, signal.SIGKILL)
    await child.proc.wait()
    await asyncio.sleep(0.05)
    return child
