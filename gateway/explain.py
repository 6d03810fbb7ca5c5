"""GET /v1/explain and `gateway policy explain`: what the gateway would decide for a
request, and why, without calling the backend.

It runs the proxy's own stages — match_route (target.py's grammar and the route table),
authorize (policy/authz.py's relations, the restriction check, the data-set check) and the
redaction plan (redact.py's make_plan, through the same cache) — so it cannot disagree
with them about the route, the refusal and its reason, or the data sets served at the
document level. What only the answer can decide is named as such: data sets a data
subject gets where the answer shows them as organizer or author, elements of restricted
users, retention masks and windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .context import GATEWAY, Decider
from .endpoints import api, identifier, json_response
from .errors import Denied
from .pipeline import authorize, match_route
from .policy.authz import Policy, path_relations
from .policy.catalog import ACTION_OF_METHOD, Catalog
from .principal import Principal


@dataclass
class _Row:
    service: str | None = None
    route: str | None = None
    subject_euo: str | None = None
    subject_users: list[str] = field(default_factory=list)


class _Scratch:
    """Stands in for a Call: match_route notes the route and subject here, not in a row
    that will be written."""

    def __init__(self):
        self.row = _Row()

    def about(self, euo, users=()) -> None:
        self.row.subject_euo, self.row.subject_users = euo, sorted(set(users))


def explain(gw: Decider, principal: Principal, method: str, path: str,
            scratch: _Scratch | None = None) -> dict[str, Any]:
    """The decision for `principal` making `method path`. `gw` is a Decider: the running
    Gateway, or an Offline one; the subject the path names is noted in `scratch`'s row."""
    out: dict[str, Any] = {
        "caller": {"role": principal.role, "sub": principal.sub, "partner": principal.partner,
                   "euo": principal.euo},
        "method": method, "path": path, "policy_version": gw.policy_version,
        "route": None, "relations": None}
    scratch = scratch or _Scratch()
    try:
        matched = match_route(gw, method, path, scratch)
    except Denied as e:
        return {**out, **_denied(e)}
    route = matched.route
    out["route"] = {"name": route.name, "service": route.service,
                    "params": dict(matched.params), "data_sets": sorted(route.data_sets),
                    "binary": list(route.binary) or None}
    out["subject"] = {"euo": scratch.row.subject_euo, "users": scratch.row.subject_users}
    relations, restricted = None, frozenset()
    try:
        target = authorize(gw, principal, method, matched)
        relations = target.relations
        out["decision"], out["status"], out["reason"] = "allow", 200, None
        restricted = target.withheld
    except Denied as e:
        out.update(_denied(e))
        try:                                # how far it got: the relations, if any held
            user = matched.params.get(route.subject_user) if route.subject_user else None
            relations = path_relations(principal, matched.params[route.subject_euo], user,
                                       gw.contracts.active_partner)
        except Denied:
            return out
    out["relations"] = sorted(relations)
    out.update(_data_sets(gw.catalog, gw.policy, gw.plan, route, principal, relations,
                          ACTION_OF_METHOD[method], out["decision"] == "allow", restricted))
    return out


def _denied(e: Denied) -> dict[str, Any]:
    return {"decision": "deny", "status": e.status, "reason": e.code, "message": e.message}


def _data_sets(catalog: Catalog, policy: Policy, plan, route, principal: Principal,
               relations: frozenset[str], action: str, allowed: bool,
               restricted: frozenset[str]) -> dict[str, Any]:
    role = principal.kind
    offered = frozenset(route.binary) if route.binary else route.data_sets
    if action == "read" and not route.binary:
        served = set(plan(route, principal.role, relations).visible)
    else:
        served = set(offered & policy.granted(principal.role, relations, action))
    maybe: set[str] = set()
    if role.data_subject and action == "read" and not route.binary:
        maybe = set(offered & policy.granted(principal.role, relations | route.body_relations,
                                             "read")) - served
    withheld = (served | maybe) & restricted         # the subject restricted them
    served, maybe = served - withheld, maybe - withheld
    hidden = {ds for ds in offered if role.column in catalog.data_sets[ds].hidden_from}
    deciding = policy.deciding_lines(principal.role, relations | route.body_relations, action,
                                     served | maybe)
    return {
        "action": action,
        "served": sorted(served) if allowed else [],
        "served_where_the_answer_shows": (
            {"relations": sorted(route.body_relations - relations), "data_sets": sorted(maybe)}
            if allowed and maybe else None),
        "removed": sorted(offered - served - maybe) if allowed else sorted(offered),
        "never_served": sorted(hidden),
        "withheld_by_restriction": sorted(withheld),
        "policy_lines": deciding,
        "restriction_applies": principal.role in catalog.restricted_roles,
        "decided_by_the_answer": [note for note, holds in (
            ("retention windows and masks (datasets.yaml)", True),
            ("elements of users who restricted processing",
             principal.role in catalog.restricted_roles),
            ("elements of a list about the caller alone (a data subject)", role.data_subject),
            ("which one of its data sets a file is (the listing the route names)",
             len(route.binary) > 1))
            if holds],
    }


