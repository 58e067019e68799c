"""UK Open Banking wire rules: poll requests, SET payloads, event types and error bodies.

Everything here is pure checking and shaping; storage lives in broker/sets.py and
broker/subscriptions.py. Errors are InvalidRequest carrying an OB error code
(`UK.OBIE.Field.Invalid`, ...) and a JSON-ish path, which `ob_middleware` turns into an
OBErrorResponse1 body for the OB paths (`/events`, `/event-subscriptions...`) only; the Oxlin
and producer paths keep the generic error body of broker/app.py.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker import ids, jsonutil
from broker.errors import (
    AuthError,
    InvalidRequest,
    RequestError,
    StoreUnavailable,
    UnsupportedMediaType,
    from_http_status,
)
from broker.http import Handler

log = logging.getLogger(__name__)

# Scopes accepted on the OB endpoints: the v3.1.10+ list plus v3.1.2's `eventpolling` (spec §9.24).
POLL_SCOPES = ("accounts", "payments", "fundsconfirmations", "eventpolling")
INTERACTION_ID = "x-fapi-interaction-id"

FIELD_INVALID = "UK.OBIE.Field.Invalid"
FIELD_MISSING = "UK.OBIE.Field.Missing"
FIELD_UNEXPECTED = "UK.OBIE.Field.Unexpected"
HEADER_INVALID = "UK.OBIE.Header.Invalid"
HEADER_MISSING = "UK.OBIE.Header.Missing"
INVALID_FORMAT = "UK.OBIE.Resource.InvalidFormat"
NOT_FOUND = "UK.OBIE.Resource.NotFound"
ALREADY_EXISTS = "UK.OBIE.Rules.ResourceAlreadyExists"
UNSUPPORTED_EVENT_TYPE = "UK.OBIE.Unsupported.EventType"
UNEXPECTED = "UK.OBIE.UnexpectedError"

# OBEventNotification2 event URNs and their OBEventType1Code (namespaced enumeration).
RESOURCE_UPDATE = "urn:uk:org:openbanking:events:resource-update"
CONSENT_REVOKED = "urn:uk:org:openbanking:events:consent-authorization-revoked"
LINKED_ACCOUNT_UPDATE = "urn:uk:org:openbanking:events:account-access-consent-linked-account-update"
EVENT_CODES = {
    RESOURCE_UPDATE: "UK.OBIE.Resource-Update",
    CONSENT_REVOKED: "UK.OBIE.Consent-Authorization-Revoked",
    LINKED_ACCOUNT_UPDATE: "UK.OBIE.Account-Access-Consent-Linked-Account-Update",
}
# Subscribable codes: the three above plus Consent-Access-Revoked, which OB lists in the enum
# but for which OBEventNotification2 defines no event (so no SET ever carries it).
SUBSCRIBABLE_CODES = (*EVENT_CODES.values(), "UK.OBIE.Consent-Access-Revoked")
SUBJECT_TYPE = "http://openbanking.org.uk/rid_http://openbanking.org.uk/rty"
RID = "http://openbanking.org.uk/rid"
RTY = "http://openbanking.org.uk/rty"
RLK = "http://openbanking.org.uk/rlk"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_STATUS_TEXT = {
    400: "400 BadRequest",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 NotFound",
    405: "405 MethodNotAllowed",
    406: "406 NotAcceptable",
    409: "409 Conflict",
    413: "413 PayloadTooLarge",
    415: "415 UnsupportedMediaType",
    500: "500 InternalServerError",
    503: "503 ServiceUnavailable",
}


def bad(message: str, path: str | None = None, code: str = FIELD_INVALID) -> InvalidRequest:
    return InvalidRequest(message, code=code, path=path)


# ---------------------------------------------------------------------------------------------
# POST /events request (OBEventPolling1, RFC 8936 §2.2)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and one is made per request
class PollRequest:
    """A checked OBEventPolling1 body. `max_events` None: the client set no limit."""

    max_events: int | None = None
    return_immediately: bool | None = None
    ack: tuple[str, ...] = ()
    # jti -> (err, description); jtis also in `ack` are already removed (the ack wins).
    set_errs: dict[str, tuple[str, str]] = field(default_factory=dict)


def parse_poll_request(body: Any, *, max_acks: int) -> PollRequest:
    """Check a POST /events body whole; any violation raises before anything is applied.

    Unknown members are ignored (RFC 8936 extensibility; spec §9.17).
    """
    if not isinstance(body, dict):
        raise bad("body must be a JSON object (OBEventPolling1)", code=INVALID_FORMAT)
    max_events = body.get("maxEvents")
    if "maxEvents" in body:
        # bool is an int in Python; a JSON true is not an integer.
        if not isinstance(max_events, int) or isinstance(max_events, bool):
            raise bad("maxEvents must be an integer", "maxEvents")
        if max_events < 0:
            raise bad("maxEvents must be 0 or more", "maxEvents")
    immediate = body.get("returnImmediately")
    if "returnImmediately" in body and not isinstance(immediate, bool):
        raise bad("returnImmediately must be a boolean", "returnImmediately")
    if "ack" not in body and "setErrs" not in body:
        return PollRequest(max_events, immediate, (), {})  # a plain poll: most of them
    ack: list[str] = []
    if "ack" in body:
        raw = body["ack"]
        if not isinstance(raw, list):
            raise bad("ack must be an array of jti strings", "ack")
        if len(raw) > max_acks:
            raise bad(f"ack holds {len(raw)} jtis; at most {max_acks} per request", "ack")
        for i, jti in enumerate(raw):
            _check_text(jti, 128, f"ack[{i}]")
            ack.append(jti)
    set_errs: dict[str, tuple[str, str]] = {}
    if "setErrs" in body:
        raw = body["setErrs"]
        if not isinstance(raw, dict):
            raise bad("setErrs must be an object of jti -> {err, description}", "setErrs")
        if len(raw) > max_acks:
            raise bad(f"setErrs holds {len(raw)} jtis; at most {max_acks} per request", "setErrs")
        for jti, entry in raw.items():
            path = f"setErrs.{jti}"
            _check_text(jti, 128, path)
            if not isinstance(entry, dict):
                raise bad("each setErrs entry must be an object {err, description}", path)
            for member, limit in (("err", 40), ("description", 256)):
                if member not in entry:
                    raise bad(f"{path}.{member} is required", f"{path}.{member}", FIELD_MISSING)
                _check_text(entry[member], limit, f"{path}.{member}")
            set_errs[jti] = (entry["err"], entry["description"])
    acked = set(ack)
    return PollRequest(
        max_events=max_events,
        return_immediately=immediate,
        ack=tuple(dict.fromkeys(ack)),
        set_errs={j: e for j, e in set_errs.items() if j not in acked},
    )


def _check_text(value: Any, limit: int, path: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise bad(f"{path} must be a string of 1 to {limit} characters", path)


# ---------------------------------------------------------------------------------------------
# SET payloads (OBEventNotification2, §5.6)


@dataclass(frozen=True, slots=True)
class SetInput:
    """A producer's SET payload, checked; the broker adds iss, iat, jti and aud."""

    sub: str
    events: dict[str, Any]
    txn: str | None
    toe: int | None

    @property
    def event_codes(self) -> tuple[str, ...]:
        return tuple(EVENT_CODES[urn] for urn in self.events)


