"""Comfy registry metadata (issue 22 item 4): the icon exists where ``[tool.comfy] Icon`` points,
classifiers are the ones the registry reads, and requirements.txt mirrors the dependencies.

``comfy node validate`` and the ``comfy node pack`` archive (with .comfyignore) run in .ci/run, with
comfy-cli installed from PyPI into a venv of their own.
"""
from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What comfy-cli's config parser accepts (any other value drops the whole family with a warning).
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}


def test_icon_exists_where_the_registry_looks():
    url = PYPROJECT["tool"]["comfy"]["Icon"]
    repository = PYPROJECT["project"]["urls"]["Repository"]
    match = re.fullmatch(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/main/(.+)", url)
    assert match, f"Icon {url} is not a raw GitHub URL on main"
    assert repository.endswith("/" + match[1]), f"Icon points into {match[1]}, the repository is {repository}"
    path = REPO / match[2]
    assert path.is_file(), f"Icon points at {match[2]}, which is not in the repository"
    with Image.open(path) as icon:
        assert icon.format == "PNG"
        assert icon.width == icon.height <= 400, f"the registry wants a square icon <= 400 px, got {icon.size}"
        colours = icon.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 8, "the icon is (nearly) blank"


def test_classifiers_are_the_ones_the_registry_reads():
    classifiers = PYPROJECT["project"]["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment :: ")]
    assert systems and all(s.startswith(OS_PREFIXES) for s in systems), systems
    assert accelerators and set(accelerators) <= ACCELERATORS, accelerators


def test_requirements_txt_mirrors_the_dependencies():
    """ComfyUI-Manager installs requirements.txt, pip and the registry read pyproject: the same list."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line] == PYPROJECT["project"]["dependencies"]
