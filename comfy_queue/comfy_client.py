"""One ComfyUI server over its HTTP API: upload, validate, queue, follow ``/ws``, download.

Routes (ComfyUI's ``server.py``): ``POST /upload/image``, ``GET /object_info``, ``POST /prompt``,
``GET /ws?clientId=``, ``GET /history/{prompt_id}``, ``GET /view``. Progress comes from the
websocket (``websocket-client``); where it cannot connect, the client polls ``/history`` instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests

from .comfy_errors import ComfyError, ExecutionFailed, ServerUnavailable, ValidationFailed

log = logging.getLogger(__name__)

# ws messages for one prompt; ``on_event(type, data)`` receives each of them.
EventCallback = Callable[[str, dict], None]


def normalize_server(server: str) -> str:
    """``127.0.0.1:8188`` -> ``http://127.0.0.1:8188`` (no trailing slash)."""
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    if urlsplit(server).scheme not in ("http", "https"):
        raise ValueError(f"--server must be an http(s) URL, got {server!r}")
    return server


def _image_bytes(image) -> tuple[bytes, str]:
    """(file bytes, extension) of a path, raw bytes or a PIL image (sent as PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), ".png"
    if hasattr(image, "save") and hasattr(image, "size"):  # PIL.Image.Image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    path = Path(image)
    if not path.is_file():
        raise ComfyError(f"input image not found: {path}")
    return path.read_bytes(), (path.suffix.lower() or ".png")


class ComfyClient:
    def __init__(self, server: str, timeout: float = 30.0, use_websocket: bool = True):
        self.server = normalize_server(server)
        self.timeout = timeout
        self.use_websocket = use_websocket
        self.session = requests.Session()
        self._object_info: dict | None = None

    # -- HTTP ------------------------------------------------------------------------------
    def _request(self, method: str, route: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            return self.session.request(method, self.server + route, **kwargs)
        except requests.ConnectionError as e:
            raise ServerUnavailable(self.server, _short_reason(e)) from None
        except requests.Timeout:
            raise ServerUnavailable(self.server, f"no answer to {method} {route} within {kwargs['timeout']}s") from None

    def _json(self, method: str, route: str, **kwargs):
        r = self._request(method, route, **kwargs)
        if r.status_code != 200:
            raise ComfyError(f"{method} {self.server}{route} answered HTTP {r.status_code}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError:
            raise ComfyError(f"{self.server}{route} did not answer JSON; is this a ComfyUI server?") from None

    def system_stats(self) -> dict:
        return self._json("GET", "/system_stats")

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self._json("GET", "/object_info", timeout=max(self.timeout, 60))
        return self._object_info

    def upload_image(self, image, name: str | None = None) -> str:
        """Upload to the server's input folder; returns the value for ``LoadImage.image``.

        Files are named by content hash, so a pair shared by many jobs uploads once per server and
        two different images never collide.
        """
        data, ext = _image_bytes(image)
        name = name or f"dualref-{hashlib.sha256(data).hexdigest()[:20]}{ext}"
        r = self._request(
            "POST", "/upload/image", files={"image": (name, data, "application/octet-stream")},
            data={"type": "input", "overwrite": "true"},
        )
        if r.status_code != 200:
            raise ComfyError(f"upload of {name} to {self.server} failed with HTTP {r.status_code}: {r.text[:300]}")
        info = r.json()
        sub = info.get("subfolder") or ""
        return f"{sub}/{info['name']}" if sub else info["name"]

    def queue_prompt(self, workflow: dict, client_id: str) -> str:
        payload = {"prompt": workflow, "client_id": client_id, "prompt_id": str(uuid.uuid4())}
        r = self._request("POST", "/prompt", json=payload)
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 400 or body.get("error"):
            raise ValidationFailed(self.server, body.get("error", r.text[:300]), body.get("node_errors") or {}, workflow)
        if r.status_code != 200:
            raise ComfyError(f"POST {self.server}/prompt answered HTTP {r.status_code}: {r.text[:300]}")
        if body.get("node_errors"):
            # ComfyUI queued the outputs that passed and dropped the rest; a half-run workflow is
            # not what was asked for, so take it off the queue (if it has not started) and say why.
            self._request("POST", "/queue", json={"delete": [body["prompt_id"]]})
            raise ValidationFailed(self.server, "some outputs failed validation", body["node_errors"], workflow)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._json("GET", f"/history/{prompt_id}").get(prompt_id)

    def view(self, filename: str, subfolder: str = "", folder_type: str = "output") -> bytes:
        r = self._request("GET", "/view", params={"filename": filename, "subfolder": subfolder, "type": folder_type})
        if r.status_code != 200:
            raise ComfyError(f"download of {filename} from {self.server} failed with HTTP {r.status_code}")
        return r.content

    # -- following a prompt ----------------------------------------------------------------
    def open_socket(self, client_id: str):
        """A websocket for ``client_id``, or None (then ``wait`` polls ``/history``)."""
        if not self.use_websocket:
            return None
        try:
            import websocket  # websocket-client
        except ImportError:
            log.info("websocket-client is not installed; following progress by polling /history")
            return None
        url = "ws" + self.server[len("http"):] + f"/ws?clientId={client_id}"
        try:
            return websocket.create_connection(url, timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as e:
            if isinstance(e, ConnectionRefusedError):
                raise ServerUnavailable(self.server, _short_reason(e)) from None
            log.warning("websocket to %s failed (%s); polling /history instead", url, e)
            return None

    def wait(self, prompt_id: str, ws=None, on_event: EventCallback | None = None,
             timeout: float | None = None, poll_s: float = 0.5) -> dict:
        """Block until the prompt finishes; returns its ``/history`` entry or raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if ws is not None:
            try:
                self._follow_socket(prompt_id, ws, on_event, deadline)
            finally:
                ws.close()
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # history is written once the prompt has ended
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise ExecutionFailed(self.server, prompt_id, _error_from_status(status))
                return entry
            if deadline is not None and time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} on {self.server} did not finish within {timeout}s: the server "
                                 "took it but has not finished it (frozen, or busy with other work); check the server "
                                 "or raise --timeout")
            time.sleep(poll_s)

    def _follow_socket(self, prompt_id, ws, on_event, deadline) -> None:
        import websocket

        ws.settimeout(min(self.timeout, 10.0))
        while True:
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                if deadline is not None and time.monotonic() > deadline:
                    raise ComfyError(f"prompt {prompt_id} on {self.server} did not finish within the time allowed: the "
                                     "server took it but has sent no end (frozen, or busy with other work); check the "
                                     "server or raise --timeout") from None
                if self.history(prompt_id) is not None:  # finished while we were not told
                    return
                continue
            except (OSError, websocket.WebSocketException) as e:
                log.warning("websocket to %s dropped (%s); polling /history", self.server, e)
                self.system_stats()  # raises ServerUnavailable when the server itself is gone
                return
            if not isinstance(raw, str):
                continue  # binary preview frames
            message = json.loads(raw)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if on_event is not None and "prompt_id" in data:
                on_event(kind, data)
            if kind in ("execution_error", "execution_interrupted"):
                raise ExecutionFailed(self.server, prompt_id, data)
            if kind == "execution_success" or (kind == "executing" and data.get("node") is None and "prompt_id" in data):
                return

    def download_outputs(self, entry: dict, out_dir, prefix: str = "", only_nodes: set[str] | None = None,
                         folder_types=("output",), name: str | None = None) -> list[Path]:
        """The prompt's saved images into ``out_dir``: under ComfyUI's file names (after ``prefix``), or,
        with ``name``, as ``<name>.png`` (``<name>-<k>.png`` when there are several): names that do not
        depend on the server's file counter, so a rerun writes the same files."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        images = [image for node_id, output in sorted(entry.get("outputs", {}).items(), key=lambda kv: str(kv[0]))
                  if only_nodes is None or str(node_id) in only_nodes
                  for image in output.get("images", []) if image.get("type", "output") in folder_types]
        paths = []
        for k, image in enumerate(images):
            data = self.view(image["filename"], image.get("subfolder", ""), image.get("type", "output"))
            if name is not None:
                suffix = Path(image["filename"]).suffix
                path = out_dir / (f"{name}{suffix}" if len(images) == 1 else f"{name}-{k}{suffix}")
            else:
                path = out_dir / f"{prefix}{Path(image['filename']).name}"
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(data)
            tmp.replace(path)
            paths.append(path)
        return paths

    def close(self) -> None:
        self.session.close()


def _short_reason(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _error_from_status(status: dict) -> dict | str:
    for kind, data in status.get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return data
    return "the prompt ended with an error (see the ComfyUI log)"
