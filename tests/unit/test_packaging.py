"""The package layout in pyproject.toml: every folder that installs files is a listed package.

setuptools warns ("Package would be ignored") for each data folder inside a package that is
not listed itself, and a future setuptools drops its files from the wheel.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_folder_with_installed_files_is_a_listed_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(config["packages"])
    package_dirs = {"nexus_bus": "nexus_bus", **config["package-dir"]}
    missing = []
    for package, folder in package_dirs.items():
        for sub in (ROOT / folder).rglob("*"):
            if not sub.is_dir() or sub.name == "__pycache__":
                continue
            if any(f.is_file() and f.suffix in (".py", ".json") for f in sub.iterdir()):
                name = ".".join([package, *sub.relative_to(ROOT / folder).parts])
                if name not in packages:
                    missing.append(name)
    assert missing == []


def test_the_declared_license_file_is_there() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
