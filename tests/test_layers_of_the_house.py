"""The house's shape (docs/architecture.md): packages import one way, onto a small core, and the planning side never
imports torch. Read from the sources themselves (every import statement, function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cachefit"

# What each part may import (besides itself). cli and apps are programs on top; api is the library's front.
ALLOWED = {
    "core": set(),
    "planning": {"core"},
    "perf": {"core"},
    "output": {"core"},
    "nn": {"core"},
    "sources": {"core", "nn"},
    "runtime": {"core", "nn", "sources"},     # a Hugging Face stage is built, and its plan checked, as profiled
    "api": {"core", "planning", "perf", "output", "sources", "runtime"},
    "apps": {"api", "core", "output", "sources", "runtime"},
    "cli": {"api", "apps", "core", "output", "sources", "runtime"},
}
NO_TORCH = ("core", "planning", "perf", "output")


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) == 1:
        return {"api": "api", "__init__": "api", "__main__": "cli"}.get(relative.stem, relative.stem)
    return relative.parts[0]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_packages_import_one_way_onto_the_core() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        part = part_of(path)
        for module in imports_of(path):
            names = module.split(".")
            if names[0] != "cachefit" or len(names) < 2:
                continue
            target = names[1] if names[1] in ALLOWED else "api"     # `from cachefit import X`: the public API
            if target != part and target not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(PACKAGE)} ({part}) imports {module}")
    assert wrong == []


def test_the_planning_side_never_imports_torch() -> None:
    for path in PACKAGE.rglob("*.py"):
        if part_of(path) in NO_TORCH:
            heavy = {m for m in imports_of(path) if m.split(".")[0] in ("torch", "transformers", "safetensors")}
            assert heavy == set(), f"{path.relative_to(PACKAGE)} imports {heavy}"


def test_files_and_functions_stay_small() -> None:
    # A house a newcomer can read: files under ~400 lines, functions under 60.
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 60, f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} has {length} lines"


def test_what_starts_first_imports_no_torch() -> None:
    # The package loads its names on first use, and `cachefit run`'s launcher checks the shards and starts the
    # ranks before it imports torch (1.3 s): a module-level torch import on these paths would undo both.
    import subprocess
    import sys
    probe = ("import sys, cachefit, cachefit.cli, cachefit.runtime.launch, cachefit.runtime.manifest; "
             "print(sorted(m for m in ('torch', 'cachefit.api', 'pyarrow') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"


def test_a_rank_s_peak_probe_imports_no_compiler() -> None:
    # Each rank measures its largest pass under PeakTracker (a dispatch mode). torch wraps a mode's dispatch in
    # torch._dynamo.disable unless the mode opts out, and that import cost every rank 1.6 s here; the probe must
    # still count what the pass allocates (a 4x4 float32 product and a sum of it: 64 bytes each, both live).
    import subprocess
    import sys
    probe = ("import sys, torch; from cachefit.runtime.measure import PeakTracker; x = torch.ones(4, 4)\n"
             "with PeakTracker() as t:\n    y = x @ x; z = y + 1\n"
             "print('torch._dynamo' in sys.modules, t.peak)")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.split() == ["False", "128"]
