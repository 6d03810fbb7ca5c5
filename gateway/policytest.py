"""`gateway policy test [DIR]`: a policy tested like code (as `opa test` and Cerbos test
suites test theirs).

Each YAML file of DIR (default: the policy directory's `tests/`) is a suite of cases: a
caller and a request, and what the gateway must decide. A case is decided by explain.py —
the proxy's own route match, relation and restriction checks and redaction plan — from the
policy files alone, with the contracts and restricted users the file assumes, so a case
cannot pass while the proxy would decide otherwise.

    callers:                       # who the cases call as: token claims
      partner: {role: partner, sub: pat@northwind, partner: p-northwind}
    contracts: {euo-acme: p-northwind}       # active contracts assumed (EUO: partner)
    restricted: [euo-acme/u-carla]           # users who restricted processing (optional)
    cases:
      - name: a partner never receives a user's voicemails
        as: partner
        request: GET /telephony/euos/euo-acme/users/u-alice/voicemails
        expect:
          refused: {status: 403, reason: dataset_not_permitted}
      - name: a partner reads a user's record without their personal directory
        as: partner
        request: GET /telephony/euos/euo-acme/users/u-alice
        expect:
          served: [user_address, user_email, user_language, user_mobile, user_name]
          excludes: [personal_directory]

`name` is optional (by default, the caller and the request). `expect` holds `refused`
(status, and reason id if given), or any of: `served` (exactly these data sets), `includes`
(at least these), `excludes` (none of these, not even where the answer would show the
caller as organizer or author), `removed` (exactly these), `served_where_the_answer_shows`
(exactly these). Every data set named must exist, every key must be known: a typo is an
error, never a case that passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .authn import _principal
from .errors import Denied
from .explain import Offline, explain
from .policy.catalog import ACTION_OF_METHOD
from .policy.policyset import PolicySet
from .principal import Principal

FILE_KEYS = {"callers", "contracts", "restricted", "cases"}
CASE_KEYS = {"name", "as", "request", "expect"}
CALLER_KEYS = {"role", "sub", "partner", "euo"}
SET_EXPECTATIONS = ("served", "includes", "excludes", "removed", "served_where_the_answer_shows")
EXPECT_KEYS = {"refused", *SET_EXPECTATIONS}
MAX_FILE_BYTES = 4 * 1024 * 1024     # the shipped suites are ~25 KB together


class CaseError(ValueError):
    """A case file that cannot be run (the message names the file and the case)."""


@dataclass(frozen=True)
class Case:
    file: str
    name: str
    principal: Principal
    method: str
    path: str
    expect: dict[str, Any]
    gw: Offline


@dataclass(frozen=True)
class Failure:
    case: Case
    problems: list[str]

    def __str__(self) -> str:
        c = self.case
        return (f"FAIL {c.file}: {c.name}\n  as {c.principal.role} ({c.principal.sub}): "
                f"{c.method} {c.path}\n" + "\n".join(f"  {p}" for p in self.problems))


def load_cases(directory: Path, policy_set: PolicySet) -> list[Case]:
    """Every case of every *.yaml file of the directory; CaseError on anything malformed."""
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise CaseError(f"{directory}: no *.yaml case files")
    cases: list[Case] = []
    for path in files:
        cases += _file_cases(path, policy_set)
    return cases


class _CaseLoader(yaml.SafeLoader):
    """yaml.safe_load without aliases: `*name` may stand for a structure that is itself
    made of aliases, so a few hundred bytes can stand for billions of nodes (a "billion
    laughs"); no case needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in case files",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _read(path: Path, where: str) -> Any:
    try:
        if not path.is_file():          # a FIFO would block, a device never end
            raise CaseError(f"{where}: cannot be read: not a regular file")
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise CaseError(f"{where}: cannot be read: larger than {MAX_FILE_BYTES} bytes")
        return yaml.load(data.decode("utf-8"), Loader=_CaseLoader)  # noqa: S506 (safe)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CaseError(f"{where}: cannot be read: {e}") from None
    except RecursionError:
        raise CaseError(f"{where}: cannot be read: nested too deeply") from None


def _file_cases(path: Path, policy_set: PolicySet) -> list[Case]:
    where = path.name
    doc = _read(path, where)
    if not isinstance(doc, dict):
        raise CaseError(f"{where}: expected a mapping with `cases:`")
    _known(doc, FILE_KEYS, where)
    catalog = policy_set.catalog
    callers = {name: _caller(name, spec, catalog.roles, where)
               for name, spec in _mapping(doc.get("callers"), f"{where}: callers").items()}
    contracts = doc.get("contracts") or {}        # optional: none assumed
    if not isinstance(contracts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in contracts.items()):
        raise CaseError(f"{where}: contracts maps an EUO id to a partner id")
    restricted = set()
    listed = doc.get("restricted") or []
    if not isinstance(listed, list):
        raise CaseError(f"{where}: restricted is a list of EUO/USER")
    for item in listed:
        if not isinstance(item, str) or item.count("/") != 1:
            raise CaseError(f"{where}: restricted lists EUO/USER, not {_show(item)}")
        restricted.add(tuple(item.split("/")))
    gw = Offline(catalog, policy_set.policy, policy_set.version, contracts, restricted)
    raw_cases = doc.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise CaseError(f"{where}: `cases:` must be a non-empty list")
    cases, names = [], set()
    for i, raw in enumerate(raw_cases, 1):
        if not isinstance(raw, dict):
            raise CaseError(f"{where}: case {i}: a case is a mapping (as, request, expect)")
        caller, request = raw.get("as"), raw.get("request", "")
        # by default a case is named by who asks what
        name = raw.get("name", " ".join(v if isinstance(v, str) else f"<{type(v).__name__}>"
                                        for v in (caller, request)))
        if not isinstance(name, str) or not name:
            raise CaseError(f"{where}: case {i}: a name is text")
        here = f"{where}: case {i} ({name})"
        if name in names:
            raise CaseError(f"{here}: the name is used twice in this file")
        names.add(name)
        _known(raw, CASE_KEYS, here)
        if not isinstance(caller, str) or caller not in callers:
            raise CaseError(f"{here}: `as` must name one of callers: {', '.join(callers)}")
        method, _, target = (request if isinstance(request, str) else "").partition(" ")
        if method not in ACTION_OF_METHOD or not target.startswith("/"):
            raise CaseError(f"{here}: request is 'METHOD /path' with METHOD one of "
                            f"{', '.join(sorted(ACTION_OF_METHOD))}")
        cases.append(Case(where, name, callers[caller], method, target,
                          _expectation(raw.get("expect"), set(catalog.data_sets), here), gw))
    return cases


def _caller(name: Any, spec: Any, roles, where: str) -> Principal:
    if not isinstance(name, str) or not isinstance(spec, dict):
        raise CaseError(f"{where}: callers maps a name to its claims (role, sub, …)")
    _known(spec, CALLER_KEYS, f"{where}: caller {name}")
    role = spec.get("role")
    kind = roles.get(role) if isinstance(role, str) else None
    if kind is None:
        raise CaseError(f"{where}: caller {name}: no role {_show(role)} in roles.yaml")
    if not isinstance(spec.get("sub"), str):
        raise CaseError(f"{where}: caller {name}: `sub` is required")
    if kind.tenant_claim is not None and not isinstance(spec.get(kind.tenant_claim), str):
        raise CaseError(f"{where}: caller {name}: role {kind.name} needs the "
                        f"{kind.tenant_claim} claim")
    # the caller a token with these claims would be: the same grammar, and only the
    # role's own tenant claim counts (the proxy ignores the others)
    try:
        principal = _principal({**spec, "exp": 0}, roles)
    except Denied as e:
        raise CaseError(f"{where}: caller {name}: a token with these claims is refused "
                        f"({e.code}: {e.message})") from None
    return Principal(sub=principal.sub, role=principal.role, partner=principal.partner,
                     euo=principal.euo, kind=kind)


def _expectation(raw: Any, data_sets: set[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise CaseError(f"{where}: `expect` must say what is decided")
    _known(raw, EXPECT_KEYS, f"{where}: expect")
    if "refused" in raw:
        if len(raw) > 1:
            raise CaseError(f"{where}: a refused case expects nothing else")
        refused = raw["refused"]
        status = refused.get("status") if isinstance(refused, dict) else None
        if type(status) is not int or not 400 <= status <= 599 or \
                not isinstance(refused.get("reason", ""), str):
            raise CaseError(f"{where}: refused is {{status: 4xx, reason: id}}")
        _known(refused, {"status", "reason"}, f"{where}: refused")
        return raw
    for key in SET_EXPECTATIONS:
        if key in raw:
            names = raw[key]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CaseError(f"{where}: {key} lists data set names")
            if unknown := sorted(set(names) - data_sets):
                raise CaseError(f"{where}: {key}: no data set {', '.join(unknown)} "
                                "in datasets.yaml")
    return raw


def _known(mapping: dict, keys: set[str], where: str) -> None:
    if unknown := sorted(str(k) for k in set(mapping) - keys):
        raise CaseError(f"{where}: unknown keys {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(keys))})")


def _show(value: Any) -> str:
    """A value of the file, for a message: short whatever it holds."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    return repr(value[:80] + "…" if len(value) > 80 else value)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise CaseError(f"{where}: expected a mapping")
    return value


def check(case: Case) -> Failure | None:
    """Run one case; its failure, or None when the gateway decides as expected."""
    said = explain(case.gw, case.principal, case.method, case.path)
    expect, problems = case.expect, []
    if "refused" in expect:
        want = expect["refused"]
        wanted = f"expected refused {want['status']} {want.get('reason', '')}".rstrip()
        if said["decision"] != "deny":
            problems.append(f"{wanted}, got allowed, serving "
                            f"{', '.join(said['served']) or 'nothing'}")
        elif said["status"] != want["status"] or want.get("reason", said["reason"]) != said["reason"]:
            problems.append(f"{wanted}, got {said['status']} {said['reason']}")
        return Failure(case, problems) if problems else None
    if said["decision"] != "allow":
        return Failure(case, [f"expected allowed, got refused {said['status']} {said['reason']}"])
    served = set(said["served"])
    maybe = set((said["served_where_the_answer_shows"] or {}).get("data_sets", []))
    got = {"served": served, "removed": set(said["removed"]),
           "served_where_the_answer_shows": maybe}
    for key in ("served", "removed", "served_where_the_answer_shows"):
        if key in expect and set(expect[key]) != got[key]:
            problems.append(f"{key}: expected {_names(expect[key])}, got {_names(got[key])}"
                            + _difference(set(expect[key]), got[key]))
    if missing := set(expect.get("includes", ())) - served:
        problems.append(f"includes: not served: {_names(missing)}")
    if leaked := set(expect.get("excludes", ())) & (served | maybe):
        problems.append(f"excludes: served: {_names(leaked)}")
    return Failure(case, problems) if problems else None


def _names(names) -> str:
    return "[" + ", ".join(sorted(names)) + "]"


def _difference(expected: set[str], got: set[str]) -> str:
    parts = []
    if more := got - expected:
        parts.append(f"also {_names(more)}")
    if fewer := expected - got:
        parts.append(f"not {_names(fewer)}")
    return " (" + "; ".join(parts) + ")" if parts else ""


def run(directory: Path, policy_set: PolicySet) -> tuple[list[Case], list[Failure]]:
    """Load and run every case; CaseError when a file cannot be run."""
    cases = load_cases(directory, policy_set)
    return cases, [f for f in map(check, cases) if f is not None]
