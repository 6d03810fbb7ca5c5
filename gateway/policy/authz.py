"""Casbin decisions over (role, relation, data set, action), and the floors check.

The model (model.conf) must be Casbin's four-field equality match with allow-only effect
(MODEL below), and for that model the allow-lines *are* the decision table: a question is
granted exactly when a line equals it. So the table is built from the lines Casbin parsed
(a set per role, relation and action: a request costs a few dictionary look-ups however
long the policy is), and any other model.conf is refused at load, so the table can never
drift from what Casbin would answer (tests/test_policy_table.py compares the two). Relations
come from the principal's claims, the path and the contracts cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import casbin

from ..errors import Denied
from ..principal import Principal
from .catalog import ACTIONS, RELATIONS, Catalog, PolicyError
from .roles import SUBJECT_RELATIONS

FIELDS = ("role", "rel", "ds", "act")
MODEL = """[request_definition]
r = role, rel, ds, act

[policy_definition]
p = role, rel, ds, act

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = r.role == p.role && r.rel == p.rel && r.ds == p.ds && r.act == p.act
"""


class Policy:
    """The allow-lines of policy.csv as look-up tables, checked against the floors."""

    def __init__(self, catalog: Catalog, lines: Sequence[Sequence[str]]):
        """`lines`: policy.csv's p-lines as Casbin parsed them, under the model MODEL."""
        self.catalog = catalog
        table: dict[tuple[str, str, str], set[str]] = {
            (role, rel, act): set() for role in catalog.roles for rel in RELATIONS for act in ACTIONS}
        for line in lines:
            if len(line) == 4 and line[2] in catalog.data_sets:
                role, rel, ds, act = line
                if (role, rel, act) in table:
                    table[role, rel, act].add(ds)
        self._lines = {key: frozenset(granted) for key, granted in table.items()}
        self._unknown = list(_unknown_terms(lines, catalog))
        self.granted = lru_cache(maxsize=4096)(self._granted)
        self.line_numbers: dict[tuple[str, str, str, str], int] = {}   # policy.csv, by line

    def deciding_lines(self, role: str, relations: frozenset[str], action: str,
                       data_sets: set[str]) -> list[dict[str, object]]:
        """The allow-lines that grant these data sets to this role and relations (explain)."""
        return [{"line": self.line_numbers.get((role, rel, ds, action)),
                 "rule": f"p, {role}, {rel}, {ds}, {action}"}
                for rel in sorted(relations) for ds in sorted(data_sets)
                if ds in self._lines.get((role, rel, action), ())]

    def _granted(self, role: str, relations: frozenset[str], action: str) -> frozenset[str]:
        """The data sets a caller of this role holding these relations may act on."""
        out: frozenset[str] = frozenset()
        for rel in relations:
            out |= self._lines.get((role, rel, action), frozenset())
        return out

    def who_may(self, data_set: str) -> list[dict[str, object]]:
        """Who may do what with a data set: [{role, relation, actions}]."""
        out = []
        for role in self.catalog.roles:
            for rel in RELATIONS:
                acts = [a for a in ACTIONS if data_set in self._lines[role, rel, a]]
                if acts:
                    out.append({"role": role, "relation": rel, "actions": acts})
        return out

    def check_floors(self, policy_file: Path | str = "policy.csv") -> None:
        """Raise PolicyError listing every floor (docs/contract.md, Floors) this policy breaks."""
        problems = list(self._unknown)
        data_sets, roles = self.catalog.data_sets, self.catalog.roles
        for (name, rel, act), granted in self._lines.items():
            if not granted:
                continue
            role = roles[name]
            if rel not in role.relations:
                problems.append(f"{name} can never hold relation {rel!r} "
                                f"(a {name} holds only {sorted(role.relations)})")
            for ds_name in sorted(granted):
                ds = data_sets[ds_name]
                if role.column in ds.hidden_from:
                    problems.append(f"{name} may {act} {ds_name}, which datasets.yaml marks (**) "
                                    f"as hidden from {role.column}")
                # an author deleting their own note names themself in the path (self)
                if ds.subject == "author" and rel != "author" and not (
                        role.data_subject and rel == "self" and act == "delete"):
                    problems.append(f"{name} may {act} {ds_name} as {rel}: only its author may")
                # a data subject, or any role held to the user's column: someone else's
                # personal data only as its subject (self, organizer), never by reach
                if (role.data_subject or role.column == "user") and \
                        rel not in SUBJECT_RELATIONS and ds.subject in ("user", "meeting"):
                    problems.append(f"a {name} may {act} another user's {ds_name}")
                if rel == "organizer" and ds.subject != "meeting":
                    problems.append(f"a meeting organizer may {act} {ds_name}, not meeting data")
        for name in (name for name, role in roles.items() if role.data_subject):
            for ds_name, ds in data_sets.items():
                if ds.subject == "user" and ds_name not in self._lines[name, "self", "read"]:
                    problems.append(f"a {name} may not read their own {ds_name} (right of access)")
                if ds.subject == "meeting" and ds_name not in self._lines[name, "organizer", "read"]:
                    problems.append(f"a meeting organizer ({name}) may not read {ds_name} of "
                                    "their meeting")
                if ds.subject == "author" and ds_name not in self._lines[name, "author", "read"]:
                    problems.append(f"the author ({name}) of {ds_name} may not read them")
        if problems:
            raise PolicyError(f"{policy_file} breaks floors that no policy may lower "
                              "(docs/contract.md, Floors):\n  - " + "\n  - ".join(problems))


