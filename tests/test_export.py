"""Self-service export: all of a user's data, nothing of anyone else's, audited, and a
failed backend call fails the export."""

from __future__ import annotations

import contextlib
import io
import shutil
import zipfile

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from gateway.demo.run import start_site
from gateway.export import gather as export_gather
from gateway.export.document import foreign, strip
from gateway.policy.catalog import PolicyError
from gateway.policy.catalog_files import load_catalog
from gateway.policy.policyset import load_policy_set
from gateway.policy.roles import RoleError, load_roles

from .conftest import POLICY_DIR, call, gateway_settings, running_gateway, wait_for

SESSION = web.AppKey("session", aiohttp.ClientSession)

# every data set (docs/contract.md) u-alice may read and is within its retention: her
# EUO's identity and her entry of its directory, her own data, and the content of mtg-acme-1
# (she organises it and took part); her outgoing fax was sent, so it is past (README.md,
# Retention: the data subject's export is not exempt)
ALICE_DATA_SETS = {
    "telephony": {"euo_identity", "company_directory", "user_name", "user_email",
                  "user_language", "user_mobile", "user_address", "personal_directory",
                  "voicemails", "faxes_incoming", "call_recordings", "call_history"},
    "meeting": {"account_name", "company_name", "organizer_name", "organizer_email",
                "organizer_language", "address_book", "organizer_documents", "meeting_list",
                "meeting_topic", "meeting_agenda", "meeting_invitees", "meeting_documents",
                "whiteboard_drawings", "chat_messages", "meeting_minutes", "private_notes",
                "participant_name", "participant_email", "connection_statistics"},
}
# u-bob took part in mtg-acme-1 without organising it: of its content, only his own note
# and chat messages; his participation (the name and email he joined under)
BOB_MEETING = {"account_name", "company_name", "organizer_name", "organizer_email",
               "organizer_language", "address_book", "organizer_documents", "meeting_list",
               "private_notes", "chat_messages", "participant_name", "participant_email",
               "connection_statistics"}


async def export_json(http, gateway, token):
    status, _, body = await call(http, "GET", gateway + "/v1/me/export?format=json", token)
    assert status == 200, body
    return orjson.loads(body), body


async def test_export_holds_every_data_set_about_the_user(gateway, http, token_for):
    doc, _ = await export_json(http, gateway, token_for("alice"))
    assert doc["subject"] == {"user": "u-alice", "euo": "euo-acme"}
    for service, expected in ALICE_DATA_SETS.items():
        assert set(doc["services"][service]) == expected
    about = doc["services"]["telephony"]["voicemails"]["about"]
    assert about["purpose"] == "Voice messaging" and about["retention"] and about["collected_by"]
    assert doc["export"]["exported_at"] and doc["export"]["exported_from"]["client_addr"]


async def test_export_holds_nothing_about_anyone_else(gateway, http, token_for):
    doc, body = await export_json(http, gateway, token_for("alice"))
    notes = doc["services"]["meeting"]["private_notes"]["records"]
    assert {r["data"]["author_id"] for r in notes} == {"u-alice"}
    cdrs = doc["services"]["telephony"]["call_history"]["records"]
    assert cdrs and {r["data"]["user_id"] for r in cdrs} == {"u-alice"}
    stats = doc["services"]["meeting"]["connection_statistics"]["records"]
    assert {r["data"]["user_id"] for r in stats} == {"u-alice"}
    directory = doc["services"]["telephony"]["company_directory"]["records"]
    assert [r["data"]["user_id"] for r in directory] == ["u-alice"]
    for other in (b"Private thought of u-bob", b"Peeters'", b"+32470111202", b"u-dirk"):
        assert other not in body
    assert doc["not_held"] == []          # every source answered: nothing known missing


async def test_trunk_call_records_are_in_the_export(gateway, http, token_for, demo):
    """SIP-trunk CDRs, found through the trunks the EUO's record lists, asked per user."""
    doc, _ = await export_json(http, gateway, token_for("alice"))
    records = doc["services"]["telephony"]["call_history"]["records"]
    trunk = {r["data"]["id"] for r in records
             if r["source"] == "GET /telephony/euos/euo-acme/trunks/trunk-1/cdrs?user=u-alice"}
    expected = {c["id"] for c in demo.trunk_cdrs[("euo-acme", "trunk-1")]
                if c["user_id"] == "u-alice"}
    assert expected and trunk == expected


