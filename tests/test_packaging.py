"""The installed distribution holds every module of the source tree.

setup.sh installs the project editable, where a package missing from pyproject's list still
imports from the checkout; `pip install .` (a wheel) would silently leave it out.
"""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: ROOT / path for name, path in config.get("package-dir", {}).items()}
    found = set()
    for name in ("codecsight", "codecsight_client"):
        top = roots.get(name, ROOT / name)
        for init in top.rglob("__init__.py"):
            parts = init.parent.relative_to(top).parts
            found.add(".".join((name,) + parts))
    assert "codecsight.families" in found      # the walk sees nested packages
    assert found - listed == set(), f"packages missing from pyproject.toml: {found - listed}"
    assert listed - found == set(), f"listed packages with no __init__.py: {listed - found}"
