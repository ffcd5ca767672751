"""Import direction (STYLE.md §12): a module imports only from lower layers; L1 modules never import torch."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "segjointgene"

#: module (relative to the package, without .py; packages by folder) -> layer. Half steps order modules within a
#: layer of STYLE.md §12 (e.g. ``preprocess`` builds on ``io``); a module imports only from strictly lower values.
LAYERS = {
    "__init__": 0, "constants": 0, "errors": 0, "interrupt": 0, "config": 0.5,
    "io": 1, "runfolder": 1, "windows": 1.1, "metadata": 1.2, "geometry": 1.3, "dapi": 1.3, "platforms": 1.6, "simulate": 1.5, "preprocess": 1.5, "stitch": 1.5, "metrics": 1.5, "baselines": 1.5, "densitycells": 1.6, "engine": 1.7, "tilenet": 2.55, "tiles": 2.6, "tilemerge": 2.65, "tilerun": 2.7, "method": 0.6, "spotmodel": 1.5, "partition": 1.6, "ranking": 1.5, "polygons": 1.5, "spatialstore": 1.5,
    "labels": 2, "dataset": 2, "model": 2, "checkpoint": 2, "attribution": 2, "plots": 2, "distributed": 2, "density": 2,
    "export": 2.5, "evaluation": 2.5, "embed": 2.5, "classify": 2.5,
    "trainer": 3,
    "cli": 4, "api": 4.5,
}
NO_TORCH = {name for name, layer in LAYERS.items() if layer < 2}
#: Upward imports that are allowed: the package's lazy ``segjointgene.segment`` (imported on first use only).
ALLOWED = {("__init__", "api")}


def _module_key(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported top-level name inside the package or external root, level) of every import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.module or "", 0))
            elif node.level == 1 and path.parent == PKG:
                for alias in node.names:
                    out.append((f"segjointgene.{node.module or alias.name}", 0))
            else:  # from .. inside a sub-package
                base = node.module or node.names[0].name
                out.append((f"segjointgene.{base}" if node.level >= 2 else f"segjointgene.{_module_key(path)}.{base}", 0))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, 0) for alias in node.names)
    return out


def test_every_module_has_a_layer():
    keys = {_module_key(p) for p in PKG.rglob("*.py")}
    assert keys <= set(LAYERS), f"add these modules to LAYERS: {sorted(keys - set(LAYERS))}"


def test_imports_flow_downwards():
    problems = []
    for path in PKG.rglob("*.py"):
        me = _module_key(path)
        for name, _ in _imports(path):
            if name.split(".")[0] == "torch" and me in NO_TORCH:
                problems.append(f"{path.name} (layer {LAYERS[me]}) imports torch")
            if not name.startswith("segjointgene."):
                continue
            other = name.split(".")[1]
            if other == me or other not in LAYERS or (me, other) in ALLOWED:
                continue
            if LAYERS[other] >= LAYERS[me]:
                problems.append(f"{path.relative_to(PKG)} (layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})")
    assert not problems, "\n".join(problems)


def test_nothing_imports_cli_and_only_cli_imports_trainer():
    for path in PKG.rglob("*.py"):
        me = _module_key(path)
        names = [n for n, _ in _imports(path)]
        assert "segjointgene.cli" not in names or me in ("cli", "api"), path  # api: the Python face of the CLI
        if me not in ("cli", "trainer"):  # the trainer package's modules import each other
            assert not any(n.startswith("segjointgene.trainer") for n in names), f"{path} imports trainer"


#: Body lines (docstring aside) a function may have: it fits on a screen.
MAX_BODY_LINES = 60


def test_functions_fit_on_a_screen():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                    isinstance(body[0].value.value, str):
                body = body[1:]
            if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_BODY_LINES:
                long.append(f"{path.relative_to(PKG)}::{node.name} ({body[-1].end_lineno - body[0].lineno + 1} lines)")
    assert not long, "split these functions: " + ", ".join(long)
