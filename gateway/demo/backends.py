"""Demo telephony and meeting backends: exactly the backend API of docs/contract.md
(the lists of CDRs, connection statistics, voicemails, faxes and recordings paged by
from, to, limit and cursor)."""

from __future__ import annotations

import base64
import binascii
import copy
from datetime import UTC, datetime

import orjson
from aiohttp import web

from .data import DemoData

DATA = web.AppKey("data", DemoData)
# a page size the backend applies when the caller gives no limit (None: the whole list), as
# a real backend may: the gateway's export and erasure must then follow next_cursor
DEFAULT_LIMIT = web.AppKey("default_limit", int)


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _missing() -> web.HTTPNotFound:
    return web.HTTPNotFound(body=orjson.dumps({"error": "not found"}),
                            content_type="application/json")


def _user(request: web.Request) -> dict:
    d = request.app[DATA]
    euo, uid = request.match_info["euo"], request.match_info["user"]
    user = d.users.get(uid)
    if user is None or user["euo_id"] != euo:
        raise _missing()
    return user


def _blob(request: web.Request, listing: dict[str, list[dict]]) -> web.Response:
    user = _user(request)
    item_id = request.match_info["id"]
    if not any(i["id"] == item_id for i in listing.get(user["id"], [])):
        raise _missing()
    kind, data = request.app[DATA].blobs[item_id]
    if request.method == "DELETE":
        listing[user["id"]] = [i for i in listing[user["id"]] if i["id"] != item_id]
        return web.Response(status=204)
    return web.Response(body=data, content_type=kind)


async def _patch(request: web.Request, record: dict) -> web.Response:
    try:
        changes = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json({"error": "bad json"}, 400)
    if not isinstance(changes, dict) or not set(changes) <= set(record) - {"id", "euo_id"}:
        return _json({"error": "unknown or read-only field"}, 422)
    record.update(changes)
    return _json(record)


def _page(request: web.Request, rows: list[dict], at: str) -> dict:
    """One page of a list ordered by (`at`, id): `from` (inclusive) and `to` (exclusive)
    RFC 3339 times, `limit` rows after `cursor`; `next_cursor` (null on the last page) is
    the opaque key of the page's last row."""
    q = request.query
    try:
        start = datetime.fromisoformat(q["from"]) if "from" in q else None
        end = datetime.fromisoformat(q["to"]) if "to" in q else None
        limit = int(q["limit"]) if "limit" in q else request.app.get(DEFAULT_LIMIT)
        after = tuple(orjson.loads(base64.urlsafe_b64decode(q["cursor"] + "==="))) \
            if "cursor" in q else None
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise web.HTTPBadRequest(body=orjson.dumps({"error": "bad query"}),
                                 content_type="application/json") from None
    if (limit is not None and limit < 1) or (after is not None and (
            len(after) != 2 or not all(isinstance(k, str) for k in after))):
        raise web.HTTPBadRequest(body=orjson.dumps({"error": "bad limit or cursor"}),
                                 content_type="application/json")

    def key(row: dict) -> tuple[str, str]:
        when = datetime.fromisoformat(row[at]).astimezone(UTC)
        return (when.isoformat(), str(row.get("id") or orjson.dumps(row, option=orjson.OPT_SORT_KEYS)))
    keyed = sorted(((key(r), r) for r in rows
                    if (start is None or datetime.fromisoformat(r[at]) >= start)
                    and (end is None or datetime.fromisoformat(r[at]) < end)),
                   key=lambda kr: kr[0])
    if after is not None:
        keyed = [(k, r) for k, r in keyed if k > after]
    page = keyed if limit is None else keyed[:limit]
    more = len(page) < len(keyed)
    cursor = base64.urlsafe_b64encode(orjson.dumps(page[-1][0])).rstrip(b"=").decode() \
        if more else None
    return {"rows": [r for _, r in page], "next_cursor": cursor}