_SET_INPUT_MEMBERS = frozenset({"sub", "events", "txn", "toe"})
_BROKER_CLAIMS = frozenset({"iss", "iat", "jti", "aud"})


def parse_set_input(item: Any, at: str = "") -> SetInput:
    """Check one producer SET payload against OBEventNotification2; InvalidRequest if not."""
    if not isinstance(item, dict):
        raise bad(f"SET{at} must be a JSON object {{sub, events, txn?, toe?}}", at or None)
    for name in item:
        if name in _BROKER_CLAIMS:
            raise bad(f"SET{at}: '{name}' is set by the broker; leave it out", f"{at}.{name}")
        if name == "exp":
            raise bad(f"SET{at}: SETs carry no 'exp' (RFC 8417 §2.2)", f"{at}.exp")
        if name not in _SET_INPUT_MEMBERS:
            raise bad(f"SET{at}: unknown member '{name}'", f"{at}.{name}", FIELD_UNEXPECTED)
    sub = item.get("sub")
    if not isinstance(sub, str) or not _URI.match(sub):
        raise bad(f"SET{at}: 'sub' must be the URI of the affected resource", f"{at}.sub")
    txn = item.get("txn")
    if "txn" in item:
        _check_text(txn, 128, f"{at}.txn")
    toe = item.get("toe")
    if "toe" in item and (not isinstance(toe, int) or isinstance(toe, bool) or toe < 0):
        raise bad(f"SET{at}: 'toe' must be a time in epoch seconds", f"{at}.toe")
    events = item.get("events")
    if not isinstance(events, dict) or not events:
        raise bad(f"SET{at}: 'events' must be an object with at least one event", f"{at}.events")
    for urn, event in events.items():
        path = f"{at}.events.{urn}"
        if urn not in EVENT_CODES:
            known = ", ".join(EVENT_CODES)
            raise bad(f"SET{at}: unsupported event type '{urn}'; known: {known}", path)
        if not isinstance(event, dict):
            raise bad(f"SET{at}: event '{urn}' must be an object", path)
        allowed = {"subject"} if urn == RESOURCE_UPDATE else {"subject", "reason"}
        for name in event:
            if name not in allowed:
                raise bad(f"SET{at}: unknown member '{name}'", f"{path}.{name}", FIELD_UNEXPECTED)
        if "reason" in event:
            # Namespaced enumerations are open (ASPSPs may extend them): any code string.
            _check_text(event["reason"], 128, f"{path}.reason")
        if "subject" in event:
            _check_subject(event["subject"], f"{path}.subject")
        elif urn != CONSENT_REVOKED or RESOURCE_UPDATE not in events:
            # consent-authorization-revoked may omit it only beside a resource-update.
            raise bad(f"SET{at}: event '{urn}' needs a subject", f"{path}.subject", FIELD_MISSING)
        if urn == LINKED_ACCOUNT_UPDATE and event["subject"].get(RTY) != "account-access-consent":
            raise bad(
                f"SET{at}: '{urn}' subject must have rty 'account-access-consent'",
                f"{path}.subject.{RTY}",
            )
    return SetInput(sub=sub, events=events, txn=txn, toe=toe)


