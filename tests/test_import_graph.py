"""The house has floors: gateway/'s modules import one another without a circle, and the
policy (gateway/policy/) and the context every feature works with (gateway/context.py) lie
below the request path, the wiring and the features: nothing they import, however
indirectly, reaches up to them.

The graph is read from the source (ast), not from what happens to be imported at run time,
so an import inside a function or under TYPE_CHECKING counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

# the request path and the wiring
ABOVE = ("gateway.pipeline", "gateway.proxy", "gateway.app", "gateway.endpoints",
         "gateway.__main__", "gateway.cli")
# the features: the gateway's own API, background jobs, the command line's helpers
FEATURES = ("gateway.export", "gateway.erasure", "gateway.break_glass", "gateway.subject_requests",
            "gateway.webhooks", "gateway.alerts", "gateway.alerts_api", "gateway.explain",
            "gateway.retention_report", "gateway.check", "gateway.policytest", "gateway.console",
            "gateway.demo", "gateway.audit.api", "gateway.audit.slices", "gateway.audit.per_day",
            "gateway.audit.cli", "gateway.metrics", "gateway.access_log", "gateway.connections")
BELOW = ("gateway.policy", "gateway.context")

KNOWN_CIRCLES: list[set[str]] = []     # none: add one only with the reason it must stay


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of gateway/ by dotted name: (file, whether it is a package's __init__)."""
    out = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
        if "_data" in parts:
            continue
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the gateway modules it imports, anywhere in its file."""
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, package) in mods.items():
        here = name if package else name.rpartition(".")[0]
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found.update(known(a.name) for a in node.names if a.name.split(".")[0] == "gateway")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "gateway":
                    base = node.module
                else:
                    continue
                for alias in node.names:     # `from . import pipeline` imports a module
                    full = f"{base}.{alias.name}"
                    found.add(full if full in mods else known(base))
        graph[name] = {m for m in found if m is not None and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reached(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module importing `start` runs, with a chain of imports that gets there (a
    submodule's import runs its packages' __init__ files first)."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop()
        nexts = set(graph[v])
        for w in graph[v]:
            nexts.update(".".join(w.split(".")[:i]) for i in range(2, w.count(".") + 1))
        for w in sorted(nexts - paths.keys()):
            if w in graph:
                paths[w] = paths[v] + [w]
                todo.append(w)
    return paths


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


GRAPH = import_graph()


def test_the_graph_is_read_whole():
    """The reading sees top-level, relative, package and function-level imports (so the
    other tests cannot pass on an empty graph)."""
    assert "gateway.context" in GRAPH["gateway.pipeline"]            # from .context import …
    assert "gateway.pipeline" in GRAPH["gateway.app"]                # from . import pipeline
    assert "gateway.policy.catalog" in GRAPH["gateway.export.gather"]    # from ..policy.catalog
    assert "gateway.demo.run" in GRAPH["gateway.cli.demo"]           # inside a function
    assert len(GRAPH) > 60


def test_no_module_of_gateway_imports_itself_round_a_circle():
    """No circle of imports in gateway/, TYPE_CHECKING and function-level imports included."""
    found = [c for c in circles(GRAPH) if c not in KNOWN_CIRCLES]
    assert not found, "import circles: " + "; ".join(
        " <-> ".join(sorted(c)) for c in found)


@pytest.mark.parametrize("low", sorted(m for m in GRAPH if _within(m, BELOW)))
def test_the_policy_and_the_context_import_nothing_above_them(low):
    """Nothing the policy package or the context imports, directly or not, is the request
    path, the wiring, a feature, or a module that serves the gateway's own API or the proxy
    (one importing endpoints or pipeline)."""
    serving = {m for m, deps in GRAPH.items() if deps & {"gateway.endpoints", "gateway.pipeline"}}
    for module, chain in reached(GRAPH, low).items():
        assert not (_within(module, ABOVE + FEATURES) or module in serving), \
            f"{low} reaches {module}: {' -> '.join(chain)}"
