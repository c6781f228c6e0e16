"""The layers import only downward (docs/architecture.md).

Every module's imports are read from its source (``import`` statements anywhere in the file,
including the lazy ones inside functions), so a lazy upward import is caught too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> folder, as setup.py maps them
FOLDERS = {"irlm": ROOT / "irlm", "irlm.frontends": ROOT / "frontends",
           "irlm.passes": ROOT / "passes", "irlm.lowering": ROOT / "lowering",
           "irlm.kernels": ROOT / "kernels" / "src"}
#: the IR core: the modules at the top of irlm/ and the op definitions
CORE = ("irlm.errors", "irlm.types", "irlm.ir", "irlm.registry", "irlm.builder",
        "irlm.verifier", "irlm.interpreter", "irlm.weights", "irlm.ops")
ABOVE_CORE = ("irlm.text", "irlm.passes", "irlm.frontends", "irlm.compilation", "irlm.lowering",
              "irlm.runtime", "irlm.serving", "irlm.cli", "irlm.kernels")


def modules():
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "irlm" and parts and parts[0] in ("frontends", "passes", "lowering"):
                continue
            name = ".".join([package, *parts])
            yield name, path, path.name == "__init__.py"


def imports(name: str, path: Path, is_package: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "irlm" or m.startswith("irlm.")}


def within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


ALL = sorted(modules())


def _violations(selected, forbidden):
    bad = []
    for name, path, is_pkg in ALL:
        if not within(name, selected):
            continue
        for m in sorted(imports(name, path, is_pkg)):
            if within(m, forbidden):
                bad.append(f"{name} imports {m}")
    return bad


def test_the_module_walk_sees_every_layer():
    names = {n for n, _, _ in ALL}
    for package in CORE + ABOVE_CORE:
        assert any(within(n, (package,)) for n in names), package


def test_ir_core_imports_nothing_above_it():
    # the core may print a graph (Graph.__str__) through the text format, nothing else above
    assert _violations(CORE, tuple(p for p in ABOVE_CORE if p != "irlm.text")) == []


def test_text_format_imports_only_the_core():
    assert _violations(("irlm.text",), tuple(p for p in ABOVE_CORE if p != "irlm.text")) == []


@pytest.mark.parametrize("layer", ["irlm.passes", "irlm.frontends"])
def test_passes_and_frontends_never_import_lowering_runtime_or_the_cli(layer):
    forbidden = ("irlm.lowering", "irlm.runtime", "irlm.serving", "irlm.cli", "irlm.compilation")
    if layer == "irlm.passes":
        forbidden += ("irlm.frontends",)
    assert _violations((layer,), forbidden) == []


def test_lowering_and_compile_library_never_import_runtime_or_cli():
    assert _violations(("irlm.lowering", "irlm.compilation"),
                       ("irlm.runtime", "irlm.serving", "irlm.cli")) == []


def test_runtime_never_imports_serving_the_cli_or_the_compile_library():
    assert _violations(("irlm.runtime",), ("irlm.serving", "irlm.cli", "irlm.compilation")) == []


def test_serving_never_imports_the_cli_or_the_compile_library():
    assert _violations(("irlm.serving",), ("irlm.cli", "irlm.compilation")) == []


#: the passes' own sub-packages that hold passes (the infrastructure and the rewriting engine
#: sit below them)
PASS_GROUPS = ("irlm.passes.transforms", "irlm.passes.fusions", "irlm.passes.llm",
               "irlm.passes.parallel")


def test_the_rewriting_engine_imports_no_pass():
    assert _violations(("irlm.passes.rewriting",), PASS_GROUPS) == []
