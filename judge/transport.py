"""HTTP to an OpenAI-compatible chat-completions endpoint: limits, retries, Retry-After, redaction.

Retried: 408, 429, 5xx, timeouts, dropped connections, bodies that are not JSON (truncated) and
bodies without ``choices``. Not retried: other 4xx (bad request, bad key, unknown model) — they
fail at once with the server's reason. Nothing here ever makes up an answer.
"""
from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import threading
import time
import uuid

import requests

from .config import Profile
from .verdict import Unjudged

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
_TRANSIENT = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)
# Anything that looks like a credential in a server's error text (OpenAI echoes part of bad keys).
# Also any long unbroken token (keys, base64): error texts never need them.
_KEYLIKE = re.compile(
    r"\b(?:sk|key|api|bearer)[-_][-_A-Za-z0-9*.]{6,}|\bBearer\s+\S+|AIza[-_A-Za-z0-9]{10,}|[-_A-Za-z0-9+/=*]{32,}",
    re.IGNORECASE,
)


# Stand-ins for image data URLs inside a payload: the JSON is built small and the (megabytes of)
# base64 spliced in afterwards, instead of json.dumps scanning every image again on every call.
_TOKEN = f"dualref-attachment-{uuid.uuid4().hex}-"


def attachment(i: int) -> str:
    return f"{_TOKEN}{i}"


def encode_body(payload: dict, attachments=()) -> bytes:
    text = json.dumps(payload, separators=(",", ":"))
    for i, url in enumerate(attachments):  # data URLs are plain ASCII: no JSON escaping needed
        text = text.replace(attachment(i), url)
    return text.encode("ascii")


def redact(text: str, secret: str | None = None, limit: int = 300) -> str:
    text = str(text)
    if secret:
        text = text.replace(secret, "[REDACTED]")
    return _KEYLIKE.sub("[REDACTED]", text)[:limit]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (fractions tolerated) or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RateLimiter:
    """Requests-per-minute as a token bucket (burst = ``burst``), plus a shared pause for Retry-After."""

    def __init__(self, rpm: float | None, burst: int = 1):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.burst = max(1, int(burst))
        self._lock = threading.Lock()
        self._next_free = 0.0  # GCRA "theoretical arrival time"
        self._paused_until = 0.0

    def pause_until(self, deadline: float):
        with self._lock:
            self._paused_until = max(self._paused_until, deadline)

    def acquire(self):
        while True:
            with self._lock:
                now = time.monotonic()
                wait = self._paused_until - now
                if wait <= 0 and self.interval:
                    start = max(self._next_free, now)
                    wait = start - now - (self.burst - 1) * self.interval
                    if wait <= 0:
                        self._next_free = start + self.interval
                if wait <= 0:
                    return
            time.sleep(min(wait, 1.0))