async def test_participant_side_meeting_data_is_in_the_export(gateway, http, token_for, db):
    """u-bob took part in u-alice's meeting: his own note and chat are in his export, nothing
    else of the meeting, and the rows of his export name him alone."""
    status, headers, body = await call(http, "GET", gateway + "/v1/me/export?format=json",
                                       token_for("bob"))
    assert status == 200, body
    doc = orjson.loads(body)
    assert set(doc["services"]["meeting"]) == BOB_MEETING
    meeting = doc["services"]["meeting"]
    source = "GET /meeting/accounts/euo-acme/meetings/mtg-acme-1"
    assert [r["data"] for r in meeting["private_notes"]["records"]] == [
        {"author_id": "u-bob", "text": "Private thought of u-bob"}]
    chat = meeting["chat_messages"]["records"]
    assert [r["data"]["text"] for r in chat] == ["Hello all, Bob here"]
    assert {r["source"] for r in chat} == {source}
    joined = meeting["participant_name"]["records"]        # his participations, and his
    assert {(r["source"], r["data"]["name"]) for r in joined} == {   # entry in the meeting
        ("GET /meeting/accounts/euo-acme/participants/u-bob", "Bob Peeters"),
        (source, "Bob Peeters")}
    for other in (b"Remember to send the budget", b"Alice here", b"Carla here", b"Weekly planning",
                  b"Budget approved", b"Private thought of u-carla"):
        assert other not in body
    rows = await db.fetch("select route, actor_sub, subject_users, data_sets from audit_log "
                          "where request_id = $1", headers["X-Request-Id"])
    assert {r["actor_sub"] for r in rows} == {"u-bob"}
    assert {u for r in rows for u in r["subject_users"]} == {"u-bob"}
    (meeting_row,) = [r for r in rows if r["route"] == "meeting:/accounts/{euo}/meetings/{meeting}"]
    assert meeting_row["subject_users"] == ["u-bob"]
    assert set(meeting_row["data_sets"]) == {"private_notes", "chat_messages",
                                             "participant_name", "participant_email"}


async def test_each_data_set_says_purpose_retention_and_recipients_from_the_policy(
        gateway, http, token_for):
    doc, _ = await export_json(http, gateway, token_for("alice"))
    tel, meet = doc["services"]["telephony"], doc["services"]["meeting"]
    assert meet["private_notes"]["about"]["recipients"] == [{"role": "user", "relation": "author"}]
    assert tel["voicemails"]["about"]["recipients"] == [{"role": "user", "relation": "self"}]
    assert tel["call_recordings"]["about"]["recipients"] == [
        {"role": "partner", "relation": "contracted_partner"},
        {"role": "euo_admin", "relation": "same_euo"}, {"role": "user", "relation": "self"}]
    assert meet["chat_messages"]["about"]["recipients"] == [
        {"role": "user", "relation": "organizer"}, {"role": "user", "relation": "author"}]
    about = tel["call_history"]["about"]
    assert about["purpose"] == "Invoicing, reporting and fraud detection"
    assert about["retention"].startswith("Duration of the contract + 6 months")


async def test_a_changed_policy_changes_the_recipients(backends, database_url, http, token_for,
                                                       tmp_path):
    """Recipients are the policy's, not words: a policy that gives voicemails to EUO admins
    too makes the export say so."""
    policy = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy)
    with open(policy / "policy.csv", "a") as f:
        f.write("p, euo_admin, same_euo, voicemails, read\n")
    settings = gateway_settings(backends["urls"], policy_dir=policy)
    async with running_gateway(settings, database_url) as gw:
        doc, _ = await export_json(http, gw, token_for("alice"))
    assert doc["services"]["telephony"]["voicemails"]["about"]["recipients"] == [
        {"role": "euo_admin", "relation": "same_euo"}, {"role": "user", "relation": "self"}]