def telephony_app(data: DemoData, middlewares=(), default_limit: int | None = None
                  ) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    app[DATA] = data
    if default_limit is not None:
        app[DEFAULT_LIMIT] = default_limit
    r = web.RouteTableDef()

    def euo_of(request: web.Request) -> str:
        euo = request.match_info["euo"]
        if euo not in data.euos:
            raise _missing()
        return euo

    @r.get("/")
    async def root(request):
        return _json({"service": "telephony"})

    @r.get("/euos/{euo}")
    async def euo(request):
        return _json(data.euos[euo_of(request)])

    @r.get("/euos/{euo}/directory")
    async def directory(request):
        entries = data.directories.get(euo_of(request), [])
        if "user" in request.query:
            entries = [e for e in entries if e.get("user_id") == request.query["user"]]
        return _json({"entries": entries})

    @r.get("/euos/{euo}/users")
    async def users(request):
        euo = euo_of(request)
        return _json({"users": [u for u in data.users.values() if u["euo_id"] == euo]})

    @r.get("/euos/{euo}/users/{user}")
    async def user(request):
        return _json(_user(request))

    @r.patch("/euos/{euo}/users/{user}")
    async def patch_user(request):
        return await _patch(request, _user(request))

    @r.get("/euos/{euo}/users/{user}/personal-directory")
    async def personal_directory(request):
        return _json({"entries": _user(request)["personal_directory"]})

    @r.get("/euos/{euo}/users/{user}/voicemails")
    async def voicemails(request):
        page = _page(request, data.voicemails.get(_user(request)["id"], []), "received_at")
        return _json({"voicemails": page["rows"], "next_cursor": page["next_cursor"]})

    @r.route("*", "/euos/{euo}/users/{user}/voicemails/{id}")
    async def voicemail(request):
        return _blob(request, data.voicemails)

    @r.get("/euos/{euo}/users/{user}/faxes")
    async def faxes(request):
        page = _page(request, data.faxes.get(_user(request)["id"], []), "at")
        return _json({"faxes": page["rows"], "next_cursor": page["next_cursor"]})

    @r.get("/euos/{euo}/users/{user}/faxes/{id}")
    async def fax(request):
        return _blob(request, data.faxes)

    @r.get("/euos/{euo}/users/{user}/recordings")
    async def recordings(request):
        page = _page(request, data.recordings.get(_user(request)["id"], []), "at")
        return _json({"recordings": page["rows"], "next_cursor": page["next_cursor"]})

    @r.route("*", "/euos/{euo}/users/{user}/recordings/{id}")
    async def recording(request):
        return _blob(request, data.recordings)

    @r.get("/euos/{euo}/cdrs")
    async def cdrs(request):
        rows = data.cdrs[euo_of(request)]
        if "user" in request.query:
            rows = [c for c in rows if c["user_id"] == request.query["user"]]
        page = _page(request, rows, "start")
        return _json({"cdrs": page["rows"], "next_cursor": page["next_cursor"]})

    @r.get("/euos/{euo}/trunks/{trunk}/cdrs")
    async def trunk_cdrs(request):
        key = (euo_of(request), request.match_info["trunk"])
        if key not in data.trunk_cdrs:
            raise _missing()
        rows = data.trunk_cdrs[key]
        if "user" in request.query:
            rows = [c for c in rows if c["user_id"] == request.query["user"]]
        page = _page(request, rows, "start")
        return _json({"cdrs": page["rows"], "next_cursor": page["next_cursor"]})

    app.add_routes(r)
    return app


