"""Packaging: `lorafleet.*` imports from the editable install and from a built wheel, and the repo's
operator/ folder never shadows the standard library's `operator` module.

Every check runs Python in a subprocess whose working directory is the repo root, because that is
where the shadowing happens (`python -c`, `python -m`, scripts put the working directory first on
sys.path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"engine": "lorafleet.engine", "operator": "lorafleet.operator", "bench": "lorafleet.bench"}
# Fails if `operator` is anything but the standard library module.
STDLIB_OPERATOR = "import operator; assert operator.add(2, 3) == 5, operator"


def python(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def operator_modules() -> list[str]:
    """The importable modules directly under operator/ (there may be none yet)."""
    folder = REPO / "operator"
    files = [p.stem for p in folder.glob("*.py") if p.stem != "__main__"]
    packages = [p.name for p in folder.iterdir() if (p / "__init__.py").exists()]
    return [f"lorafleet.operator.{name}" for name in sorted(files + packages)]


def import_check() -> str:
    """Code that imports the namespace and prints where lorafleet.engine and lorafleet.operator live."""
    imports = "".join(f"import {module}; " for module in operator_modules())
    return (
        f"{STDLIB_OPERATOR}; import importlib.util, lorafleet.engine, lorafleet.bench; {imports}"
        "spec = importlib.util.find_spec('lorafleet.operator'); "
        "print(lorafleet.engine.__file__); print(list(spec.submodule_search_locations) if spec else None)"
    )


def test_operator_folder_has_no_init() -> None:
    # With operator/__init__.py, `import operator` from the repo root finds this folder first.
    assert not (REPO / "operator" / "__init__.py").exists()


def test_editable_install_imports_from_the_repo_root() -> None:
    engine_file, operator_locations = python("-c", import_check()).splitlines()
    assert Path(engine_file) == REPO / "engine" / "__init__.py"
    assert str(REPO / "operator") in operator_locations


def test_python_dash_m_from_the_repo_root_keeps_stdlib_operator() -> None:
    # `-m` puts the working directory first on sys.path, as `python -m pytest` does.
    python(
        "-m", "timeit", "-n", "1", "-r", "1", "-s", "import operator, lorafleet.engine", "operator.add(2, 3)"
    )
    assert python("-m", "pytest", "--version").startswith("pytest ")


def test_wheel_installs_the_namespace_only(tmp_path: Path) -> None:
    # Build from a copy so that setuptools' build/ and *.egg-info never land in the shared tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source)
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    python(
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(tmp_path),
        str(source),
    )
    (wheel,) = tmp_path.glob("lorafleet-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"lorafleet"}
    assert "lorafleet/__init__.py" not in names  # a namespace, like the editable install
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                wheel_name = f"{package.replace('.', '/')}/{path.relative_to(REPO / folder).as_posix()}"
                assert wheel_name in names, f"{wheel_name} missing from the wheel (subpackage not listed?)"
    for src in (
        "decode_attention.cpp",
        "elementwise.cpp",
        "avx512_math.h",
        "common.h",
    ):  # the C++ ops, as package data
        assert f"lorafleet/engine/csrc/{src}" in names

    target = tmp_path / "installed"
    python("-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    # -S skips site-packages' .pth files, so the editable install cannot answer instead of the
    # wheel; the dependencies stay importable through PYTHONPATH.
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    engine_file, _ = python("-S", "-c", import_check(), env=env).splitlines()
    assert Path(engine_file) == target / "lorafleet" / "engine" / "__init__.py"
