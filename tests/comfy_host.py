"""Finding and starting the real ComfyUI host for tests.

The host is found through ``COMFYUI_PATH`` or ``~/comfy/ComfyUI``; tests that need it skip,
saying why, where it is absent. It is never copied into this repository.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-DualRef"


def comfy_path() -> Path | None:
    p = Path(os.environ.get("COMFYUI_PATH", Path.home() / "comfy" / "ComfyUI")).expanduser()
    return p if (p / "main.py").is_file() else None


def skip_reason() -> str:
    where = os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI"))
    return f"no ComfyUI host at {where} (set COMFYUI_PATH to a ComfyUI checkout to run host tests)"


def import_host() -> Path:
    """Put ComfyUI first on sys.path so ``import nodes``/``comfy`` resolve to the host."""
    path = comfy_path()
    assert path is not None, skip_reason()
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    mod = sys.modules.get("nodes")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(str(path)):
        del sys.modules["nodes"]  # never our nodes/ package
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args
        import torch

        # ComfyUI's defaults assume a GPU; without one behave like `main.py --cpu`.
        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401

    return path


def load_pack():
    """Import the pack the way ComfyUI does: as a package named after its folder."""
    import_host()
    name = PACK_NAME.replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostServer:
    """``python main.py --cpu`` on 127.0.0.1 with the pack linked into a private base directory."""

    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path):
        self.base, self.port, self.proc, self.log = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def get_json(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, route: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(
            self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def start_server(extra_args=(), base: Path | None = None, env: dict | None = None, timeout: float = 240):
    """Start the host; ``base`` gets models/, custom_nodes/ (with the pack), input/, output/."""
    path = comfy_path()
    assert path is not None, skip_reason()
    with tempfile.TemporaryDirectory(prefix="dualref-host-") as tmp:
        base = Path(base or tmp)
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for sub in ("input", "output", "temp", "user", "models"):
            (base / sub).mkdir(exist_ok=True)
        example = path / "input" / "example.png"  # what a fresh ComfyUI install has in input/
        if example.is_file() and not (base / "input" / example.name).exists():
            shutil.copyfile(example, base / "input" / example.name)
        port = free_port()
        log = Path(tmp) / "host.log"
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--base-directory", str(base), "--disable-auto-launch", *extra_args,
        ]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=path, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
        server = HostServer(base, port, proc, log)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{server.log_text()[-4000:]}")
                try:
                    server.get_json("/system_stats", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"ComfyUI did not answer in {timeout}s:\n{server.log_text()[-4000:]}")
                    time.sleep(0.5)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
