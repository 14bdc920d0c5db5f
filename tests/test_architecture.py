"""The package's layers and the one way its imports run (``docs/architecture.md``), read from the source with ``ast``.

    mll.metrics  →  mll.nn  →  mll.functional  →  mll.functional._engine  →  torch

A layer imports the layers below it and never one above; private names (``_x``) do not cross a package's border;
and no module outgrows 400 lines. The rules are checked on every import statement, at module level or inside a
function (a deferred import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "mll"

#: each layer and the layers it may import (besides itself, torch and the standard library)
LAYERS: dict[str, set[str]] = {
    "mll.functional._engine": set(),
    "mll.functional": {"mll.functional._engine"},
    "mll.nn": {"mll.functional", "mll.functional._engine"},
    # evaluation: public maths (cosine_logits) and the heads it evaluates, never the engine's private modules
    "mll.metrics": {"mll.nn", "mll.functional"},
    # peers' APIs (mll.compat.pml): shells over the public maths and the heads, never the engine's private modules
    "mll.compat": {"mll.nn", "mll.functional"},
    "mll": {"mll.metrics", "mll.nn", "mll.functional", "mll.functional._engine"},  # the package's face and the demo
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The most specific layer a module belongs to (``mll.functional.margin`` → ``mll.functional``)."""
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def imports(path: Path, me: str = "") -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, names taken from it)`` for every import of an ``mll`` module in the file (``me``:
    the module's name, by default from its path)."""
    tree = ast.parse(path.read_text(), str(path))
    me = me or module_name(path)
    package = package_of(me, path.name == "__init__.py")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "mll"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "mll":
                continue
            names = [alias.name for alias in node.names]
            # ``from mll.functional import proxy`` imports a module: the arrow points at it
            found.append((node.lineno, target, names))
    return found


def _resolve(target: str, names: list[str]) -> list[tuple[str, str]]:
    """``(module, name)`` pairs: a name that is a submodule of ``target`` becomes that module, with no name."""
    if not names:
        return [(target, "")]
    out = []
    for name in names:
        sub = ROOT.parent.joinpath(*f"{target}.{name}".split("."))
        if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
            out.append((f"{target}.{name}", ""))
        else:
            out.append((target, name))
    return out


ARROWS = [
    (path, line, module, name)
    for path in sources()
    for line, target, names in imports(path)
    for module, name in _resolve(target, names)
]


def test_the_layers_cover_every_module() -> None:
    assert {layer_of(module_name(path)) for path in sources()} == set(LAYERS)
    assert (ROOT / "functional" / "_engine" / "__init__.py").exists()


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_run_one_way(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    wrong = [
        f"line {line}: {me} ({mine}) imports {module} ({layer_of(module)})"
        for p, line, module, _ in ARROWS
        if p == path and layer_of(module) != mine and layer_of(module) not in LAYERS[mine]
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_private_names_stay_in_their_package(path: Path) -> None:
    me = module_name(path)
    here = package_of(me, path.name == "__init__.py")
    wrong = [
        f"line {line}: {me} imports {name} from {module}"
        for p, line, module, name in ARROWS
        # a module of this package, or the package's own __init__, may hand over a private name
        if p == path and name.startswith("_") and here not in (module, package_of(module, False))
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_module_outgrows_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {lines} lines (at most {MAX_LINES})"


def test_the_rules_catch_a_wrong_arrow(tmp_path: Path) -> None:
    """The checker itself: an engine module that imports a public family and a head, and takes a private name
    across a package's border, is seen on all three counts."""
    probe = tmp_path / "probe.py"
    probe.write_text("from mll.functional.margins import _arc_value\n\ndef f():\n    from mll.nn import ArcFace\n")
    found = [
        (module, name)
        for _, target, names in imports(probe, "mll.functional._engine.probe")
        for module, name in _resolve(target, names)
    ]
    mine = layer_of("mll.functional._engine.probe")
    assert mine == "mll.functional._engine"
    assert [m for m, _ in found if layer_of(m) not in LAYERS[mine] and layer_of(m) != mine] == [
        "mll.functional.margins",
        "mll.nn",
    ]
    assert [n for _, n in found if n.startswith("_")] == ["_arc_value"]