def load_policy(policy_dir: Path, catalog: Catalog) -> Policy:
    """Load model.conf and policy.csv and refuse a policy that breaks a floor."""
    policy = read_policy(policy_dir, catalog)
    lines = policy_dir / "policy.csv"
    policy.check_floors(lines)
    for number, text in enumerate(lines.read_text(encoding="utf-8").splitlines(), 1):
        fields = [f.strip() for f in text.split(",")]
        if len(fields) == 5 and fields[0] == "p":
            policy.line_numbers.setdefault(tuple(fields[1:]), number)
    return policy


def read_policy(policy_dir: Path, catalog: Catalog) -> Policy:
    """policy.csv's lines as parsed by Casbin, as a table (floors not checked); a
    PolicyError for an unreadable file or a model.conf that is not MODEL."""
    model, lines = policy_dir / "model.conf", policy_dir / "policy.csv"
    for path in (model, lines):
        if not path.is_file():
            raise PolicyError(f"cannot read {path}")
    try:
        enforcer = casbin.Enforcer(str(model), str(lines))
    except Exception as e:  # casbin raises bare exceptions of many kinds on bad files
        raise PolicyError(f"Casbin could not load {model} / {lines}: {e}") from None
    _check_model(enforcer, model)
    return Policy(catalog, enforcer.get_policy())


def _check_model(enforcer: casbin.Enforcer, path: Path) -> None:
    """Raise PolicyError unless the model is MODEL: the one whose decisions are its lines."""
    sections = enforcer.get_model().model
    want = {"r": [f"r_{f}" for f in FIELDS], "p": [f"p_{f}" for f in FIELDS]}
    shape = {sec: sorted(keys) for sec, keys in sections.items()}
    matcher = sections.get("m", {}).get("m")
    terms = sorted(t.replace(" ", "") for t in matcher.value.split("&&")) if matcher else []
    effect = sections.get("e", {}).get("e")
    if (shape != {"r": ["r"], "p": ["p"], "e": ["e"], "m": ["m"]}
            or any(sections[sec][sec].tokens != tokens for sec, tokens in want.items())
            or effect.value.replace(" ", "") != "some(where(p_eft==allow))"
            or terms != sorted(f"r_{f}==p_{f}" for f in FIELDS)):
        raise PolicyError(
            f"{path} is not the model the gateway decides with. It takes policy.csv's lines as "
            "its decision table, which is what Casbin answers only for the four-field equality "
            "match with allow-only effect (no roles, no patterns, no deny); model.conf must "
            f"say exactly this (comments aside):\n{MODEL}")


def _unknown_terms(lines: Sequence[Sequence[str]], catalog: Catalog) -> Iterable[str]:
    """Policy lines naming a role, relation, data set or action nobody knows: typos."""
    for line in lines:
        if len(line) != 4:
            yield f"policy line {line} does not have 4 fields"
            continue
        role, rel, ds, act = line
        if role not in catalog.roles:
            yield f"policy line {line}: unknown role {role!r} (roles.yaml)"
        if rel not in RELATIONS:
            yield f"policy line {line}: unknown relation {rel!r}"
        if ds not in catalog.data_sets:
            yield f"policy line {line}: unknown data set {ds!r}"
        if act not in ACTIONS:
            yield f"policy line {line}: unknown action {act!r}"


def path_relations(principal: Principal, euo: str, user: str | None,
                   active_partner: Callable[[str], str | None]) -> frozenset[str]:
    """The relations the caller holds to a resource of this EUO (and user), or Denied.

    `active_partner(euo)` names the partner holding an active contract with the EUO.
    """
    role = principal.kind
    if role.tenant_claim is None:
        return ANY
    if role.tenant_claim == "partner":
        # no partner claim is no contract (never "equal" to an EUO without one)
        if principal.partner is None or active_partner(euo) != principal.partner:
            raise Denied(403, "no_active_contract",
                         "your partner holds no active contract with this EUO")
        return CONTRACTED
    if principal.euo is None or principal.euo != euo:
        raise Denied(403, "other_euo", "this resource belongs to another EUO")
    if role.data_subject and user is not None and user == principal.sub:
        return SAME_EUO_SELF
    return SAME_EUO


ANY, CONTRACTED = frozenset({"any"}), frozenset({"contracted_partner"})
SAME_EUO, SAME_EUO_SELF = frozenset({"same_euo"}), frozenset({"same_euo", "self"})
BREAK_GLASS = frozenset({"break_glass"})      # held under a grant in force (break_glass.py)
