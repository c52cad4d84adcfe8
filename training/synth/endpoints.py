"""HTTP for synthesis: the request/cost budget, chat completions and the image endpoint.

Chat completions go through the judge's :class:`judge.transport.ChatTransport` (same retries on
408/429/5xx, Retry-After, redaction, key from the environment). The image endpoint reuses its
helpers for the same policy on a different route and body.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import random
import threading
import time

import requests
from PIL import Image

from judge.accounting import usage_of
from judge.transport import RETRY_STATUS, ChatTransport, RateLimiter, parse_retry_after, redact
from judge.verdict import Unjudged

from .config import ImageConfig, LLMConfig

log = logging.getLogger(__name__)
_TRANSIENT = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


class BudgetExhausted(RuntimeError):
    """The run's request or cost budget is spent; the run stops cleanly, keeping what is done."""


class EndpointError(RuntimeError):
    """An endpoint failed after its retries (down, rate-limited, bad key); the pair is retried next run."""


class Budget:
    """Requests (every HTTP attempt, retries included) and estimated USD for one run; thread-safe.

    Counted here: the LLM's and the image endpoint's attempts. Clients that count for themselves
    (the judge's accounting) report their totals through :meth:`set_external`.
    """

    def __init__(self, max_requests: int | None = None, max_cost_usd: float | None = None):
        self.max_requests, self.max_cost_usd = max_requests, max_cost_usd
        self._requests = 0
        self._cost_usd = 0.0
        self._external: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    @property
    def requests(self) -> int:
        return self._requests + sum(r for r, _ in self._external.values())

    @property
    def cost_usd(self) -> float:
        return self._cost_usd + sum(c for _, c in self._external.values())

    def reason(self, more: int = 1) -> str | None:
        """Why ``more`` requests may not be sent now, or None."""
        if self.max_requests is not None and self.requests + more > self.max_requests:
            return f"request budget reached ({self.requests} of {self.max_requests} requests)"
        if self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd:
            return f"cost budget reached (${self.cost_usd:.4f} of ${self.max_cost_usd:g})"
        return None

    def take_request(self, kind: str = "request") -> None:
        """Called before every attempt; raises instead of sending one past the budget."""
        with self._lock:
            reason = self.reason(more=1)
            if reason:
                raise BudgetExhausted(reason)
            self._requests += 1

    def require(self, requests: int = 1) -> None:
        """Raise unless ``requests`` more fit (for calls counted after the fact, like the judge's)."""
        with self._lock:
            reason = self.reason(more=requests)
            if reason:
                raise BudgetExhausted(reason)

    def add(self, requests: int = 0, cost_usd: float = 0.0) -> None:
        with self._lock:
            self._requests += int(requests)
            self._cost_usd += float(cost_usd)

    def set_external(self, name: str, requests: int, cost_usd: float) -> None:
        with self._lock:
            self._external[name] = (int(requests), float(cost_usd))

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "cost_usd": round(self.cost_usd, 6),
                    "max_requests": self.max_requests, "max_cost_usd": self.max_cost_usd}


