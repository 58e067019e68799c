"""Validate broker responses and SET payloads against the OB standard's own OpenAPI documents.

The documents are the unmodified v3.1.11 files in `SHARED/ob-openapi/` (tests/conftest.py's
SHARED = the folder beside the clone). Their `$ref`s ("#/components/...") resolve through a
`referencing` registry holding each document as one resource.

The v3.1.11 event-notifications document defines only OBEventNotification1 (resource-update
only). OBEventNotification2 (§5.6: resource-update, consent-authorization-revoked,
account-access-consent-linked-account-update) is assembled here from that document's own
components (OBEventSubject1, OBEventLink1, OBEventResourceUpdate1) per the OB data dictionary;
resource-update-only SETs are also checked against the document's OBEventNotification1 as is.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

import jsonschema
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT7

from tests.conftest import SHARED

EVENTS_DOC = SHARED / "ob-openapi" / "v3.1.11-events-openapi.yaml"
NOTIFICATIONS_DOC = SHARED / "ob-openapi" / "v3.1.11-event-notifications-openapi.yaml"
EVENTS_URI = "urn:ob:v3.1.11:events"
NOTIFICATIONS_URI = "urn:ob:v3.1.11:event-notifications"
JSON_MEDIA = "application/json; charset=utf-8"
RU = "urn:uk:org:openbanking:events:resource-update"
CAR = "urn:uk:org:openbanking:events:consent-authorization-revoked"
LAU = "urn:uk:org:openbanking:events:account-access-consent-linked-account-update"


@functools.cache
def _docs() -> tuple[dict[str, Any], dict[str, Any]]:
    events = yaml.safe_load(EVENTS_DOC.read_text("utf-8"))
    notifications = yaml.safe_load(NOTIFICATIONS_DOC.read_text("utf-8"))
    return _stringify_keys(events), _with_notification2(_stringify_keys(notifications))


def _stringify_keys(node: Any) -> Any:
    # YAML reads the response codes (`200:`) as ints; JSON Schema and lookups want strings.
    if isinstance(node, dict):
        return {str(k): _stringify_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_stringify_keys(v) for v in node]
    return node


def _with_notification2(doc: dict[str, Any]) -> dict[str, Any]:
    schemas = doc["components"]["schemas"]
    if "OBEventNotification2" in schemas:
        return doc
    subject = {"$ref": "#/components/schemas/OBEventSubject1"}
    reason = {"type": "string", "minLength": 1}
    events2 = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            RU: {"$ref": "#/components/schemas/OBEventResourceUpdate1"},
            CAR: {
                "type": "object",
                "properties": {"reason": reason, "subject": subject},
                "additionalProperties": False,
            },
            LAU: {
                "type": "object",
                "properties": {"reason": reason, "subject": subject},
                "required": ["subject"],
                "additionalProperties": False,
            },
        },
    }
    n2 = copy.deepcopy(schemas["OBEventNotification1"])
    n2["properties"]["events"] = events2
    schemas["OBEventNotification2"] = n2
    return doc


@functools.cache
def _registry() -> Registry:
    events, notifications = _docs()
    return Registry().with_resources(
        [
            (EVENTS_URI, DRAFT7.create_resource(events)),
            (NOTIFICATIONS_URI, DRAFT7.create_resource(notifications)),
        ]
    )


def _validate(uri: str, pointer: str, instance: Any) -> None:
    validator = jsonschema.Draft7Validator({"$ref": f"{uri}#{pointer}"}, registry=_registry())
    validator.validate(instance)


def validate_set_payload(claims: dict[str, Any]) -> None:
    """The decoded SET against OBEventNotification2 (and OBEventNotification1 when it fits)."""
    _validate(NOTIFICATIONS_URI, "/components/schemas/OBEventNotification2", claims)
    if set(claims["events"]) == {RU}:
        _validate(NOTIFICATIONS_URI, "/components/schemas/OBEventNotification1", claims)


def validate_poll_request(body: dict[str, Any]) -> None:
    """A request body the tests send as valid, against OBEventPolling1."""
    _validate(EVENTS_URI, "/components/schemas/OBEventPolling1", body)


def _operation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    events, _ = _docs()
    for template, item in events["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path):
            return template, item.get(method.lower(), {})
    return None


def check_response(method: str, path: str, status: int, headers: Any, body: bytes) -> None:
    """An OB response against the events document: a documented status, the interaction id,
    and, where the document gives the status a JSON body, that body against its schema.

    Statuses the document lists without a body (401, 405, 409, 415) may still carry our
    OBErrorResponse1; it is then checked against that schema.
    """
    found = _operation(method, path)
    assert found is not None, f"{path} is not in the OB events document"
    template, op = found
    assert headers.get("x-fapi-interaction-id"), f"{method} {path} {status}: no interaction id"
    responses = op.get("responses") or {}
    if status == 405 and not op:
        responses = {"405": {"$ref": "#/components/responses/405Error"}}
    assert str(status) in responses, f"{method} {template}: {status} is not a documented status"
    events, _ = _docs()
    ref = responses[str(status)]["$ref"]
    response = events["components"]["responses"][ref.rsplit("/", 1)[1]]
    content = response.get("content")
    if content is None:
        if body:
            _validate(EVENTS_URI, "/components/schemas/OBErrorResponse1", _json(body))
        return
    pointer = content[JSON_MEDIA]["schema"]["$ref"].lstrip("#")
    _validate(EVENTS_URI, pointer, _json(body))


def _json(body: bytes) -> Any:
    return json.loads(body)
