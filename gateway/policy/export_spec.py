"""export.yaml: the sources of a self-service export (each a route of the route table,
with its attachments and followed items), and the purposes an admin-assisted export may
give. The export must hold every data set a data subject may read (policyset.py checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..grammar import IDENTIFIER
from .catalog import Catalog, PolicyError


@dataclass(frozen=True)
class Attachments:
    list_field: str
    get: str
    name: tuple[str, ...]
    ext: str | None


@dataclass(frozen=True)
class Source:
    get: str
    optional: bool = False
    attachments: Attachments | None = None
    follow: tuple[str, str] | None = None      # (list field, path with {id})


@dataclass(frozen=True)
class ExportSpec:
    """export.yaml: the sources, and the purposes an admin-assisted export may give."""
    sources: list[Source]
    purposes: dict[str, str]


def load_sources(policy_dir: Path, catalog: Catalog,
                 readable: frozenset[str] | None = None) -> ExportSpec:
    """export.yaml, each path checked against the route table; with `readable` (the data
    sets a user may read under the policy), a list that leaves one out is refused."""
    try:
        doc = yaml.safe_load((policy_dir / "export.yaml").read_text(encoding="utf-8"))
        purposes = {str(k): str(v) for k, v in
                    ((doc.get("assisted") or {}).get("purposes") or {}).items()}
        sources = []
        for spec in doc["sources"]:
            att = spec.get("attachments")
            follow = spec.get("follow")
            sources.append(Source(
                get=spec["get"], optional=bool(spec.get("optional")),
                attachments=Attachments(att["list"], att["get"], tuple(att["name"]), att.get("ext"))
                if att else None,
                follow=(follow["list"], follow["get"]) if follow else None))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise PolicyError(f"export.yaml: {e}") from None
    covered: set[str] = set()
    for s in sources:
        for path in (s.get, s.attachments and s.attachments.get, s.follow and s.follow[1]):
            if not path:
                continue
            found = route_of(catalog, path.format(euo="e", user="u", id="i"))
            if found is None:
                raise PolicyError(f"export.yaml: {path} is not in the route table")
            covered |= found[0].data_sets
    for purpose in purposes:
        if not IDENTIFIER.fullmatch(purpose):
            raise PolicyError(f"export.yaml: assisted purpose {purpose!r} is not an identifier")
    if readable is not None and (missing := readable - covered):
        raise PolicyError("export.yaml leaves out data sets a user may read (the export must "
                          f"hold every one): {', '.join(sorted(missing))}")
    return ExportSpec(sources, purposes)


def route_of(catalog: Catalog, path: str):
    """The route (and its parameters) a source's path names, if any."""
    service, *segments = path.split("?")[0].strip("/").split("/")
    return catalog.match(service, segments)
