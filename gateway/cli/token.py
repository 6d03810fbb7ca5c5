"""`gateway token`: a development token (gateway/tokens.py)."""

from __future__ import annotations

from ..tokens import mint_token

COMMANDS = ("token",)


def register(sub) -> None:
    tok = sub.add_parser("token", help="mint a development token (HS256), signed with "
                         "GATEWAY_JWT_SECRET or the demo's secret under GATEWAY_DATA_DIR")
    tok.add_argument("--role", required=True,
                     help="the token's role claim: a role of the policy's roles.yaml "
                     "(default policy: provider_staff, partner, euo_admin, user)")
    tok.add_argument("--sub", required=True, help="the token's subject (who calls)")
    tok.add_argument("--partner", help="the partner claim (roles whose tenant_claim is partner)")
    tok.add_argument("--euo", help="the EUO claim (roles whose tenant_claim is euo)")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    tok.set_defaults(run=_token)


def _token(settings, args) -> int:
    print(mint_token(settings, args.role, args.sub, args.partner, args.euo, args.ttl))
    return 0
