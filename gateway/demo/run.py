"""`gateway demo`: embedded PostgreSQL, the demo backends, the gateway, and a token and a
curl line per role that show what each role sees."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

import asyncpg
from aiohttp import web

from ..database import database_url
from ..db import migrate, query
from ..embedded import EmbeddedPostgres
from ..settings import ConfigError, Settings, upstream_variable
from ..supervisor import use_uvloop, wait_for_signal
from ..tokens import DEV_SECRET_FILE, dev_secret, mint_token
from . import data as demo_data
from .backends import meeting_app, telephony_app
from .receiver import demo_secret_file, receiver_app

# (label, role, sub, partner, euo, path): what each printed curl line shows
SHOWCASE = [
    ("provider staff: a user record, personal directory removed", "provider_staff",
     "staff-sam", None, None, "/telephony/euos/euo-acme/users/u-alice"),
    ("provider staff: voicemails are refused", "provider_staff", "staff-sam", None, None,
     "/telephony/euos/euo-acme/users/u-alice/voicemails"),
    ("partner: a contracted EUO's call history (old numbers masked)", "partner",
     "pat@northwind", "p-northwind", None, "/telephony/euos/euo-acme/cdrs"),
    ("partner: an EUO of another partner is refused", "partner", "pat@northwind",
     "p-northwind", None, "/telephony/euos/euo-initech"),
    ("partner: an ended contract is refused", "partner", "bea@bluesky", "p-bluesky", None,
     "/telephony/euos/euo-umbrella"),
    ("EUO admin: call recordings of a user", "euo_admin", "admin@acme", None, "euo-acme",
     "/telephony/euos/euo-acme/users/u-bob/recordings"),
    ("EUO admin: meeting content is refused", "euo_admin", "admin@acme", None, "euo-acme",
     "/meeting/accounts/euo-acme/meetings/mtg-acme-1"),
    ("user: their own record, untouched", "user", "u-alice", None, "euo-acme",
     "/telephony/euos/euo-acme/users/u-alice"),
    ("user: their own voicemail, as WAV", "user", "u-alice", None, "euo-acme",
     "/telephony/euos/euo-acme/users/u-alice/voicemails/vm-u-alice-1 -o voicemail.wav"),
    ("user: a colleague's voicemails are refused", "user", "u-alice", None, "euo-acme",
     "/telephony/euos/euo-acme/users/u-bob/voicemails"),
    ("organizer: their meeting, others' private notes removed", "user", "u-alice", None,
     "euo-acme", "/meeting/accounts/euo-acme/meetings/mtg-acme-1"),
    ("participant: only their own private note", "user", "u-bob", None, "euo-acme",
     "/meeting/accounts/euo-acme/meetings/mtg-acme-1"),
    ("user: all of their data as a ZIP (export.json + attachments)", "user", "u-alice", None,
     "euo-acme", "/v1/me/export -o export.zip"),
    ("user: who accessed their data (run the lines above first)", "user", "u-alice", None,
     "euo-acme", "/v1/me/access-log"),
    ("provider staff: the access log, newest first", "provider_staff", "staff-sam", None, None,
     "/v1/audit?limit=5"),
    ("partner: connection statistics (a 400-day-old row is past retention: withheld)",
     "partner", "pat@northwind", "p-northwind", None, "/meeting/accounts/euo-acme/connection-stats"),
    ("provider staff: backends that served data past retention (run the line above first)",
     "provider_staff", "staff-sam", None, None, "/v1/admin/retention"),
    ("user: restrict processing of their mobile number (a webhook is printed below)", "user",
     "u-bob", None, "euo-acme", "/v1/me/requests -H 'Content-Type: application/json' "
     "-d '{\"type\": \"restriction\", \"data_sets\": [\"user_mobile\"]}'"),
    ("partner: why a contracted EUO's recordings are served (explain, no backend call)",
     "partner", "pat@northwind", "p-northwind", None,
     "/v1/explain?path=/telephony/euos/euo-acme/users/u-bob/recordings"),
    ("provider staff: explain for another caller (here the EUO admin: voicemails refused, "
     "and the policy lines that decide)", "provider_staff", "staff-sam", None, None,
     "/v1/explain?path=/telephony/euos/euo-acme/users/u-alice/voicemails"
     "&role=euo_admin&sub=admin@acme&euo=euo-acme"),
]

# who signs in to the console, one per role
CONSOLE = [("provider_staff", "staff-sam", None, None),
           ("partner", "pat@northwind", "p-northwind", None),
           ("euo_admin", "admin@acme", None, "euo-acme"),
           ("user", "u-alice", None, "euo-acme")]


def run_demo(settings: Settings, port: int | None, reset: bool = False) -> int:
    """The demo: embedded database (deleted first with reset), backends, gateway, tokens."""
    use_uvloop()
    if port is not None:
        settings = settings.with_(listen_port=port)
    if reset:
        reset_embedded_database(settings)
    settings = settings.with_(jwt_secret=dev_secret(settings), jwt_jwks_url=None,
                              jwt_public_key_file=None)
    with contextlib.ExitStack() as stack:
        dsn = database_url(settings, stack)
        asyncio.run(_run(settings, dsn))
    return 0


BACKEND_PORT = 8081        # telephony; meeting on the next port


def run_backends(settings: Settings, port: int | None) -> int:
    """`gateway demo --backends-only`: the demo backends alone (no database, no gateway),
    with the environment lines that point `gateway serve` at them, until Ctrl-C."""
    use_uvloop()
    asyncio.run(_run_backends(settings, BACKEND_PORT if port is None else port))
    return 0


async def _run_backends(settings: Settings, port: int) -> None:
    data = demo_data.build()
    runners, upstreams = [], {}
    try:
        for i, (service, make) in enumerate((("telephony", telephony_app),
                                             ("meeting", meeting_app))):
            want = port + i if port else 0
            try:
                runner, bound = await start_site(make(data), "127.0.0.1", want)
            except OSError as e:
                raise ConfigError(f"cannot listen on 127.0.0.1:{want} for the demo {service} "
                                  f"backend ({e.strerror or e}): give another --port") from None
            runners.append(runner)
            upstreams[service] = f"http://127.0.0.1:{bound}"
        _print_backends(settings, upstreams, data)
        await wait_for_signal()
    finally:
        for r in reversed(runners):
            await r.cleanup()


def _print_backends(settings: Settings, upstreams: dict[str, str], data) -> None:
    cli = gateway_command()
    print("Demo backends (no database, no gateway):")
    for service, url in upstreams.items():
        print(f"  {service:<10} {url}")
    print("\n# Run `gateway serve` against them, in another shell (a database: "
          "GATEWAY_DATABASE_URL, or the embedded one under GATEWAY_DATA_DIR):")
    for service, url in upstreams.items():
        print(f"export {upstream_variable(service)}={url}")
    if not settings.jwt_secret:        # the demo's development secret, as `gateway token` signs
        secret_file = (settings.data_dir / DEV_SECRET_FILE).resolve()
        dev_secret(settings)
        print(f'export GATEWAY_JWT_SECRET="$(cat {shlex.quote(str(secret_file))})"')
    print(f"export GATEWAY_DATA_DIR={shlex.quote(str(settings.data_dir.resolve()))}")
    print(f"{cli} serve")
    base = f"http://{settings.listen_host}:{settings.listen_port}"
    print("\n# Partners see an EUO only under a contract: the demo's, added by provider staff")
    print(f"STAFF=$({cli} token --role provider_staff --sub staff-sam)")
    for euo, (partner, end) in sorted(data.contracts().items()):
        body = json.dumps({"partner_id": partner,
                           "contract_end": end.isoformat() if end else None})
        print(f"curl -s -X PUT -H \"Authorization: Bearer $STAFF\" -H 'Content-Type: "
              f"application/json' -d '{body}' {base}/v1/admin/euos/{euo}")
    print("\nCtrl-C stops the backends.", flush=True)


def reset_embedded_database(settings: Settings) -> None:
    """Delete the embedded database under the data dir (a clean demo); refuse with an
    external database, which a demo must not wipe."""
    if settings.database_url:
        raise ConfigError("--reset deletes only the embedded database; GATEWAY_DATABASE_URL is set")
    pgdata = EmbeddedPostgres(settings.data_dir).pgdata
    if _running(pgdata / "postmaster.pid"):
        raise ConfigError(f"the embedded database under {pgdata} is running: stop the gateway "
                          "that uses it first")
    if pgdata.exists():
        shutil.rmtree(pgdata)
        print(f"deleted {pgdata}")


def _running(pid_file: Path) -> bool:
    """Whether the postmaster a pid file names is alive (a stale file after a crash is not)."""
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


async def seed_contracts(dsn: str, data: demo_data.DemoData) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        for euo, (partner, end) in data.contracts().items():
            await conn.execute(query("put_contract"), euo, partner, end)
    finally:
        await conn.close()


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve an app on host:port (0: any free port); return the runner and the port."""
    from ..app import GatewayRunner
    runner = GatewayRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, sock.getsockname()[1]


