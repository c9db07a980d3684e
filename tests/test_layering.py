"""The import rules docs/ARCHITECTURE.md writes down, checked on every import (module level or inside a function)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainers", "datasets_prep", "launch")
# datasets_prep reaches trainers only through these (docs/ARCHITECTURE.md, "Who imports whom")
PREP_MAY_USE = ("trainers.errors", "trainers.config", "trainers.versions", "trainers.images", "trainers.backbones")
OBJECTIVE_HELPERS = ("trainers.objectives", "trainers.objectives.base", "trainers.objectives.inputs")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Project modules `path` imports, `from a import b` counting as a.b where that is a module."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def edges() -> list[tuple[str, str]]:
    known = modules()
    return [(a, b) for a, path in known.items() for b in sorted(imports_of(a, path, known))]


def forbidden(a: str, b: str) -> str | None:
    if a.startswith(("trainers", "datasets_prep")) and b.startswith("launch"):
        return "trainers/ and datasets_prep/ never import launch/"
    if a.startswith("trainers.objectives.") and b.startswith("trainers.objectives.") and b not in OBJECTIVE_HELPERS:
        return "an objective imports base (and the shared inputs), never another objective"
    if a.startswith("trainers.objectives") and b in ("trainers.engine", "trainers.checkpoint", "trainers.hub"):
        return "objectives never reach the loop, checkpoint I/O or the hub"
    if a.startswith("datasets_prep") and b.startswith("trainers") and not b.startswith(PREP_MAY_USE):
        return f"datasets_prep reaches trainers only through {', '.join(PREP_MAY_USE)}"
    if a == "trainers.diffusion" and b not in ("trainers", "trainers.errors", "trainers.seeding"):
        return "diffusion.py is tensor math: it imports only errors and seeding"
    if a.startswith("trainers.") and not a.startswith("trainers.objectives") and a != "trainers.config" \
            and b.startswith("trainers.objectives.") and a != "trainers.engine":
        return "outside objectives/, only the engine (through the registry) and the recipe loader know objectives"
    return None


def test_no_edge_breaks_the_documented_layering():
    broken = [f"{a} -> {b}: {why}" for a, b in edges() if (why := forbidden(a, b))]
    assert not broken, "\n".join(broken)


def test_the_engine_and_loader_find_objectives_through_the_registry_only():
    for a, b in edges():
        if a in ("trainers.engine", "trainers.config") and b.startswith("trainers.objectives"):
            assert b == "trainers.objectives", f"{a} imports {b}, a concrete objective"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [node])


def test_objective_modules_import_no_other_objective_by_grep():
    """The issue's own check: `grep -rn "from trainers.objectives\\.[a-z]* import" trainers/objectives` finds base."""
    pattern = re.compile(r"from trainers\.objectives\.([a-z_]*) import")
    found = {m.group(1) for p in (ROOT / "trainers" / "objectives").glob("*.py") for m in pattern.finditer(p.read_text())}
    assert found <= {"base"}, found


def test_the_rules_catch_what_they_forbid():
    """The checker itself: each rule fires on an edge it exists for."""
    assert forbidden("trainers.objectives.progressive", "trainers.objectives.consistency")
    assert forbidden("datasets_prep.cache", "trainers.data")
    assert forbidden("trainers.engine", "launch.cli")
    assert forbidden("trainers.data", "trainers.objectives.finetune")
    assert not forbidden("trainers.objectives.finetune", "trainers.objectives.base")
    assert not forbidden("datasets_prep.cache", "trainers.backbones")


def test_architecture_document_exists_and_readme_links_it():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for heading in ("Who imports whom", "The objective seam", "The noise-process seam", "Adding an objective",
                    "Adding a backbone family", "Run directory"):
        assert heading in doc, heading
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text()
