"""Write floors_routes.py from a policy directory's route table (the shipped one by
default): `python -m gateway.policy.pin_routes > gateway/policy/floors_routes.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import floors_routes
from .catalog import route_fields, route_key
from .catalog_files import load_catalog


def render(policy_dir) -> str:
    """floors_routes.py's text for the route table of `policy_dir`."""
    catalog = load_catalog(Path(policy_dir), pinned=False)
    routes = {route_key(r): dict(sorted(route_fields(r).items())) for r in catalog.routes}
    text = Path(floors_routes.__file__).read_text()
    head = text[:text.index("# fmt: off\n") + len("# fmt: off\n")]
    relations = ", ".join(map(json.dumps, sorted(catalog.data_subject_relations)))
    lines = [f"RELATIONS = frozenset({{{relations}}})", "",
             "ROUTES: dict[str, dict[str, str]] = {"]
    for key, fields in sorted(routes.items()):
        lines.append(f"    {json.dumps(key)}: {{")
        lines += [f"        {json.dumps(at)}: {json.dumps(what)}," for at, what in fields.items()]
        lines.append("    },")
    return head + "\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1
                            else Path(__file__).parent.parent / "_data" / "policies"))
