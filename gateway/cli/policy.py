"""`gateway policy explain | test`: the policy directory asked offline."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from ..settings import Settings

COMMANDS = ("policy",)


def register(sub) -> None:
    pol = sub.add_parser("policy", help="ask the policy directory (GATEWAY_POLICY_DIR) offline")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    exp = pol_sub.add_parser("explain", help="what the gateway would decide for a request and "
                             "why (route, relations, data sets served and removed, the policy "
                             "lines), as GET /v1/explain answers, without database or backend")
    exp.add_argument("path", help="the backend path, e.g. /telephony/euos/euo-acme/users/u-alice")
    exp.add_argument("--method", default="GET", help="GET (default), POST, PUT, PATCH or DELETE")
    exp.add_argument("--role", required=True, help="the caller's role (roles.yaml)")
    exp.add_argument("--sub", required=True, help="the caller's token subject")
    exp.add_argument("--partner", help="the partner claim")
    exp.add_argument("--euo", help="the EUO claim")
    exp.add_argument("--contract", action="append", default=[], metavar="EUO=PARTNER",
                     help="an active contract to assume (repeat); none by default")
    exp.add_argument("--restricted", action="append", default=[], metavar="EUO/USER",
                     help="a user who restricted processing (repeat); none by default")
    pt = pol_sub.add_parser("test", help="run the YAML cases of DIR (default: the policy "
                            "directory's tests/) against the policy, as explain decides them; "
                            "exit 1 when one fails, 2 when a case file is malformed")
    pt.add_argument("dir", nargs="?", help="a directory of *.yaml case files")
    exp.set_defaults(run=_explain_offline)
    pt.set_defaults(run=_policy_test)


def _explain_offline(settings: Settings, args) -> int:
    """gateway policy explain: the policy files alone (contracts and restrictions as given)."""
    from ..explain import Offline, explain
    from ..policy.policyset import load_policy_set
    from ..principal import Principal
    policy_set = load_policy_set(settings.policy_dir)
    kind = policy_set.catalog.roles.get(args.role)
    if kind is None:
        print(f"gateway policy explain: no role {args.role!r} in roles.yaml", file=sys.stderr)
        return 2
    try:
        contracts = dict(c.split("=", 1) for c in args.contract)
        restricted = {tuple(r.split("/", 1)) for r in args.restricted}
    except ValueError:
        print("gateway policy explain: --contract EUO=PARTNER, --restricted EUO/USER",
              file=sys.stderr)
        return 2
    if args.method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        print("gateway policy explain: --method is one of GET POST PUT PATCH DELETE",
              file=sys.stderr)
        return 2
    # the caller a token with these claims would be, or none (as the proxy would refuse it)
    from ..authn import _principal
    from ..errors import Denied
    if kind.tenant_claim is not None and getattr(args, kind.tenant_claim) is None:
        print(f"gateway policy explain: role {kind.name} needs the {kind.tenant_claim} claim "
              f"(--{kind.tenant_claim})", file=sys.stderr)
        return 2
    try:
        claims = {"role": args.role, "sub": args.sub, "exp": 0,
                  "partner": args.partner, "euo": args.euo}
        token_caller = _principal(claims, policy_set.catalog.roles)
    except Denied as e:
        print(f"gateway policy explain: a token with these claims is refused ({e.code}: "
              f"{e.message})", file=sys.stderr)
        return 2
    principal = Principal(sub=token_caller.sub, role=token_caller.role,
                          partner=token_caller.partner, euo=token_caller.euo, kind=kind)
    gw = Offline(policy_set.catalog, policy_set.policy, policy_set.version, contracts, restricted)
    print(orjson.dumps(explain(gw, principal, args.method, args.path),
                       option=orjson.OPT_INDENT_2).decode())
    return 0


def _policy_test(settings: Settings, args) -> int:
    """gateway policy test: every case of DIR against the policy directory."""
    from ..policy.policyset import load_policy_set
    from ..policytest import CaseError, run
    policy_set = load_policy_set(settings.policy_dir)
    directory = Path(args.dir) if args.dir else settings.policy_dir / "tests"
    try:
        cases, failures = run(directory, policy_set)
    except CaseError as e:
        print(f"gateway policy test: {e}", file=sys.stderr)
        return 2
    for failure in failures:
        print(failure)
    files = len({c.file for c in cases})
    print(f"policy test: {len(cases)} cases in {files} file{'s' if files != 1 else ''}, "
          f"{len(failures)} failed (policy {policy_set.version}, {settings.policy_dir})")
    return 1 if failures else 0