class ChatClient:
    """JSON-answering chat completions with images, counted against the budget."""

    def __init__(self, config: LLMConfig, budget: Budget):
        self.config, self.profile, self.budget = config, config.profile, budget
        self.transport = ChatTransport(self.profile, on_attempt=budget.take_request)

    def complete(self, messages: list[dict], schema: dict | None = None) -> str:
        """The reply text of one completion (transport retries inside); raises EndpointError."""

        def payload():
            body = {"model": self.profile.model, "messages": messages, **self.transport.generation_fields()}
            if self.config.response_format == "json_object":
                body["response_format"] = {"type": "json_object"}
            elif self.config.response_format == "json_schema" and schema is not None:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "edit_plan", "schema": schema, "strict": False}}
            body.update(self.profile.extra_body)
            return body

        try:
            body = self.transport.post(payload, context="synthesis plan: ")
        except Unjudged as e:  # the judge transport's name for "gave up"; here it is an endpoint failure
            raise EndpointError(f"LLM endpoint {self.profile.base_url}: {e.reason}") from None
        prompt_tokens, completion_tokens = usage_of(body)
        self.budget.add(cost_usd=(prompt_tokens * self.profile.price_input_per_mtok
                                  + completion_tokens * self.profile.price_output_per_mtok) / 1e6)
        message = body["choices"][0].get("message") or {}
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ImageClient:
    """The OpenAI-style image endpoint (``edits`` or ``generations``, see training/synth/config.py)."""

    def __init__(self, config: ImageConfig, budget: Budget):
        self.config, self.profile, self.budget = config, config.profile, budget
        self.url = self.profile.base_url.rstrip("/") + f"/images/{config.endpoint}"
        self.limiter = RateLimiter(self.profile.rpm)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
            self._local.session.trust_env = False
        return self._local.session

    def _send(self, prompt: str, references, key: str | None) -> requests.Response:
        c = self.config
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        fields = {"model": self.profile.model, "prompt": prompt, "n": 1}
        if c.size:
            fields["size"] = c.size
        if c.response_format:
            fields["response_format"] = c.response_format
        fields.update(c.extra_fields)
        timeout = (self.profile.connect_timeout_s, self.profile.timeout_s)
        if c.endpoint == "generations":
            return self._session().post(self.url, json=fields, headers=headers, timeout=timeout)
        images = references if c.image_field.endswith("[]") else references[:1]
        files = [(c.image_field, (f"image{i + 1}.png", _png_bytes(im), "image/png")) for i, im in enumerate(images)]
        data = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in fields.items()}
        return self._session().post(self.url, data=data, files=files, headers=headers, timeout=timeout)

    def generate(self, prompt: str, references) -> Image.Image:
        """One image for ``prompt`` (and the references, for edits); raises EndpointError."""
        try:
            key = self.profile.api_key()
        except ValueError as e:
            raise EndpointError(str(e)) from None
        last, attempt = "no attempt made", 0
        while True:
            self.limiter.acquire()
            self.budget.take_request()
            delay = None
            try:
                response = self._send(prompt, references, key)
            except _TRANSIENT as e:
                last = f"{type(e).__name__}: {redact(e, key, 200)}"
            except requests.RequestException as e:
                raise EndpointError(f"image endpoint {self.url}: {type(e).__name__}: {redact(e, key)}") from None
            else:
                if response.status_code in RETRY_STATUS:
                    last = f"HTTP {response.status_code}: {redact(response.text, key, 200)}"
                    delay = parse_retry_after(response.headers.get("Retry-After"))
                    if delay is not None and delay > self.profile.max_retry_after_s:
                        raise EndpointError(f"image endpoint asked to retry after {delay:.0f}s; try later")
                elif response.status_code >= 400:
                    hint = f" (check the key in ${self.profile.api_key_env})" if response.status_code in (401, 403) else ""
                    raise EndpointError(
                        f"image endpoint {self.url}: HTTP {response.status_code}{hint}: {redact(response.text, key)}"
                    )
                else:
                    image, last = self._decode(response, key)
                    if image is not None:
                        self.budget.add(cost_usd=self.config.price_per_image)
                        return image
            if attempt >= self.profile.max_retries:
                raise EndpointError(f"image endpoint {self.url}: gave up after {attempt + 1} attempts; last error: {last}")
            if delay is None:
                cap = min(self.profile.backoff_max_s, self.profile.backoff_base_s * 2 ** attempt)
                delay = cap * (0.5 + 0.5 * random.random())
            log.info("image endpoint: retry %d/%d in %.2fs after %s", attempt + 1, self.profile.max_retries, delay, last)
            time.sleep(delay)
            attempt += 1

    def _decode(self, response: requests.Response, key: str | None):
        try:
            item = response.json()["data"][0]
            if item.get("b64_json"):
                raw = base64.b64decode(item["b64_json"])
            elif item.get("url"):
                fetched = self._session().get(item["url"], timeout=(self.profile.connect_timeout_s, self.profile.timeout_s))
                fetched.raise_for_status()
                raw = fetched.content
            else:
                return None, "an answer without b64_json or url"
            with Image.open(io.BytesIO(raw)) as im:
                return im.convert("RGB"), ""
        except (ValueError, KeyError, IndexError, TypeError, OSError, requests.RequestException) as e:
            return None, f"an answer that is not an image ({type(e).__name__}: {redact(e, key, 200)})"
