import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as training/ sets it: tests never wait on the network

from comfy_host import comfy_path, import_host, load_pack, skip_reason, start_server

logging.getLogger("PIL").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def comfy_host():
    """The ComfyUI host imported in-process (skips, saying why, where it is absent)."""
    if comfy_path() is None:
        pytest.skip(skip_reason())
    return import_host()


@pytest.fixture(scope="session")
def pack(comfy_host):
    """Our pack imported as ComfyUI imports it (a package named after its folder)."""
    return load_pack()


@pytest.fixture(scope="session")
def comfy_server():
    """A headless ComfyUI (``main.py --cpu``) on 127.0.0.1 with the pack in custom_nodes."""
    if comfy_path() is None:
        pytest.skip(skip_reason())
    with start_server() as server:
        yield server
