"""The house keeps its layers: core's folders are its layers, imports go down only, no cycles, no
hidden imports, and docs/architecture.md lists every module where it lives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "llmkit" / "core"

# Bottom to top. Core's top-level modules are the foundation every layer may use.
LAYERS = ["(top level)", "host", "files", "text", "model", "decoding", "training", "tasks", "store", "interop", "jobs"]


def _modules() -> dict[str, Path]:
    """'text.tokenizer' -> its file, for every module of core ('' prefix dropped)."""
    out = {}
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__") if name.endswith(".__init__") else name] = path
    return out


def _layer(module: str) -> int:
    head = module.split(".")[0]
    return LAYERS.index(head) if "." in module or head in LAYERS[1:] else 0


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool, str]]:
    """(core module imported, line, inside a function?, the source line) for each import of core."""
    lines = path.read_text().split("\n")
    tree = ast.parse("\n".join(lines))
    inner: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("llmkit.core."):
                name = target.removeprefix("llmkit.core.")
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    found.append((name, node.lineno, node.lineno in inner, lines[node.lineno - 1]))
                    break
        else:
            found.append(("", node.lineno, node.lineno in inner, lines[node.lineno - 1]))
    return found


def test_every_subpackage_of_core_is_a_layer_whose_docstring_states_its_rule():
    packages = sorted(p.parent.name for p in CORE.glob("*/__init__.py"))
    assert sorted(packages) == sorted(LAYERS[1:]), "a new folder of core must take its place in LAYERS"
    for name in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((CORE / name / "__init__.py").read_text())) or ""
        assert re.match(rf"Layer {LAYERS.index(name)}, {name}:", doc), f"{name}/__init__.py: 'Layer N, {name}: ...'"
        assert "Rule:" in doc, f"{name}/__init__.py says no rule"
    top = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 5, f"core's top level should stay a handful of modules: {top}"


def test_each_layer_imports_only_the_layers_below_it():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for target, line, _, _ in _imports(path, modules):
            if target and _layer(target) > _layer(name):
                upward.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[_layer(name)]}) imports "
                    f"{target} ({LAYERS[_layer(target)]})"
                )
    assert not upward, "\n".join(upward)


def test_core_has_no_import_cycles():
    modules = _modules()
    graph = {
        name: {t for t, *_ in _imports(path, modules) if t and t != name and not name.startswith(t + ".")}
        for name, path in modules.items()
    }
    # A package's __init__ is only a docstring: importing 'x.y' runs 'x' first, which imports nothing.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt) :] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_imports_inside_functions_say_why():
    unexplained = []
    for path in sorted(CORE.rglob("*.py")):
        lines = path.read_text().split("\n")
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    line, before = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    span = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                    if "#" not in span and not before.startswith("#"):
                        unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
    assert not unexplained, "an import inside a function needs a comment saying why:\n" + "\n".join(unexplained)


def test_architecture_doc_lists_every_module_of_core_in_its_folder():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    tree = doc.split("<!-- tree -->")[1]
    listed = set(re.findall(r"^\s*([a-z_]+\.py)\b", tree, re.M))
    folders = re.findall(r"^  ([a-z_]+)/", tree, re.M)
    assert folders == LAYERS[1:], "the tree lists the layers bottom to top"
    for path in CORE.rglob("*.py"):
        if path.name != "__init__.py":
            assert path.name in listed, f"docs/architecture.md's tree misses {path.relative_to(CORE)}"
    for line in tree.splitlines():  # each module listed under the folder it lives in
        m = re.match(r"^    ([a-z_]+\.py)\b", line)
        if m:
            folder = next(f for f in reversed(re.findall(r"^  ([a-z_]+)/", tree[: tree.index(line)], re.M)))
            assert (CORE / folder / m.group(1)).is_file(), f"architecture.md: {folder}/{m.group(1)} does not exist"


def test_no_function_in_llmkit_is_over_80_lines():
    """Counted from the first line after the docstring to the last, blank and comment lines included."""
    long = []
    for path in sorted((ROOT / "llmkit").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = fn.body[0]
                doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                start = first.end_lineno + 1 if doc and len(fn.body) > 1 else first.lineno
                if fn.end_lineno - start + 1 > 80:
                    long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - start + 1} lines)")
    assert not long, "\n".join(long)


def test_every_llmkit_import_of_the_benchmarks_scripts_and_examples_resolves():
    """Benchmarks are not run by the suite: a moved module would break them silently."""
    import importlib

    broken = []
    for folder in ("benchmarks", "scripts", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmkit"):
                    try:
                        module = importlib.import_module(node.module)
                    except ImportError as e:
                        broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: {e}")
                        continue
                    for alias in node.names:
                        if not hasattr(module, alias.name):
                            try:
                                importlib.import_module(f"{node.module}.{alias.name}")
                            except ImportError:
                                broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}")
    assert not broken, "\n".join(broken)
