"""Who is calling: the verified claims of a token, and the role (roles.yaml) they name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policy.roles import Role


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    role: str
    partner: str | None = None
    euo: str | None = None
    exp: float = 0.0
    kind: Role | None = None           # the role's definition in the policy in force

    def audit_fields(self) -> tuple[str, str, str | None, str | None]:
        return self.sub, self.role, self.partner, self.euo


def scope(principal: Principal) -> tuple[str | None, str | None]:
    """(EUO, partner) the caller's audit rows and requests are narrowed to, by its role's
    tenant claim; (None, None): everything (the Provider's own roles)."""
    claim = principal.kind.tenant_claim
    if claim is None:
        return None, None
    if claim == "partner":
        return None, principal.partner
    return principal.euo, None
