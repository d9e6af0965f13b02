"""pyproject's package list matches the repository's folders (what a wheel ships)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_config_folder_is_a_listed_package():
    """A configs/ folder missing from ``packages`` makes setuptools warn (and, in later versions, drop it)."""
    tool = _setuptools()
    folders = {
        "loopsim.configs" + "".join("." + part for part in d.relative_to(ROOT / "configs").parts)
        for d in [ROOT / "configs", *(ROOT / "configs").rglob("*")]
        if d.is_dir() and "__pycache__" not in d.parts
    }
    listed = {p for p in tool["packages"] if p.startswith("loopsim.configs")}
    assert folders == listed
    assert tool["package-data"]["loopsim.configs"] == ["**/*.yaml"]


def test_every_listed_package_exists():
    tool = _setuptools()
    dirs = tool["package-dir"]
    for package in tool["packages"]:
        top = max((k for k in dirs if package == k or package.startswith(k + ".")), key=len)
        rest = package[len(top) + 1:].split(".") if package != top else []
        path = ROOT.joinpath(dirs[top], *rest)
        assert path.is_dir(), (package, path)
