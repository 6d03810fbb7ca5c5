"""What the shipped route table shows to whom: the floors of policies/routes.yaml.

The data-set table's floors (floors.py) say which data sets are hidden from whom; the route
table says which field of which backend answer is which data set. Mapping a voicemail's
field to a data set Provider staff may see would lower a floor as surely as unhiding
voicemails, so the shipped mapping ships with the code too, and a policy directory's
routes.yaml may only be as strict or stricter (floors.routes_lowered), or name what it
lowers in lowered_floors.yaml.

Generated from the shipped policy: `python -m gateway.floors_routes > gateway/floors_routes.py`
(tests/test_floors.py fails when this file and policies/routes.yaml differ: a change of the
shipped table shows here, in review, field by field).
"""
# fmt: off
RELATIONS = frozenset({"author", "organizer", "self"})

ROUTES: dict[str, dict[str, str]] = {
    "meeting:/accounts/{}": {
        ".account_name": "account_name",
        ".company_name": "company_name",
        ".id": "identifier",
        "@binds.id": "euo",
        "@path.euo": "0",
    },
    "meeting:/accounts/{}/connection-stats": {
        ".next_cursor": "identifier",
        ".stats[].at": "connection_statistics",
        ".stats[].browser": "connection_statistics",
        ".stats[].errors": "connection_statistics",
        ".stats[].jitter_ms": "connection_statistics",
        ".stats[].os": "connection_statistics",
        ".stats[].packet_loss": "connection_statistics",
        ".stats[].quality": "connection_statistics",
        ".stats[].rtt_ms": "connection_statistics",
        ".stats[].user_id": "identifier",
        ".stats[]@binds.user_id": "user",
        ".stats[]@self": "user_id",
        "@path.euo": "0",
    },
    "meeting:/accounts/{}/meetings/{}": {
        ".agenda": "meeting_agenda",
        ".chat[].at": "chat_messages",
        ".chat[].author": "chat_messages",
        ".chat[].author_id": "chat_messages",
        ".chat[].text": "chat_messages",
        ".chat[]@author": "author_id",
        ".chat[]@no_account": "author_id",
        ".documents": "meeting_documents",
        ".end": "identifier",
        ".id": "identifier",
        ".invited": "meeting_invitees",
        ".minutes": "meeting_minutes",
        ".organizer_id": "identifier",
        ".participants[].email": "participant_email",
        ".participants[].name": "participant_name",
        ".participants[].user_id": "identifier",
        ".participants[]@no_account": "user_id",
        ".participants[]@self": "user_id",
        ".private_notes[].author_id": "private_notes",
        ".private_notes[].text": "private_notes",
        ".private_notes[]@author": "author_id",
        ".start": "identifier",
        ".topic": "meeting_topic",
        ".whiteboards": "whiteboard_drawings",
        "@binds.id": "meeting",
        "@organizer": "organizer_id",
        "@path.euo": "0",
    },
    "meeting:/accounts/{}/meetings/{}/chat/{}": {
        "@needs.chat_messages": "chat_messages",
        "@path.euo": "0",
        "@path.user": "2",
    },
    "meeting:/accounts/{}/meetings/{}/notes/{}": {
        "@needs.private_notes": "private_notes",
        "@path.euo": "0",
        "@path.user": "2",
    },
    "meeting:/accounts/{}/meetings/{}/participants/{}": {
        "@needs.participant_email": "participant_email",
        "@needs.participant_name": "participant_name",
        "@path.euo": "0",
        "@path.user": "2",
    },
    "meeting:/accounts/{}/organizers/{}": {
        ".address_book": "address_book",
        ".documents": "organizer_documents",
        ".email": "organizer_email",
        ".first_name": "organizer_name",
        ".id": "identifier",
        ".language": "organizer_language",
        ".last_name": "organizer_name",
        ".meetings": "meeting_list",
        "@binds.id": "user",
        "@path.euo": "0",
        "@path.user": "1",
        "@self": "id",
    },
    "meeting:/accounts/{}/organizers/{}/address-book/{}": {
        "@needs.address_book": "address_book",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "meeting:/accounts/{}/organizers/{}/documents/{}": {
        "@needs.organizer_documents": "organizer_documents",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "meeting:/accounts/{}/organizers/{}/meetings/{}": {
        "@needs.chat_messages": "chat_messages",
        "@needs.meeting_agenda": "meeting_agenda",
        "@needs.meeting_documents": "meeting_documents",
        "@needs.meeting_invitees": "meeting_invitees",
        "@needs.meeting_list": "meeting_list",
        "@needs.meeting_minutes": "meeting_minutes",
        "@needs.meeting_topic": "meeting_topic",
        "@needs.participant_email": "participant_email",
        "@needs.participant_name": "participant_name",
        "@needs.whiteboard_drawings": "whiteboard_drawings",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "meeting:/accounts/{}/participants/{}": {
        ".id": "identifier",
        ".meetings[].email": "participant_email",
        ".meetings[].id": "identifier",
        ".meetings[].name": "participant_name",
        "@binds.id": "user",
        "@path.euo": "0",
        "@path.user": "1",
        "@self": "id",
    },
    "telephony:/euos/{}": {
        ".id": "identifier",
        ".name": "euo_identity",
        ".partner_id": "identifier",
        ".postal_address": "euo_identity",
        ".trunks[].id": "identifier",
        "@binds.id": "euo",
        "@path.euo": "0",
    },
    "telephony:/euos/{}/cdrs": {
        ".cdrs[].callee": "call_history",
        ".cdrs[].caller": "call_history",
        ".cdrs[].direction": "call_history",
        ".cdrs[].duration_s": "call_history",
        ".cdrs[].id": "identifier",
        ".cdrs[].start": "call_history",
        ".cdrs[].user_id": "identifier",
        ".cdrs[]@binds.user_id": "user",
        ".cdrs[]@self": "user_id",
        ".next_cursor": "identifier",
        "@path.euo": "0",
    },
    "telephony:/euos/{}/directory": {
        ".entries[].name": "company_directory",
        ".entries[].number": "company_directory",
        ".entries[].user_id": "identifier",
        ".entries[]@binds.user_id": "user",
        "@path.euo": "0",
    },
    "telephony:/euos/{}/trunks/{}/cdrs": {
        ".cdrs[].callee": "call_history",
        ".cdrs[].caller": "call_history",
        ".cdrs[].direction": "call_history",
        ".cdrs[].duration_s": "call_history",
        ".cdrs[].id": "identifier",
        ".cdrs[].start": "call_history",
        ".cdrs[].user_id": "identifier",
        ".cdrs[]@binds.user_id": "user",
        ".cdrs[]@self": "user_id",
        ".next_cursor": "identifier",
        "@path.euo": "0",
    },
    "telephony:/euos/{}/users": {
        ".users[].address": "user_address",
        ".users[].email": "user_email",
        ".users[].euo_id": "identifier",
        ".users[].first_name": "user_name",
        ".users[].id": "identifier",
        ".users[].language": "user_language",
        ".users[].last_name": "user_name",
        ".users[].mobile": "user_mobile",
        ".users[].personal_directory": "personal_directory",
        ".users[]@binds.euo_id": "euo",
        ".users[]@binds.id": "user",
        ".users[]@self": "id",
        "@path.euo": "0",
    },
    "telephony:/euos/{}/users/{}": {
        ".address": "user_address",
        ".email": "user_email",
        ".euo_id": "identifier",
        ".first_name": "user_name",
        ".id": "identifier",
        ".language": "user_language",
        ".last_name": "user_name",
        ".mobile": "user_mobile",
        ".personal_directory": "personal_directory",
        "@binds.euo_id": "euo",
        "@binds.id": "user",
        "@path.euo": "0",
        "@path.user": "1",
        "@self": "id",
    },
    "telephony:/euos/{}/users/{}/faxes": {
        ".faxes[].at": "identifier",
        ".faxes[].direction": "identifier",
        ".faxes[].direction=in": "faxes_incoming",
        ".faxes[].direction=out": "faxes_outgoing",
        ".faxes[].id": "identifier",
        ".faxes[].pages": "identifier",
        ".faxes[].peer": "identifier",
        ".next_cursor": "identifier",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "telephony:/euos/{}/users/{}/faxes/{}": {
        "@needs.faxes_incoming": "faxes_incoming",
        "@needs.faxes_outgoing": "faxes_outgoing",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "telephony:/euos/{}/users/{}/personal-directory": {
        ".entries": "personal_directory",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "telephony:/euos/{}/users/{}/recordings": {
        ".next_cursor": "identifier",
        ".recordings": "call_recordings",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "telephony:/euos/{}/users/{}/recordings/{}": {
        "@needs.call_recordings": "call_recordings",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "telephony:/euos/{}/users/{}/voicemails": {
        ".next_cursor": "identifier",
        ".voicemails": "voicemails",
        "@path.euo": "0",
        "@path.user": "1",
    },
    "telephony:/euos/{}/users/{}/voicemails/{}": {
        "@needs.voicemails": "voicemails",
        "@path.euo": "0",
        "@path.user": "1",
    },
}

def render(policy_dir) -> str:
    """This module's text for the route table of `policy_dir`."""
    import json
    from pathlib import Path

    from .catalog import load_catalog, route_fields, route_key
    catalog = load_catalog(Path(policy_dir), pinned=False)
    routes = {route_key(r): dict(sorted(route_fields(r).items())) for r in catalog.routes}
    text = Path(__file__).read_text()
    head = text[:text.index("# fmt: off\n") + len("# fmt: off\n")]
    tail = text[text.index("\n\ndef render("):]
    relations = ", ".join(map(json.dumps, sorted(catalog.data_subject_relations)))
    lines = [f"RELATIONS = frozenset({{{relations}}})", "",
             "ROUTES: dict[str, dict[str, str]] = {"]
    for key, fields in sorted(routes.items()):
        lines.append(f"    {json.dumps(key)}: {{")
        lines += [f"        {json.dumps(at)}: {json.dumps(what)}," for at, what in fields.items()]
        lines.append("    },")
    return head + "\n".join(lines) + "\n}" + tail


if __name__ == "__main__":
    import sys
    from pathlib import Path
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1
                            else Path(__file__).parent / "_data" / "policies"))