def gateway_command() -> str:
    """How to run this gateway's CLI from a shell, as the demo was run: `gateway` when that
    is on PATH, else the script's own path (`.venv/bin/gateway`), or `python -m gateway`."""
    script = Path(sys.argv[0])
    if script.name == "gateway" and script.exists():
        found = shutil.which("gateway")
        if found and Path(found).resolve() == script.resolve():
            return "gateway"
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(sys.executable)} -m gateway"


def print_break_glass_and_slice(settings: Settings, base: str, gateway: str) -> None:
    """The break-glass story (refused, opened, allowed and flagged, seen by the EUO admin and
    the user, ended early, refused again), explain offline, the EUO admin's slice downloaded
    and verified in one command, and the policy's own tests: shell lines to paste in order."""
    def token(role, sub, partner=None, euo=None):
        return mint_token(settings, role, sub, partner, euo, 8 * 3600)
    send = "curl -s -X {} -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json'"
    organizer = f"{base}/meeting/accounts/euo-acme/organizers/u-alice"
    grant_id = "$(python3 -c \"import json; print(json.load(open('grant.json'))['id'])\")"
    print("# provider staff: break-glass. Correcting an organizer's profile is refused; open a\n"
          "# 30-minute grant with purpose and ticket (saved in grant.json), and it is allowed\n"
          "# and flagged in the audit rows (a grant opened by an earlier run of the demo that is\n"
          "# still in force allows it too: `gateway demo --reset` starts clean)\n"
          f"  TOKEN={token('provider_staff', 'staff-sam')}\n"
          f"  {send.format('PATCH')} -d '{{\"language\": \"en\"}}' {organizer}\n"
          f"  {send.format('POST')} -d '{{\"euo\": \"euo-acme\", \"user\": \"u-alice\", "
          f"\"purpose\": \"organizer locked out\", \"ticket\": \"INC-1234\", \"minutes\": 30}}' "
          f"{base}/v1/break-glass | tee grant.json\n"
          f"  {send.format('PATCH')} -d '{{\"language\": \"en\"}}' {organizer}\n")
    print("# the EUO admin sees the grant (purpose, ticket, until when), u-alice sees it beside\n"
          "# the access in her access log; the EUO admin ends it early, and the same correction\n"
          "# is refused again\n"
          f"  ADMIN={token('euo_admin', 'admin@acme', euo='euo-acme')}\n"
          f"  ALICE={token('user', 'u-alice', euo='euo-acme')}\n"
          f"  curl -s -H \"Authorization: Bearer $ADMIN\" {base}/v1/break-glass\n"
          f"  curl -s -H \"Authorization: Bearer $ALICE\" '{base}/v1/me/access-log?limit=3'\n"
          f"  curl -s -X DELETE -H \"Authorization: Bearer $ADMIN\" {base}/v1/break-glass/{grant_id}\n"
          f"  {send.format('PATCH')} -d '{{\"language\": \"en\"}}' {organizer}\n")
    print("# explain offline, from the policy files alone (no database, no backend; contracts\n"
          "# as given):\n"
          f"  {gateway} policy explain --role partner --sub pat@northwind --partner p-northwind "
          "--contract euo-acme=p-northwind /telephony/euos/euo-acme/users/u-bob/recordings\n")
    print("# EUO admin: download their slice of the audit log (their rows, with inclusion proofs\n"
          "# against signed roots) and verify it against the published keys, in one command.\n"
          "# Rows are sealed every GATEWAY_AUDIT_CHECKPOINT_S (60 s by default): newer ones are\n"
          "# counted as rows_not_yet_sealed; run it again a minute later to see them proved\n"
          f"  ADMIN={token('euo_admin', 'admin@acme', euo='euo-acme')}\n"
          f"  {gateway} audit verify-slice '{base}/v1/audit/slice?limit=1000' --token \"$ADMIN\" "
          f"--public-key {base}/v1/audit/keys --save slice.json\n")
    print("# The policy's own tests (the floors and the visibility matrix as YAML cases; no "
          f"database needed):\n  {gateway} policy test\n")