def _request(params) -> tuple[str, str]:
    method, path = params.get("method", "GET"), params.get("path")
    repeated = any(len(params.getall(name, ())) > 1 for name in ("method", "path"))
    if repeated or method not in ACTION_OF_METHOD or not isinstance(path, str) or not path:
        raise Denied(400, "bad_explain", "explain needs method (one the route table knows: "
                     f"{', '.join(sorted(ACTION_OF_METHOD))}) and path (a backend path, e.g. "
                     "/telephony/euos/euo-acme), each once")
    return method, path


AS_PARAMETERS = ("role", "sub", "partner", "euo")


def _as(catalog: Catalog, params) -> Principal:
    """The caller to explain for, from role, sub and the tenant claim its role needs."""
    for name in AS_PARAMETERS:
        if len(params.getall(name, ())) > 1:
            raise Denied(400, "bad_explain", f"{name} is given once")
    kind = catalog.roles.get(params.get("role"))
    if kind is None:
        raise Denied(400, "bad_explain", "role must be one of roles.yaml: "
                     + ", ".join(sorted(catalog.roles)))
    sub = identifier(params.get("sub"), "sub")
    claims = {}
    for claim in ("partner", "euo"):
        value = params.get(claim)
        if claim == kind.tenant_claim:
            claims[claim] = identifier(value, claim)
        elif value is not None:
            raise Denied(400, "bad_explain", f"role {kind.name} carries no {claim} claim")
    return Principal(sub=sub, role=kind.name, kind=kind, **claims)


@api("/v1/explain")
async def explain_endpoint(request: web.Request, principal: Principal, row) -> web.Response:
    """The decision for the caller, without calling the backend (any role); for another
    caller (role, sub and its tenant claim given) for a role with the explain_any group."""
    method, path = _request(request.query)
    gw = request.app[GATEWAY]
    # the row names whom the path is about: an explain of a user (her restrictions, what
    # the caller may see of her) shows in her access log as `explained`
    scratch = _Scratch()
    if not any(name in request.query for name in AS_PARAMETERS):
        said = explain(gw, principal, method, path, scratch)
    elif not principal.kind.may("explain_any"):
        raise Denied(403, "role_not_permitted", "only a role with the explain_any group "
                     "(roles.yaml) may explain for another caller")
    else:
        said = explain(gw, _as(gw.catalog, request.query), method, path, scratch)
        said["explained_by"] = {"role": principal.role, "sub": principal.sub}
    row.subject_euo, row.subject_users = scratch.row.subject_euo, scratch.row.subject_users
    row.access = "explained" if scratch.row.subject_euo else None
    return json_response(said)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/explain", explain_endpoint)


@dataclass
class _Contracts:
    partners: dict[str, str]

    def active_partner(self, euo: str) -> str | None:
        return self.partners.get(euo)


@dataclass
class _Restrictions:
    users: set[tuple[str, str]]

    def restricted(self, euo: str, user: str) -> frozenset[str]:
        """A user given as restricted has restricted every data set."""
        return self._all if (euo, user) in self.users else frozenset()

    _all: frozenset[str] = frozenset()


class _NoGrants:
    def grant_for(self, principal, euo, user):
        return None


class Offline(Decider):
    """The gateway's own Decider, from the policy files alone: contracts and restrictions
    as given on the command line (none by default), no break-glass grant."""

    def __init__(self, catalog: Catalog, policy: Policy, version: str,
                 contracts: dict[str, str] | None = None,
                 restricted: set[tuple[str, str]] | None = None):
        super().__init__(catalog=catalog, policy=policy, policy_version=version,
                         contracts=_Contracts(contracts or {}),
                         restrictions=_Restrictions(restricted or set(),
                                                    frozenset(catalog.data_sets)),
                         break_glass=_NoGrants())
