"""The roles a token may carry, loaded from policies/roles.yaml and checked.

Everything the code needs to know about a role is here, derived from its tenant claim:
the relations it can hold, its audit scope, how the access log names its organisation,
whether it is a data subject, and which gateway API groups it may call. A role is held to
one column of the data-set table (its floors); the column must fit the tenant claim, so a
new role can never be held to a laxer column than its reach allows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# the columns of the Provider's data-set table: datasets.yaml's hidden_from names them
COLUMNS = ("provider_staff", "partner", "euo_admin", "user")
TENANT_CLAIMS = (None, "partner", "euo")
# the columns a role of each tenant claim may be held to
COLUMNS_OF_CLAIM = {None: ("provider_staff",), "partner": ("partner",), "euo": ("euo_admin", "user")}
# the relation a role of each tenant claim holds to a resource it reaches
REACH = {None: "any", "partner": "contracted_partner", "euo": "same_euo"}
SUBJECT_RELATIONS = frozenset({"self", "organizer", "author"})
API_GROUPS = ("audit", "requests", "audit_verify", "contracts", "retention", "assisted_export",
              "explain_any")
PROVIDER_ONLY = frozenset({"audit_verify", "contracts", "retention", "explain_any"})


class RoleError(ValueError):
    """roles.yaml is malformed or a role could break a floor (the message says which)."""


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    description: str
    tenant_claim: str | None           # None: the Provider's own
    organisation: str | None           # the access log's name for a role without a tenant
    data_subject: bool
    column: str
    gateway_api: frozenset[str]
    break_glass: bool = False          # may open break-glass grants (relation break_glass)
    peers: tuple[str, ...] = ()        # the roles of the same tenant claim, this one included
    label: str = ""                    # how people read its name (the console, the access log)

    @property
    def relations(self) -> frozenset[str]:
        """Every relation a holder of this role can ever hold."""
        reach = frozenset({REACH[self.tenant_claim]})
        if self.break_glass:
            reach |= {"break_glass"}
        return reach | SUBJECT_RELATIONS if self.data_subject else reach

    def may(self, group: str) -> bool:
        return group in self.gateway_api

    def organisation_of(self, row: Any) -> str | None:
        """The organisation an audit row's actor of this role belongs to."""
        if self.tenant_claim is None:
            return self.organisation
        return row[f"actor_{self.tenant_claim}"]

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "description": self.description,
                "organisation": self.organisation,
                "tenant_claim": self.tenant_claim, "data_subject": self.data_subject,
                "column": self.column, "relations": sorted(self.relations),
                "gateway_api": sorted(self.gateway_api), "break_glass": self.break_glass}


def load_roles(raw: Any, source: str = "roles.yaml") -> dict[str, Role]:
    """Roles from the parsed roles.yaml; RoleError naming the role and what is wrong."""
    roles_raw = raw.get("roles") if isinstance(raw, dict) else None
    if not isinstance(roles_raw, dict) or not roles_raw:
        raise RoleError(f"{source}: no `roles:` mapping")
    if odd := [name for name in roles_raw if not isinstance(name, str)]:
        # YAML reads true:, no:, null: or 1: as no text: "True" could then shadow "True"
        raise RoleError(f"{source}: role names must be text, not {odd!r} (quote them)")
    roles = {name: _role(name, spec, source) for name, spec in roles_raw.items()}
    roles = {name: replace(role, peers=tuple(sorted(
        other.name for other in roles.values() if other.tenant_claim == role.tenant_claim)))
        for name, role in roles.items()}
    if not any(r.data_subject for r in roles.values()):
        raise RoleError(f"{source}: no role is a data subject: nobody could read their own data")
    return roles


