"""broker/ob.py and broker/subscriptions.py checks: poll bodies, SET payloads, subscriptions."""

from __future__ import annotations

import pytest

from broker import ob
from broker.errors import InvalidRequest
from broker.subscriptions import parse_subscription
from tests import obschema
from tests.ob_helpers import CAR, RU, resource_update, subject


def test_poll_request_defaults():
    p = ob.parse_poll_request({}, max_acks=10)
    assert p == ob.PollRequest()
    assert p.max_events is None and p.return_immediately is None


def test_a_plain_poll_body_is_read_like_any_other():
    """No ack and no setErrs (most polls) take a shorter path to the same result."""
    plain = ob.parse_poll_request({"maxEvents": 7, "returnImmediately": True}, max_acks=10)
    full = ob.parse_poll_request(
        {"maxEvents": 7, "returnImmediately": True, "ack": [], "setErrs": {}}, max_acks=10
    )
    assert plain == full == ob.PollRequest(7, True, (), {})
    with pytest.raises(InvalidRequest):  # still checked before the short path
        ob.parse_poll_request({"maxEvents": "7"}, max_acks=10)


def test_poll_request_dedupes_acks_and_ack_wins_over_set_errs():
    body = {
        "ack": ["a", "b", "a"],
        "setErrs": {"a": {"err": "e", "description": "d"}, "c": {"err": "e", "description": "d"}},
        "maxEvents": 0,
        "returnImmediately": False,
    }
    obschema.validate_poll_request(body)
    p = ob.parse_poll_request(body, max_acks=10)
    assert p.ack == ("a", "b")
    assert p.set_errs == {"c": ("e", "d")}
    assert (p.max_events, p.return_immediately) == (0, False)


@pytest.mark.parametrize(
    "body",
    [
        {"maxEvents": -1},
        {"maxEvents": 1.0},
        {"returnImmediately": None},
        {"ack": None},
        {"ack": ["ok", None]},
        {"setErrs": {"": {"err": "e", "description": "d"}}},
        {"setErrs": {"a": {"err": "e", "description": None}}},
    ],
)
def test_poll_request_rejections(body):
    with pytest.raises(InvalidRequest) as e:
        ob.parse_poll_request(body, max_acks=10)
    assert e.value.code.startswith("UK.OBIE.Field.")
    assert e.value.path


def test_set_input_examples_from_the_ob_documentation():
    cbpii = resource_update("88379")
    cbpii["events"][CAR] = {}  # consent-authorization-revoked beside a resource-update
    s = ob.parse_set_input(cbpii)
    assert s.event_codes == ("UK.OBIE.Resource-Update", "UK.OBIE.Consent-Authorization-Revoked")
    revoked_alone = {"sub": "https://x/aac-1", "events": {CAR: {"subject": subject("aac-1")}}}
    assert ob.parse_set_input(revoked_alone).txn is None


def test_set_input_error_paths_name_the_field():
    p = resource_update()
    p["events"][RU]["subject"]["http://openbanking.org.uk/rlk"] = [
        {"version": "v" * 11, "link": "https://x"}
    ]
    with pytest.raises(InvalidRequest) as e:
        ob.parse_set_input(p, "[3]")
    assert e.value.path == f"[3].events.{RU}.subject.http://openbanking.org.uk/rlk[0].version"


def test_subscription_event_types_accept_codes_and_urns_case_insensitively():
    s = parse_subscription(
        {
            "Data": {
                "Version": "3.1",
                "EventTypes": [
                    "uk.obie.resource-update",
                    RU,
                    "UK.OBIE.Consent-Access-Revoked",
                    "urn:uk:org:openbanking:events:account-access-consent-linked-account-update",
                ],
            }
        }
    )
    assert s.event_types == (
        "UK.OBIE.Resource-Update",
        "UK.OBIE.Consent-Access-Revoked",
        "UK.OBIE.Account-Access-Consent-Linked-Account-Update",
    )


def test_subscription_rejections():
    with pytest.raises(InvalidRequest) as e:
        parse_subscription({"Data": {"Version": "3.1", "EventTypes": [7]}})
    assert e.value.code == "UK.OBIE.Unsupported.EventType"
    with pytest.raises(InvalidRequest):
        parse_subscription([])


def test_ob_paths():
    assert ob.is_ob_path("/events")
    assert ob.is_ob_path("/event-subscriptions/abc")
    assert not ob.is_ob_path("/events/x")
    assert not ob.is_ob_path("/queues/subscribe")