def _check_subject(subject: Any, path: str) -> None:
    """OBEventSubject1."""
    if not isinstance(subject, dict):
        raise bad("subject must be an object (OBEventSubject1)", path)
    for name in subject:
        if name not in ("subject_type", RID, RTY, RLK):
            raise bad(f"unknown subject member '{name}'", f"{path}.{name}", FIELD_UNEXPECTED)
    for name in ("subject_type", RID, RTY, RLK):
        if name not in subject:
            raise bad(f"subject needs '{name}'", f"{path}.{name}", FIELD_MISSING)
    if subject["subject_type"] != SUBJECT_TYPE:
        raise bad(f"subject_type must be '{SUBJECT_TYPE}'", f"{path}.subject_type")
    _check_text(subject[RID], 128, f"{path}.{RID}")
    _check_text(subject[RTY], 128, f"{path}.{RTY}")
    links = subject[RLK]
    if not isinstance(links, list) or not links:
        raise bad("rlk must be a non-empty array of {version, link}", f"{path}.{RLK}")
    for i, link in enumerate(links):
        at = f"{path}.{RLK}[{i}]"
        if not isinstance(link, dict) or set(link) != {"version", "link"}:
            raise bad("each rlk entry must be exactly {version, link}", at)
        _check_text(link["version"], 10, f"{at}.version")
        if not isinstance(link["link"], str) or not _URI.match(link["link"]):
            raise bad("rlk link must be a URI", f"{at}.link")


# ---------------------------------------------------------------------------------------------
# Errors as OBErrorResponse1, and x-fapi-interaction-id on every OB response


def is_ob_path(path: str) -> bool:
    return path == "/events" or path.startswith("/event-subscriptions")


def error_response(
    status: int,
    code: str,
    message: str,
    path: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OBErrorResponse1 body (Code, Id, Message, Errors[1])."""
    error: dict[str, str] = {"ErrorCode": code, "Message": message[:500]}
    if path:
        error["Path"] = path[:500]
    body = {
        "Code": _STATUS_TEXT.get(status, f"{status} Error"),
        # A unique reference for the error instance; the interaction id may exceed Max40Text.
        "Id": uuid.uuid4().hex,
        "Message": message[:500],
        "Errors": [error],
    }
    return jsonutil.json_response(body, status=status, headers=headers)


def _ob_code(e: RequestError) -> str:
    if e.code.startswith("UK.OBIE."):
        return e.code
    if isinstance(e, AuthError):
        return HEADER_MISSING if "missing" in e.message else HEADER_INVALID
    if isinstance(e, UnsupportedMediaType):
        return HEADER_INVALID
    if e.status == 404:
        return NOT_FOUND
    if e.status == 403:
        # OB has no scope code; the Authorization header's token is what falls short.
        return HEADER_INVALID
    # Other 400s from the shared helpers are about the body as a whole (not JSON, empty).
    return INVALID_FORMAT


def _error_path(e: RequestError) -> str | None:
    if e.path:
        return e.path
    if isinstance(e, AuthError) or e.status == 403:
        return "Authorization"
    if isinstance(e, UnsupportedMediaType):
        return "Content-Type"
    return None


def interaction_id(request: web.Request) -> str:
    """The caller's x-fapi-interaction-id, else a new one (a UUID, as FAPI asks)."""
    return request.headers.get(INTERACTION_ID) or ids.uuid4()


def answer_error(request: web.Request, e: Exception) -> web.Response:
    """The OBErrorResponse1 answer to an error; re-raises what is not one (see routing.py).

    The caller sets x-fapi-interaction-id, as on every OB answer.
    """
    if isinstance(e, web.HTTPException):
        if e.status < 400:
            raise e
        e = from_http_status(e.status, e.reason)
    if isinstance(e, RequestError):
        return error_response(e.status, _ob_code(e), e.message, _error_path(e), e.headers())
    if isinstance(e, StoreUnavailable):
        log.warning("store unavailable: %s", e)
        response = error_response(503, UNEXPECTED, "the event store is unavailable; retry")
        response.headers["Retry-After"] = "1"
        return response
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=e)
    return error_response(500, UNEXPECTED, "internal error")


def endpoint(handler: Handler) -> Handler:
    """Wrap an OB handler: OBErrorResponse1 errors, x-fapi-interaction-id on every answer.

    The counterpart of routing.endpoint for OB paths (see routing.py for why a wrapper and
    not a middleware).
    """

    async def guarded(request: web.Request) -> web.StreamResponse:
        interaction = interaction_id(request)
        response: web.StreamResponse
        try:
            response = await handler(request)
        except Exception as e:  # CancelledError is a BaseException: it goes through
            response = answer_error(request, e)
        response.headers[INTERACTION_ID] = interaction
        return response

    guarded.__name__ = getattr(handler, "__name__", "guarded")
    guarded.__doc__ = handler.__doc__
    return guarded
