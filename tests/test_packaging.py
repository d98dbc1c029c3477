"""The wheel a user installs holds every bundled data file and works outside the checkout: built offline from a
copy of the sources, installed into a temporary target, run from there (a bundled HF config plans; a bad model
name is one line and exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed in)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # Offline: no index, no build isolation (setuptools and wheel come with the dev extra).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(work / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((work / "dist").glob("cachefit-*.whl"))
    target = work / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    return wheel, target


def test_the_wheel_holds_every_data_file(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    data = ROOT / "src" / "cachefit" / "data"
    bundled = [path.relative_to(data.parent.parent).as_posix() for path in data.rglob("*") if path.is_file()]
    assert bundled and [name for name in bundled if name not in names] == []
    assert "cachefit/py.typed" in names


def _cachefit(target: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, "-m", "cachefit", *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_the_installed_wheel_plans_and_refuses(installed: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    _, target = installed
    where = subprocess.run([sys.executable, "-c", "import cachefit; print(cachefit.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))              # the wheel's copy, not the checkout's
    result = _cachefit(target, tmp_path, "plan", "hf/gpt2", "--capacity", "1GB", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["name"] == "hf/gpt2"
    result = _cachefit(target, tmp_path, "plan", "no-such-model", "--capacity", "1GB")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "is not a file, nor a preset" in result.stderr