def load_break_glass(raw: Any, roles: dict[str, Role], source: str = "roles.yaml") -> int:
    """The longest grant in minutes (`break_glass: {max_minutes: N}`); required when a role
    may open grants."""
    spec = raw.get("break_glass") if isinstance(raw, dict) else None
    if spec is None:
        if any(r.break_glass for r in roles.values()):
            raise RoleError(f"{source}: a role may open break-glass grants, but "
                            "`break_glass: {max_minutes: N}` is not set")
        return 0
    most = spec.get("max_minutes") if isinstance(spec, dict) else None
    if type(most) is not int or not 1 <= most <= 7 * 24 * 60:
        raise RoleError(f"{source}: break_glass.max_minutes must be 1 to 10080 (a week)")
    return most


_KEYS = {"label", "description", "tenant_claim", "organisation", "data_subject", "column", "gateway_api",
         "break_glass"}


def _role(name: str, spec: Any, source: str) -> Role:
    where = f"{source}: role {name}"
    if not isinstance(spec, dict):
        raise RoleError(f"{where}: expected a mapping")
    if unknown := set(spec) - _KEYS:
        raise RoleError(f"{where}: unknown keys {sorted(unknown)}")
    if not name.isidentifier() or len(name) > 64:
        raise RoleError(f"{where}: a role name is a word of letters, digits and _")
    if "tenant_claim" not in spec:
        raise RoleError(f"{where}: tenant_claim is required (null, partner or euo)")
    claim = spec["tenant_claim"]
    if claim not in TENANT_CLAIMS:
        raise RoleError(f"{where}: tenant_claim must be null, partner or euo")
    organisation = spec.get("organisation")
    if claim is None and not (isinstance(organisation, str) and organisation):
        raise RoleError(f"{where}: a role without a tenant claim needs `organisation`")
    if claim is not None and organisation is not None:
        raise RoleError(f"{where}: `organisation` is the {claim} claim's value; do not set it")
    data_subject = spec.get("data_subject", False)
    if not isinstance(data_subject, bool):
        raise RoleError(f"{where}: data_subject must be true or false")
    if data_subject and claim != "euo":
        raise RoleError(f"{where}: a data subject is a user of an EUO (tenant_claim euo)")
    column = spec.get("column", name if name in COLUMNS else None)
    if column is None:
        raise RoleError(f"{where}: name the data-set table column whose floors hold it "
                        f"(`column`: one of {', '.join(COLUMNS_OF_CLAIM[claim])})")
    if column not in COLUMNS_OF_CLAIM[claim]:
        raise RoleError(f"{where}: a role with tenant_claim {claim or 'null'} is held to "
                        f"column {' or '.join(COLUMNS_OF_CLAIM[claim])}, not {column!r}")
    groups = spec.get("gateway_api") or []
    if not isinstance(groups, list) or not set(groups) <= set(API_GROUPS):
        raise RoleError(f"{where}: gateway_api lists groups of {', '.join(API_GROUPS)}")
    if claim is not None and (provider := PROVIDER_ONLY & set(groups)):
        raise RoleError(f"{where}: {', '.join(sorted(provider))} reach every organisation's "
                        "data: only a role without a tenant claim may call them")
    if "assisted_export" in groups and (claim != "euo" or data_subject):
        raise RoleError(f"{where}: assisted_export is an EUO administrator's: only a role of "
                        "tenant_claim euo that is not a data subject may list it")
    break_glass = spec.get("break_glass", False)
    if not isinstance(break_glass, bool):
        raise RoleError(f"{where}: break_glass must be true or false")
    if break_glass and claim == "euo":
        raise RoleError(f"{where}: break-glass is for the Provider's and Partners' roles, "
                        "not an EUO's own people")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise RoleError(f"{where}: description must be text")
    label = spec.get("label", name.replace("_", " "))
    if not isinstance(label, str) or not label or len(label) > 64:
        raise RoleError(f"{where}: label must be text of 1 to 64 characters")
    return Role(name, description, claim, organisation, data_subject, column, frozenset(groups),
                break_glass, label=label)
