"""Erasure that acts: the backend delete calls the route table declares (`erasure:` in
routes.yaml) for the data sets of an accepted erasure request.

Every call goes through the route table, the policy and redaction exactly as if the data
subject made it (the erasure is their right, exercised on their behalf), and is audited as
a call of the admin who accepted the request, under that request's id. What no entry names
cannot be erased through a backend and is listed in the resolution.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from multidict import CIMultiDict

from . import pipeline
from .catalog import Catalog, PolicyError
from .errors import Denied
from .pipeline import Gateway
from .principal import Principal


@dataclass(frozen=True)
class Eraser:
    data_sets: tuple[str, ...]
    list: str           # GET, {euo} and {user} filled in
    items: str          # the list field of its answer
    delete: str         # DELETE, {euo}, {user} and {id}


def load_erasers(policy_dir: Path, catalog: Catalog) -> list[Eraser]:
    """routes.yaml's `erasure:` entries, each path checked against the route table."""
    try:
        doc = yaml.safe_load((Path(policy_dir) / "routes.yaml").read_text(encoding="utf-8"))
        erasers = [Eraser(tuple(e["data_sets"]), e["list"], e["items"], e["delete"])
                   for e in doc.get("erasure") or ()]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise PolicyError(f"routes.yaml: erasure: {e}") from None
    fill = {"euo": "e", "user": "u", "id": "i"}
    for e in erasers:
        for ds in e.data_sets:
            if ds not in catalog.data_sets:
                raise PolicyError(f"routes.yaml: erasure: unknown data set {ds!r}")
        for method, path in (("GET", e.list), ("DELETE", e.delete)):
            service, *segments = path.format(**fill).strip("/").split("/")
            found = catalog.match(service, segments)
            if found is None or method not in found[0].methods:
                raise PolicyError(f"routes.yaml: erasure: {method} {path} is not in the route table")
    return erasers


@dataclass
class Outcome:
    """One backend call of an erasure."""
    data_sets: list[str]
    method: str
    path: str
    status: int | None
    outcome: str                  # erased | not_held | failed
    reason: str | None = None


@dataclass
class ErasureResult:
    calls: list[Outcome] = field(default_factory=list)
    erased: dict[str, int] = field(default_factory=dict)     # data set -> items deleted
    failed: dict[str, str] = field(default_factory=dict)     # data set -> reason id
    not_erasable: list[str] = field(default_factory=list)    # no backend route

    @property
    def ok(self) -> bool:
        return not self.failed

    def resolution(self) -> str:
        """What happened, in words an admin and the user can read."""
        parts = []
        if self.erased:
            parts.append("erased through the backends: " + ", ".join(
                f"{ds} ({n} item{'s' if n != 1 else ''})" for ds, n in sorted(self.erased.items())))
        if self.failed:
            parts.append("NOT erased, a backend call failed (accept again to retry): " + ", ".join(
                f"{ds} ({reason})" for ds, reason in sorted(self.failed.items())))
        if self.not_erasable:
            parts.append("cannot be erased through a backend (the EUO admin or the Provider "
                         "must handle it): " + ", ".join(sorted(self.not_erasable)))
        return "; ".join(parts) or "nothing to erase"


