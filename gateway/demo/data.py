"""Demo data: two partners, four EUOs (one whose contract ended), their users, and the
voicemails (real WAV), faxes (real PDF), recordings, CDRs and meetings (guests and a
dial-in caller without an account among their participants) the backends serve.
Some of it is past its retention on purpose (old CDRs, a 400-day-old connection statistic,
sent faxes, everything of the EUO whose contract ended more than 6 months ago), as real
backends hold it: the gateway withholds it and reports it."""

from __future__ import annotations

import io
import math
import struct
import wave
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

PARTNERS = ("p-northwind", "p-bluesky")

# euo id -> (name, postal address, partner, contract_end)
EUOS = {
    "euo-acme": ("Acme Logistics SA", "Rue de la Loi 16, 1000 Brussels", "p-northwind", None),
    "euo-globex": ("Globex Dental SPRL", "Meir 50, 2000 Antwerp", "p-northwind", None),
    "euo-initech": ("Initech Software NV", "Veldstraat 1, 9000 Ghent", "p-bluesky", None),
    "euo-umbrella": ("Umbrella Pharma BV", "Grote Markt 7, 3000 Leuven", "p-bluesky",
                     date(2025, 6, 30)),
}

# user id -> (euo, first, last, language, mobile)
USERS = {
    "u-alice": ("euo-acme", "Alice", "Martin", "fr", "+32470111201"),
    "u-bob": ("euo-acme", "Bob", "Peeters", "nl", "+32470111202"),
    "u-carla": ("euo-acme", "Carla", "Dubois", "fr", "+32470111203"),
    "u-dirk": ("euo-globex", "Dirk", "Janssens", "nl", "+32470222301"),
    "u-eva": ("euo-globex", "Eva", "Maes", "en", "+32470222302"),
    "u-farid": ("euo-initech", "Farid", "El Amrani", "fr", "+32470333401"),
    "u-greet": ("euo-initech", "Greet", "Wouters", "nl", "+32470333402"),
    "u-hugo": ("euo-umbrella", "Hugo", "Claes", "en", "+32470444501"),
}


