"""The dependency direction, read from the source (ast), not from what a run happens to import:

    editor -> lsp_server -> worker.protocol -> worker -> model -> kernels      (bench may use them all)

- nothing under model/ or kernels/ imports the language server (at any depth, lazily included);
- the language server does not reach torch, transformers or numpy at import (module-level imports,
  followed through every dlm_ls module they load, package __init__ files included);
- no import cycle among dlm_ls modules (module-level or lazy; `if TYPE_CHECKING:` imports are not run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lsp_server": "dlm_ls.lsp_server", "model": "dlm_ls.model", "kernels": "dlm_ls.kernels",
            "worker": "dlm_ls.worker", "bench": "dlm_ls.bench"}
HEAVY = ("torch", "transformers", "numpy")


def modules() -> dict[str, Path]:
    """Every dlm_ls module name -> its file (data folders such as bench/tasks/ are not packages)."""
    out = {}
    for folder, package in PACKAGES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            if any(not (base.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(len(parts))):
                continue  # not inside a package (a data file run by path)
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str) -> tuple[set[str], set[str]]:
    """(module-level, lazy) imported module names of one module, as absolute names."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top, lazy = set(), set()

    def absolute(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node: ast.AST, into: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit_stmt(sub, into)
                continue
            visit_stmt(child, into)

    def visit_stmt(child: ast.AST, into: set[str]) -> None:
        if isinstance(child, ast.Import):
            into.update(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = absolute(child.module, child.level)
            for alias in child.names:
                sub = f"{base}.{alias.name}"
                into.add(sub if sub in MODULES else base)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, lazy)
        else:
            visit(child, into)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), top)
    return top, lazy - top


IMPORTS = {name: imports(name) for name in MODULES}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in MODULES]


def test_the_engine_never_imports_the_language_server():
    bad = [(name, dep) for name, (top, lazy) in IMPORTS.items()
           if name.startswith(("dlm_ls.model", "dlm_ls.kernels"))
           for dep in top | lazy if dep.startswith("dlm_ls.lsp_server")]
    assert not bad, bad


def test_the_language_server_reaches_no_torch_at_import():
    for start in [n for n in MODULES if n.startswith("dlm_ls.lsp_server")]:
        seen, stack, via = {start}, [start], {start: None}
        while stack:
            name = stack.pop()
            for dep in IMPORTS[name][0] | set(_parents(name)):
                assert dep.split(".")[0] not in HEAVY or dep == name, _chain(via, name, dep)
                if dep in MODULES and dep not in seen:
                    seen.add(dep)
                    via[dep] = name
                    stack.append(dep)


def _chain(via: dict[str, str | None], name: str, dep: str) -> str:
    chain = [dep, name]
    while via.get(chain[-1]):
        chain.append(via[chain[-1]])
    return " <- ".join(chain)


def test_no_import_cycles():
    graph = {name: {d for d in top | lazy if d in MODULES and d != name} for name, (top, lazy) in IMPORTS.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []
    cycles = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                walk(dep)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_the_imports_they_judge():
    # The walk is only worth its verdicts if it finds real edges (guards against parsing nothing).
    assert "dlm_ls.worker.protocol" in IMPORTS["dlm_ls.lsp_server.worker_client"][0]
    assert "torch" in IMPORTS["dlm_ls.model.engine"][0]
    assert "dlm_ls.worker.scheduler" in IMPORTS["dlm_ls.lsp_server.worker_client"][1]  # --in-process, lazily