class Erasure:
    """One erasure request's backend calls."""

    def __init__(self, gw: Gateway, erasers: list[Eraser], actor: Principal, euo: str,
                 user: str, request_id: str, client: str | None,
                 record: Callable[[Outcome], Awaitable[None]], deadline_s: float):
        self.gw, self.erasers, self.actor = gw, erasers, actor
        # each backend call's outcome is recorded as soon as it is known (durably), so a
        # gateway that stops midway leaves what it did; past the deadline nothing more is
        # called and what remains is failed (`erasure_deadline`): accept again to go on
        self.record = record
        self.deadline = time.monotonic() + deadline_s
        # the data subject, as the role of roles.yaml a data subject holds (requests do not
        # record which, as long as one role is the data subjects' own)
        role = gw.catalog.data_subject_roles[0]
        self.subject = Principal(sub=user, role=role, euo=euo, kind=gw.catalog.roles[role])
        self.fill = {"euo": euo, "user": user}
        self.request_id, self.client = request_id, client
        self._listed: dict[str, Any] = {}

    async def run(self, data_sets: list[str]) -> ErasureResult:
        result = ErasureResult()
        wanted = set(data_sets)
        covered: set[str] = set()
        for eraser in self.erasers:
            names = sorted(wanted & set(eraser.data_sets))
            if not names:
                continue
            covered.update(names)
            deleted, reason = await self._erase(eraser, names, result)
            for ds in names:
                if reason is None:
                    result.erased[ds] = result.erased.get(ds, 0) + deleted
                else:
                    result.failed[ds] = reason
        result.not_erasable = sorted(wanted - covered)
        return result

    async def _erase(self, eraser: Eraser, names: list[str],
                     result: ErasureResult) -> tuple[int, str | None]:
        """Delete every listed item; (how many were deleted, the first failure's reason)."""
        path = eraser.list.format(**self.fill)
        if path not in self._listed:
            if time.monotonic() > self.deadline:
                await self._add(result, Outcome(names, "GET", path, None, "failed",
                                                "erasure_deadline"))
                return 0, "erasure_deadline"
            self._listed[path] = await self._list(path, names, result)
        document = self._listed[path]
        if isinstance(document, str):
            return 0, document                      # the listing failed
        items = document.get(eraser.items) if isinstance(document, dict) else None
        deleted = 0
        for item in items or ():
            item_id = item.get("id") if isinstance(item, dict) else item
            if not isinstance(item_id, str):
                # nothing to name the item by: it cannot be deleted, so it is not claimed
                await self._add(result, Outcome(names, "DELETE", eraser.delete.format(
                    **self.fill, id="?"), None, "failed", "backend_unmappable"))
                return deleted, "backend_unmappable"
            target = eraser.delete.format(**self.fill, id=item_id)
            if time.monotonic() > self.deadline:
                await self._add(result, Outcome(names, "DELETE", target, None, "failed",
                                                "erasure_deadline"))
                return deleted, "erasure_deadline"
            outcome = await self._delete(target, names)
            await self._add(result, outcome)
            if outcome.outcome == "failed":
                return deleted, outcome.reason
            deleted += outcome.outcome == "erased"
        return deleted, None

    async def _add(self, result: ErasureResult, outcome: Outcome) -> None:
        result.calls.append(outcome)
        await self.record(outcome)

    def _call(self, method: str, path: str):
        call = self.gw.new_call(self.request_id, method, path, self.client)
        call.identify(self.actor)          # who caused it; authorized as the data subject
        return call

    async def _list(self, path: str, names: list[str], result: ErasureResult) -> Any:
        """The listing's redacted document; None when the backend holds nothing, the reason
        id when it failed."""
        call = self._call("GET", path)
        gw = self.gw
        try:
            matched = pipeline.match_route(gw, "GET", path, call)
            target = pipeline.authorize(gw, self.subject, "GET", matched)
            deadline = gw.backends.deadline()
            upstream = await pipeline.send(gw, target, "GET", CIMultiDict(), call, self.client,
                                           deadline)
            answer = await pipeline.read_json(gw, target, upstream, call, deadline)
            await call.allow(answer.status, len(answer.body), answer.served, answer.removed)
        except Exception as e:
            denial = e if isinstance(e, Denied) else pipeline.internal(e, self.request_id)
            await call.record_refusal(denial)
            held = denial.code != "backend_not_found"
            await self._add(result, Outcome(names, "GET", path, denial.status,
                                            "failed" if held else "not_held",
                                            denial.code if held else None))
            return denial.code if held else None
        return answer.document

    async def _delete(self, path: str, names: list[str]) -> Outcome:
        call = self._call("DELETE", path)
        gw = self.gw
        try:
            matched = pipeline.match_route(gw, "DELETE", path, call)
            target = pipeline.authorize(gw, self.subject, "DELETE", matched)
            upstream = await pipeline.send(gw, target, "DELETE", CIMultiDict(), call,
                                           self.client, gw.backends.deadline())
            upstream.release()
            await call.allow(upstream.status, 0, sorted(target.route.binary))
        except Exception as e:
            denial = e if isinstance(e, Denied) else pipeline.internal(e, self.request_id)
            await call.record_refusal(denial)
            if denial.code == "backend_not_found":     # gone already: nothing held
                return Outcome(names, "DELETE", path, 404, "not_held")
            return Outcome(names, "DELETE", path, denial.status, "failed", denial.code)
        return Outcome(names, "DELETE", path, upstream.status, "erased")
