"""The policy directory as one versioned unit: loaded, checked against the floors, and
swapped whole (at start, and on SIGHUP without a restart).

The version is a hash of the policy files' bytes, so an auditor can tell which policy
decided a request and two processes can tell whether they agree. A policy that lowers floors
of the data-set table (lowered_floors.yaml, floors.py) has `+floors-lowered-N` appended, so
every audit row it decides says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..settings import POLICY_FILES
from .alert_rules import AlertRule, load_alert_rules
from .authz import Policy, load_policy
from .catalog import Catalog, PolicyError
from .catalog_files import load_catalog
from .erasers import Eraser, load_erasers
from .export_spec import ExportSpec, load_sources
from .floors import LOWERED_FILE


@dataclass(frozen=True)
class PolicySet:
    catalog: Catalog
    policy: Policy
    export_sources: ExportSpec       # export.yaml: its sources and assisted purposes
    version: str
    erasers: tuple[Eraser, ...] = ()     # routes.yaml's erasure: entries
    alert_rules: tuple[AlertRule, ...] = ()   # alerts.yaml's rules (alerts.py)


def policy_version(policy_dir: Path) -> str:
    """sha256 over the policy files (name and bytes, in a fixed order; lowered_floors.yaml
    when there is one), first 16 hex digits."""
    digest = hashlib.sha256()
    path = Path(policy_dir)
    try:      # a file or directory this process may not read is a PolicyError, not a traceback
        names = POLICY_FILES + ((LOWERED_FILE,) if (path / LOWERED_FILE).exists() else ())
        for name in names:
            path = Path(policy_dir) / name
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes() if path.is_file() else b"")
            digest.update(b"\0")
    except OSError as e:
        raise PolicyError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()[:16]


def load_policy_set(policy_dir: Path) -> PolicySet:
    """Load and check every policy file; raise PolicyError naming what is wrong."""
    version = policy_version(policy_dir)
    catalog = _loading("roles.yaml, datasets.yaml or routes.yaml", load_catalog, policy_dir)
    policy = _loading("model.conf or policy.csv", load_policy, policy_dir, catalog)
    # the export must hold every data set a data subject may read under this policy
    readable = frozenset().union(*(
        policy.granted(name, role.relations, "read")
        for name, role in catalog.roles.items() if role.data_subject))
    sources = _loading("export.yaml", load_sources, policy_dir, catalog, readable)
    erasers = tuple(_loading("routes.yaml (erasure:)", load_erasers, policy_dir, catalog))
    alert_rules = _loading("alerts.yaml", load_alert_rules, policy_dir, catalog)
    if policy_version(policy_dir) != version:
        # a file changed while being read: refuse rather than record a version that lies
        raise PolicyError(f"{policy_dir} changed while it was being loaded; try again")
    if catalog.lowered_floors:
        version += f"+floors-lowered-{len(catalog.lowered_floors)}"
    return PolicySet(catalog, policy, sources, version, erasers, alert_rules)


def _loading(files: str, load, *args):
    """A loader's result; a file of the wrong shape somewhere the loader did not check (a
    list where a mapping is due) is a PolicyError naming the files, never another
    exception: a reload keeps the policy in force, `check` and `serve` name the problem."""
    try:
        return load(*args)
    except PolicyError:
        raise
    except (TypeError, AttributeError, ValueError, KeyError, IndexError, RecursionError) as e:
        raise PolicyError(f"{files} in {args[0]}: a value of the wrong shape "
                          f"({type(e).__name__}: {e})") from None
