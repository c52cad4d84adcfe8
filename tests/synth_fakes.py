"""A loopback OpenAI-compatible server and colour-coded pools for tests/test_synth.py.

Pool images are solid colours, so the server (and a test judge) can tell which pool image they
were sent and answer by rule: valid plans, invalid ones, faults (429, 500), targets whose colour is
the mean of the pair's.
"""
from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

KEY_ENV = "DUALREF_SYNTH_TEST_KEY"
SECRET = "sk-synth-test-0123456789abcdef"

COLORS = {  # pool image name -> its colour
    "s_ok": (200, 40, 40), "s_flaky": (40, 200, 40), "a_ok": (40, 40, 200), "a_bad": (200, 200, 40),
    "st_ok": (40, 200, 200), "st_ugly": (200, 40, 200), "p1": (120, 10, 10), "p2": (10, 120, 10),
    "p3": (10, 10, 120), "c1": (90, 90, 10), "c2": (10, 90, 90),
}
THEME_OF = {"s_": "scenes", "a_": "animals", "st": "styles", "p": "people", "c": "clothing"}
LICENCES = {"scenes": "CC0-1.0", "animals": "CC-BY-4.0", "styles": "public domain", "people": "proprietary",
            "clothing": "CC-BY-SA-4.0"}  # each pool's, as its config entry gives it


def pool_entry(theme: str, folder: str | None = None) -> dict:
    """A pool's config entry: its folder (relative to the config) with a source and licence of its own."""
    return {"path": folder or f"pools/{theme}", "source": f"https://pools.test/{theme}", "licence": LICENCES[theme]}


def color_name(image: Image.Image) -> str:
    rgb = image.convert("RGB").getpixel((0, 0))
    return next(n for n, c in COLORS.items() if c == tuple(rgb))


def mean_color(a: str, b: str) -> tuple:
    return tuple((x + y) // 2 for x, y in zip(COLORS[a], COLORS[b]))


def valid_plan(task, names, instruction=None):
    return {
        "task": task,
        "instruction": instruction or f"Combine the {names[0]} of image 1 with the {names[1]} of image 2",
        "image1": {"role": "scene", "content": names[0]},
        "image2": {"role": "subject", "content": names[1], "take": [names[1]]},
        "placement": {"region": "center", "scale": "medium"},
        "constraints": {"preserve_identity": [names[1]], "cross_image_consistency": ["same lighting"],
                        "keep_unchanged": [names[0]]},
        "target_description": f"{names[0]} together with {names[1]}",
    }


def png_b64(color, size=(24, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class FakeAPI:
    """Chat completions + image edits/generations, scripted by ``plan_rule`` and fault lists."""

    def __init__(self, plan_rule):
        self.plan_rule = plan_rule
        self.chat_faults: list[int] = []  # statuses to answer next, in order
        self.image_faults: list[int] = []
        self.image_delay_s = 0.0  # seconds each image takes (requests overlap at concurrency > 1)
        self.chat_log: list[dict] = []  # one entry per answered (200) chat request
        self.image_log: list[dict] = []
        self.faults_served: list[tuple[str, int]] = []
        self.started: list[tuple[str, float]] = []  # (chat|image, time.monotonic()) as each request arrives
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {SECRET}":
                    return self._reply(401, {"error": {"message": "bad key"}})
                kind = "chat" if self.path.endswith("/chat/completions") else "image"
                with api.lock:
                    api.started.append((kind, time.monotonic()))
                    faults = api.chat_faults if kind == "chat" else api.image_faults
                    fault = faults.pop(0) if faults else None
                    if fault:
                        api.faults_served.append((kind, fault))
                if fault:
                    return self._reply(fault, {"error": {"message": "scripted fault"}}, [("Retry-After", "0")])
                if kind == "chat":
                    return self._reply(200, api.chat(json.loads(body)))
                return self._reply(200, api.image(self.path, self.headers.get("Content-Type", ""), body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def chat(self, payload):
        user = payload["messages"][1]["content"]
        task = re.search(r"Task: (\w+)\.", user[0]["text"]).group(1)
        names = []
        for part in user:
            if part["type"] == "image_url":
                url = part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                names.append(color_name(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))))
        followups = [m["content"] for m in payload["messages"][2:] if m["role"] == "user"]
        entry = {"task": task, "names": tuple(names), "followups": followups, "response_format": payload.get("response_format")}
        reply = self.plan_rule(task, tuple(names), followups)
        with self.lock:
            self.chat_log.append(entry)
        content = reply if isinstance(reply, str) else json.dumps(reply)
        return {"choices": [{"message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 200}}

    def image(self, path, content_type, body):
        time.sleep(self.image_delay_s)
        if path.endswith("/images/edits"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + body)
            fields, names = {}, []
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                data = part.get_payload(decode=True)
                if name == "image[]":
                    names.append(color_name(Image.open(io.BytesIO(data))))
                else:
                    fields[name] = data.decode()
            with self.lock:
                self.image_log.append({"names": tuple(names), **fields})
            return {"data": [{"b64_json": png_b64(mean_color(*names))}]}
        fields = json.loads(body)
        with self.lock:
            self.image_log.append(fields)
        return {"data": [{"b64_json": png_b64((len(fields["prompt"]) % 256, 7, 7))}]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def make_pools(root: Path, names) -> dict:
    pools = {}
    for name in names:
        theme = next(t for prefix, t in sorted(THEME_OF.items(), key=lambda kv: -len(kv[0])) if name.startswith(prefix))
        folder = root / "pools" / theme
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), COLORS[name]).save(folder / f"{name}.png")
        pools[theme] = pool_entry(theme)
    return pools
