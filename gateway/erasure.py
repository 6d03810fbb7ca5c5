"""Erasure that acts, exactly as asked: the backend delete calls the route table declares
(`erasure:` in routes.yaml) for the data sets of an accepted erasure request, then a count
of what remains of them.

Each entry declares what one of its DELETEs removes (`deletes:`: the data sets of the
subject's own, and those of the other people in the item), so what a call would take is
decided from the policy, not from code:

- a DELETE is sent only when everything it removes is named by the request; an item whose
  delete would take more is not called and is listed as needing a wider erasure;
- other people's data goes with it only where the data-set table makes it the subject's to
  delete (retention `organizer_deletes`: the organizer's meeting), checked when the policy
  loads; the resolution names whose it was;
- afterwards the listings are read again and what remains of the asked data sets is counted:
  anything left, and the request is not completed.

Every call goes through the route table, the policy and redaction exactly as if the data
subject made it (the erasure is their right, exercised on their behalf), and is audited as
a call of the admin who accepted the request, under that request's id. Each DELETE is
written ahead (`commit_intent`): its intent is durable before it is sent. What no entry
names cannot be erased through a backend and is listed in the resolution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from . import pipeline
from .call import Call
from .context import Gateway
from .db import query
from .errors import Denied, refusal
from .forward import send
from .policy.catalog import Leaf, ListOf, Node, ObjectOf
from .policy.erasers import Eraser
from .policy.erasers import route_for as _route
from .principal import Principal
from .redact import now_utc

log = logging.getLogger("gateway.pipeline")


def held(node: Node | None, value: Any, sub: str, about_them: bool) -> Counter[str]:
    """How much of each data set in `value` (shaped `node`) is `sub`'s: an object naming its
    own subject is theirs when it names them; a field of an object is that object's; a list
    element naming nobody is theirs only in an answer about them (`about_them`: a path with
    their {user}), never another person's in a shared item (a meeting's participants)."""
    out: Counter[str] = Counter()

    def walk(node: Node | None, value: Any, mine: bool) -> None:
        if value is None or node is None:
            return
        if isinstance(node, Leaf):
            if node.data_set is not None and mine and value not in ("", [], {}):
                out[node.data_set] += len(value) if isinstance(value, list) else 1
        elif isinstance(node, ListOf):
            for item in value if isinstance(value, list) else ():
                walk(node.item, item, about_them)
        elif isinstance(value, dict):
            if node.subject:
                mine = any(value.get(fld) == sub for _, fld in node.subject)
            if node.dataset_by is not None:
                chosen = node.dataset_by[1].get(value.get(node.dataset_by[0]))
                if mine and chosen is not None:
                    out[chosen] += 1
                return
            for key, child in node.fields.items():
                walk(child, value.get(key), mine)
    walk(node, value, about_them)
    return out


def others_in(node: Node | None, value: Any, sub: str) -> set[str]:
    """The people other than `sub` that objects of `value` name as their subject."""
    found: set[str] = set()

    def walk(node: Node | None, value: Any) -> None:
        if isinstance(node, ListOf) and isinstance(value, list):
            for item in value:
                walk(node.item, item)
        elif isinstance(node, ObjectOf) and isinstance(value, dict):
            for _, fld in node.subject:
                if isinstance(value.get(fld), str) and value[fld] != sub:
                    found.add(value[fld])
            for key, child in node.fields.items():
                walk(child, value.get(key))
    walk(node, value)
    return found


@dataclass(frozen=True)
class Failed:
    """A read of an erasure that failed: its status (None: never called) and reason id."""
    status: int | None
    code: str


@dataclass
class Outcome:
    """One backend call of an erasure (or an item not called: `needs_wider`)."""
    data_sets: list[str]
    method: str
    path: str
    status: int | None
    outcome: str                  # erased | not_held | failed | unknown | needs_wider
    reason: str | None = None


@dataclass
class Wider:
    """An item not deleted: its DELETE removes more than the request names."""
    data_sets: list[str]          # what the request asked of it
    path: str
    also: list[str]               # what else the DELETE would remove of the subject's
    others: list[str]             # … and of other people's


@dataclass
class ErasureResult:
    calls: list[Outcome] = field(default_factory=list)
    erased: dict[str, int] = field(default_factory=dict)     # data set -> items deleted
    failed: dict[str, str] = field(default_factory=dict)     # data set -> reason id
    not_erasable: list[str] = field(default_factory=list)    # no backend route
    wider: list[Wider] = field(default_factory=list)
    # (DELETE path, other people's data sets it took, whose the subject could see)
    took_others: list[tuple[str, list[str], list[str]]] = field(default_factory=list)
    remains: dict[str, int] = field(default_factory=dict)    # counted after the deletes
    uncounted: dict[str, str] = field(default_factory=dict)  # data set -> why not counted
    counted: set[str] = field(default_factory=set)           # read back after the deletes
    unknown_before: list[str] = field(default_factory=list)  # earlier runs' DELETEs, no outcome

    @property
    def ok(self) -> bool:
        """Everything asked that a backend can erase is erased, and counted gone."""
        return not (self.failed or self.wider or self.remains or self.uncounted)

    def resolution(self) -> str:
        """What happened, in words an admin and the user can read."""
        parts = []
        erased = sorted((ds, n) for ds, n in self.erased.items() if n)
        if erased:
            parts.append("erased through the backends: " + ", ".join(
                f"{ds} ({n} item{'s' if n != 1 else ''})" for ds, n in erased))
        for path, data_sets, people in self.took_others:
            parts.append(f"with {path} went other people's {', '.join(data_sets)} (the data-set "
                         f"table makes the organizer's delete theirs too)"
                         + (f", of {', '.join(people)}" if people else ""))
        if self.failed:
            parts.append("NOT erased, a backend call failed (accept again to retry): " + ", ".join(
                f"{ds} ({reason})" for ds, reason in sorted(self.failed.items())))
        if self.wider:
            parts.append("NOT erased, needs a wider erasure (the delete would remove more than "
                         "was asked; nothing was called — an erasure naming the rest too "
                         "deletes it): " + ", ".join(
                             f"{', '.join(w.data_sets)} in {w.path}, which also deletes "
                             f"{', '.join(w.also)}"
                             + (f" and other people's {', '.join(w.others)}" if w.others else "")
                             for w in self.wider))
        gone = sorted(self.counted - set(self.remains) - set(self.failed))
        if gone:
            parts.append("read back afterwards, nothing remains of " + ", ".join(gone))
        if self.remains:
            parts.append("still held after the erasure (read back): " + ", ".join(
                f"{ds} ({n})" for ds, n in sorted(self.remains.items())))
        if self.uncounted:
            parts.append("not counted after the erasure: " + ", ".join(
                f"{ds} ({reason})" for ds, reason in sorted(self.uncounted.items())))
        if self.not_erasable:
            parts.append("cannot be erased through a backend (the EUO admin or the Provider "
                         "must handle it): " + ", ".join(sorted(self.not_erasable)))
        if self.unknown_before:
            parts.append("an earlier run's DELETE has no recorded outcome (the gateway stopped "
                         "while it was under way; what remains was counted in this run): "
                         + ", ".join(self.unknown_before))
        return "; ".join(parts) or "nothing to erase"


class Ledger:
    """One erasure request's rows of `dsr_erasure_calls`."""

    def __init__(self, pool, request: uuid.UUID):
        self.pool, self.request = pool, request

    async def add(self, c: Outcome) -> None:
        """A call whose outcome is known at once (a failed listing, an item not called)."""
        await self.pool.fetchval(query("add_erasure_call"), self.request, c.data_sets,
                                 c.method, c.path, c.status, c.outcome, c.reason)

    def intent(self, data_sets: list[str], path: str):
        """The change that commits a DELETE's row, outcome `unknown`, with its intent's audit
        row; it returns the row's id."""
        async def insert(conn) -> int:
            return await conn.fetchval(query("add_erasure_call"), self.request, data_sets,
                                       "DELETE", path, None, "unknown", None)
        return insert

    async def finish(self, call_id: int, c: Outcome) -> None:
        """The DELETE's outcome, written into its intent's row."""
        await self.pool.execute(query("finish_erasure_call"), call_id, c.status, c.outcome,
                                c.reason)

    async def unknown(self) -> list[str]:
        """The paths of this request's DELETEs whose outcome was never written."""
        return [r["path"] for r in await self.pool.fetch(query("unknown_erasure_calls"),
                                                         self.request)]


