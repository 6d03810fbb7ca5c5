"""routes.yaml's `erasure:` entries: how a data subject's erasure is carried out through the
backends (list, then DELETE per item), each checked against the route table and the
data-set table at load. erasure.py carries them out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .catalog import Catalog, PolicyError, Route

# the retention anchor by which the data-set table makes other people's data the subject's
# to delete (it lasts "until the organizer deletes the meeting")
DELETED_WITH_THE_ITEM = "organizer_deletes"


@dataclass(frozen=True)
class Eraser:
    data_sets: tuple[str, ...]   # what this entry erases for the subject (and counts after)
    list: str                    # GET, {euo} and {user} filled in
    items: str                   # the list field of its answer
    delete: str                  # DELETE, {euo}, {user} and {id}
    deletes: frozenset[str]      # what one DELETE removes of the subject's
    others: frozenset[str]       # … and of the other people in the item
    read: str | None = None      # GET per item ({id}): what the subject holds in it, who else

    @property
    def removes(self) -> frozenset[str]:
        """Every data set one DELETE removes, whoever's."""
        return self.deletes | self.others


def load_erasers(policy_dir: Path, catalog: Catalog) -> list[Eraser]:
    """routes.yaml's `erasure:` entries, each path checked against the route table and what
    each DELETE removes against the route and the data-set table."""
    try:
        doc = yaml.safe_load((Path(policy_dir) / "routes.yaml").read_text(encoding="utf-8"))
        erasers = [_eraser(e) for e in doc.get("erasure") or ()]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise PolicyError(f"routes.yaml: erasure: {e}") from None
    fill = {"euo": "e", "user": "u", "id": "i"}
    for e in erasers:
        where = f"routes.yaml: erasure: {e.delete}"
        for ds in e.removes | set(e.data_sets):
            if ds not in catalog.data_sets:
                raise PolicyError(f"{where}: unknown data set {ds!r}")
        if not set(e.data_sets) <= e.deletes:
            raise PolicyError(f"{where}: data_sets must be among what deletes: subject lists")
        for ds in sorted(e.others):
            rule = catalog.data_sets[ds].rule
            if rule is None or rule.anchor != DELETED_WITH_THE_ITEM:
                raise PolicyError(f"{where}: deletes other people's {ds}, which the data-set "
                                  f"table does not make theirs to delete ({DELETED_WITH_THE_ITEM})")
        paths = (("GET", e.list), ("DELETE", e.delete)) + ((("GET", e.read),) if e.read else ())
        for method, path in paths:
            route = route_for(catalog, path.format(**fill), method)
            if route is None:
                raise PolicyError(f"{where}: {method} {path} is not in the route table")
            if method == "DELETE" and not route.data_sets <= e.removes:
                raise PolicyError(f"{where}: the route deletes {sorted(route.data_sets)}; "
                                  f"deletes: must name them all")
    return erasers


def _eraser(e: dict) -> Eraser:
    deletes = e["deletes"]
    return Eraser(tuple(e["data_sets"]), e["list"], e["items"], e["delete"],
                  frozenset(deletes["subject"]), frozenset(deletes.get("others") or ()),
                  e.get("read"))


def route_for(catalog: Catalog, path: str, method: str) -> Route | None:
    """The route serving `method path` (a path with its parameters filled in), if any."""
    service, *segments = path.strip("/").split("/")
    found = catalog.match(service, segments)
    return found[0] if found is not None and method in found[0].methods else None