class ChatTransport:
    """POSTs chat-completion payloads for one profile; one connection pool per thread."""

    def __init__(self, profile: Profile, on_attempt=None):
        self.profile = profile
        self.url = profile.base_url.rstrip("/") + "/chat/completions"
        self.limiter = RateLimiter(profile.rpm, burst=profile.concurrency)
        self._local = threading.local()
        self._on_attempt = on_attempt  # callback(kind: str) for accounting: "request", "retry"
        self._adapted = threading.Lock()
        self._token_param = profile.token_param
        self._send_temperature = profile.temperature is not None

    def __repr__(self):
        return f"ChatTransport(profile={self.profile.name!r}, url={self.url!r}, key=[REDACTED])"

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()  # honours HTTPS_PROXY / REQUESTS_CA_BUNDLE
        return session

    def _headers(self, key: str | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _delay(self, attempt: int) -> float:
        cap = min(self.profile.backoff_max_s, self.profile.backoff_base_s * (2 ** attempt))
        return cap * (0.5 + 0.5 * random.random())  # exponential with jitter, never zero

    def generation_fields(self) -> dict:
        fields = {self._token_param: self.profile.max_tokens}
        if self._send_temperature:
            fields["temperature"] = self.profile.temperature
        return fields

    def _adapt(self, body_text: str, sent: dict) -> bool:
        """Some models reject max_tokens or temperature 0 (OpenAI reasoning models): switch, once for all threads."""
        text = body_text.lower()
        with self._adapted:
            if "max_tokens" in sent and "max_tokens" in text and "max_completion_tokens" in text:
                if self._token_param == "max_tokens":
                    self._token_param = "max_completion_tokens"
                    log.warning("judge %s: server wants max_completion_tokens; switching (set token_param in the profile)", self.profile.name)
                return True
            if "temperature" in sent and "temperature" in text and ("unsupported" in text or "not support" in text):
                if self._send_temperature:
                    self._send_temperature = False
                    log.warning("judge %s: server rejects temperature %s; leaving it out (set temperature: null)", self.profile.name, self.profile.temperature)
                return True
        return False

    def post(self, build_payload, context: str = "", attachments=()) -> dict:
        """Send ``build_payload()`` (rebuilt per attempt; ``attachment(i)`` strings in it become
        ``attachments[i]``) until a JSON body with choices comes back."""
        key = self.profile.api_key()
        last = "no attempt made"
        attempt = 0
        adaptations = 0
        while True:
            self.limiter.acquire()
            if self._on_attempt:
                self._on_attempt("request" if attempt == 0 else "retry")
            delay = None
            payload = build_payload()
            try:
                response = self._session().post(
                    self.url, data=encode_body(payload, attachments), headers=self._headers(key),
                    timeout=(self.profile.connect_timeout_s, self.profile.timeout_s),
                )
            except _TRANSIENT as e:
                last = f"{type(e).__name__}: {redact(e, key, 200)}"
            except requests.RequestException as e:  # invalid URL and the like: retrying cannot help
                raise Unjudged(f"{context}request to {self.profile.name} failed: {type(e).__name__}: {redact(e, key)}") from None
            else:
                status = response.status_code
                if status in RETRY_STATUS:
                    last = f"HTTP {status}: {redact(response.text, key, 200)}"
                    delay = parse_retry_after(response.headers.get("Retry-After"))
                    if delay is not None:
                        if delay > self.profile.max_retry_after_s:
                            raise Unjudged(
                                f"{context}server asked to retry after {delay:.0f}s (> max_retry_after_s="
                                f"{self.profile.max_retry_after_s:g}); try later or raise the limit"
                            )
                        self.limiter.pause_until(time.monotonic() + delay)
                elif status >= 400:
                    text = response.text
                    if status == 400 and adaptations < 2 and self._adapt(text, payload):
                        adaptations += 1
                        continue
                    if status in (401, 403):
                        hint = f"the server rejected the key in ${self.profile.api_key_env}" if key else "the server wants a key; set api_key_env in the profile"
                        raise Unjudged(f"{context}HTTP {status} from {self.profile.name}: {hint}")
                    raise Unjudged(f"{context}HTTP {status} from {self.profile.name} (not retried): {redact(text, key)}")
                else:
                    try:
                        body = response.json()
                    except ValueError:
                        body, last = None, f"HTTP {status} with a body that is not valid JSON (truncated?)"
                    choices = body.get("choices") if isinstance(body, dict) else None
                    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                        return body
                    if body is not None:
                        last = f"HTTP {status} without choices: {redact(str(body.get('error', body)) if isinstance(body, dict) else body, key, 200)}"
            if attempt >= self.profile.max_retries:
                raise Unjudged(f"{context}gave up after {attempt + 1} attempts; last error: {last}")
            wait = delay if delay is not None else self._delay(attempt)
            log.info("judge %s: %sretry %d/%d in %.2fs after %s", self.profile.name, context, attempt + 1, self.profile.max_retries, wait, last)
            time.sleep(wait)
            attempt += 1
