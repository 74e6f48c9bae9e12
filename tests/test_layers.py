"""The package's layering, read from the source: no import cycle (not even through an import
inside a function or under TYPE_CHECKING), and no package importing one above it.

The layers, lowest first (docs/architecture.md draws them):

    top-level helpers (backoff, twistedtypes, keys, derpmap, netinfo, sdk, ...)
    wire                                 codecs
    netstack, stun, forward              userspace TCP/UDP, STUN, port-forward flows
    derp, coordinator                    relay and coordination, client and server side
    tailnet                              Conn, magicsock, the tunnel client
    agent, provider                      the workspace agent, the Terraform provider
    cli, cdk                             the user's command line, template synthesis
    server                               control plane (it runs the CLI's dev login too)
"""

from __future__ import annotations

import ast
import os

from twisted.trial import unittest

import coderstack

PACKAGE_DIR = os.path.dirname(os.path.abspath(coderstack.__file__))

RANK = {
    "wire": 1,
    "netstack": 2, "stun": 2, "forward": 2,
    "derp": 3, "coordinator": 3,
    "tailnet": 4,
    "agent": 5, "provider": 5, "scaletest": 5,
    "cli": 6, "cdk": 6,
    "server": 7,
}
ENTRY_POINTS = {"coderstack.__main__"}


def modules() -> dict[str, str]:
    found = {}
    for folder, _dirs, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """Every coderstack module each module imports, wherever the import statement sits."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            edges[mod].update(n for n in names if n in mods and n != mod)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def rank(module: str) -> int:
    if module in ENTRY_POINTS:
        return 100
    parts = module.split(".")
    return RANK.get(parts[1], 0) if len(parts) > 1 else 0


_EDGES: dict[str, set[str]] = {}


class LayerTests(unittest.TestCase):
    def setUp(self) -> None:
        if not _EDGES:  # parsed once for the class: the package does not change under the tests
            _EDGES.update(imports(modules()))
        self.edges = _EDGES

    def test_the_walk_sees_the_package(self) -> None:
        self.assertIn("coderstack.tailnet.client", self.edges)
        self.assertIn("coderstack.tailnet.conn", self.edges["coderstack.tailnet.client"])

    def test_no_import_cycle(self) -> None:
        self.assertEqual(cycles(self.edges), [])

    def test_the_cycle_finder_finds_one(self) -> None:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(cycles(edges), [["a", "b", "c"]])

    def test_every_package_has_a_layer(self) -> None:
        packages = {m.split(".")[1] for m in self.edges if m.count(".") >= 2}
        self.assertEqual(packages - set(RANK), set())

    def test_layers_call_down(self) -> None:
        upward = sorted(
            f"{mod} imports {dep}"
            for mod, deps in self.edges.items()
            for dep in deps
            if rank(dep) > rank(mod)
        )
        self.assertEqual(upward, [])