def wav_bytes(seconds: float = 1.0, hz: float = 440.0, rate: int = 8000) -> bytes:
    """A real mono 16-bit PCM WAV file holding a sine tone."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / rate)))
            for i in range(int(seconds * rate)))
        w.writeframes(frames)
    return buf.getvalue()


def pdf_bytes(text: str) -> bytes:
    """A real one-page PDF with one line of text."""
    safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 18 Tf 72 720 Td ({safe}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (i, obj))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


@dataclass
class DemoData:
    """Everything the demo backends serve, keyed as the backend API (docs/contract.md) addresses it."""
    euos: dict[str, dict] = field(default_factory=dict)
    directories: dict[str, list[dict]] = field(default_factory=dict)
    users: dict[str, dict] = field(default_factory=dict)
    voicemails: dict[str, list[dict]] = field(default_factory=dict)
    faxes: dict[str, list[dict]] = field(default_factory=dict)
    recordings: dict[str, list[dict]] = field(default_factory=dict)
    blobs: dict[str, tuple[str, bytes]] = field(default_factory=dict)   # key -> (type, bytes)
    cdrs: dict[str, list[dict]] = field(default_factory=dict)            # euo -> cdrs
    trunk_cdrs: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    accounts: dict[str, dict] = field(default_factory=dict)
    organizers: dict[str, dict] = field(default_factory=dict)
    meetings: dict[str, dict] = field(default_factory=dict)
    participations: dict[str, list[dict]] = field(default_factory=dict)   # user -> meetings
    stats: dict[str, list[dict]] = field(default_factory=dict)

    def contracts(self) -> dict[str, tuple[str, date | None]]:
        return {euo: (partner, end) for euo, (_, _, partner, end) in EUOS.items()}


def build(now: datetime | None = None) -> DemoData:
    """The demo data set; times are relative to `now` so some CDRs are always old."""
    now = now or datetime.now(UTC)
    d = DemoData()
    iso = lambda t: t.replace(microsecond=0).isoformat()  # noqa: E731
    for euo, (name, address, partner, _end) in EUOS.items():
        d.euos[euo] = {"id": euo, "name": name, "postal_address": address, "partner_id": partner,
                       "trunks": [{"id": "trunk-1"}]}
        d.accounts[euo] = {"id": euo, "account_name": name.split()[0].lower() + "-meet",
                           "company_name": name}
        d.cdrs[euo] = []
        d.stats[euo] = []
    for n, (uid, (euo, first, last, lang, mobile)) in enumerate(USERS.items()):
        email = f"{first.lower()}.{last.lower().replace(' ', '')}@{euo[4:]}.example"
        d.users[uid] = {
            "id": uid, "euo_id": euo, "first_name": first, "last_name": last, "email": email,
            "language": lang, "mobile": mobile, "address": f"Home street {n + 1}, Belgium",
            "personal_directory": [{"name": f"{first}'s dentist", "number": f"+3225550{n:03d}"},
                                   {"name": "Mum", "number": f"+3247099{n:04d}"}],
        }
        d.directories.setdefault(euo, []).append(
            {"user_id": uid, "name": f"{first} {last}", "number": f"+32 2 700 1{n:02d}"})
        d.voicemails[uid] = [{"id": f"vm-{uid}-1", "caller": "+3226400000",
                              "received_at": iso(now - timedelta(hours=5 + n)), "duration_s": 1}]
        d.blobs[f"vm-{uid}-1"] = ("audio/wav", wav_bytes(1.0, 440 + 20 * n))
        d.faxes[uid] = [
            {"id": f"fax-{uid}-in", "direction": "in", "peer": "+3221234567",
             "at": iso(now - timedelta(days=2)), "pages": 1},
            {"id": f"fax-{uid}-out", "direction": "out", "peer": "+3227654321",
             "at": iso(now - timedelta(days=1)), "pages": 1},
        ]
        d.blobs[f"fax-{uid}-in"] = ("application/pdf", pdf_bytes(f"Fax to {first} {last}"))
        d.blobs[f"fax-{uid}-out"] = ("application/pdf", pdf_bytes(f"Fax from {first} {last}"))
        d.recordings[uid] = [{"id": f"rec-{uid}-1", "peer": "+3226401111",
                              "at": iso(now - timedelta(days=3)), "duration_s": 1}]
        d.blobs[f"rec-{uid}-1"] = ("audio/wav", wav_bytes(1.0, 330))
        for k, age in enumerate((1, 7, 200, 400)):   # two recent CDRs, two old ones
            d.cdrs[euo].append({
                "id": f"cdr-{uid}-{k}", "user_id": uid, "caller": mobile,
                "callee": f"+3226{n:02d}{k:05d}", "start": iso(now - timedelta(days=age)),
                "duration_s": 60 + k, "direction": "out" if k % 2 else "in"})
        d.organizers[uid] = {
            "id": uid, "first_name": first, "last_name": last, "email": email,
            "language": lang, "address_book": [f"client{n}@customer.example", "team@ops.example"],
            "documents": [{"id": f"doc-{uid}-1", "name": "Quarterly plan.pdf", "size": 0}],
            "meetings": [],
        }
        d.blobs[f"doc-{uid}-1"] = ("application/pdf", pdf_bytes(f"Plan by {first} {last}"))
        d.organizers[uid]["documents"][0]["size"] = len(d.blobs[f"doc-{uid}-1"][1])
        d.stats[euo].append({"user_id": uid, "at": iso(now - timedelta(days=1)), "os": "Linux 6.8",
                             "browser": "Firefox 140", "rtt_ms": 23 + n, "jitter_ms": 3,
                             "packet_loss": 0.1, "quality": "good", "errors": []})
    for euo in EUOS:
        d.trunk_cdrs[(euo, "trunk-1")] = [dict(c, id=c["id"] + "-t") for c in d.cdrs[euo]
                                          if c["id"].endswith(("-0", "-2"))]
        members = [u for u, v in USERS.items() if v[0] == euo]
        organizer, others = members[0], members[1:]
        # a backend that keeps data too long: connection statistics are deleted after at
        # most 180 days, yet this row is 400 days old (the gateway withholds it and
        # `gateway retention report` names the backend)
        d.stats[euo].append({"user_id": organizer, "at": iso(now - timedelta(days=400)),
                             "os": "Windows 10", "browser": "Edge 109", "rtt_ms": 80,
                             "jitter_ms": 9, "packet_loss": 1.5, "quality": "poor",
                             "errors": ["ice_timeout"]})
        mid = f"mtg-{euo[4:]}-1"
        notes = [{"author_id": organizer, "text": "Remember to send the budget."}]
        notes += [{"author_id": o, "text": f"Private thought of {o}"} for o in others]
        d.meetings[mid] = {
            "id": mid, "euo": euo, "organizer_id": organizer,
            "start": iso(now - timedelta(days=2)), "end": iso(now - timedelta(days=2, hours=-1)),
            "topic": "Weekly planning", "agenda": "1. Numbers 2. Hiring",
            "invited": [d.users[m]["email"] for m in members],
            "documents": [{"id": f"mdoc-{mid}", "name": "slides.pdf", "size": 2048}],
            "whiteboards": [{"id": "wb-1", "svg": "<svg><line x1='0' y1='0' x2='9' y2='9'/></svg>"}],
            "chat": [{"author_id": m, "author": USERS[m][1], "text": f"Hello all, {USERS[m][1]} here",
                      "at": iso(now - timedelta(days=2))} for m in members]
            # a guest without an account and a dial-in caller: no user of ours
            + [{"author_id": None, "author": "Guest 1", "text": "Hi, Jan from the auditors here",
                "at": iso(now - timedelta(days=2))}],
            "minutes": "Budget approved.",
            "private_notes": notes,
            "participants": [{"user_id": m, "name": f"{USERS[m][1]} {USERS[m][2]}",
                              "email": d.users[m]["email"]} for m in members]
            + [{"user_id": None, "name": "Guest 1", "email": "jan@auditors.example"},
               {"user_id": None, "name": "+32 2 555 01 99", "email": None}],
        }
        d.organizers[organizer]["meetings"].append(
            {"id": mid, "topic": "Weekly planning", "start": d.meetings[mid]["start"]})
        for m in members:       # everyone took part, the organizer too
            d.participations.setdefault(m, []).append(
                {"id": mid, "name": f"{USERS[m][1]} {USERS[m][2]}", "email": d.users[m]["email"]})
    return d
