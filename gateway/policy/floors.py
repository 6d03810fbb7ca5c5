"""The floors of the Provider's data-set table, shipped with the code (docs/contract.md,
Data sets and Floors): which data sets are `(**)`, hidden from which column, and whose data
each is. Written by hand from the published table, not from any policy file.

The policy directory's datasets.yaml may add restrictions (hide a data set from more
columns), never take one away: a data set of the table that datasets.yaml leaves out, hides
from fewer columns, or gives another subject, lowers a floor, and the policy is refused.
A floor is lowered only by naming it, with a reason, in the policy directory's
`lowered_floors.yaml`; `gateway check` warns of each, `GET /v1/catalog` lists them per data
set, and the policy version (in every audit row) ends in `+floors-lowered-N`.

The route table's floors (floors_routes.py, routes_lowered) are kept the same way: which
field of which shipped route is which data set, and what decides whose data it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .floors_routes import RELATIONS, ROUTES

LOWERED_FILE = "lowered_floors.yaml"

_TELEPHONY = frozenset({"provider_staff"})            # "not accessible to Provider staff"
_MEETING = frozenset({"provider_staff", "partner"})   # "... to Provider staff or Partners"
_NONE: frozenset[str] = frozenset()

# data set: (whose data it is, the columns it is hidden from)
SEED: dict[str, tuple[str, frozenset[str]]] = {
    "euo_identity": ("euo", _NONE),
    "company_directory": ("euo", _NONE),
    "user_address": ("user", _NONE),
    "user_name": ("user", _NONE),
    "user_language": ("user", _NONE),
    "user_email": ("user", _NONE),
    "user_mobile": ("user", _NONE),
    "personal_directory": ("user", _TELEPHONY),
    "voicemails": ("user", _TELEPHONY),
    "faxes_incoming": ("user", _TELEPHONY),
    "faxes_outgoing": ("user", _TELEPHONY),
    "call_recordings": ("user", _TELEPHONY),
    "call_history": ("user", _NONE),
    "account_name": ("euo", _NONE),
    "company_name": ("euo", _NONE),
    "organizer_name": ("user", _NONE),
    "organizer_email": ("user", _NONE),
    "organizer_language": ("user", _NONE),
    "address_book": ("user", _MEETING),
    "organizer_documents": ("user", _MEETING),
    "meeting_list": ("user", _MEETING),
    "participant_name": ("meeting", _MEETING),
    "participant_email": ("meeting", _MEETING),
    "meeting_topic": ("meeting", _MEETING),
    "meeting_agenda": ("meeting", _MEETING),
    "meeting_invitees": ("meeting", _MEETING),
    "meeting_documents": ("meeting", _MEETING),
    "whiteboard_drawings": ("meeting", _MEETING),
    "chat_messages": ("meeting", _MEETING),
    "meeting_minutes": ("meeting", _MEETING),
    "private_notes": ("author", _MEETING),
    "connection_statistics": ("user", _NONE),
}


def floors_of(name: str) -> dict[str, str]:
    """A data set's floors in the table, by id (`voicemails.hidden_from.provider_staff`,
    `private_notes.subject.author`), each with what it says."""
    subject, hidden = SEED[name]
    out = {f"{name}.subject.{subject}": f"{name} is {subject} data"}
    for column in sorted(hidden):
        out[f"{name}.hidden_from.{column}"] = f"{name} is (**): hidden from {column}"
    return out


ALL_FLOORS: dict[str, str] = {k: v for name in SEED for k, v in floors_of(name).items()}


def lowered_by(data_sets: Mapping[str, Any]) -> dict[str, str]:
    """The floors these data sets (name -> DataSet with `subject`, `hidden_from`) lower, by
    id, each with how datasets.yaml lowers it."""
    out = {}
    for name, (subject, hidden) in SEED.items():
        ds = data_sets.get(name)
        if ds is None:
            for floor in floors_of(name):
                out[floor] = f"datasets.yaml has no data set {name}"
            continue
        if ds.subject != subject:
            out[f"{name}.subject.{subject}"] = (f"datasets.yaml gives {name} subject "
                                                f"{ds.subject}; the table says {subject}")
        for column in sorted(hidden - set(ds.hidden_from)):
            out[f"{name}.hidden_from.{column}"] = (f"datasets.yaml does not hide {name} from "
                                                   f"{column}, which the table marks (**)")
    return out


def routes_lowered(loaded: Mapping[str, Mapping[str, str]], relations: frozenset[str],
                   data_sets: Mapping[str, Any]) -> dict[str, str]:
    """The floors the route table lowers (`route:<route key><field key>`), each with how:
    a route of the shipped table (ROUTES, by catalog.route_key) whose answer shows a field to
    more callers than the shipped one does. A field may be left undeclared (then only its
    data subject receives it) or moved to a data set hidden from at least the same columns,
    of the same subject; it may not be declared where the shipped route leaves it to the
    subject alone, nor made an identifier. What decides whose data it is (`@` keys) stays as
    shipped, and a file or delete still needs every data set it needed. Routes the shipped
    table does not have are the policy's own."""
    out = {f"route:data_subject_relations.{rel}": f"routes.yaml counts {rel} as the data "
           "subject, who receives every undeclared field" for rel in sorted(relations - RELATIONS)}
    for key, fields in loaded.items():
        shipped = ROUTES.get(key)
        if shipped is None:
            continue
        for at, was in shipped.items():
            if at not in fields and at.startswith(("@needs.", "@binds.", "@path.")):
                out[f"route:{key}{at}"] = f"routes.yaml drops {at} ({was}) from {key}"
        for at, now in fields.items():
            was = shipped.get(at)
            if now == was or was == "identifier" or at.startswith("@needs."):
                continue
            if "@" in at or was is None or now == "identifier" \
                    or not _as_strict(data_sets.get(now), data_sets.get(was)):
                out[f"route:{key}{at}"] = (f"routes.yaml makes {at} of {key} {now}; the shipped "
                                           f"route table has {was or 'it undeclared'}")
    return out


