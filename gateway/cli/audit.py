"""`gateway audit verify | verify-slice | verify-consistency | maintain | prune | query`
(the database's side in gateway/audit/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from ..database import with_database
from ..settings import ConfigError

COMMANDS = ("audit",)


def register(sub) -> None:
    audit = sub.add_parser("audit", help="verify, prune or query the access audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify_cmd = audit_sub.add_parser("verify", help="check every hash chain (and, with "
                                      "--public-key, the signed checkpoints); exit 1 on a break")
    keys_help = ("the Ed25519 public keys: a file or http(s) URL holding PEM keys or the "
                 "answer of GET /v1/audit/keys (every key ever used, rotated ones included); "
                 "repeatable")
    verify_cmd.add_argument("--incremental", action="store_true",
                            help="walk each chain only from where verify last found it whole "
                            "(a full run, the default, reads every row and finds a change to "
                            "what was verified before)")
    verify_cmd.add_argument("--public-key", action="append", default=[], metavar="KEYS",
                            help=keys_help + ". Rows after a chain's last checkpoint are "
                            "reported as not yet sealed")
    for name, what in (("verify-slice", "check a slice of GET /v1/audit/slice with no "
                         "database: signatures, every row against its signed root"),
                       ("verify-consistency", "check a consistency proof of GET "
                        "/v1/audit/consistency with no database: the later signed tree "
                        "extends the earlier")):
        offline = audit_sub.add_parser(name, help=what + "; exit 1 if anything fails")
        offline.add_argument("file", metavar="FILE_OR_URL", help="the saved JSON answer, or "
                             "the endpoint's http(s) URL (query included) to download it from "
                             "with --token (a slice must then be of the window its URL asks)")
        offline.add_argument("--public-key", action="append", required=True, metavar="KEYS",
                             help=keys_help)
        offline.add_argument("--token", help="the bearer token to download FILE_OR_URL with")
        offline.add_argument("--save", type=Path, metavar="FILE", help="keep what was "
                             "downloaded here (e.g. for a later --previous)")
        offline.set_defaults(run=lambda settings, args: _verify_offline(args),
                             needs_settings=False)
        if name == "verify-slice":
            offline.add_argument("--previous", metavar="FILE_OR_URL", help="an earlier "
                                 "slice of the same caller and window: each of its proved rows "
                                 "must still be there, unchanged")
    audit_sub.add_parser("maintain", help="create the audit partitions ahead and drop those "
                         "past GATEWAY_AUDIT_RETENTION_DAYS (a periodic job, as the owner)")
    prune = audit_sub.add_parser("prune", help="drop whole month partitions past retention")
    prune.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                       help="e.g. 400d (default: GATEWAY_AUDIT_RETENTION_DAYS)")
    prune.add_argument("--dry-run", action="store_true", help="only list what would go")
    q = audit_sub.add_parser("query", help="print matching rows (all scopes) as NDJSON or CSV")
    for name, what in (("actor", "the acting token's sub"),
                       ("subject-user", "a data subject (user id)"),
                       ("euo", "the data subject's EUO"), ("dataset", "a data set name"),
                       ("decision", "allow, deny or error"),
                       ("from", "ISO 8601 time with zone, e.g. 2026-11-01T00:00:00Z (inclusive)"),
                       ("to", "ISO 8601 time with zone (exclusive)"),
                       ("limit", "at most this many rows (default: all)")):
        q.add_argument(f"--{name}", help=what)
    q.add_argument("--format", choices=("ndjson", "csv"), default="ndjson",
                   help="NDJSON (default) or CSV (formula cells neutralised)")
    audit_sub.add_parser("public-key", help="print the deployment's audit public key (PEM), "
                         "from its signing key file, never from the database: the key to "
                         "publish for auditors to pin (--public-key FILE)"
                         ).set_defaults(run=_public_key)
    audit.set_defaults(run=_run)


def _public_key(settings, args) -> int:
    """The public half of GATEWAY_AUDIT_SIGNING_KEY_FILE (or of the key generated under
    GATEWAY_DATA_DIR); 2 when there is none (a key is never made here)."""
    from ..audit.checkpoints import load_signing_key, public_pem, signing_key_path
    path = signing_key_path(settings.audit_signing_key_file, settings.data_dir)
    if not path.exists():
        raise ConfigError(f"no audit signing key at {path}: set GATEWAY_AUDIT_SIGNING_KEY_FILE")
    sys.stdout.write(public_pem(load_signing_key(path).public_key()))
    return 0


def _run(settings, args) -> int:
    from ..audit import cli
    return with_database(settings, lambda dsn: cli.run(dsn, settings, args))


def _verify_offline(args) -> int:
    """verify-slice / verify-consistency: files, URLs and keys only, no settings, no
    database; a document given by URL is downloaded (with --token) and checked at once."""
    from ..audit import checkpoints, remote, slice_check
    try:
        if args.save and not remote.is_url(args.file):
            raise ConfigError("--save keeps a download: give FILE_OR_URL as an http(s) URL")
        keys = checkpoints.load_public_keys(args.public_key)
        data = remote.read(args.file, args.token)
        if args.save:
            args.save.write_bytes(data)
        doc = _json(data, args.file)
        if args.audit_command == "verify-consistency":
            report = slice_check.verify_consistency_doc(doc, keys)
        else:
            previous = (_json(remote.read(args.previous, args.token), args.previous)
                        if args.previous else None)
            # downloaded, the slice must be of the window its URL asked for
            report = slice_check.verify_slice(doc, keys, previous, remote.asked(args.file),
                                         remote.asked(args.previous) if args.previous else None)
            if isinstance(doc, dict) and doc.get("next_cursor"):
                report["next_cursor"] = doc["next_cursor"]     # more rows: ask with cursor=
    except ConfigError as e:
        print(f"gateway audit {args.audit_command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:                   # --save unwritable
        print(f"gateway audit {args.audit_command}: {e}", file=sys.stderr)
        return 2
    except (TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # a value of the wrong type where the format has another: never verified, and a
        # message rather than a traceback
        print(f"gateway audit {args.audit_command}: the file is not in the format the "
              f"gateway writes ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0 if report["ok"] else 1


def _json(data: bytes, source) -> object:
    try:
        return orjson.loads(data)
    except ValueError as e:
        raise ConfigError(f"{source}: not a JSON document ({e})") from None


def _days(value: str) -> int:
    digits = value[:-1] if value.endswith("d") else value
    if not digits.isdigit():
        raise argparse.ArgumentTypeError("give a number of days, e.g. 400d")
    return int(digits)
