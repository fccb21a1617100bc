"""The import graph: no cycles, the project's own modules imported at module level, and
``import lsw_jax`` (model, generate, kernels, CLI) working without the optional packages."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lsw_jax", "pallas_kernels")

# Heavy or optional packages the core (model, generate, kernels, loading, CLI) must not need.
OPTIONAL = ("gguf", "starlette", "uvicorn", "matplotlib", "torch")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _own(name: str | None) -> bool:
    return name is not None and name.split(".")[0] in PACKAGES


def _imports(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """Project modules an import statement loads (``from a import b`` may name module a.b)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _own(a.name)]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and _own(node.module):
        subs = [f"{node.module}.{a.name}" for a in node.names]
        return [node.module] + [s for s in subs if s in modules]
    return []


def _module_level_imports(tree: ast.Module, modules: dict[str, Path]) -> list[str]:
    out = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            out += _imports(sub, modules)
    return out


def _function_local_imports(tree: ast.Module, modules: dict[str, Path]) -> list[tuple[int, str]]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                out += [(node.lineno, name) for name in _imports(node, modules)]
    return out


def test_project_modules_are_imported_at_module_level():
    modules = _modules()
    offenders = []
    for path in modules.values():
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        offenders += [
            f"{rel}:{line} imports {mod}" for line, mod in _function_local_imports(tree, modules)
        ]
    assert not offenders, "function-local imports of the project:\n" + "\n".join(offenders)


def test_module_level_import_graph_has_no_cycle():
    """Edges: a module -> each project module it imports at module level, and -> the
    packages above that module (importing ``a.b.c`` first runs ``a/b/__init__``), except
    its own ancestors (already being imported)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own_ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own_ancestors.add(name)
        edges = set()
        for target in _module_level_imports(ast.parse(path.read_text()), modules):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in modules and dep not in own_ancestors and dep != name:
                    edges.add(dep)
        graph[name] = edges

    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_core_works_without_optional_packages():
    """The GPU hosts lack gguf/starlette/uvicorn: importing the library, its CLI and
    server module, and generating with a tiny model must not need any of them."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {OPTIONAL!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked optional package {{name}}")

        sys.meta_path.insert(0, Block())
        import numpy as np
        import lsw_jax, lsw_jax.cli, lsw_jax.serve.server
        import pallas_kernels.lora_unmerged, pallas_kernels.switch_merge
        from lsw_jax.config import ModelConfig
        model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32")
        out = lsw_jax.generate(model, np.array([[1, 2, 3]], np.int32), 4)
        assert out.shape == (1, 4), out.shape
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
