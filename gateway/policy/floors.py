"""The floors of the Provider's data-set table, shipped with the code (docs/contract.md,
Data sets and Floors): which data sets are `(**)`, hidden from which column, and whose data
each is. Written by hand from the published table, not from any policy file.

The policy directory's datasets.yaml may add restrictions (hide a data set from more
columns), never take one away: a data set of the table that datasets.yaml leaves out, hides
from fewer columns, or gives another subject, lowers a floor, and the policy is refused.
A floor is lowered only by naming it, with a reason, in the policy directory's
`lowered_floors.yaml`; `gateway check` warns of each, `GET /v1/catalog` lists them per data
set, and the policy version (in every audit row) ends in `+floors-lowered-N`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def check(data_sets: Mapping[str, Any], declared: Mapping[str, str]) -> list[str]:
    """Problems: each floor lowered without being declared in lowered_floors.yaml, and each
    declaration that names no floor or one datasets.yaml keeps (a stale override would
    claim a lowering that is not there)."""
    lowered = lowered_by(data_sets)
    problems = [f"{how} ({floor}: a floor of the data-set table; to lower it anyway, name it "
                f"with a reason in {LOWERED_FILE})"
                for floor, how in lowered.items() if floor not in declared]
    for floor in declared:
        if floor not in ALL_FLOORS:
            problems.append(f"{LOWERED_FILE}: {floor!r} is no floor of the data-set table "
                            "(<data set>.hidden_from.<column> or <data set>.subject.<kind>)")
        elif floor not in lowered:
            problems.append(f"{LOWERED_FILE}: {floor} is not lowered by datasets.yaml: "
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
