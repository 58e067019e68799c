"""Settings: read once from a TOML file, overridden by BROKER_<SECTION>_<KEY> variables.

Every key lives in a section (`poll.max_wait_s`); its environment override is the upper-cased
`BROKER_POLL_MAX_WAIT_S`. Values are checked here, at start, so a bad one stops the broker with
a message naming the key and the value instead of failing on the first request.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

ENV_PREFIX = "BROKER_"


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # aiohttp's access log halves the request rate; operators turn it on when they need it.
    access_log: bool = False
    shutdown_timeout_s: float = 5.0
    # Listen backlog: aiohttp's default (128) overflows when thousands of pollers reconnect at
    # once (after a deploy); the kernel caps it at net.core.somaxconn.
    backlog: int = 4096
    # Garbage collector (broker/gcstats.py): survivors are frozen this often (0: never, and no
    # maintenance collections either), and everything is collected once this often to reclaim
    # rare cycles (0: only after a mass disconnect).
    gc_freeze_interval_s: float = 0.1
    gc_full_interval_s: float = 3600.0
    # Memory allocator (broker/allocator.py): "malloc" hands memory back after a mass
    # disconnect; "pymalloc" (CPython's own) keeps ~5% less per parked poll but holds on to
    # its peak. Set by re-executing `serve` once with PYTHONMALLOC, unless that is already set.
    allocator: str = "malloc"

    def check(self) -> None:
        _require(
            self.allocator in ("malloc", "pymalloc"),
            "server.allocator",
            self.allocator,
            "'malloc' or 'pymalloc'",
        )
        _require(
            self.gc_freeze_interval_s >= 0,
            "server.gc_freeze_interval_s",
            self.gc_freeze_interval_s,
            ">= 0",
        )
        _require(
            self.gc_full_interval_s >= 0,
            "server.gc_full_interval_s",
            self.gc_full_interval_s,
            ">= 0",
        )
        _require(0 <= self.port <= 65535, "server.port", self.port, "a TCP port (0-65535)")
        _require(1 <= self.workers <= 64, "server.workers", self.workers, "between 1 and 64")
        _require(1 <= self.backlog <= 65535, "server.backlog", self.backlog, "between 1 and 65535")


@dataclass(frozen=True)
class RedisSettings:
    # Empty: start an embedded Redis-compatible server (valkey) with its data under data_dir.
    url: str = ""
    data_dir: str = ".broker"
    # Pooled redis-py connections for occasional commands (subscriptions, readiness). Polls
    # and publishes share one more, pipelined; the long-poll hub adds one blocking.
    max_connections: int = 2
    socket_timeout_s: float = 5.0
    # The embedded server's fsync of its append-only file: "everysec" (a host crash can lose
    # about the last second of acknowledged events), "always" (none, for a slower write per
    # publish) or "no" (the OS decides, ~30 s). A Redis of your own keeps its own setting.
    embedded_appendfsync: str = "everysec"

    def check(self) -> None:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            _fail("redis.url", self.url, "a redis://, rediss:// or unix:// URL, or empty")
        _require(
            self.embedded_appendfsync in ("always", "everysec", "no"),
            "redis.embedded_appendfsync",
            self.embedded_appendfsync,
            "'always', 'everysec' or 'no'",
        )
        _require(
            1 <= self.max_connections <= 1024,
            "redis.max_connections",
            self.max_connections,
            "between 1 and 1024",
        )
        _require(
            self.socket_timeout_s > 0,
            "redis.socket_timeout_s",
            self.socket_timeout_s,
            "a positive number of seconds",
        )


@dataclass(frozen=True)
class AuthSettings:
    # Empty: run the dev issuer (key generated once under redis.data_dir, tokens from
    # `python -m broker token`).
    jwks_file: str = ""
    issuer: str = ""
    audience: str = ""
    # A verified token is remembered this long (never past its exp) so polls skip the signature.
    token_cache_s: float = 60.0
    leeway_s: float = 30.0

    def check(self) -> None:
        if self.jwks_file and not Path(self.jwks_file).is_file():
            _fail("auth.jwks_file", self.jwks_file, "an existing JWKS file")
        _require(self.token_cache_s >= 0, "auth.token_cache_s", self.token_cache_s, ">= 0")
        _require(self.leeway_s >= 0, "auth.leeway_s", self.leeway_s, ">= 0")


@dataclass(frozen=True)
class QueueSettings:
    ttl_s: int = 900
    topics: tuple[str, ...] = ("connections",)
    # Per-queue cap on stored events; past it the oldest are dropped (and counted).
    maxlen: int = 10000
    # Events returned by one GET at most; the rest come with the next GET.
    max_batch: int = 1000

    def check(self) -> None:
        _require(self.ttl_s >= 1, "queues.ttl_s", self.ttl_s, "at least 1 second")
        _require(
            len(self.topics) > 0 and all(t and "," not in t for t in self.topics),
            "queues.topics",
            list(self.topics),
            "a non-empty list of names without commas",
        )
        _require(self.maxlen >= 1, "queues.maxlen", self.maxlen, "at least 1")
        _require(self.max_batch >= 1, "queues.max_batch", self.max_batch, "at least 1")


@dataclass(frozen=True)
class PollSettings:
    max_wait_s: float = 30.0
    # Default hold of an OB long poll (returnImmediately false or absent), capped by max_wait_s.
    default_wait_s: float = 30.0
    # How long the hub's XREAD blocks before it re-arms; bounds how fast it notices shutdown.
    hub_block_ms: int = 5000
    # A poll that finds nothing is answered after its hold less up to this fraction (random):
    # clients that all connected at once (a deploy, a network blip) and re-poll at once keep
    # timing out together, every hold, unless something spreads them.
    hold_jitter: float = 0.05

    def check(self) -> None:
        _require(
            0 <= self.max_wait_s <= 3600,
            "poll.max_wait_s",
            self.max_wait_s,
            "between 0 and 3600 seconds",
        )
        _require(self.default_wait_s >= 0, "poll.default_wait_s", self.default_wait_s, ">= 0")
        _require(
            100 <= self.hub_block_ms <= 60000,
            "poll.hub_block_ms",
            self.hub_block_ms,
            "between 100 and 60000",
        )
        _require(
            0 <= self.hold_jitter <= 0.5,
            "poll.hold_jitter",
            self.hold_jitter,
            "between 0 and 0.5",
        )


@dataclass(frozen=True)
class PublishSettings:
    max_event_bytes: int = 65536
    max_batch: int = 1000
    # Largest request body accepted by any endpoint (413 past it).
    max_body_bytes: int = 4 * 1024 * 1024
    # How long a producer's Idempotency-Key is remembered.
    idempotency_ttl_s: int = 86400

    def check(self) -> None:
        _require(
            self.max_event_bytes >= 256,
            "publish.max_event_bytes",
            self.max_event_bytes,
            "at least 256",
        )
        _require(self.max_batch >= 1, "publish.max_batch", self.max_batch, "at least 1")
        _require(
            self.max_body_bytes >= self.max_event_bytes,
            "publish.max_body_bytes",
            self.max_body_bytes,
            "at least publish.max_event_bytes",
        )


@dataclass(frozen=True)
class SigningSettings:
    # Empty: a dev RSA key generated once under redis.data_dir.
    key_file: str = ""
    # Keys still published in the JWKS during a rotation (public or private PEM files).
    previous_key_files: tuple[str, ...] = ()
    # Their kids, in the same order; empty: each key's RFC 7638 thumbprint.
    previous_kids: tuple[str, ...] = ()
    # Empty: the RFC 7638 thumbprint of the key.
    kid: str = ""
    issuer: str = "https://aspsp.example.com/"
    # "ob": OB message-signing header (PS256, kid, OB iat/iss/tan, crit, no typ);
    # "rfc8417": typ secevent+jwt for OpenID SSF receivers.
    profile: str = "ob"
    # http://openbanking.org.uk/iss and /tan header values.
    ob_iss: str = "0015800001041RHAAY"
    ob_tan: str = "openbanking.org.uk"
    jwks_max_age_s: int = 300
    # Processes that make the PS256 signatures (signproc.py; a signature takes the event loop
    # ~300 µs otherwise); 0: sign on the loop.
    processes: int = 0

    def check(self) -> None:
        if self.key_file and not Path(self.key_file).is_file():
            _fail("signing.key_file", self.key_file, "an existing PEM file")
        for f in self.previous_key_files:
            if not Path(f).is_file():
                _fail("signing.previous_key_files", f, "existing PEM files")
        _require(
            self.profile in ("ob", "rfc8417"), "signing.profile", self.profile, "'ob' or 'rfc8417'"
        )
        _require(
            not self.previous_kids or len(self.previous_kids) == len(self.previous_key_files),
            "signing.previous_kids",
            list(self.previous_kids),
            "one kid per signing.previous_key_files entry, or empty",
        )
        _require(self.jwks_max_age_s >= 0, "signing.jwks_max_age_s", self.jwks_max_age_s, ">= 0")


@dataclass(frozen=True)
class EventSettings:
    # Server cap on SETs per POST /events response (OB asks ASPSPs to document it).
    max_events: int = 100
    # 0: unacked SETs are redelivered on every poll; else held back this long after delivery.
    redelivery_s: float = 0.0
    # Unacked SETs older than this are dropped (and counted).
    retention_s: int = 7 * 24 * 3600
    # Largest ack/setErrs list accepted in one request.
    max_acks: int = 1000

    def check(self) -> None:
        _require(
            1 <= self.max_events <= 10000,
            "events.max_events",
            self.max_events,
            "between 1 and 10000",
        )
        _require(self.redelivery_s >= 0, "events.redelivery_s", self.redelivery_s, ">= 0")
        _require(self.retention_s >= 1, "events.retention_s", self.retention_s, "at least 1")
        _require(self.max_acks >= 1, "events.max_acks", self.max_acks, "at least 1")


@dataclass(frozen=True)
class PushSettings:
    """Real-time push of SETs to a subscription's CallbackUrl (broker/push.py)."""

    enabled: bool = True
    # One POST's time-out; no reply in time counts as a failure to retry.
    timeout_s: float = 10.0
    # Attempts per SET before the callback is declared unresponsive for it (it stays pollable).
    max_attempts: int = 8
    # The wait after the first failure, doubled after each one, never over max_backoff_s.
    backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    # How often a worker looks for pushes that fell due (a publish in the same worker wakes it).
    interval_s: float = 1.0
    # OB callbacks are TLS only; plain http is for tests and development.
    allow_http: bool = False
    # Callbacks may reach public (global unicast) addresses only, checked at connect time
    # (broker/callbacks.py): not loopback, private, link-local (cloud metadata) or reserved
    # ranges. Lift it for tests, or for TPPs reached over a private network.
    allow_private_addresses: bool = False
    # Sent as x-fapi-financial-id when set (the 3.1.9 OAS requires it).
    financial_id: str = ""

    def check(self) -> None:
        _require(self.timeout_s > 0, "push.timeout_s", self.timeout_s, "a positive number")
        _require(self.max_attempts >= 1, "push.max_attempts", self.max_attempts, "at least 1")
        _require(self.backoff_s > 0, "push.backoff_s", self.backoff_s, "a positive number")
        _require(
            self.max_backoff_s >= self.backoff_s,
            "push.max_backoff_s",
            self.max_backoff_s,
            ">= push.backoff_s",
        )
        _require(self.interval_s > 0, "push.interval_s", self.interval_s, "a positive number")


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    queues: QueueSettings = field(default_factory=QueueSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    events: EventSettings = field(default_factory=EventSettings)
    push: PushSettings = field(default_factory=PushSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.redis.data_dir)

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some keys changed, e.g. `s.replace(poll={"max_wait_s": 1})` (tests)."""
        raw = {name: dict(values) for name, values in sections.items()}
        return _build(raw, base=self)


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `path` (TOML), apply BROKER_* overrides from `environ`, check every value."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"Config file '{path}' does not exist.") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Config file '{path}' is not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"Config '{section}' must be a [section] table.")
            raw[section] = dict(values)
    for name, value in (os.environ if environ is None else environ).items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in _SECTIONS or not key:
            continue  # BROKER_* variables that are not settings (e.g. BROKER_TOKEN in scripts)
        raw.setdefault(section, {})[key] = _EnvValue(value)
    return _build(raw, base=Settings())


class _EnvValue(str):
    """A value that came from the environment, so it is parsed from text."""


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)
}


def sections() -> frozenset[str]:
    """The settings' sections: the SECTION of a BROKER_SECTION_KEY override."""
    return frozenset(_SECTIONS)


def _build(raw: dict[str, dict[str, Any]], base: Settings) -> Settings:
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"Config section '{section}' is unknown; known: {sorted(_SECTIONS)}.")
        cls = _SECTIONS[section]
        hints = typing.get_type_hints(cls)
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"Config '{section}.{key}' is unknown; known keys: {sorted(hints)}."
                )
            changes[key] = _coerce(f"{section}.{key}", value, hints[key])
        sections[section] = dataclasses.replace(getattr(base, section), **changes)
    settings = dataclasses.replace(base, **sections)
    for f in dataclasses.fields(settings):
        getattr(settings, f.name).check()
    return settings


def _coerce(key: str, value: Any, typ: Any) -> Any:
    env = isinstance(value, _EnvValue)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if env and value.lower() in ("1", "true", "yes", "on"):
            return True
        if env and value.lower() in ("0", "false", "no", "off"):
            return False
        _fail(key, value, "a boolean (true or false)")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if env:
            try:
                return int(value)
            except ValueError:
                pass
        _fail(key, value, "an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if env:
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, value, "a number")
    if typ is str:
        if isinstance(value, str):
            return str(value)
        _fail(key, value, "a string")
    if typing.get_origin(typ) is tuple or isinstance(typ, types.GenericAlias):
        if env:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        _fail(key, value, "a list of strings (comma-separated in the environment)")
    raise ConfigError(f"Config '{key}' has an unsupported type {typ!r}.")  # pragma: no cover


def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise ConfigError(f"Config '{key}' has value {value!r}: expected {expected}.")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        _fail(key, value, expected)
