"""Command line: `python -m broker serve | token | publish`. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from broker.config import load_settings
from broker.errors import BrokerError

DEFAULT_CONFIG = "config/broker.toml"


def _config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP broker")
    p.add_argument("--config", help=f"TOML settings file (default {DEFAULT_CONFIG})")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="worker processes sharing the port")

    p = sub.add_parser("token", help="mint a dev access token with the dev issuer key")
    p.add_argument("--config")
    p.add_argument("--sub", required=True, help="subject (the Oxlin user id)")
    p.add_argument("--scope", default="", help='space-separated scopes, e.g. "events:publish"')
    p.add_argument("--client-id", help="OB client id (TPP) claim")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")

    p = sub.add_parser("publish", help="publish Oxlin events for a user through a running broker")
    p.add_argument("--config")
    p.add_argument("--url", help="broker base URL (default from the config's server section)")
    p.add_argument("--user", required=True, help="user id whose queues receive the events")
    p.add_argument(
        "--token",
        default=os.environ.get("PRODUCER_TOKEN"),
        help="producer token (default: $PRODUCER_TOKEN, else a dev token)",
    )
    p.add_argument("events", help="JSON event object or array; '-' reads stdin")

    args = parser.parse_args(argv)
    try:
        settings = load_settings(_config_path(args.config))
        if args.command == "serve":
            if argv is None:  # the real command line, which a restart can run again
                from broker import allocator

                # First, before the server is imported: may replace this process.
                allocator.ensure(settings.server.allocator)
            from broker.server import serve

            changes: dict[str, object] = {}
            for name in ("host", "port", "workers"):
                if getattr(args, name) is not None:
                    changes[name] = getattr(args, name)
            if changes:
                settings = settings.replace(server=changes)
            return serve(settings)
        if args.command == "token":
            print(_mint(settings, args.sub, args.scope.split(), args.client_id, args.ttl))
            return 0
        if args.command == "publish":
            return _publish(settings, args)
    except BrokerError as e:
        print(f"broker: {e.message}", file=sys.stderr)
        return 2
    return 1  # pragma: no cover - argparse enforces a command


def _mint(settings: object, sub: str, scopes: list[str], client_id: str | None, ttl: int) -> str:
    from broker.auth import DevIssuer
    from broker.config import Settings

    assert isinstance(settings, Settings)
    if settings.auth.jwks_file:
        raise BrokerError(
            "auth.jwks_file is set: tokens come from your identity provider, "
            "not from the dev issuer"
        )
    issuer = DevIssuer.load_or_create(settings.data_dir)
    kwargs: dict[str, object] = {"audience": settings.auth.audience}
    if settings.auth.issuer:
        kwargs["issuer"] = settings.auth.issuer
    return issuer.mint(sub, scopes=scopes, client_id=client_id, ttl_s=ttl, **kwargs)  # type: ignore[arg-type]


def _publish(settings: object, args: argparse.Namespace) -> int:
    from broker.config import Settings

    assert isinstance(settings, Settings)
    text = sys.stdin.read() if args.events == "-" else args.events
    try:
        json.loads(text)
    except ValueError as e:
        raise BrokerError(f"events argument is not JSON: {e}") from None
    url = args.url or f"http://{settings.server.host}:{settings.server.port}"
    token = args.token or _mint(settings, "cli-producer", ["events:publish"], None, 300)
    req = urllib.request.Request(
        f"{url.rstrip('/')}/publish/users/{urllib.parse.quote(args.user, safe='')}/events",
        data=text.encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(resp.read().decode())
            return 0
    except urllib.error.HTTPError as e:
        print(f"broker: HTTP {e.code}: {e.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        raise BrokerError(f"cannot reach the broker at {url}: {e.reason}") from None