def _as_strict(now: Any, was: Any) -> bool:
    """Data set `now` is hidden from every column `was` is, and is the same kind's data."""
    return now is not None and was is not None and now.subject == was.subject and \
        set(was.hidden_from) <= set(now.hidden_from)


def check(data_sets: Mapping[str, Any], declared: Mapping[str, str],
          routes: Mapping[str, str] | None = None) -> list[str]:
    """Problems: each floor lowered (by datasets.yaml, or by routes.yaml: `routes`, from
    routes_lowered) without being declared in lowered_floors.yaml, and each declaration that
    names no floor or one the policy keeps (a stale override would claim a lowering that is
    not there). Without `routes` (the route table not read yet), only the data-set table's."""
    lowered = lowered_by(data_sets) | dict(routes or {})
    problems = [f"{how} ({floor}: a floor of the data-set table; to lower it anyway, name it "
                f"with a reason in {LOWERED_FILE})"
                for floor, how in lowered.items() if floor not in declared]
    for floor in declared:
        if routes is None and floor.startswith("route:"):
            continue
        if floor not in ALL_FLOORS and not floor.startswith("route:"):
            problems.append(f"{LOWERED_FILE}: {floor!r} is no floor of the data-set table "
                            "(<data set>.hidden_from.<column>, <data set>.subject.<kind> or "
                            "route:<route><field>)")
        elif floor not in lowered:
            problems.append(f"{LOWERED_FILE}: {floor} is not lowered by the policy: "
                            "remove it")
    return problems


def parse_declared(doc: Any) -> dict[str, str]:
    """`lowered: {floor id: reason}` of lowered_floors.yaml; ValueError on another shape."""
    if not isinstance(doc, dict) or set(doc) != {"lowered"} or not isinstance(doc["lowered"], dict):
        raise ValueError("expected `lowered:` mapping each lowered floor to its reason")
    out = {}
    for floor, reason in doc["lowered"].items():
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"{floor}: give the reason for lowering it (a text)")
        out[str(floor)] = reason.strip()
    return out