async def _run(settings: Settings, dsn: str) -> None:
    from ..app import create_app

    data = demo_data.build()
    await seed_contracts(dsn, data)
    runners = []
    upstreams = {}
    for service, make in (("telephony", telephony_app), ("meeting", meeting_app)):
        runner, port = await start_site(make(data), "127.0.0.1", 0)
        runners.append(runner)
        upstreams[service] = f"http://127.0.0.1:{port}"
    settings = settings.with_(upstreams=upstreams)
    if settings.webhook_url is None:      # the demo's own receiver, unless one is configured
        key_file = demo_secret_file(settings.data_dir)
        runner, port = await start_site(receiver_app(key_file.read_bytes().strip()),
                                        "127.0.0.1", 0)
        runners.append(runner)
        settings = settings.with_(webhook_url=f"http://127.0.0.1:{port}/webhooks",
                                  webhook_secret_file=key_file)
    runner, port = await start_site(create_app(settings, dsn), settings.listen_host,
                                    settings.listen_port)
    runners.append(runner)
    base = f"http://{settings.listen_host}:{port}"
    print(f"\nGateway demo on {base}  (backends: {upstreams['telephony']}, "
          f"{upstreams['meeting']})")
    print(f"Webhooks (requests filed, due in 7 days, overdue, resolved, restrictions lifted) "
          f"go to {settings.webhook_url}, signed with the key in {settings.webhook_secret_file}"
          "; the demo's receiver checks each signature and prints the event here.")
    print("Partners: p-northwind (euo-acme, euo-globex), p-bluesky (euo-initech; euo-umbrella "
          "ended 2025-06-30)\n")
    for label, role, sub, partner, euo, path in SHOWCASE:
        token = mint_token(settings, role, sub, partner, euo, 8 * 3600)
        path, _, options = path.partition(" ")     # the URL, then curl's own options
        # quoted where a shell would read it otherwise (zsh refuses an unquoted `?`)
        print(f"# {label}\n  TOKEN={token}\n  curl -s -H \"Authorization: Bearer $TOKEN\" "
              f"{shlex.quote(base + path)}{' ' + options if options else ''}\n")
    print_break_glass_and_slice(settings, base, gateway_command())
    print(f"# Console: open {base}/console/ and paste one of these tokens (one per role)")
    for role, sub, partner, euo in CONSOLE:
        token = mint_token(settings, role, sub, partner, euo, 8 * 3600)
        print(f"  {role:<14} {sub:<14} {token}")
    print()
    print(f"More tokens: {gateway_command()} token --role user --euo euo-acme --sub u-bob  "
          f"(same GATEWAY_DATA_DIR={settings.data_dir})\nCtrl-C stops the demo.")
    try:
        await wait_for_signal()
    finally:
        for r in reversed(runners):
            await r.cleanup()
