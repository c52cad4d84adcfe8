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
from pathlib import Path

import requests
from PIL import Image

from judge.accounting import usage_of
from judge.transport import RETRY_STATUS, ChatTransport, RateLimiter, parse_retry_after, redact
from judge.verdict import Unjudged

from ..files import write_json
from .config import ImageConfig, LLMConfig

log = logging.getLogger(__name__)
_TRANSIENT = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


class BudgetExhausted(RuntimeError):
    """The run's request or cost budget is spent; the run stops cleanly, keeping what is done."""


class EndpointError(RuntimeError):
    """An endpoint failed after its retries (down, rate-limited, bad key); the pair is retried next run."""


BUDGET_SCOPES = ("total", "run")


def image_tokens(max_side: int | None) -> int:
    """An upper estimate of one image's prompt tokens (OpenAI's tiling: 85 + 170 per 512-px tile)."""
    tiles = -(-(max_side or 2048) // 512)
    return 85 + 170 * tiles * tiles


def call_max_cost(profile, messages_or_chars, images: int = 0) -> float:
    """The most one chat completion may cost: ``max_tokens`` of output plus an input estimate
    (text at ~3 characters a token, images at their tiled maximum)."""
    chars = messages_or_chars if isinstance(messages_or_chars, int) else len(json.dumps(messages_or_chars))
    prompt = chars // 3 + images * image_tokens(profile.image_max_side)
    return (prompt * profile.price_input_per_mtok + profile.max_tokens * profile.price_output_per_mtok) / 1e6


class Budget:
    """Requests (every HTTP attempt, retries included) and USD for synthesis; thread-safe.

    Cost is capped before money is spent: each paid call first reserves its known or maximum price
    (:meth:`reserve`); a call that does not fit in ``max_cost_usd`` minus what is spent and reserved
    is not sent, so the cap holds at any concurrency. The spend of every run is recorded in
    ``ledger`` (``<out>/spend.json``; a reservation counts as spent until settled, so a killed run
    never under-reports); with ``scope="total"`` the cap counts earlier runs' spend too, so a
    resumed run continues the budget instead of spending it again. ``max_requests`` is per run.
    Clients that count for themselves (the judge's accounting) report through :meth:`set_external`.
    """

    def __init__(self, max_requests: int | None = None, max_cost_usd: float | None = None, ledger=None,
                 scope: str = "total"):
        if scope not in BUDGET_SCOPES:
            raise ValueError(f"budget scope must be one of {', '.join(BUDGET_SCOPES)}, not {scope!r}")
        self.max_requests, self.max_cost_usd, self.scope = max_requests, max_cost_usd, scope
        self.ledger = Path(ledger) if ledger else None
        self._earlier = self._read_ledger()  # USD spent by earlier runs of this folder
        self._requests = 0
        self._cost_usd = 0.0
        self._reserved: dict[int, float] = {}
        self._next = 0
        self._external: dict[str, tuple[int, float]] = {}
        self._closed: str | None = None
        self._lock = threading.Lock()

    def _read_ledger(self) -> float:
        if self.ledger is None or not self.ledger.is_file():
            return 0.0
        try:
            return float(json.loads(self.ledger.read_text())["total_usd"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{self.ledger} is damaged; it records what earlier runs spent - fix it, or delete "
                             "it to count from zero (then --max-cost no longer covers earlier runs)") from None

    def _write_ledger(self) -> None:  # under the lock
        if self.ledger is not None:
            write_json(self.ledger, {"total_usd": round(self._earlier + self._run_cost() + sum(self._reserved.values()), 6),
                                     "runs_before_usd": round(self._earlier, 6)})

    def _run_cost(self) -> float:
        return self._cost_usd + sum(c for _, c in self._external.values())

    @property
    def requests(self) -> int:
        return self._requests + sum(r for r, _ in self._external.values())

    @property
    def cost_usd(self) -> float:
        """USD spent by this run (settled calls)."""
        return self._run_cost()

    def _counted(self) -> float:
        """USD the cap counts now: spent (earlier runs too, for scope total) plus reserved."""
        return (self._earlier if self.scope == "total" else 0.0) + self._run_cost() + sum(self._reserved.values())

    def reason(self, more: int = 1, cost: float = 0.0) -> str | None:
        """Why ``more`` requests costing up to ``cost`` may not be sent now, or None."""
        if self.max_requests is not None and self.requests + more > self.max_requests:
            return "request budget reached"
        if self.max_cost_usd is not None and (self._counted() + cost > self.max_cost_usd + 1e-12
                                              or self._counted() >= self.max_cost_usd):
            return "cost budget reached"
        return None

    def close(self, reason: str) -> None:
        """No request is sent from now on (Ctrl-C): every reserve/attempt raises BudgetExhausted."""
        with self._lock:
            self._closed = reason

    def take_request(self, kind: str = "request") -> None:
        """Called before every attempt; raises instead of sending one past the request budget."""
        with self._lock:
            if self._closed:
                raise BudgetExhausted(self._closed)
            if self.max_requests is not None and self.requests + 1 > self.max_requests:
                raise BudgetExhausted("request budget reached")
            self._requests += 1

    def reserve(self, cost_usd: float, requests: int = 1) -> int:
        """Hold ``cost_usd`` (a call's known or maximum price) before sending it; raises
        BudgetExhausted when it does not fit. Returns the token for :meth:`settle`."""
        with self._lock:
            reason = self._closed or self.reason(more=requests, cost=cost_usd)
            if reason:
                raise BudgetExhausted(reason)
            self._next += 1
            self._reserved[self._next] = float(cost_usd)
            self._write_ledger()
            return self._next

    def settle(self, token: int, spent_usd: float = 0.0) -> None:
        """Replace a reservation by what the call cost (0 for a call that was not charged)."""
        with self._lock:
            held = self._reserved.pop(token, 0.0)
            if spent_usd > held + 1e-12:
                log.warning("a call cost $%.6f, more than the $%.6f reserved for it; raise max_tokens or the "
                            "price estimate", spent_usd, held)
            self._cost_usd += float(spent_usd)
            self._write_ledger()

    def add(self, requests: int = 0, cost_usd: float = 0.0) -> None:
        with self._lock:
            self._requests += int(requests)
            self._cost_usd += float(cost_usd)
            self._write_ledger()

    def set_external(self, name: str, requests: int, cost_usd: float) -> None:
        with self._lock:
            self._external[name] = (int(requests), float(cost_usd))
            self._write_ledger()

    def snapshot(self) -> dict:
        with self._lock:
            run = self._run_cost()
            return {"requests": self.requests, "cost_usd": round(run, 6),
                    "total_cost_usd": round(self._earlier + run, 6), "max_requests": self.max_requests,
                    "max_cost_usd": self.max_cost_usd, "scope": self.scope}

    def spend_line(self) -> str:
        """The one spend figure a run prints."""
        snap = self.snapshot()
        cap = f" of the ${snap['max_cost_usd']:g} cap" if snap["max_cost_usd"] is not None else ""
        if self.scope == "total":
            return f"spent ${snap['total_cost_usd']:.4f}{cap} over all runs of this folder (${snap['cost_usd']:.4f} this run)"
        return f"spent ${snap['cost_usd']:.4f}{cap} this run (${snap['total_cost_usd']:.4f} over all runs)"


class ChatClient:
    """JSON-answering chat completions with images, counted against the budget."""

    def __init__(self, config: LLMConfig, budget: Budget):
        self.config, self.profile, self.budget = config, config.profile, budget
        self.transport = ChatTransport(self.profile, on_attempt=budget.take_request, role="synthesis")

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

        images = sum(1 for m in messages if isinstance(m.get("content"), list)
                     for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")
        text = sum(len(part.get("text", "")) if isinstance(part, dict) else len(str(part))
                   for m in messages for part in (m["content"] if isinstance(m.get("content"), list) else [m.get("content") or ""]))
        token = self.budget.reserve(call_max_cost(self.profile, text + 200, images))
        spent = 0.0
        try:
            body = self.transport.post(payload, context="synthesis plan: ")
            prompt_tokens, completion_tokens = usage_of(body)
            spent = (prompt_tokens * self.profile.price_input_per_mtok
                     + completion_tokens * self.profile.price_output_per_mtok) / 1e6
        except Unjudged as e:  # the judge transport's name for "gave up"; here it is an endpoint failure
            raise EndpointError(f"LLM endpoint {self.profile.base_url}: {e.reason}") from None
        finally:
            self.budget.settle(token, spent)
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
            token = self.budget.reserve(self.config.price_per_image)  # raises when the image does not fit
            image = None
            maybe_made = True  # until an answer says otherwise: a cut-off request may still be billed
            try:
                image, delay, last, maybe_made = self._attempt(prompt, references, key, last)
            except (EndpointError, BudgetExhausted):  # refused (4xx) or never sent: not billed
                maybe_made = False
                raise
            finally:
                self.budget.settle(token, self.config.price_per_image if image is not None or maybe_made else 0.0)
            if image is not None:
                return image
            if attempt >= self.profile.max_retries:
                raise EndpointError(f"image endpoint {self.url}: gave up after {attempt + 1} attempts; last error: {last}")
            if delay is None:
                cap = min(self.profile.backoff_max_s, self.profile.backoff_base_s * 2 ** attempt)
                delay = cap * (0.5 + 0.5 * random.random())
            log.info("image endpoint: retry %d/%d in %.2fs after %s", attempt + 1, self.profile.max_retries, delay, last)
            time.sleep(delay)
            attempt += 1

    def _attempt(self, prompt, references, key, last):
        """One attempt: ``(image or None, Retry-After delay or None, last error, whether an image may
        have been made and billed)``; raises EndpointError for answers that a retry cannot fix."""
        image = delay = None
        self.budget.take_request()
        try:
            response = self._send(prompt, references, key)
        except _TRANSIENT as e:
            last = f"{type(e).__name__}: {redact(e, key, 200)}"
            # a read timeout or a cut answer came after the request was taken: it may be billed
            return None, None, last, isinstance(e, (requests.ReadTimeout, requests.exceptions.ChunkedEncodingError))
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
                return image, delay, last, True
        return image, delay, last, False

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
