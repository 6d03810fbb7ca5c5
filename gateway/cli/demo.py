"""`gateway demo`: the embedded database, the demo backends, the gateway and tokens."""

from __future__ import annotations

from ..settings import ConfigError

COMMANDS = ("demo",)


def register(sub) -> None:
    demo = sub.add_parser("demo", help="embedded database, demo backends, gateway and tokens")
    demo.add_argument("--port", type=int, default=None, help="gateway port (default from "
                      "GATEWAY_LISTEN, 8080)")
    demo.add_argument("--reset", action="store_true", help="start from a clean state: delete "
                      "the embedded database under GATEWAY_DATA_DIR first")
    demo.add_argument("--backends-only", action="store_true", help="only the demo telephony "
                      "and meeting backends (--port: telephony's, meeting on the next; default "
                      "8081; 0: any free ports), and the lines that run `gateway serve` "
                      "against them")
    demo.set_defaults(run=_demo)


def _demo(settings, args) -> int:
    from ..demo.run import run_backends, run_demo
    if args.backends_only:
        if args.reset:
            raise ConfigError("--backends-only starts no database: --reset does not apply")
        return run_backends(settings, args.port)
    return run_demo(settings, args.port, reset=args.reset)