def meeting_app(data: DemoData, middlewares=(), default_limit: int | None = None
                ) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    app[DATA] = data
    if default_limit is not None:
        app[DEFAULT_LIMIT] = default_limit
    r = web.RouteTableDef()

    def organizer(request: web.Request) -> dict:
        euo, uid = request.match_info["euo"], request.match_info["user"]
        found = data.organizers.get(uid)
        if found is None or data.users[uid]["euo_id"] != euo:
            raise _missing()
        return found

    @r.get("/")
    async def root(request):
        return _json({"service": "meeting"})

    @r.get("/accounts/{euo}")
    async def account(request):
        found = data.accounts.get(request.match_info["euo"])
        if found is None:
            raise _missing()
        return _json(found)

    @r.get("/accounts/{euo}/organizers/{user}")
    async def get_organizer(request):
        return _json(organizer(request))

    @r.patch("/accounts/{euo}/organizers/{user}")
    async def patch_organizer(request):
        return await _patch(request, organizer(request))

    @r.route("*", "/accounts/{euo}/organizers/{user}/documents/{id}")
    async def document(request):
        org = organizer(request)
        doc_id = request.match_info["id"]
        if not any(doc["id"] == doc_id for doc in org["documents"]):
            raise _missing()
        if request.method == "DELETE":
            org["documents"] = [doc for doc in org["documents"] if doc["id"] != doc_id]
            data.blobs.pop(doc_id, None)
            return web.Response(status=204)
        kind, blob = data.blobs[doc_id]
        return web.Response(body=blob, content_type=kind)

    @r.delete("/accounts/{euo}/organizers/{user}/address-book/{entry}")
    async def delete_address(request):
        org = organizer(request)
        entry = request.match_info["entry"]
        if entry not in org["address_book"]:
            raise _missing()
        org["address_book"] = [a for a in org["address_book"] if a != entry]
        return web.Response(status=204)

    @r.delete("/accounts/{euo}/organizers/{user}/meetings/{meeting}")
    async def delete_meeting(request):
        org = organizer(request)
        mid = request.match_info["meeting"]
        found = data.meetings.get(mid)
        if found is None or found["organizer_id"] != org["id"]:
            raise _missing()          # only a meeting this organizer organises
        del data.meetings[mid]
        org["meetings"] = [m for m in org["meetings"] if m["id"] != mid]
        for uid, taken in data.participations.items():     # everyone's part went with it
            data.participations[uid] = [p for p in taken if p["id"] != mid]
        return web.Response(status=204)

    def in_meeting(request: web.Request) -> tuple[dict, str]:
        found = data.meetings.get(request.match_info["meeting"])
        uid = request.match_info["user"]
        if found is None or found["euo"] != request.match_info["euo"] or uid not in data.users:
            raise _missing()
        return found, uid

    def tidy(found: dict, uid: str) -> None:
        """A participation the user holds nothing of any more (name, email, chat, note) is
        no longer listed; while they hold some, it is, with what is left."""
        def holds(p: dict) -> bool:
            return (p["id"] != found["id"] or p.get("name") is not None
                    or any(c["author_id"] == uid for c in found["chat"])
                    or any(n["author_id"] == uid for n in found["private_notes"]))
        data.participations[uid] = [p for p in data.participations.get(uid, []) if holds(p)]

    @r.delete("/accounts/{euo}/meetings/{meeting}/chat/{user}")
    async def delete_chat(request):
        found, uid = in_meeting(request)
        if not any(c["author_id"] == uid for c in found["chat"]):
            raise _missing()
        found["chat"] = [c for c in found["chat"] if c["author_id"] != uid]
        tidy(found, uid)
        return web.Response(status=204)

    @r.delete("/accounts/{euo}/meetings/{meeting}/participants/{user}")
    async def delete_participation(request):
        found, uid = in_meeting(request)
        mine = [p for p in data.participations.get(uid, [])
                if p["id"] == found["id"] and p.get("name") is not None]
        if not mine:
            raise _missing()
        taken = {(p["name"], p["email"]) for p in mine}
        found["participants"] = [p for p in found["participants"]
                                 if (p["name"], p["email"]) not in taken]
        for p in mine:
            p["name"] = p["email"] = None
        tidy(found, uid)
        return web.Response(status=204)

    @r.delete("/accounts/{euo}/meetings/{meeting}/notes/{user}")
    async def delete_note(request):
        found = data.meetings.get(request.match_info["meeting"])
        author = request.match_info["user"]
        if found is None or found["euo"] != request.match_info["euo"] or not any(
                n["author_id"] == author for n in found["private_notes"]):
            raise _missing()
        found["private_notes"] = [n for n in found["private_notes"] if n["author_id"] != author]
        if author in data.users:
            tidy(found, author)
        return web.Response(status=204)

    @r.get("/accounts/{euo}/meetings/{meeting}")
    async def meeting(request):
        found = data.meetings.get(request.match_info["meeting"])
        if found is None or found["euo"] != request.match_info["euo"]:
            raise _missing()
        body = copy.copy(found)
        del body["euo"]
        return _json(body)

    @r.get("/accounts/{euo}/participants/{user}")
    async def participations(request):
        euo, uid = request.match_info["euo"], request.match_info["user"]
        if uid not in data.users or data.users[uid]["euo_id"] != euo:
            raise _missing()
        return _json({"id": uid, "meetings": data.participations.get(uid, [])})

    @r.get("/accounts/{euo}/connection-stats")
    async def stats(request):
        rows = data.stats.get(request.match_info["euo"])
        if rows is None:
            raise _missing()
        if "user" in request.query:
            rows = [s for s in rows if s["user_id"] == request.query["user"]]
        page = _page(request, rows, "at")
        return _json({"stats": page["rows"], "next_cursor": page["next_cursor"]})

    app.add_routes(r)
    return app