def test_an_export_list_that_leaves_out_a_readable_data_set_is_refused(tmp_path):
    policy = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy)
    spec = yaml.safe_load((policy / "export.yaml").read_text())
    spec["sources"] = [s for s in spec["sources"] if "directory?" not in s["get"]]
    (policy / "export.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(PolicyError, match="leaves out .*: company_directory$"):
        load_policy_set(policy)


async def test_zip_attachments_are_byte_identical_to_the_backend(gateway, http, token_for,
                                                                 backends, demo):
    status, headers, body = await call(http, "GET", gateway + "/v1/me/export", token_for("alice"))
    assert status == 200 and headers["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    doc = orjson.loads(archive.read("export.json"))
    files = {a["file"]: a for a in doc["attachments"]}
    assert set(archive.namelist()) == {"export.json", "access-log.ndjson", *files}
    kinds = {f.split("/")[1] for f in files}
    assert kinds == {"voicemails", "faxes", "recordings", "documents"}
    for name, item in files.items():
        assert archive.read(name) == demo.blobs[item["id"]][1]


async def test_each_zip_member_is_written_ahead_and_its_outcome_says_what_went_in(
        gateway, http, token_for, db, demo):
    """A file put into the archive is audited as a proxied file is: the intent row before
    its first byte, the outcome row with the bytes that went in (not one row committed
    before the copy, saying nothing of how it ended)."""
    status, headers, body = await call(http, "GET", gateway + "/v1/me/export", token_for("alice"))
    assert status == 200
    files = orjson.loads(zipfile.ZipFile(io.BytesIO(body)).read("export.json"))["attachments"]
    sizes = {item["source"].split(" ", 1)[1]: len(demo.blobs[item["id"]][1]) for item in files}

    async def rows():
        found = await db.fetch("select path, phase, bytes, reason, access from audit_log "
                               "where request_id = $1 and path = any($2::text[])",
                               headers["X-Request-Id"], list(sizes))
        return found if len(found) == 2 * len(sizes) else None
    found = await wait_for(rows)
    assert found, "an intent and an outcome row for every member"
    for path, size in sizes.items():
        mine = {r["phase"]: r for r in found if r["path"] == path}
        assert set(mine) == {"intent", "outcome"}, path
        assert mine["outcome"]["bytes"] == size and mine["outcome"]["reason"] is None
        assert mine["intent"]["access"] == mine["outcome"]["access"] == "served"


async def test_the_export_and_its_backend_calls_are_audited(gateway, http, token_for, db):
    _, headers, _ = await call(http, "GET", gateway + "/v1/me/export?format=json",
                               token_for("alice"))
    rows = await db.fetch("select route, decision from audit_log where request_id = $1",
                          headers["X-Request-Id"])
    routes = [r["route"] for r in rows]
    assert "gateway:/v1/me/export" in routes
    assert "telephony:/euos/{euo}/users/{user}/voicemails" in routes
    assert "meeting:/accounts/{euo}/meetings/{meeting}" in routes
    assert {r["decision"] for r in rows} == {"allow"}


async def test_the_export_holds_what_the_gateway_itself_keeps_about_the_user(
        gateway, http, token_for):
    """Her whole access log (the recipients of her data, as GET /v1/me/access-log shows it,
    every page) and her requests with their history are hers too (right of access)."""
    alice = token_for("alice")
    assert (await call(http, "GET", gateway + "/telephony/euos/euo-acme/users/u-alice",
                       token_for("staff")))[0] == 200
    status, _, body = await call(http, "POST", gateway + "/v1/me/requests", alice, json={
        "type": "rectification", "data_sets": ["user_address"],
        "detail": "the export test's request"})
    assert status == 201, body
    filed = orjson.loads(body)["id"]
    log, cursor = [], None
    while True:
        _, _, page = await call(http, "GET", gateway + "/v1/me/access-log?limit=100"
                                + (f"&cursor={cursor}" if cursor else ""), alice)
        page = orjson.loads(page)
        log += page["accesses"]
        if not (cursor := page["next_cursor"]):
            break
    doc, _ = await export_json(http, gateway, alice)
    held = doc["held_by_gateway"]
    assert held["access_log"] == log and log and held["access_log_complete"] is True
    assert log[0]["accessor"] == {"role": "provider_staff", "organisation": "Provider"}
    # the ZIP streams the whole log as a file of its own, a line per access
    status, _, body = await call(http, "GET", gateway + "/v1/me/export", alice)
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        lines = z.read("access-log.ndjson").splitlines()
        inside = orjson.loads(z.read("export.json"))["held_by_gateway"]
    assert [orjson.loads(x) for x in lines] == log
    assert inside["access_log_file"] == "access-log.ndjson"
    (mine,) = [r for r in held["requests"] if r["id"] == filed]
    assert mine["status"] == "open" and mine["detail"] == "the export test's request"
    assert mine["transitions"] and mine["transitions"][0]["to"] == "open"
    # nothing of anyone else: every request is hers, no access is her own
    assert {(r["euo_id"], r["user_sub"]) for r in held["requests"]} == {("euo-acme", "u-alice")}


async def test_export_json_holds_the_newest_accesses_and_says_when_there_are_more(
        gateway, http, token_for, monkeypatch):
    """export.json's copy of the access log is bounded (memory); it says when it is not the
    whole log, which the ZIP's access-log.ndjson and GET /v1/me/access-log hold."""
    alice = token_for("alice")
    for _ in range(2):
        assert (await call(http, "GET", gateway + "/telephony/euos/euo-acme/users/u-alice",
                           token_for("admin")))[0] == 200
    monkeypatch.setattr(export_gather, "EXPORT_ACCESSES", 1)
    doc, _ = await export_json(http, gateway, alice)
    held = doc["held_by_gateway"]
    assert len(held["access_log"]) == 1 and held["access_log_complete"] is False
    assert held["access_log"][0]["accessor"]["role"] == "euo_admin"      # the newest


async def test_the_export_counts_the_elements_left_out_and_says_why(gateway, http, token_for,
                                                                     db):
    """What retention, masking and scope left out is in export.json: the sum of the receipts
    of the export's backend calls."""
    status, headers, body = await call(http, "GET", gateway + "/v1/me/export?format=json",
                                       token_for("alice"))
    assert status == 200
    doc = orjson.loads(body)
    got = {(w["reason"], w["data_set"]): w["elements"] for w in doc["withheld_elements"]}
    expected: dict = {}
    for (receipt,) in await db.fetch("select withheld from audit_log where request_id = $1 "
                                     "and withheld is not null", headers["X-Request-Id"]):
        for reason, counts in orjson.loads(receipt).items():
            for data_set, n in counts.items():
                expected[reason, data_set] = expected.get((reason, data_set), 0) + n
    assert got == expected
    # the demo's outgoing fax was sent, so it is past retention, and its old CDRs are masked
    assert got[("retention", "faxes_outgoing")] >= 1 and got[("masking", "call_history")] >= 1
    assert all(w["meaning"] for w in doc["withheld_elements"])


async def test_only_users_may_export(gateway, http, token_for):
    for who in ("staff", "partner", "admin"):
        assert (await call(http, "GET", gateway + "/v1/me/export", token_for(who)))[0] == 403


async def test_a_failing_backend_fails_the_export(backends, database_url, http, token_for):
    """A backend error answers an error status, not a partial archive."""
    async def broken(request):
        return web.Response(status=500, text="boom")
    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        urls = dict(backends["urls"], meeting=f"http://127.0.0.1:{port}")
        async with running_gateway(gateway_settings(urls), database_url) as gw:
            for path in ("/v1/me/export", "/v1/me/export?format=json"):
                status, headers, body = await call(http, "GET", gw + path, token_for("alice"))
                assert status == 502
                assert orjson.loads(body)["error"]["code"] == "backend_error"
                assert not body.startswith(b"PK")
    finally:
        await runner.cleanup()


async def test_an_attachment_breaking_off_midway_breaks_the_download(backends, database_url,
                                                                     http, token_for, demo):
    """The JSON parts succeed, a voicemail breaks off: the client cannot get a valid ZIP."""
    async def flaky(request):
        if request.path.endswith("/voicemails/vm-u-alice-1"):
            response = web.StreamResponse(headers={"Content-Type": "audio/wav",
                                                   "Content-Length": "1000000"})
            await response.prepare(request)
            await response.write(b"RIFF" + b"\0" * 1000)
            request.transport.close()
            return response
        async with request.app[SESSION].get(backends["urls"]["telephony"] + request.path_qs) as r:
            return web.Response(body=await r.read(), status=r.status,
                                content_type=r.content_type)
    app = web.Application()
    app.router.add_get("/{tail:.*}", flaky)
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            urls = dict(backends["urls"], telephony=f"http://127.0.0.1:{port}")
            async with running_gateway(gateway_settings(urls), database_url) as gw:
                try:
                    status, _, body = await call(http, "GET", gw + "/v1/me/export",
                                                 token_for("alice"))
                except aiohttp.ClientError:
                    return    # the connection was cut: the download failed visibly
                assert status == 200
                try:
                    zipfile.ZipFile(io.BytesIO(body)).testzip()
                except zipfile.BadZipFile:
                    return
                raise AssertionError("a broken export produced a valid archive")
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def tampering(backends, database_url, tamper, **settings):
    """A gateway whose backends are the demo's behind a proxy on loopback that may rewrite
    any answer: tamper(path_qs, status, document) returns (status, document) or a response."""
    async def proxy(request):
        service = request.match_info["service"]
        url = backends["urls"][service] + "/" + request.match_info["tail"]
        if request.query_string:
            url += "?" + request.query_string
        async with request.app[SESSION].get(url) as r:
            body, kind, status = await r.read(), r.content_type, r.status
        path = request.path_qs                    # /telephony/euos/...: as the export asks
        if kind == "application/json":
            answer = tamper(path, status, orjson.loads(body))
            if isinstance(answer, web.StreamResponse):
                return answer
            status, document = answer
            return web.Response(body=orjson.dumps(document), status=status, content_type=kind)
        answer = tamper(path, status, None)
        if isinstance(answer, web.StreamResponse):
            return answer
        return web.Response(body=body, status=status, content_type=kind)
    app = web.Application()
    app.router.add_get("/{service}/{tail:.*}", proxy)
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            urls = {s: f"http://127.0.0.1:{port}/{s}" for s in backends["urls"]}
            async with running_gateway(gateway_settings(urls, **settings), database_url) as gw:
                yield gw
        finally:
            await runner.cleanup()


def gone(status: int = 404):
    return web.json_response({"error": "not found"}, status=status)


async def test_not_held_lists_exactly_what_the_backends_do_not_hold(backends, database_url,
                                                                    http, token_for):
    """A backend without the participations route, a meeting deleted between its listing
    and its fetch, a recording deleted before the ZIP got it: each is in not_held with
    its data sets, and nothing else is."""
    def tamper(path, status, document):
        if path.startswith("/meeting/accounts/euo-acme/participants/"):
            return gone()
        if path == "/meeting/accounts/euo-acme/meetings/mtg-acme-1":
            return gone()
        if path.endswith("/recordings/rec-u-alice-1"):
            return gone()
        return status, document
    async with tampering(backends, database_url, tamper) as gw:
        doc, _ = await export_json(http, gw, token_for("alice"))
        status, _, body = await call(http, "GET", gw + "/v1/me/export", token_for("alice"))
    participation = {
        "source": "GET /meeting/accounts/euo-acme/participants/u-alice",
        "data_sets": ["chat_messages", "meeting_agenda", "meeting_documents", "meeting_invitees",
                      "meeting_minutes", "meeting_topic", "participant_email", "participant_name",
                      "private_notes", "whiteboard_drawings"],
        "reason": "backend_not_found"}
    meeting = {"source": "GET /meeting/accounts/euo-acme/meetings/mtg-acme-1",
               "data_sets": ["chat_messages", "meeting_agenda", "meeting_documents",
                             "meeting_invitees", "meeting_minutes", "meeting_topic",
                             "participant_email", "participant_name", "private_notes",
                             "whiteboard_drawings"],
               "reason": "backend_not_found"}
    recording = {"source": "GET /telephony/euos/euo-acme/users/u-alice/recordings/rec-u-alice-1",
                 "data_sets": ["call_recordings"], "reason": "backend_not_found"}
    strip_meaning = [{k: v for k, v in e.items() if k != "meaning"} for e in doc["not_held"]]
    assert strip_meaning == [meeting, participation]    # the JSON export fetches no files
    assert status == 200
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    zipped = orjson.loads(archive.read("export.json"))
    assert [{k: v for k, v in e.items() if k != "meaning"} for e in zipped["not_held"]] == [
        meeting, participation, recording]
    assert "recordings" not in {a["file"].split("/")[1] for a in zipped["attachments"]}
    assert not any(n.startswith("telephony/recordings/") for n in archive.namelist())


async def test_a_slipped_in_note_of_another_user_is_dropped_and_audited(backends, database_url,
                                                                         http, token_for, db):
    """The meeting backend slips Carla's note and a chat message of hers into the meeting
    Bob attended: his export drops them and the row says what was removed."""
    def tamper(path, status, document):
        if path == "/meeting/accounts/euo-acme/meetings/mtg-acme-1":
            document = dict(document)
            document["private_notes"] = document["private_notes"] + [
                {"author_id": "u-carla", "text": "CARLA-SECRET"}]
            document["chat"] = document["chat"] + [
                {"author_id": "u-carla", "author": "Carla", "text": "CARLA-DM", "at": "x"}]
        return status, document
    async with tampering(backends, database_url, tamper) as gw:
        status, headers, body = await call(http, "GET", gw + "/v1/me/export?format=json",
                                           token_for("bob"))
    assert status == 200 and b"CARLA" not in body
    row = await db.fetchrow("select fields_removed, subject_users from audit_log where "
                            "request_id = $1 and route = $2", headers["X-Request-Id"],
                            "meeting:/accounts/{euo}/meetings/{meeting}")
    assert {"private_notes[].text", "chat[].text"} <= set(row["fields_removed"])
    assert row["subject_users"] == ["u-bob"]


ALICE_ROW = {"user_id": "u-alice", "name": "ALICE-ROW", "number": "+3227000000"}


@pytest.mark.parametrize(("path", "tampered"), [
    ("/telephony/euos/euo-acme/trunks/trunk-1/cdrs?user=u-bob",
     lambda doc: {"cdrs": doc["cdrs"] + [dict(doc["cdrs"][0], user_id="u-alice", id="ALICE-ROW")]}),
    ("/telephony/euos/euo-acme/directory?user=u-bob",
     lambda doc: {"entries": doc["entries"] + [ALICE_ROW]}),
    ("/meeting/accounts/euo-acme/participants/u-bob",
     lambda doc: dict(doc, id="u-alice", meetings=[{"id": "m", "name": "ALICE-ROW"}])),
], ids=["trunk-cdrs", "directory", "participations"])
async def test_another_users_record_in_a_bound_answer_refuses_the_export(
        backends, database_url, http, token_for, db, path, tampered):
    """An answer asked for u-bob that holds u-alice's call record, directory entry or
    participation: the export fails (502, audited), nothing of hers is sent."""
    def tamper(p, status, document):
        return status, tampered(document) if p == path else document
    async with tampering(backends, database_url, tamper) as gw:
        for fmt in ("json", "zip"):
            status, headers, body = await call(http, "GET", f"{gw}/v1/me/export?format={fmt}",
                                               token_for("bob"))
            assert status == 502, body
            assert orjson.loads(body)["error"]["code"] == "backend_subject_mismatch"
            assert b"ALICE" not in body
            rows = await db.fetch("select path, decision, reason from audit_log where "
                                  "request_id = $1", headers["X-Request-Id"])
            assert (path, "error", "backend_subject_mismatch") in {
                (r["path"], r["decision"], r["reason"]) for r in rows}


def test_the_export_finds_another_persons_own_data_the_redaction_let_through():
    """The second line: an element naming someone else that carries a data set of theirs
    is found wherever it sits; meeting content the user may read as organizer is not."""
    catalog = load_catalog(POLICY_DIR)
    route = {r.name: r for r in catalog.routes}
    meeting = route["meeting:/accounts/{euo}/meetings/{meeting}"].body
    cdrs = route["telephony:/euos/{euo}/cdrs"].body
    mine = {"id": "m", "organizer_id": "u-alice", "topic": "T",
            "chat": [{"author_id": "u-bob", "text": "hi"}],
            "private_notes": [{"author_id": "u-alice", "text": "mine"}]}
    assert foreign(mine, meeting, "u-alice", catalog) is None
    leaked = dict(mine, private_notes=[{"author_id": "u-bob", "text": "his"}])
    assert foreign(leaked, meeting, "u-alice", catalog) == "private_notes[]"
    assert foreign({"cdrs": [{"user_id": "u-bob", "caller": "1"}]}, cdrs, "u-alice",
                   catalog) == "cdrs[]"
    assert foreign({"cdrs": [{"user_id": "u-alice", "caller": "1"}]}, cdrs, "u-alice",
                   catalog) is None
    removed: set[str] = set()
    kept = strip(mine, meeting, frozenset({"private_notes"}), removed)
    assert "private_notes" not in kept and kept["chat"] == mine["chat"]
    assert removed == {"private_notes[].author_id", "private_notes[].text"}


ASSISTED = "/v1/euos/euo-acme/users/u-bob/export?purpose=user_cannot_sign_in"


async def test_an_euo_admin_exports_for_a_user_of_their_euo(gateway, http, token_for, db):
    """The user's export, minus what only its author may receive; every row names the admin
    as actor, the user as subject and the purpose; the user's access log shows it."""
    status, headers, body = await call(http, "GET", f"{gateway}{ASSISTED}&format=json",
                                       token_for("admin"))
    assert status == 200, body
    doc = orjson.loads(body)
    assert doc["subject"] == {"user": "u-bob", "euo": "euo-acme"}
    assert doc["export"]["assisted"]["by"] == {"role": "euo_admin", "sub": "admin@acme",
                                              "euo": "euo-acme"}
    assert doc["export"]["assisted"]["purpose"] == "user_cannot_sign_in"
    # no more than the admin's own policy lines give them of Bob's data through the API:
    # never private notes (a floor), nor his personal communications (data minimisation)
    withheld = {w["data_sets"][0]: w["sources"] for w in doc["withheld"]}
    assert {"private_notes", "voicemails", "personal_directory"} <= set(withheld)
    assert withheld["private_notes"] == ["GET /meeting/accounts/euo-acme/meetings/mtg-acme-1"]
    assert b"Private thought" not in body and b"vm-u-bob-1" not in body
    assert "user_name" in doc["services"]["telephony"]
    admin_reads = {ds for ds, in [line.split(", ")[3:4] for line in
                                  (POLICY_DIR / "policy.csv").read_text().splitlines()
                                  if line.startswith("p, euo_admin, same_euo, ")
                                  and line.endswith(", read")]}
    served = {ds for service in doc["services"].values() for ds in service}
    assert served <= admin_reads and not set(withheld) & admin_reads
    rows = await db.fetch("select route, actor_sub, actor_role, subject_euo, subject_users, "
                          "data_sets, reason, decision from audit_log where request_id = $1",
                          headers["X-Request-Id"])
    assert len(rows) > 10
    for r in rows:
        assert (r["actor_sub"], r["actor_role"], r["decision"]) == ("admin@acme", "euo_admin", "allow")
        # every row names whose export it is, EUO-wide sources too (some named nobody)
        assert r["subject_euo"] == "euo-acme" and r["subject_users"] == ["u-bob"], r["route"]
        assert r["reason"] == "assisted_export:user_cannot_sign_in"
        assert "private_notes" not in r["data_sets"]
    (top,) = [r for r in rows if r["route"] == "gateway:/v1/euos/{euo}/users/{user}/export"]
    assert top["subject_users"] == ["u-bob"]
    _, _, log = await call(http, "GET", gateway + "/v1/me/access-log?limit=200", token_for("bob"))
    seen = [a for a in orjson.loads(log)["accesses"]
            if a["route"] == "gateway:/v1/euos/{euo}/users/{user}/export"]
    assert seen and seen[0]["accessor"] == {"role": "euo_admin", "organisation": "euo-acme"}
    assert seen[0]["reason"] == "assisted_export:user_cannot_sign_in"


async def test_an_assisted_export_gives_the_admin_no_field_the_route_table_does_not_declare(
        backends, database_url, http, token_for, db):
    """A field no data set claims reaches only the data subject (deny by default): the
    user's own export carries it, but an EUO admin reading the user's record through the
    API gets it removed, and so must the admin's assisted export of that user."""
    def tamper(path, status, document):
        if path == "/telephony/euos/euo-acme/users/u-bob":
            document = dict(document, national_id="BOB-UNDECLARED-1",
                            personal_directory=[dict(e, note="BOB-UNDECLARED-2")
                                                for e in document["personal_directory"]])
        if path == "/meeting/accounts/euo-acme":
            document = dict(document, billing_contact="BOB-UNDECLARED-3")
        return status, document
    async with tampering(backends, database_url, tamper) as gw:
        status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-bob",
                                     token_for("admin"))
        assert status == 200 and b"BOB-UNDECLARED" not in body      # the API: removed
        for fmt in ("json", "zip"):
            status, headers, body = await call(http, "GET", f"{gw}{ASSISTED}&format={fmt}",
                                               token_for("admin"))
            assert status == 200, body
            if fmt == "zip":
                body = zipfile.ZipFile(io.BytesIO(body)).read("export.json")
            assert b"BOB-UNDECLARED" not in body
            assert b"user_name" in body                               # the record is there
            row = await db.fetchrow("select fields_removed from audit_log where request_id = "
                                    "$1 and route = $2", headers["X-Request-Id"],
                                    "telephony:/euos/{euo}/users/{user}")
            assert "national_id" in row["fields_removed"]
        status, _, body = await call(http, "GET", gw + "/v1/me/export?format=json",
                                     token_for("bob"))
        assert status == 200 and b"BOB-UNDECLARED-1" in body          # his own: his


async def test_the_assisted_zip_streams_the_users_files(gateway, http, token_for, demo):
    status, headers, body = await call(http, "GET", gateway + ASSISTED, token_for("admin"))
    assert status == 200 and headers["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(body))
    doc = orjson.loads(archive.read("export.json"))
    assert doc["subject"]["user"] == "u-bob" and doc["attachments"]
    for item in doc["attachments"]:
        assert archive.read(item["file"]) == demo.blobs[item["id"]][1]
    # the recordings the admin may hear are there; his voicemails and faxes are not
    kinds = {ds for item in doc["attachments"] for ds in item["data_sets"]}
    assert "call_recordings" in kinds and not kinds & {"voicemails", "faxes_incoming"}
    assert not [n for n in archive.namelist() if "voicemail" in n or "fax" in n]


@pytest.mark.parametrize(("caller", "path", "status", "code"), [
    ("admin", "/v1/euos/euo-globex/users/u-dirk/export?purpose=user_cannot_sign_in", 403,
     "other_euo"),
    ("partner", ASSISTED, 403, "role_not_permitted"),
    ("staff", ASSISTED, 403, "role_not_permitted"),
    ("alice", ASSISTED, 403, "role_not_permitted"),
    ("bob", ASSISTED, 403, "role_not_permitted"),
    ("admin", "/v1/euos/euo-acme/users/u-bob/export", 400, "bad_purpose"),
    ("admin", "/v1/euos/euo-acme/users/u-bob/export?purpose=curiosity", 400, "bad_purpose"),
    ("admin", ASSISTED + "&purpose=user_asked_admin", 400, "bad_purpose"),
    ("admin", "/v1/euos/euo-acme/users/u-nobody/export?purpose=user_asked_admin", 404,
     "backend_not_found"),
    # the parameters an export takes, each once (a repeated format was read as its first)
    ("admin", ASSISTED + "&format=json&format=zip", 400, "bad_format"),
    ("admin", ASSISTED + "&subject=u-alice", 400, "bad_format"),
    ("bob", "/v1/me/export?format=json&format=zip", 400, "bad_format"),
    ("bob", "/v1/me/export?format=json&user=u-alice", 400, "bad_format"),
    ("bob", "/v1/me/export?purpose=user_asked_admin", 400, "bad_format"),
])
async def test_assisted_export_refusals(gateway, http, token_for, db, backends, caller, path,
                                        status, code):
    """Another EUO's user, partners, staff and users, and parameters an export does not
    take: refused with a reason id, audited, and (but for an unknown user, whom only the
    backend can know) no backend is asked."""
    before = len(backends["seen"].requests)
    got, headers, body = await call(http, "GET", gateway + path, token_for(caller))
    assert (got, orjson.loads(body)["error"]["code"]) == (status, code)
    row = await db.fetchrow("select actor_role, reason, decision from audit_log where "
                            "request_id = $1 and route like 'gateway:%'", headers["X-Request-Id"])
    assert row["reason"] == code and row["decision"] != "allow"
    if code != "backend_not_found":
        assert len(backends["seen"].requests) == before


async def test_the_zip_export_takes_a_stream_slot(backends, database_url, http, token_for):
    """GATEWAY_MAX_STREAMS holds for exports too: with none free the ZIP is refused at once
    (the JSON export copies no file and still works)."""
    settings = gateway_settings(backends["urls"], max_streams=0)
    async with running_gateway(settings, database_url) as gw:
        status, _, body = await call(http, "GET", gw + "/v1/me/export", token_for("alice"))
        assert (status, orjson.loads(body)["error"]["code"]) == (503, "streams_busy")
        assert (await call(http, "GET", gw + "/v1/me/export?format=json",
                           token_for("alice")))[0] == 200


@pytest.mark.parametrize(("claim", "subject"), [(None, False), ("partner", False), ("euo", True)])
def test_only_an_euo_admin_role_may_hold_the_assisted_export(claim, subject):
    """roles.yaml refuses assisted_export for the Provider's and Partners' roles and for
    data subjects: only an EUO's administrators may export for one of its users."""
    spec = {"tenant_claim": claim, "gateway_api": ["assisted_export"], "data_subject": subject,
            "column": {None: "provider_staff", "partner": "partner", "euo": "user"}[claim]}
    if claim is None:
        spec["organisation"] = "Provider"
    with pytest.raises(RoleError, match="assisted_export"):
        load_roles({"roles": {"helper": spec, "user": {"tenant_claim": "euo",
                                                       "data_subject": True}}})
