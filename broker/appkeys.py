"""Every typed key of the aiohttp application state, in one place."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from broker.auth import TokenVerifier
    from broker.config import Settings
    from broker.gcstats import GcStats
    from broker.hub import Hub
    from broker.looplag import LoopLag
    from broker.metrics import Metrics
    from broker.persistence import Persistence
    from broker.push import Pusher
    from broker.sets import SetStore
    from broker.signing import LoopSigning, Signer
    from broker.signproc import SigningProcesses
    from broker.store import QueueStore
    from broker.subscriptions import SubscriptionStore

settings_key: web.AppKey[Settings] = web.AppKey("settings")
store_key: web.AppKey[QueueStore] = web.AppKey("store")
hub_key: web.AppKey[Hub] = web.AppKey("hub")
verifier_key: web.AppKey[TokenVerifier] = web.AppKey("verifier")
metrics_key: web.AppKey[Metrics] = web.AppKey("metrics")
gcstats_key: web.AppKey[GcStats] = web.AppKey("gcstats")
looplag_key: web.AppKey[LoopLag] = web.AppKey("looplag")
# What Redis said of its persistence at start (broker/persistence.py).
persistence_key: web.AppKey[Persistence] = web.AppKey("persistence")
# Tasks that must run to completion after their request was cancelled (client gone).
background_key: web.AppKey[set[asyncio.Future[Any]]] = web.AppKey("background")
# Open Banking: the SET signer, the SET store and the event subscriptions.
signer_key: web.AppKey[Signer] = web.AppKey("signer")
# What makes the SETs' signatures: child processes when signing.processes > 0 (signproc.py),
# else the event loop, one signature per turn (signing.LoopSigning).
signing_pool_key: web.AppKey[SigningProcesses | LoopSigning] = web.AppKey("signing_pool")
sets_key: web.AppKey[SetStore] = web.AppKey("sets")
subscriptions_key: web.AppKey[SubscriptionStore] = web.AppKey("subscriptions")
# Real-time push of SETs to subscriptions' CallbackUrl (broker/push.py).
pusher_key: web.AppKey[Pusher] = web.AppKey("pusher")