async def commit_intent(call: Call, ledger: Ledger, data_sets: list[str], path: str) -> int:
    """Write-ahead, before an erasure's DELETE is sent: the intent's audit row (phase
    `intent`: who, what, which subject, the request id) and the call's `dsr_erasure_calls`
    row (outcome `unknown`) commit in one transaction, or this raises and nothing may be
    sent. The call's own row is then its outcome. Returns the erasure call row's id."""
    intent = dataclasses.replace(call.row, decision="allow", status=0, bytes=0,
                                 data_sets=list(data_sets), phase="intent")
    call_id = await call.audit.commit(intent, ledger.intent(data_sets, path))
    call.row.at, call.row.phase = now_utc(), "outcome"
    call.intended = True             # an outcome that cannot be written is unknown
    return call_id


class Erasure:
    """One erasure request's backend calls and the count that follows them."""

    def __init__(self, gw: Gateway, erasers: list[Eraser], actor: Principal, euo: str,
                 user: str, request_id: str, client: str | None, ledger: Ledger,
                 deadline_s: float):
        self.gw, self.erasers, self.actor = gw, erasers, actor
        # each backend call's outcome is recorded as soon as it is known (durably), so a
        # gateway that stops midway leaves what it did; past the deadline nothing more is
        # called and what remains is failed (`erasure_deadline`): accept again to go on
        self.ledger = ledger
        self.deadline = time.monotonic() + deadline_s
        # the data subject, as the role of roles.yaml a data subject holds (requests do not
        # record which, as long as one role is the data subjects' own)
        role = gw.catalog.data_subject_roles[0]
        self.subject = Principal(sub=user, role=role, euo=euo, kind=gw.catalog.roles[role])
        self.sub = user
        self.fill = {"euo": euo, "user": user}
        self.request_id, self.client = request_id, client
        self._listed: dict[str, Any] = {}

    async def run(self, data_sets: list[str]) -> ErasureResult:
        result = ErasureResult()
        result.unknown_before = await self.ledger.unknown()
        wanted = set(data_sets)
        usable = [e for e in self.erasers if wanted & set(e.data_sets)]
        # an entry whose every DELETE stays within the request; the others only for what no
        # such entry erases, and then nothing is called: each item is listed as needing more
        within = [e for e in usable if e.removes <= wanted]
        covered = {ds for e in within for ds in e.data_sets}
        result.not_erasable = sorted(wanted - {ds for e in self.erasers for ds in e.data_sets})
        for eraser in usable:
            names = sorted(wanted & set(eraser.data_sets))
            if eraser in within:
                deleted, reason = await self._erase(eraser, names, result)
                for ds in names:
                    if reason is None:
                        result.erased[ds] = result.erased.get(ds, 0) + deleted.get(ds, 0)
                    else:
                        result.failed[ds] = reason
            elif set(names) - covered:
                await self._needs_wider(eraser, sorted(set(names) - covered), result)
        await self._count(usable, wanted, result)
        return result

    async def _items(self, eraser: Eraser, names: list[str], result: ErasureResult,
                     ) -> list[tuple[str, Counter[str], set[str]]] | str:
        """Each listed item holding something of `names` of the subject's: (its id, how much
        of each data set, the other people it names); or the failure's reason id."""
        path = eraser.list.format(**self.fill)
        if path not in self._listed:
            self._listed[path] = await self._read(path)
        document = self._listed[path]
        if isinstance(document, Failed):
            await self._add(result, Outcome(names, "GET", path, document.status, "failed",
                                            document.code))
            return document.code
        listing = _route(self.gw.catalog, path, "GET")
        node = listing.body.fields.get(eraser.items) if isinstance(listing.body, ObjectOf) \
            else None
        items = document.get(eraser.items) if isinstance(document, dict) else None
        out = []
        for item in items or ():
            item_id = item.get("id") if isinstance(item, dict) else item
            if not isinstance(item_id, str):
                # nothing to name the item by: it cannot be deleted, so it is not claimed
                await self._add(result, Outcome(names, "DELETE", eraser.delete.format(
                    **self.fill, id="?"), None, "failed", "backend_unmappable"))
                return "backend_unmappable"
            holding = (Counter({node.data_set: 1}) if isinstance(node, Leaf) and node.data_set
                       else held(node.item if isinstance(node, ListOf) else node, item, self.sub,
                                 listing.subject_user is not None))
            others: set[str] = set()
            if eraser.read:
                read_path = eraser.read.format(**self.fill, id=item_id)
                document = await self._read(read_path)
                if isinstance(document, Failed):
                    await self._add(result, Outcome(names, "GET", read_path, document.status,
                                                    "failed", document.code))
                    return document.code
                route = _route(self.gw.catalog, read_path, "GET")
                holding += held(route.body, document, self.sub, route.subject_user is not None)
                others = others_in(route.body, document, self.sub)
            if any(holding[ds] for ds in names):
                out.append((item_id, holding, others))
        return out

    async def _erase(self, eraser: Eraser, names: list[str], result: ErasureResult,
                     ) -> tuple[Counter[str], str | None]:
        """Delete every listed item holding some of `names`; (items deleted per data set, the
        first failure's reason)."""
        items = await self._items(eraser, names, result)
        if isinstance(items, str):
            return Counter(), items
        deleted: Counter[str] = Counter()
        for item_id, holding, others in items:
            target = eraser.delete.format(**self.fill, id=item_id)
            if time.monotonic() > self.deadline:
                await self._add(result, Outcome(names, "DELETE", target, None, "failed",
                                                "erasure_deadline"))
                return deleted, "erasure_deadline"
            outcome = await self._delete(target, names, result)
            if outcome.outcome == "failed":
                return deleted, outcome.reason
            if outcome.outcome == "erased":
                deleted.update(ds for ds in names if holding[ds])
                if eraser.others:
                    result.took_others.append((target, sorted(eraser.others), sorted(others)))
        return deleted, None

    async def _needs_wider(self, eraser: Eraser, names: list[str], result: ErasureResult) -> None:
        """List each item holding some of `names` as needing a wider erasure; call nothing."""
        items = await self._items(eraser, names, result)
        if isinstance(items, str):
            for ds in names:
                result.failed[ds] = items
            return
        for item_id, _, _ in items:
            target = eraser.delete.format(**self.fill, id=item_id)
            also = sorted(eraser.deletes - set(names))
            result.wider.append(Wider(names, target, also, sorted(eraser.others)))
            await self._add(result, Outcome(names, "DELETE", target, None, "needs_wider",
                                            "needs_wider_erasure"))

    async def _count(self, usable: list[Eraser], wanted: set[str], result: ErasureResult) -> None:
        """Read every listing (and item) again and count what remains of the asked data sets
        of the subject's; what cannot be read is not counted (and not claimed erased)."""
        self._listed = {}                 # read afresh
        found: dict[tuple[str, str], int] = {}      # (path read, data set) -> how much
        for eraser in usable:
            names = sorted(wanted & set(eraser.data_sets))
            if time.monotonic() > self.deadline:
                result.uncounted.update((ds, "erasure_deadline") for ds in names)
                continue
            document = await self._count_at(eraser.list.format(**self.fill), names, result,
                                            found)
            items = document.get(eraser.items) if isinstance(document, dict) else None
            if eraser.read is None or not isinstance(items, list):
                continue
            for item in items:
                item_id = item.get("id") if isinstance(item, dict) else item
                if not isinstance(item_id, str):       # cannot be read back: not counted
                    result.uncounted.update((ds, "backend_unmappable") for ds in names)
                    continue
                await self._count_at(eraser.read.format(**self.fill, id=item_id), names, result,
                                     found)
        result.counted = {ds for _, ds in found} - set(result.uncounted)
        for (_, ds), n in found.items():
            if n and ds not in result.uncounted:
                result.remains[ds] = result.remains.get(ds, 0) + n
        for ds in result.failed:          # said not erased already
            result.remains.pop(ds, None)
            result.uncounted.pop(ds, None)
            result.counted.discard(ds)

    async def _add(self, result: ErasureResult, outcome: Outcome) -> None:
        result.calls.append(outcome)
        await self.ledger.add(outcome)

    async def _count_at(self, path: str, names: list[str], result: ErasureResult,
                        found: dict) -> Any:
        """Read `path` (once per erasure) and count what it still holds of `names` into
        `found`; its document, or None when it could not be read (those not counted)."""
        if path not in self._listed:
            self._listed[path] = await self._read(path)
        document = self._listed[path]
        if isinstance(document, Failed):
            result.uncounted.update((ds, document.code) for ds in names)
            return None
        route = _route(self.gw.catalog, path, "GET")
        counted = held(route.body, document, self.sub, route.subject_user is not None)
        found.update(((path, ds), counted[ds]) for ds in names)
        return document

    def _call(self, method: str, path: str) -> Call:
        call = self.gw.new_call(self.request_id, method, path, self.client)
        call.identify(self.actor)          # who caused it; authorized as the data subject
        # every call of an erasure (its listings and counts too) reads "erased for request
        # N" in the log and the user's access log, never as data served to the actor
        call.row.access, call.row.reason = "acted_upon", f"erasure:{self.ledger.request}"
        return call

    async def _refused(self, call: Call, error: Exception) -> Denied:
        """Audit a call's refusal (as far as the log can be written); the refusal."""
        denial = refusal(error, self.request_id)
        # when the log cannot be written, the outcome still goes to the request's ledger
        with contextlib.suppress(Denied):
            await call.fail(denial)
        return denial

    async def _read(self, path: str) -> Any:
        """The subject's view of a GET (redacted as for them), every page of it (a list the
        backend pages: the pages' lists joined): the document; None when the backend holds
        nothing there or nothing of it is the subject's to see (a user always sees their
        own data: a floor); Failed when it failed or ran past the deadline."""
        document = None
        try:
            async for page, more in pipeline.pages(path, self._read_page):
                if page == path:
                    document = more
                    continue
                if not isinstance(more, dict):      # gone or failed midway: not a whole list
                    return more if isinstance(more, Failed) else Failed(404, "backend_not_found")
                for key, value in more.items():
                    if isinstance(value, list) and isinstance(document.get(key), list):
                        document[key] = document[key] + value
                document["next_cursor"] = more.get("next_cursor")
        except Denied as e:         # past the pages followed: not a whole list
            return Failed(e.status, e.code)
        return document

    async def _read_page(self, path: str) -> Any:
        if time.monotonic() > self.deadline:
            return Failed(None, "erasure_deadline")
        call = self._call("GET", path)
        try:
            _, answer = await pipeline.fetch_json(self.gw, self.subject, path, call, self.client)
            await call.allow(answer.status, len(answer.body), answer.served, answer.removed)
        except Exception as e:
            denial = await self._refused(call, e)
            if denial.code in ("backend_not_found", "dataset_not_permitted"):
                return None
            return Failed(denial.status, denial.code)
        return answer.document

    async def _delete(self, path: str, names: list[str], result: ErasureResult) -> Outcome:
        """One DELETE, written ahead: sent only once its intent is committed."""
        call = self._call("DELETE", path)
        gw = self.gw
        try:
            target = pipeline.authorized(gw, self.subject, "DELETE", path, call)
        except Exception as e:
            denial = await self._refused(call, e)
            outcome = Outcome(names, "DELETE", path, denial.status, "failed", denial.code)
            await self._add(result, outcome)
            return outcome
        try:
            call_id = await commit_intent(call, self.ledger, names, path)
        except Exception as e:
            # nothing is sent; and no erasure call row, as the intent's own could not be
            # written (the request says what failed)
            denial = await self._refused(call, e)
            outcome = Outcome(names, "DELETE", path, denial.status, "failed", denial.code)
            result.calls.append(outcome)
            return outcome
        try:
            upstream = await send(gw, target, "DELETE", CIMultiDict(), call,
                                           self.client, gw.backends.deadline())
            upstream.release()
        except Exception as e:
            denial = await self._refused(call, e)
            outcome = (Outcome(names, "DELETE", path, 404, "not_held")   # gone already
                       if denial.code == "backend_not_found" else
                       Outcome(names, "DELETE", path, denial.status, "failed", denial.code))
        else:
            outcome = Outcome(names, "DELETE", path, upstream.status, "erased")
            try:
                await call.allow(upstream.status, 0, sorted(target.route.binary))
            except Denied:
                # done, but its outcome's audit row is not: the intent's row says it was
                # sent, the erasure call row what came of it
                log.warning("erasure %s: the outcome of DELETE %s is not audited",
                                     self.request_id, path)
        result.calls.append(outcome)
        await self.ledger.finish(call_id, outcome)
        return outcome
