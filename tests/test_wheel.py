"""The built wheel carries the data its packages read (issue 16 item 5).

A wheel is built from a copy of the checkout, installed into a fresh venv outside it, and the
installed ``training`` package, run from a folder where the checkout is not importable, loads the
Kontext SFT config and the Kontext model configs from its own files.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# Never copied into the build: compiled files and caches inside the package folders.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache", ".pytest_cache")
# The headless packages whose data files must all ship (the workflow folder belongs to the node UI).
DATA_PACKAGES = ("training", "judge")


def _data_files(root: Path) -> set[str]:
    """Every non-Python file under the headless packages of a source tree."""
    found = set()
    for package in DATA_PACKAGES:
        for path in (root / package).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts:
                found.add(path.relative_to(root).as_posix())
    return found


def _copy_sources(dest: Path) -> None:
    """What the build reads: pyproject, README, LICENSE and the folders packages.find includes (not a
    .venv or data lying in the checkout)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    for folder in sorted(p for p in REPO.iterdir() if p.is_dir()):
        if any(fnmatch.fnmatch(folder.name, pattern) for pattern in include):
            shutil.copytree(folder, dest / folder.name, ignore=IGNORED)


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    _copy_sources(src)
    out = tmp / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, cwd=tmp)
    (wheel,) = out.glob("dualref-*.whl")
    return wheel


CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import training
    from training.config import load_config

    venv = Path(sys.argv[1]).resolve()
    root = Path(training.__file__).resolve().parent
    assert venv in root.parents, f"training imported from {root}, not from the venv {venv}"

    config = load_config(root / "configs" / "kontext_sft.json")
    kontext = root / "model_configs" / "kontext"
    index = json.loads((kontext / "model_index.json").read_text())
    components = {}
    for name, value in index.items():
        if name.startswith(("_", "tokenizer")) or value[0] is None:
            continue
        config_file = "scheduler_config.json" if name == "scheduler" else "config.json"
        values = json.loads((kontext / name / config_file).read_text())
        # diffusers configs name their class; transformers configs list their architectures
        components[name] = values.get("_class_name") or values["architectures"][0]
    settings = json.loads((kontext / "dualref.json").read_text())
    print(json.dumps({"root": str(root), "rank": config.lora.rank, "layout": config.train.layout,
                      "components": components, "settings": sorted(settings)}))
""")


def test_wheel_installs_with_its_data(tmp_path):
    wheel = _build_wheel(tmp_path)

    # Every data file of the headless packages is in the wheel, at the same relative path.
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_data_files(tmp_path / "src") - names)
    assert not missing, f"package-data in pyproject.toml misses {missing}"
    assert "training/configs/kontext_sft.json" in names
    assert "training/model_configs/kontext/transformer/config.json" in names

    # Installed into a venv outside the checkout, the package reads them from its own folder.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--force-reinstall", "-q", str(wheel)], check=True, cwd=tmp_path)
    run = tmp_path / "elsewhere"
    run.mkdir()
    result = subprocess.run([str(python), "-c", CHECK, str(venv)], cwd=run, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert Path(loaded["root"]).is_relative_to(venv.resolve())
    assert loaded["rank"] == json.loads((REPO / "training/configs/kontext_sft.json").read_text())["lora"]["rank"]
    assert loaded["layout"] == "diagonal"
    assert loaded["components"] == {"scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "CLIPTextModel",
                                    "text_encoder_2": "T5EncoderModel", "transformer": "FluxTransformer2DModel",
                                    "vae": "AutoencoderKL"}
    assert loaded["settings"], "dualref.json is empty"
