"""The structure of docs/architecture.md, checked: data flows one way, the core stands alone, rooms stay small."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "flexdiff"
CORE = ("errors", "io", "fingerprints", "parallel", "conditioning", "pipelines", "schedule", "samplers", "mixture", "anatomy", "transformer_anatomy", "runs", "engine", "models", "cost", "devices",
        "sampling", "prefixes")
UPPER = ("search", "experts", "bench", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk(tree):
    """ast.walk, leaving out `if TYPE_CHECKING:` blocks (annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path) -> set[str]:
    """flexdiff modules imported anywhere in the file (also inside functions: a cycle is a cycle)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in _walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("flexdiff"):
                target = node.module.removeprefix("flexdiff").lstrip(".")
            else:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}".lstrip(".") for a in node.names)  # `from . import x`
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("flexdiff").lstrip(".") for a in node.names if a.name.startswith("flexdiff"))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {t for t in _imports(path) if t in files and t != name and t != ""}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_nothing_above_it(core):
    upward = {t for t in _graph()[core] if t.split(".")[0] in UPPER}
    assert not upward, f"{core} imports {sorted(upward)}"


def test_no_file_is_a_warehouse():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 360}, sizes


@pytest.mark.parametrize("module", ["engine.py", "runs.py", "cost.py", "sampling.py", "search/space.py",
                                    "search/evolution.py", "search/fitness.py", "search/wiring.py"])
def test_the_engine_cost_sampling_and_search_do_not_branch_on_the_model_class(module):
    """One engine for both families: what differs between a UNet and a transformer is asked of the anatomy
    (or, for what a model is conditioned on, of conditioning.py), never decided here by the model's class."""
    code = "\n".join(line for line in (SRC / module).read_text().splitlines()
                     if not line.lstrip().startswith(("#", '"', "raise", "A ", "f\"")))
    for name in ("UNet2DModel", "UNet2DConditionModel", "Transformer2DModel", "type(unet", "type(model",
                 "type(first", "type(denoiser"):
        assert name not in code, (module, name)


def test_samplers_does_not_import_schedule():
    assert "schedule" not in _imports(SRC / "samplers.py")
