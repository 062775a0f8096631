"""Installed, not only checked out: a wheel in a fresh venv, `pip install --user` and an editable install all find
the recipes (package data read with importlib.resources) and report one version. Offline: no build isolation, no
dependencies downloaded (the venvs see this interpreter's site-packages)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastlearn
from fastlearn.core.recipes import list_recipes

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(list_recipes())
pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=600, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTLEARN_RECIPES", "PYTHONWARNINGS")}
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**clean, "COLUMNS": "80", **env})
    assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    "What an sdist holds, copied out of the repository (so building writes nothing here)."
    src = tmp_path_factory.mktemp("pkg") / "src"
    src.mkdir()
    for f in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    for d in ("fastlearn", "recipes"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    return src


@pytest.fixture(scope="module")
def wheel(source):
    dist = source.parent / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source],
         cwd=source.parent)
    (whl,) = dist.glob("fastlearn-*.whl")
    return whl


def _venv(path: Path, cwd) -> Path:
    """A venv that sees this interpreter's packages (pip, setuptools, torch): `--system-site-packages` alone gives
    the base interpreter's, which under a venv (README's commands make one) lack setuptools >= 64."""
    import site
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path], cwd)
    own = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (own / "_outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return path


def _imported_from(python, cwd, **env) -> Path:
    """The fastlearn package folder `python` would import, found without importing it (importing fastlearn means
    importing torch and fastai: seconds of CPU per process; the wheel test above runs the full command)."""
    code = "import importlib.util as u; print(u.find_spec('fastlearn').origin)"
    return Path(_run([python, "-c", code], cwd, **env).stdout.strip()).parent


def test_wheel_holds_the_package_and_the_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for p in (ROOT / "fastlearn").rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        assert rel in names, rel                                 # setup.cfg lists the packages by hand
    assert {f"fastlearn/presets/{n}.toml" for n in NAMES} <= names
    assert not any(n.startswith(("recipes/", "share/", "tests/")) for n in names)
    assert wheel.name.startswith(f"fastlearn-{fastlearn.__version__}-")   # setup.cfg reads fastlearn/base/version.py


def test_wheel_in_a_fresh_venv_runs_fastlearn_recipes(wheel, tmp_path):
    venv = tmp_path / "venv"
    _venv(venv, tmp_path)
    py, exe = venv / "bin" / "python", venv / "bin" / "fastlearn"
    _run([py, "-m", "pip", "install", "--no-deps", "-q", wheel], tmp_path)   # the pip of the interpreter it sees
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run([exe, "recipes"], elsewhere).stdout
    print(out)
    lines = out.splitlines()
    assert all(name in lines for name in NAMES) and max(map(len, lines)) <= 80
    version = _run([exe, "--version"], elsewhere).stdout.strip()
    print(version)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert version.startswith(f"fastlearn {fastlearn.__version__} from {site / 'fastlearn'} (python ")
    assert not (site / "recipes").exists()                        # found as package data, not a checkout's folder
    assert not list(elsewhere.iterdir())                          # listing recipes writes nothing


@pytest.mark.skipif(sys.prefix != sys.base_prefix, reason="a virtualenv has no user site-packages")
def test_user_install_puts_the_recipes_beside_the_package(wheel, tmp_path):
    "--user installs into another prefix; the recipes travel as package data, found beside the package as in a venv."
    user = tmp_path / "user"
    _run([sys.executable, "-m", "pip", "install", "--user", "--no-deps", "--no-warn-script-location", "-q", wheel],
         tmp_path, PYTHONUSERBASE=str(user))
    pkg = _imported_from(sys.executable, tmp_path, PYTHONUSERBASE=str(user))
    assert pkg.is_relative_to(user)
    assert sorted(p.stem for p in (pkg / "presets").glob("*.toml")) == NAMES


def test_editable_install_imports_the_checkout(source, tmp_path):
    "An editable install imports the source folder, whose recipes/ every other test reads (recipes.recipe_dirs)."
    venv = tmp_path / "venv"
    _venv(venv, tmp_path)
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", source],
         tmp_path)
    assert _imported_from(venv / "bin" / "python", tmp_path) == source / "fastlearn"
