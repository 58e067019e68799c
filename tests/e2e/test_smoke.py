async def test_subscribe_publish_poll_roundtrip(client, auth):
    r = await client.post("/queues/subscribe", json={"topics": ["connections"]}, headers=auth("alice"))
    assert r.status == 201
    loc = r.headers["Location"]
    r = await client.get(loc, headers=auth("alice"))
    assert r.status == 204
    ev = {"topic": "connections", "event_type": "SYNC_ALL_STARTED", "resource_type": "CONNECTION",
          "channel_definition_id": "redirect1", "resource": {"id": "c1"}}
    r = await client.post("/publish/users/alice/events", json=ev,
                          headers=auth("p", scopes=["events:publish"]))
    assert r.status == 202, await r.text()
    assert (await r.json())["queues"] == 1
    r = await client.get(loc, headers=auth("alice"))
    assert r.status == 200
    body = await r.json()
    assert [e["event_type"] for e in body] == ["SYNC_ALL_STARTED"]
