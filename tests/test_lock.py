"""The dependency locks requirements*.txt are what a fresh machine installs.

- The environment the suite runs in holds exactly the locked versions (``make test``
  installs them with hashes checked).
- A fresh virtual environment built from the runtime lock has every locked version,
  nothing missing (``pip check``), and runs ``bastion``; the wheel built from the tree
  still declares pyproject.toml's ranges, not the pins.
- ``tools/lock.py check`` stops with one sentence when pyproject.toml and the locks disagree.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)(?:\s*;\s*(?P<marker>[^\\]+))?"
)


def locked(lock: Path) -> dict[str, str]:
    """The pinned versions in a lock that apply to this interpreter and platform."""
    pins: dict[str, str] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match is None:
            continue
        marker = match["marker"]
        if marker and not Marker(marker.strip()).evaluate():
            continue
        pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def test_every_lock_pins_with_hashes() -> None:
    for name in ("requirements-build.txt", "requirements.txt", "requirements-dev.txt"):
        text = (REPO / name).read_text(encoding="utf-8")
        entries = [line for line in text.splitlines() if PIN.match(line)]
        assert entries, name
        assert text.count("--hash=sha256:") >= len(entries), name


def test_the_runtime_lock_is_part_of_the_dev_lock() -> None:
    runtime = locked(REPO / "requirements.txt")
    dev = locked(REPO / "requirements-dev.txt")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_this_environment_holds_exactly_the_locked_versions() -> None:
    wanted = locked(REPO / "requirements-dev.txt")
    installed = {name: metadata.version(name) for name in wanted if _installed(name) is not None}
    missing = sorted(set(wanted) - set(installed))
    assert not missing, f"locked but not installed: {missing}"
    different = {n: (installed[n], v) for n, v in wanted.items() if installed[n] != v}
    assert not different, f"installed version differs from the lock: {different}"


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _copy_for_check(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "tools").mkdir(parents=True)
    shutil.copy(REPO / "tools" / "lock.py", root / "tools" / "lock.py")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-build.txt"):
        shutil.copy(REPO / name, root / name)
    return root


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "tools" / "lock.py"), "check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_lock_check_passes_on_the_tree_as_committed(tmp_path: Path) -> None:
    result = _check(_copy_for_check(tmp_path))
    assert result.returncode == 0, result.stdout


def test_lock_check_names_the_fix_when_pyproject_changed(tmp_path: Path) -> None:
    root = _copy_for_check(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    pyproject.write_text(text.replace('"rich>=13"', '"rich>=14"'), encoding="utf-8")
    result = _check(root)
    assert result.returncode == 1
    assert "pyproject.toml and requirements.txt disagree" in result.stdout
    assert "make lock" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1


def test_lock_check_ignores_changes_that_install_nothing_new(tmp_path: Path) -> None:
    root = _copy_for_check(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text(encoding="utf-8") + "\n# a comment\n")
    assert _check(root).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_fresh_environment_installs_exactly_the_runtime_lock(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")

    def pip(*args: str) -> str:
        done = subprocess.run(
            [python, "-m", "pip", "--disable-pip-version-check", *args],
            capture_output=True,
            text=True,
            timeout=480,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    pip(
        "install",
        "--quiet",
        "--require-hashes",
        "--no-deps",
        "-r",
        str(REPO / "requirements-build.txt"),
    )
    pip(
        "install",
        "--quiet",
        "--require-hashes",
        "--no-deps",
        "-r",
        str(REPO / "requirements.txt"),
    )
    wheels = tmp_path / "wheels"
    source = tmp_path / "source"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "*cache*", "var", "tests")
    )
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source))
    (wheel,) = wheels.glob("bastion-*.whl")
    pip("install", "--quiet", "--no-deps", str(wheel))
    pip("check")

    listed = json.loads(pip("list", "--format=json"))
    installed: dict[str, str] = {canonicalize_name(p["name"]): p["version"] for p in listed}
    wanted = locked(REPO / "requirements.txt")
    assert {name: installed.get(name) for name in wanted} == wanted

    # The wheel declares pyproject.toml's ranges, so `pip install bastion` resolves freely.
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith("METADATA"))
        declared = [
            Requirement(line.split(":", 1)[1].strip())
            for line in archive.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
    assert declared
    assert not [r for r in declared if any(s.operator == "==" for s in r.specifier)]

    done = subprocess.run(
        [str(venv / "bin" / "bastion"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "register" in done.stdout
