"""Import direction (STYLE.md §12, in the package layout of issue 30): a module imports only from lower layers; L1
modules never import torch."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "segjointgene"

#: module (dotted, relative to the package, without .py) -> layer; the packages of PACKAGES stand for all their
#: modules, each sub-package's ``__init__`` is listed by itself. Half steps order modules within a layer of STYLE.md
#: §12 (e.g. ``preprocess.pipeline`` builds on ``io.files``); a module imports only from strictly lower values.
LAYERS = {
    "__init__": 0, "constants": 0, "errors": 0, "interrupt": 0, "config": 0.5, "methods.choice": 0.6,
    # io/: readers and writers
    "io.files": 1, "io.runfolder": 1, "io.windows": 1.1, "io.metadata": 1.2, "io.dapi": 1.3, "io.polygons": 1.5,
    "io.spatialstore": 1.5, "io.platforms": 1.6,
    # preprocess/
    "preprocess.geometry": 1.3, "preprocess.pipeline": 1.5, "preprocess.dataset": 2, "preprocess.density": 2,
    # evaluate/ (scoring builds on the results)
    "evaluate.simulate": 1.5, "evaluate.metrics": 1.5, "evaluate.baselines": 1.5, "evaluate.scoring": 2.5,
    # methods/: the spot-model engine, the published self-training, whole slides on tiles
    "methods.spotmodel.model": 1.5, "methods.spotmodel.partition": 1.6, "methods.spotmodel.densitycells": 1.6,
    "methods.spotmodel.engine": 1.7,
    "methods.segjointgene.labels": 2, "methods.segjointgene.unet": 2, "methods.segjointgene.checkpoint": 2,
    "methods.segjointgene.distributed": 2, "methods.segjointgene.trainer": 3,
    "methods.tiled.network": 2.55, "methods.tiled.tiles": 2.6, "methods.tiled.merge": 2.65, "methods.tiled.run": 2.7,
    # results/
    "results.stitch": 1.5, "results.ranking": 1.5, "results.borders": 1.5, "results.plots": 2, "results.export": 2.5,
    "attribution": 2, "embed": 2.5, "classify": 2.5,
    "cli": 4, "api": 4.5,
    **{f"{pkg}.__init__": 0 for pkg in ("io", "preprocess", "evaluate", "methods", "methods.spotmodel",
                                        "methods.segjointgene", "methods.tiled", "results")},
}
#: Packages whose modules share their package's layer (they import each other).
PACKAGES = ("attribution", "embed", "classify", "methods.segjointgene.trainer")
NO_TORCH = {name for name, layer in LAYERS.items() if layer < 2}
#: Upward imports that are allowed: the package's lazy ``segjointgene.segment`` (imported on first use only).
ALLOWED = {("__init__", "api")}
TRAINER = "methods.segjointgene.trainer"


def _key(dotted: str) -> str | None:
    """The LAYERS key of a module (dotted, under the package): itself, or the package of PACKAGES holding it."""
    if dotted in LAYERS:
        return dotted
    return next((p for p in PACKAGES if dotted == p or dotted.startswith(p + ".")), None)


def _module_key(path: Path) -> str:
    dotted = ".".join(path.relative_to(PKG).with_suffix("").parts)
    return _key(dotted) or dotted


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, 0) of every import in a file; ``from <pkg> import <module>`` gives the module."""
    pkg = ["segjointgene", *path.relative_to(PKG).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or "" if node.level == 0 else ".".join(
                pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            if node.module is None or base == "segjointgene":
                out.extend((f"{base}.{alias.name}", 0) for alias in node.names)
            else:
                out.append((base, 0))
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
            other = _key(name.removeprefix("segjointgene."))
            if other is None or other == me or (me, other) in ALLOWED:
                continue
            if LAYERS[other] >= LAYERS[me]:
                problems.append(f"{path.relative_to(PKG)} (layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})")
    assert not problems, "\n".join(problems)


def test_nothing_imports_cli_and_only_cli_imports_trainer():
    for path in PKG.rglob("*.py"):
        me = _module_key(path)
        names = [n for n, _ in _imports(path)]
        assert "segjointgene.cli" not in names or me in ("cli", "api"), path  # api: the Python face of the CLI
        if me not in ("cli", TRAINER):  # the trainer package's modules import each other
            assert not any(n.startswith(f"segjointgene.{TRAINER}") for n in names), f"{path} imports trainer"


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
