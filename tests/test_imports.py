"""The module map of docs/design.md holds: stages import building blocks, never the reverse.

Imports are read from the source (ast), module-level and inside functions alike.
"""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pipeline"

# docs/design.md, "Module map". Stages are siblings: a stage imports building blocks, never another
# stage (it asks pipeline.graph where its inputs are); a building block imports building blocks only.
STAGES = {"synth", "prepare", "train", "oof", "predict", "submit", "inspect", "runs", "kaggle_cli", "export",
          "cutout"}
BLOCKS = {"config", "configio", "errors", "schedule", "arch", "augment", "cache", "graph", "runtime", "ingest", "layout", "testset", "parallel", "geometry", "probmaps", "precision",
          "data", "models", "pretrained", "losses", "safeload", "distributed", "tta", "rle", "metrics",
          "folds", "validate", "score", "ensemble", "pseudo", "heap", "overlay", "tboard", "explain", "faults", "locks", "onnxrun"}
ENTRY = {"__init__", "__main__", "cli", "stagelog"}   # parse arguments, then import a stage by name


def _modules() -> set[str]:
    """pipeline's modules: its .py files and its subpackages (a stage may be a package)."""
    return {p.stem for p in PKG.glob("*.py")} | {p.parent.name for p in PKG.glob("*/__init__.py")}


def _files(module: str) -> list[Path]:
    package = PKG / module
    return sorted(package.rglob("*.py")) if package.is_dir() else [PKG / f"{module}.py"]


def _module_imports(module: str) -> set[str]:
    return set().union(*(_imports(f) for f in _files(module)))


def _imports(path: Path) -> set[str]:
    """pipeline modules that ``path`` imports (relative or absolute); in a subpackage, its imports
    of its own modules do not count."""
    top = 1 + (len(path.relative_to(PKG).parts) - 1 if path.is_relative_to(PKG) else 0)   # level of `pipeline`
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if 0 < node.level < top:                  # inside its own subpackage
                continue
            if node.level == top and not mod:         # from . import a, b
                out.update(a.name for a in node.names)
            elif node.level == top:                   # from .a import x
                out.add(mod.split(".")[0])
            elif mod == "pipeline":
                out.update(a.name for a in node.names)
            elif mod.startswith("pipeline."):
                out.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline."))
    return out


def test_every_module_is_on_the_map():
    assert _modules() == STAGES | BLOCKS | ENTRY


def test_building_blocks_never_import_stages():
    bad = {m: sorted(_module_imports(m) & (STAGES | ENTRY)) for m in sorted(BLOCKS)}
    assert {m: s for m, s in bad.items() if s} == {}


def test_no_stage_imports_another_stage():
    bad = {m: sorted(_module_imports(m) & ((STAGES - {m}) | ENTRY)) for m in sorted(STAGES)}
    assert {m: s for m, s in bad.items() if s} == {}


def test_the_check_sees_a_stage_importing_a_stage(tmp_path):
    """The rule above would catch the imports it forbids, in each form they are written."""
    for line in ("from . import train", "from .train import run", "from pipeline import predict",
                 "import pipeline.prepare", "def f():\n    from . import oof"):
        f = tmp_path / "m.py"
        f.write_text(line + "\n")
        assert _imports(f) & STAGES, line


def test_torch_free_modules_stay_torch_free():
    """submit's workers import submit, probmaps and geometry: no torch, no prepare stage."""
    code = ("import sys; import pipeline.submit, pipeline.probmaps, pipeline.geometry, pipeline.graph, "
            "pipeline.runtime, pipeline.tta, pipeline.pseudo; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m in "
            "('pipeline.prepare', 'pipeline.predict', 'pipeline.train', 'joblib.parallel_x')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_design_doc_names_every_module():
    """docs/design.md's module map gives each module its one job: a new module must be added there."""
    doc = (PKG.parent / "docs" / "design.md").read_text()
    names = {f"`{m}.py`" for m in STAGES | BLOCKS | ENTRY if (PKG / f"{m}.py").is_file()}
    names |= {f"`{m}/`" for m in STAGES | BLOCKS if (PKG / m).is_dir()}
    names |= {f"`{p.stem}`" for p in (PKG / "train").glob("*.py") if p.stem != "__init__"}
    assert {n for n in names if n not in doc} == set()
