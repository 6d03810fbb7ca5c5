"""Who is calling: the verified claims of a token."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    role: str
    partner: str | None = None
    euo: str | None = None
    exp: float = 0.0

    def audit_fields(self) -> tuple[str, str, str | None, str | None]:
        return self.sub, self.role, self.partner, self.euo
