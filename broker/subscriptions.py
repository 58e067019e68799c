"""OB event subscriptions (§5.8): at most one per TPP, and the EventTypes filter of its SETs.

The subscription lives in one hash per client, beside its SETs (same hash tag), so the publish
script can check it in the same atomic step as it queues SETs. A `CallbackUrl` (https, ending
with `<version>/event-notifications`) gets the client's SETs pushed to it (broker/push.py).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from broker import callbacks, keyspace, ob
from broker.ob import bad
from broker.store import guard

ALL_TYPES = "*"
_CODE_BY_NAME = {code.lower(): code for code in ob.SUBSCRIBABLE_CODES}
_CODE_BY_NAME.update({urn.lower(): code for urn, code in ob.EVENT_CODES.items()})
_URI = re.compile(r"^https?://\S+$", re.IGNORECASE)
# A real-time callback "MUST end with <version>/event-notifications" (OB event subscription
# resource, e.g. https://tpp.com/open-banking/v3.1/event-notifications); query and fragment aside.
_CALLBACK_PATH = re.compile(r"/v?\d+(\.\d+)*/event-notifications/?$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    version: str
    callback_url: str | None
    # OB codes; None: every supported type (EventTypes omitted).
    event_types: tuple[str, ...] | None

    def to_data(self) -> dict[str, Any]:
        """The `Data` object of an OB response; absent optional fields are omitted, not null."""
        data: dict[str, Any] = {"EventSubscriptionId": self.id}
        if self.callback_url is not None:
            data["CallbackUrl"] = self.callback_url
        data["Version"] = self.version
        if self.event_types is not None:
            data["EventTypes"] = list(self.event_types)
        return data


@dataclass(frozen=True, slots=True)
class SubscriptionInput:
    version: str
    callback_url: str | None
    event_types: tuple[str, ...] | None


def parse_subscription(
    body: Any,
    *,
    path_id: str | None = None,
    allow_http: bool = False,
    allow_private: bool = False,
) -> SubscriptionInput:
    """Check an OBEventSubscription1 (POST) or OBEventSubscriptionResponse1 (PUT) body."""
    if not isinstance(body, dict) or not isinstance(body.get("Data"), dict):
        raise bad("body must be a JSON object with a 'Data' object", "Data", ob.FIELD_MISSING)
    data = body["Data"]
    if "Version" not in data:
        raise bad("Data.Version is required", "Data.Version", ob.FIELD_MISSING)
    version = data["Version"]
    if not isinstance(version, str) or not 1 <= len(version) <= 10:
        raise bad("Data.Version must be a string of 1 to 10 characters", "Data.Version")
    if path_id is not None and data.get("EventSubscriptionId", path_id) != path_id:
        raise bad(
            "Data.EventSubscriptionId does not match the id in the URL",
            "Data.EventSubscriptionId",
        )
    callback = data.get("CallbackUrl")
    if "CallbackUrl" in data and (
        not isinstance(callback, str) or len(callback) > 2048 or not _URI.match(callback)
    ):
        raise bad("Data.CallbackUrl must be an http(s) URL", "Data.CallbackUrl")
    if callback is not None:
        _check_callback(callback, allow_http, allow_private)
    types: tuple[str, ...] | None = None
    if "EventTypes" in data:
        raw = data["EventTypes"]
        if not isinstance(raw, list):
            raise bad("Data.EventTypes must be an array of event types", "Data.EventTypes")
        codes: list[str] = []
        for i, name in enumerate(raw):
            code = _CODE_BY_NAME.get(name.lower()) if isinstance(name, str) else None
            if code is None:
                raise bad(
                    f"unsupported event type {name!r}; supported: "
                    + ", ".join(ob.SUBSCRIBABLE_CODES),
                    f"Data.EventTypes[{i}]",
                    ob.UNSUPPORTED_EVENT_TYPE,
                )
            if code not in codes:
                codes.append(code)
        types = tuple(codes)
    return SubscriptionInput(version=version, callback_url=callback, event_types=types)


def _check_callback(callback: str, allow_http: bool, allow_private: bool) -> None:
    try:
        parts = urlsplit(callback)
        port = parts.port  # raises on a port that is not a number in range
    except ValueError:
        raise bad("Data.CallbackUrl is not a valid URL", "Data.CallbackUrl") from None
    if not allow_http and parts.scheme.lower() != "https":
        # OB callbacks use TLS; a plain-http one would be stored and never pushed to.
        raise bad("Data.CallbackUrl must be an https URL", "Data.CallbackUrl")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        # No credentials in the URL: they would be sent along with every SET.
        raise bad("Data.CallbackUrl must name a host, without user or password", "Data.CallbackUrl")
    del port
    refused = None if allow_private else callbacks.refusal(callback)
    if refused is not None:
        # A host name is judged when a push resolves it (broker/callbacks.py).
        raise bad(f"Data.CallbackUrl must reach a public address: {refused}", "Data.CallbackUrl")
    if not _CALLBACK_PATH.search(parts.path):
        raise bad(
            "Data.CallbackUrl must end with <version>/event-notifications, e.g."
            " https://tpp.example/open-banking/v3.1/event-notifications",
            "Data.CallbackUrl",
        )


class SubscriptionStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._create = redis.register_script(keyspace.lua("subs_create"))
        self._update = redis.register_script(keyspace.lua("subs_update"))
        self._delete = redis.register_script(keyspace.lua("subs_delete"))

    async def get(self, client_id: str) -> Subscription | None:
        raw: dict[Any, Any] = await guard(self.redis.hgetall(_key(client_id)))
        if not raw or b"id" not in raw:
            return None
        types = raw.get(b"types", ALL_TYPES.encode()).decode()
        callback = raw.get(b"callback")
        return Subscription(
            id=raw[b"id"].decode(),
            version=raw.get(b"version", b"").decode(),
            callback_url=callback.decode() if callback is not None else None,
            event_types=None if types == ALL_TYPES else tuple(t for t in types.split(",") if t),
        )

    async def create(self, client_id: str, new: SubscriptionInput) -> Subscription | None:
        """Create the client's subscription; None if it already has one (409)."""
        sub_id = secrets.token_urlsafe(18)  # 24 characters, within Max40Text
        created = await guard(
            self._create(keys=[_key(client_id)], args=[sub_id, *_fields(new), int(time.time())])
        )
        if not created:
            return None
        return Subscription(sub_id, new.version, new.callback_url, new.event_types)

    async def update(self, client_id: str, sub_id: str, new: SubscriptionInput) -> bool:
        """Replace the fields of the subscription `sub_id`; False if the client has none such."""
        done = await guard(self._update(keys=[_key(client_id)], args=[sub_id, *_fields(new)]))
        return bool(done)

    async def delete(self, client_id: str, sub_id: str) -> bool:
        done = await guard(self._delete(keys=[_key(client_id)], args=[sub_id]))
        return bool(done)


def _key(client_id: str) -> str:
    return keyspace.subscription(keyspace.client_tag(client_id))


def _fields(new: SubscriptionInput) -> list[str]:
    types = ALL_TYPES if new.event_types is None else "," + ",".join(new.event_types) + ","
    return [new.version, new.callback_url or "", types]
