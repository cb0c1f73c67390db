"""The floors of docs/architecture.md ("The parts") are the code's: every import of the package,
its benchmarks and jobs points to a part on a lower floor, and no module imports itself back
through others (no circles, also within a part).

The floors are read from the table in docs/architecture.md, so the document and the code cannot
drift apart: a new module must sit in a part the table names, and an import that climbs fails
here, naming the file, the line and the floors. Imports are read from the source (every ``import``
statement, function-local and ``TYPE_CHECKING`` ones included), so nothing hides an arrow.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("pdso_ray", "benchmarks", "jobs")


def declared_floors() -> dict[str, int]:
    """``{part: floor}`` from the table of docs/architecture.md §2: a part is a module
    (``config.py``: ``pdso_ray/config.py``), a package of ``pdso_ray`` (``data/``) or a top-level
    folder (``benchmarks/``)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## 2. The parts", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for part in re.findall(r"`([^`]+)`", cells[1]):
                floors[part] = int(cells[0])
    return floors


def part_of(module: str) -> str | None:
    """The part of the table a dotted module name belongs to (None: the package's ``__init__``)."""
    parts = module.split(".")
    if parts[0] != "pdso_ray":
        return parts[0] + "/"
    if len(parts) == 1:
        return None
    return parts[1] + "/" if (REPO / "pdso_ray" / parts[1]).is_dir() else parts[1] + ".py"


def modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def parse(path: Path, tries: int = 5) -> ast.Module:
    """``ast.parse`` of ``path``, tried again on CPython 3.11's spurious "AST constructor recursion
    depth mismatch" SystemError: the parser's depth counter is not per thread there, and in a fresh
    clone a thread an earlier test left running (Ray's) may be compiling a module that has no .pyc
    yet at the same moment (seen once in a fresh clone's `make test`)."""
    for _ in range(tries - 1):
        try:
            return ast.parse(path.read_text(), str(path))
        except SystemError:
            continue
    return ast.parse(path.read_text(), str(path))


def imports(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of ``path`` that names one of the ``known`` modules
    (``from a.b import c`` counts as ``a.b.c`` when that is a module, else ``a.b``)."""
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            out += [(node.lineno, m) for m in subs] or [(node.lineno, node.module)]
    return out


def test_the_table_names_every_part_once():
    floors = declared_floors()
    assert {"plan.py", "config.py", "storage.py", "method/", "stages/", "cli.py", "benchmarks/"} <= set(floors)
    unplaced = sorted({part_of(m) for m in modules()} - set(floors) - {None})
    assert unplaced == [], f"docs/architecture.md §2 does not place {unplaced} on a floor"


def test_no_import_climbs_a_floor():
    floors, known = declared_floors(), modules()
    climbing = []
    for module, path in known.items():
        source = part_of(module)
        for line, target in imports(path, known):
            to = part_of(target)
            if source is None or to is None or to == source:
                continue
            if floors[to] >= floors[source]:
                climbing.append(f"{path.relative_to(REPO)}:{line}: {source} (floor {floors[source]}) "
                                f"imports {target} ({to}, floor {floors[to]})")
    assert climbing == []


def test_no_circles():
    known = modules()
    graph = {m: {t for _, t in imports(p, known) if t != m} for m, p in known.items()}
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []
