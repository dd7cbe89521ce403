"""The layout's rules, checked on the source: small modules, no import cycle, and an engine and
criticism that name no model's sites (they read them from the model's contract)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyrospatial"
MAX_LINES = 700


def _modules(*, with_models: bool = False) -> dict[str, Path]:
    """Dotted name -> file of every module under pyrospatial/ (and, with ``with_models``, of
    models/ and guides/, installed as ``pyrospatial.models`` / ``pyrospatial.guides``)."""
    roots = [(PACKAGE, ("pyrospatial",))]
    if with_models:
        roots += [(ROOT / "models", ("pyrospatial", "models")), (ROOT / "guides", ("pyrospatial", "guides"))]
    out = {}
    for root, prefix in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(prefix) + list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def test_no_module_is_over_700_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """pyrospatial modules imported at module level by ``name`` (imports inside functions are
    deferred on purpose and do not make a cycle at import time)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # e.g. "pyrospatial.engine.fit" -> "pyrospatial.engine"
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # "from pyrospatial.engine import batch" imports a module
                add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_pyrospatial_modules():
    """Edges are the module-level imports written in the source: ``from a.b import c`` is an
    edge to ``a.b.c`` when that is a module, else to ``a.b`` (a package's ``__init__``)."""
    modules = _modules(with_models=True)
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    assert "pyrospatial.engine.batch" in graph["pyrospatial.models.coral"]  # the graph sees models/
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ------------------------------------------------------------------------------------------
# the engine and criticism name no model's sites
# ------------------------------------------------------------------------------------------
#: Method-specific by nature, so exempt: recalibration factors are fitted for one model's
#: interaction scores, and metrics score one method's outputs against its simulator's truth.
EXEMPT = {"recalibration.py", "metrics.py"}
SITE_CALLS = {"sample", "deterministic", "factor", "bernoulli_edges", "laplacian_factor", "contrastive_factor"}


def _model_site_names() -> set[str]:
    """Every site name of the models (first string argument of a sample / deterministic /
    factor call in models/), every name their contracts declare, and the brief's list."""
    names = {"proteins", "spot_counts", "edges", "nonedges", "expected_rna", "cell_size", "edge_prob", "rna_weight",
             "z", "v", "abundance", "proportion", "transform", "T"}
    for path in (ROOT / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if func in SITE_CALLS and isinstance(node.args[0].value, str):
                    names.add(node.args[0].value)
    from pyrospatial.models import CoralModel
    from pyrospatial.models.alignment import AlignmentModel
    from pyrospatial.models.celltype_deconvolution import CellTypeDeconvolutionModel

    for model in (CoralModel, AlignmentModel, CellTypeDeconvolutionModel):
        c = model.contract
        names |= set(c.observed_names) | set(c.latent_sites) | set(c.deterministic) | set(c.em_parameters)
        names |= set(c.graph_em_parameters) | set(c.graph_sites) | set(c.noncentred)
        names |= {o.mean_name for o in c.observed if o.mean_name}
    return names


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant of a module except docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_site_name_list_is_read_from_the_models():
    names = _model_site_names()
    assert {"spot_counts", "counts", "x_a", "size_scale", "edge_decoder.weight"} <= names


@pytest.mark.parametrize("layer", ["engine", "criticism"])
def test_engine_and_criticism_name_no_model_site(layer):
    names = _model_site_names()
    hits = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        if path.name in EXEMPT:
            continue
        hits += [f"{path.relative_to(ROOT)}:{line} {value!r}" for line, value in _string_literals(path) if value in names]
    assert not hits, "model site names in the engine/criticism (read them from model.contract):\n" + "\n".join(hits)


def test_the_literal_scan_would_catch_a_site_name(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text('"""Docstrings may say \'proteins\'."""\nOBSERVED = {"proteins": 1}\n')
    assert [v for _, v in _string_literals(source)] == ["proteins"]
