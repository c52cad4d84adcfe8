"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

It speaks real HTTP/1.1 (keep-alive, Content-Length) and answers each call with whatever the
script returns: an answer (with or without log-probs), an error status with headers such as
Retry-After, a slow reply, a truncated body, a dropped connection, an empty ``choices``.

    def script(call):                  # call.question, call.instruction, call.images(), call.auth
        return Reply.answer("Yes, because the dog is in the park.")
    with ScriptedChatServer(script) as server:
        ... profile base_url = server.base_url ...
"""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import prompts

log = logging.getLogger(__name__)

_INSTRUCTION = re.compile(r'The instruction was: "(.*)"\n', re.DOTALL)


@dataclass
class Reply:
    kind: str = "answer"  # answer | status | raw | drop | short
    status: int = 200
    body: object = None
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0

    @classmethod
    def answer(cls, text: str, top_logprobs: list | None = None, usage=(100, 5), delay_s: float = 0.0, **kw):
        """A normal completion. ``top_logprobs``: [(token, logprob), ...] at the first answer token."""
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if top_logprobs is not None:
            first = {"token": top_logprobs[0][0], "logprob": top_logprobs[0][1],
                     "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top_logprobs]}
            choice["logprobs"] = {"content": [first]}
        body = {"id": "chatcmpl-loopback", "object": "chat.completion", "model": kw.get("model", "loopback"),
                "choices": [choice], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                               "total_tokens": usage[0] + usage[1]}}
        return cls("answer", 200, body, delay_s=delay_s)

    @classmethod
    def error(cls, status: int, message: str = "error", headers: dict | None = None, delay_s: float = 0.0):
        return cls("status", status, {"error": {"message": message}}, dict(headers or {}), delay_s)

    @classmethod
    def raw(cls, data: bytes, status: int = 200, delay_s: float = 0.0):
        """Send these bytes as the whole body (e.g. truncated JSON with a matching length)."""
        return cls("raw", status, data, delay_s=delay_s)

    @classmethod
    def short(cls, data: bytes, declared: int):
        """Announce ``declared`` bytes, send fewer, then close: a connection dropped mid-body."""
        return cls("short", 200, (data, declared))

    @classmethod
    def drop(cls, delay_s: float = 0.0):
        """Close the connection without any response."""
        return cls("drop", delay_s=delay_s)


@dataclass
class ChatCall:
    index: int
    payload: dict
    auth: str | None  # the Authorization header as received (kept in memory only)
    path: str = ""  # the request path, e.g. /v1/chat/completions

    @property
    def messages(self) -> list:
        return self.payload.get("messages") or []

    @property
    def user_text(self) -> str:
        parts = []
        for message in self.messages:
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    parts.append(content)
                else:
                    parts += [p.get("text", "") for p in content or [] if p.get("type") == "text"]
        return "\n".join(parts)

    @property
    def question(self) -> str | None:
        """Which of prompts.QUESTIONS / SCORE_QUESTIONS this call asks (from its wording)."""
        text = self.user_text
        for templates in (prompts.QUESTIONS, prompts.SCORE_QUESTIONS, prompts.question_templates(3)):
            for name, template in templates.items():
                if template.split("\n")[-1] in text:  # each template's last line is unique
                    return name
        return None

    @property
    def instruction(self) -> str | None:
        match = _INSTRUCTION.search(self.user_text)
        return match.group(1) if match else None

    @property
    def is_reask(self) -> bool:
        return any(m.get("role") == "assistant" for m in self.messages)

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.payload.get("logprobs"))

    def images(self):
        """The images of the first user message, decoded, in the order sent."""
        from PIL import Image

        out = []
        for part in self.messages[1]["content"] if len(self.messages) > 1 else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part["image_url"]["url"]
                out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: Nagle + delayed ACK would add 40 ms

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_POST(self):
        server: ScriptedChatServer = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
        except ValueError:
            return self._send(400, json.dumps({"error": {"message": "body is not JSON"}}).encode())
        call = server._record(payload, self.headers.get("Authorization"), self.path)
        try:
            reply = server.script(call) or Reply.error(500, "script returned nothing")
        except Exception as e:  # a broken script shows up as a 500, and in the server's errors
            server.errors.append(repr(e))
            reply = Reply.error(500, f"script error: {e!r}")
        delay = reply.delay_s + server.latency_s
        if delay:
            time.sleep(delay)
        try:
            self._reply(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
            self.close_connection = True

    def _reply(self, reply: Reply):
        if reply.kind == "drop":
            self.close_connection = True
            return
        if reply.kind == "short":
            data, declared = reply.body
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        data = reply.body if reply.kind == "raw" else json.dumps(reply.body).encode()
        self._send(reply.status, data, reply.headers)

    def _send(self, status: int, data: bytes, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once in the benchmark

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that timed out and hung up: expected in fault tests
        super().handle_error(request, client_address)


class ScriptedChatServer:
    def __init__(self, script=None, latency_s: float = 0.0, keep_calls: bool = True):
        self.script = script or (lambda call: Reply.answer("Yes."))
        self.latency_s = latency_s
        self.keep_calls = keep_calls
        self.calls: list[ChatCall] = []
        self.count = 0
        self.errors: list[str] = []
        self.auth_seen: set[str] = set()
        self.paths_seen: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _record(self, payload: dict, auth: str | None, path: str) -> ChatCall:
        with self._lock:
            call = ChatCall(self.count, payload, auth, path)
            self.count += 1
            if self.keep_calls:
                self.calls.append(call)
            if auth:
                self.auth_seen.add(auth)
            self.paths_seen.add(path)
        return call

    def start(self) -> "ScriptedChatServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
