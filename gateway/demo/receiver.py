"""The demo's webhook receiver: checks each delivery's signature as a real receiver must
(HMAC-SHA256 over "<timestamp>." + body, a recent timestamp) and prints the event."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import orjson
from aiohttp import web

from ..webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify


def demo_secret_file(data_dir: Path) -> Path:
    """The demo's webhook key under the data dir, made once (never part of the repository)."""
    path = Path(data_dir) / "webhook-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def receiver_app(secret: bytes) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret, request.headers.get(TIMESTAMP_HEADER, ""), body,
                      request.headers.get(SIGNATURE_HEADER, "")):
            print("webhook refused: bad or stale signature", flush=True)
            return web.Response(status=401)
        event = orjson.loads(body)
        if "break_glass" in event:           # break_glass.opened / .ended: the grant
            g = event["break_glass"] or {}
            print(f"webhook {event.get('event')} (signature ok): grant {g.get('id')} by "
                  f"{g.get('role')} over {g.get('euo')}/{g.get('user') or '*'} until "
                  f"{g.get('ends_at')}, ticket {g.get('ticket')}"
                  + (f", ended by {g.get('ended_by')}" if g.get("ended_at") else ""), flush=True)
            return web.Response(status=204)
        if "alert" in event:                 # alert.raised: a rule of alerts.yaml
            a = event["alert"] or {}
            print(f"webhook {event.get('event')} (signature ok): alert {a.get('rule')} about "
                  f"{a.get('key')}: {a.get('observed')} (limit {a.get('limit')}), "
                  f"see {a.get('audit')}", flush=True)
            return web.Response(status=204)
        req = event.get("request") or {}
        print(f"webhook {event.get('event')} (signature ok): request {req.get('id')} "
              f"{req.get('type')} {req.get('status')} of {req.get('euo_id')}/{req.get('user_sub')}"
              f", due {req.get('due_at')}", flush=True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/webhooks", receive)
    return app
