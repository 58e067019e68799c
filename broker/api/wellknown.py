"""GET /.well-known/jwks.json: the public keys that verify the broker's SETs (no auth)."""

from __future__ import annotations

from aiohttp import web

from broker import jsonutil
from broker.appkeys import signer_key

routes = web.RouteTableDef()


@routes.get("/.well-known/jwks.json")
async def jwks(request: web.Request) -> web.Response:
    """Current and previous signing keys (kid, alg PS256, use sig); public members only."""
    signer = request.app[signer_key]
    return jsonutil.raw_json_response(
        signer.jwks_body,
        headers={"Cache-Control": f"public, max-age={signer.jwks_max_age_s}"},
    )
