"""Data flows down: the package's layers import only the layers below them (imports inside functions included), and
the kernels load without the table libraries."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "blens_fast"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as an absolute dotted name."""
    package = ".".join(("blens_fast", *path.relative_to(PACKAGE).parent.parts))
    return imports_of(path.read_text(encoding="utf-8"), package)


def imports_of(source: str, package: str) -> set[str]:
    """The absolute names a module of ``package`` imports (``from x import y`` gives ``x`` and ``x.y``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = node.module if node.level == 0 else ".".join(filter(None, (base, node.module)))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import counterfact`
    return found


def reaches(path: Path, targets) -> list[str]:
    return sorted(m for m in imported_modules(path) for t in targets if m == t or m.startswith(t + "."))


def test_the_import_reader_sees_imports_inside_functions():
    source = ("import os\nfrom . import sibling\n"
              "def f():\n    from ..records import load\n    from ..ops.topk import TOPK\n")
    assert imports_of(source, "blens_fast.editing") == {
        "os", "blens_fast.editing", "blens_fast.editing.sibling", "blens_fast.records", "blens_fast.records.load",
        "blens_fast.ops.topk", "blens_fast.ops.topk.TOPK"}


@pytest.mark.parametrize("layer, above", [
    ("editing", ("blens_fast.counterfact", "blens_fast.bulk", "blens_fast.bench", "blens_fast.commands")),
    ("counterfact", ("blens_fast.bulk", "blens_fast.bench", "blens_fast.commands")),
    ("bulk", ("blens_fast.counterfact", "blens_fast.editing", "blens_fast.bench", "blens_fast.commands")),
    ("ops", ("blens_fast.context", "blens_fast.adapters", "blens_fast.capture", "blens_fast.lens",
             "blens_fast.editing", "blens_fast.counterfact", "blens_fast.bulk", "blens_fast.bench",
             "blens_fast.commands", "blens_fast.stats")),
])
def test_a_layer_never_reaches_up(layer, above):
    found = {str(path.relative_to(PACKAGE)): reaches(path, above) for path in sorted((PACKAGE / layer).rglob("*.py"))}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_reading_results_does_not_load_the_run_module():
    assert reaches(PACKAGE / "bulk" / "results.py", ["blens_fast.bulk.run"]) == []


def test_importing_the_kernels_loads_neither_pyarrow_nor_pandas():
    code = ("import sys, blens_fast.ops, blens_fast.ops.lowrank, blens_fast.ops.tuning\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyarrow', 'pandas', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plots_and_tables_go_through_the_shared_helpers():
    """One place sets matplotlib's backend and turns figures into files (_report.py), and results files are written
    atomically (_io.py): no module, benchmark or script picks a backend, saves a figure or renames a temporary file of
    its own."""
    own = {PACKAGE / "_report.py", PACKAGE / "_io.py"}
    files = [path for folder in (PACKAGE, PACKAGE.parent / "benchmarks", PACKAGE.parent / "scripts")
             for path in sorted(folder.rglob("*.py")) if path not in own]
    found = {str(path.relative_to(PACKAGE.parent)): [needle for needle in ("matplotlib.use(", ".savefig(", ".tmp")
                                                     if needle in path.read_text(encoding="utf-8")] for path in files}
    assert {name: hits for name, hits in found.items() if hits} == {}
