"""HTTP to an OpenAI-compatible chat-completions endpoint: limits, retries, Retry-After, redaction.

Retried: 408, 429, 5xx, timeouts, dropped connections, bodies that are not JSON (truncated) and
bodies without ``choices``. Not retried: other 4xx — they fail at once with the server's reason.
Answers that say no request with this profile can succeed (401/403 bad key, 402 no credit, 404 or
"model does not exist", a redirect to another host) stop the transport: that request and every
later one fail with :class:`JudgeStopped` without being sent. Redirects are never followed with a
payload to another host. ``abort()`` ends waits and in-flight requests within a fraction of a
second (Ctrl-C, the Stop button). Nothing here ever makes up an answer.
"""
from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from urllib.parse import urljoin, urlsplit

import requests

from .config import Profile
from .verdict import JudgeStopped, Unjudged

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
STOP_STATUS = frozenset({401, 402, 403, 404})  # no request with this profile can succeed
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# A 400/422 that names the model as unknown (OpenAI, vLLM, SGLang, Ollama, Gemini wordings).
_UNKNOWN_MODEL = re.compile(
    r"model_not_found|\bmodels?\b.{0,120}?\b(?:not found|does not exist|doesn't exist|not exist|is unknown)"
    r"|\b(?:unknown|no such|nonexistent|non-existent) model\b",
    re.IGNORECASE | re.DOTALL,
)
_POLL_S = 0.1  # how often a waiting worker looks at the abort flag
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
    """Seconds to wait from a Retry-After header: delta-seconds (fractions tolerated) or an HTTP-date.

    ``None`` (use the normal backoff) for anything else, and for a date already past: a server
    whose clock runs behind must not turn backoff into a tight loop of retries.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    try:
        delay = when.timestamp() - (time.time() if now is None else now)
    except (OverflowError, ValueError, OSError):
        return None
    return delay if delay > 0 else None


def scrub(text: str, secrets) -> str:
    """``text`` with every occurrence of each secret (the key, configured header values) replaced."""
    text = str(text)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "[REDACTED]")
    return text


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

    def acquire(self, abort: threading.Event | None = None):
        """Wait for a slot; returns False (without taking one) once ``abort`` is set."""
        while True:
            if abort is not None and abort.is_set():
                return False
            with self._lock:
                now = time.monotonic()
                wait = self._paused_until - now
                if wait <= 0 and self.interval:
                    start = max(self._next_free, now)
                    wait = start - now - (self.burst - 1) * self.interval
                    if wait <= 0:
                        self._next_free = start + self.interval
                if wait <= 0:
                    return True
            if abort is not None:
                abort.wait(min(wait, _POLL_S))
            else:
                time.sleep(min(wait, 1.0))


class _Sessions:
    """Idle ``requests.Session`` objects, each used by one request at a time (connections are reused)."""

    def __init__(self):
        self._idle: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return requests.Session()  # honours HTTPS_PROXY / REQUESTS_CA_BUNDLE

    def put(self, session: requests.Session):
        with self._lock:
            self._idle.append(session)

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()


class ChatTransport:
    """POSTs chat-completion payloads for one profile."""

    def __init__(self, profile: Profile, on_attempt=None, role: str = "judge"):
        self.profile = profile
        self.role = role  # what the log lines call it: "judge", or "synthesis" for the dataset LLM
        self.url = profile.base_url.rstrip("/") + "/chat/completions"
        self.limiter = RateLimiter(profile.rpm, burst=profile.concurrency)
        self._sessions = _Sessions()
        self._on_attempt = on_attempt  # callback(kind: str) for accounting: "request", "retry"
        self._adapted = threading.Lock()
        self._token_param = profile.token_param
        self._send_temperature = profile.temperature is not None
        self._abort = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped: JudgeStopped | None = None

    def __repr__(self):
        return f"ChatTransport(profile={self.profile.name!r}, url={self.url!r}, key=[REDACTED])"

    # --- stopping -----------------------------------------------------------------------------

    @property
    def stopped(self) -> JudgeStopped | None:
        """Why this profile cannot be used (the first refusing answer), or None."""
        return self._stopped

    @property
    def aborted(self) -> bool:
        return self._abort.is_set()

    def abort(self) -> None:
        """End every wait and in-flight request now; later requests fail without being sent."""
        self._abort.set()

    def _stop(self, reason: str) -> JudgeStopped:
        with self._stop_lock:
            if self._stopped is None:
                self._stopped = JudgeStopped(reason)
                log.error("%s %s: stopped, no further requests: %s", self.role, self.profile.name, reason)
            return self._stopped

    def _check_usable(self, context: str):
        if self._stopped is not None:
            raise self._stopped.for_sample(None)  # a copy: threads raise it at the same time
        if self._abort.is_set():
            raise Unjudged(f"{context}interrupted before it was judged")

    # --- secrets ------------------------------------------------------------------------------

    def _headers(self, key: str | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def secrets(self) -> list[str]:
        """What must never be stored or shown: the key and every header value that carries it."""
        try:
            key = self.profile.api_key()
        except ValueError:
            return []
        values = [v for k, v in self._headers(key).items() if k.lower() != "content-type"]
        return [key] + values if key else values

    def scrub(self, text: str) -> str:
        """``text`` without the profile's key or header values (a server may echo them in an answer)."""
        return scrub(text, self.secrets())

    # --- sending ------------------------------------------------------------------------------

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
                    log.warning("%s %s: server wants max_completion_tokens; switching (set token_param in the profile)", self.role, self.profile.name)
                return True
            if "temperature" in sent and "temperature" in text and ("unsupported" in text or "not support" in text):
                if self._send_temperature:
                    self._send_temperature = False
                    log.warning("%s %s: server rejects temperature %s; leaving it out (set temperature: null)", self.role, self.profile.name, self.profile.temperature)
                return True
        return False

    def _call(self, url: str, data: bytes, headers: dict, context: str) -> requests.Response:
        """One POST, run on its own daemon thread so that ``abort()`` can walk away from it at once
        (a blocked socket read cannot be interrupted; the abandoned thread ends with its timeout)."""
        session = self._sessions.get()
        box: dict = {}
        lock = threading.Lock()
        done = threading.Event()

        def run():
            try:
                box["response"] = session.post(url, data=data, headers=headers, allow_redirects=False,
                                               timeout=(self.profile.connect_timeout_s, self.profile.timeout_s))
            except BaseException as e:  # noqa: BLE001 - handed back to the waiting worker
                box["error"] = e
            with lock:
                done.set()
                if box.get("abandoned"):
                    session.close()

        threading.Thread(target=run, daemon=True, name=f"judge-{self.profile.name}-http").start()
        while not done.wait(_POLL_S):
            if self._abort.is_set():
                with lock:
                    if not done.is_set():
                        box["abandoned"] = True
                        raise Unjudged(f"{context}interrupted while the request was in flight")
        self._sessions.put(session)
        if "error" in box:
            raise box["error"]
        return box["response"]

    def _follow(self, response: requests.Response, data: bytes, headers: dict, key, context: str) -> requests.Response:
        """Follow a 307/308 to the same host (https never downgraded); anything else stops the judge."""
        origin = urlsplit(self.url)
        for _ in range(3):
            if response.status_code not in REDIRECTS:
                return response
            location = response.headers.get("Location")
            target = urlsplit(urljoin(response.url or self.url, location or ""))
            shown = f"{target.scheme}://{target.netloc.rpartition('@')[2]}{target.path}"  # never its query
            same_host = (target.hostname or "").lower() == (origin.hostname or "").lower()
            if not location or not same_host or (origin.scheme == "https" and target.scheme != "https"):
                raise self._stop(
                    f"{context}HTTP {response.status_code} from {self.profile.name}: the server redirects to "
                    f"{redact(shown, key)}, another host; requests (and their images) are not sent there. If you "
                    "trust it, set base_url to it in the profile")
            if response.status_code not in (307, 308):  # would turn the POST into a GET without the payload
                raise self._stop(
                    f"{context}HTTP {response.status_code} from {self.profile.name}: the server moved to "
                    f"{redact(shown, key)}; set base_url to it in the profile")
            response = self._call(target.geturl(), data, headers, context)
        raise self._stop(f"{context}{self.profile.name}: too many redirects; set base_url to the final address")

    def _refusal(self, status: int, text: str, key, context: str) -> JudgeStopped | None:
        """A JudgeStopped when this answer means no request with the profile can succeed."""
        reason = redact(_error_message(text), key)
        if status in (401, 403):
            hint = (f"the server rejected the key in ${self.profile.api_key_env}" if key
                    else "the server wants a key; set api_key_env in the profile")
            return self._stop(f"{context}HTTP {status} from {self.profile.name}: {hint} ({reason})")
        if status == 402:
            return self._stop(f"{context}HTTP 402 from {self.profile.name}: payment required ({reason})")
        if status == 404 or (status in (400, 422) and _UNKNOWN_MODEL.search(text)):
            return self._stop(f"{context}HTTP {status} from {self.profile.name}: {reason} (check model "
                              f"{self.profile.model!r} and base_url in the profile)")
        return None

    def post(self, build_payload, context: str = "", attachments=()) -> dict:
        """Send ``build_payload()`` (rebuilt per attempt; ``attachment(i)`` strings in it become
        ``attachments[i]``) until a JSON body with choices comes back."""
        key = self.profile.api_key()
        last = "no attempt made"
        attempt = 0
        adaptations = 0
        while True:
            self._check_usable(context)
            if not self.limiter.acquire(self._abort):
                self._check_usable(context)
            if self._on_attempt:
                self._on_attempt("request" if attempt == 0 else "retry")
            delay = None
            payload = build_payload()
            try:
                data, headers = encode_body(payload, attachments), self._headers(key)
                response = self._call(self.url, data, headers, context)
                response = self._follow(response, data, headers, key, context)
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
                    refusal = self._refusal(status, text, key, context)
                    if refusal is not None:
                        raise refusal
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
            log.info("%s %s: %sretry %d/%d in %.2fs after %s", self.role, self.profile.name, context, attempt + 1, self.profile.max_retries, wait, last)
            if self._abort.wait(wait):
                self._check_usable(context)
            attempt += 1

    def close(self) -> None:
        self._sessions.close()


def _error_message(text: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the text itself."""
    try:
        body = json.loads(text)
    except ValueError:
        return str(text)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return str(text)
