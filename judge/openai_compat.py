"""The judge backend for OpenAI-compatible chat completions (OpenAI, Gemini's compatible endpoint,
vLLM, SGLang, Ollama).

Each question is its own request (the paper's three independent questions), sent with the three
images in the stated order. Requests run on a pool of ``profile.concurrency`` threads; ``submit``
returns a future at once, so callers (the DDPO loop) can keep sampling while verdicts arrive.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

from . import prompts
from .accounting import Accounting, gather, usage_of
from .base import Judge
from .cache import AnswerCache, cache_key
from .config import Profile, default_cache_dir
from .edit_score import SCORE_ASPECTS, SCORE_MODE, EditScore
from .images import DATA_URLS, fit, image_hash, to_pil
from .pool import collect
from .parsing import parse_score_pair, parse_yes_no, yes_probability
from .transport import ChatTransport, attachment, redact
from .verdict import QUESTIONS, JudgeRequest, JudgeStopped, Unjudged, Verdict

log = logging.getLogger(__name__)


class _Images:
    """A request's images, hashed and encoded once however many questions use them.

    Converted to PIL at once (on the caller's thread): the caller may reuse or free its tensors
    (GPU memory included) as soon as ``submit`` returns.
    """

    def __init__(self, images, max_side):
        self._pils = [fit(to_pil(im), max_side) for im in images]
        self._lock = threading.Lock()
        self._hashes = self._urls = None

    def hashes(self) -> list[str]:
        with self._lock:
            if self._hashes is None:
                self._hashes = [image_hash(im) for im in self._pils]
            return self._hashes

    def data_urls(self) -> list[str]:
        self.hashes()
        with self._lock:
            if self._urls is None:
                self._urls = [DATA_URLS.get(h, im) for h, im in zip(self._hashes, self._pils)]
            return self._urls


@dataclass
class _Answer:
    value: object  # 0/1 or P(yes) for yes/no questions; [a, b] for score questions
    text: str
    cache_hit: bool
    usage: dict = field(default_factory=dict)
    note: str = ""


def _message_text(message: dict) -> str | None:
    content = message.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not content and message.get("refusal"):
        return str(message["refusal"])
    return content if isinstance(content, str) else None


class OpenAIJudge(Judge):
    """Three yes/no questions (binary or probability mode) and the 0-10 score mode over HTTP."""

    def __init__(self, profile: Profile, cache_dir=None):
        if profile.kind != "openai":
            raise ValueError(f"profile {profile.name!r} is of kind {profile.kind!r}, not openai")
        self.profile = profile
        self.name = profile.judge_id
        self.mode = profile.mode
        self.accounting = Accounting(profile.price_input_per_mtok, profile.price_output_per_mtok)
        self.transport = ChatTransport(profile, on_attempt=self.accounting.count_attempt)
        root = cache_dir or profile.cache_dir or default_cache_dir()
        self.cache = AnswerCache(root) if profile.cache else None
        self._executor = ThreadPoolExecutor(profile.concurrency, thread_name_prefix=f"judge-{profile.name}")
        self._closed = False

    def __repr__(self):
        return f"OpenAIJudge(profile={self.profile.name!r}, model={self.profile.model!r}, mode={self.mode!r})"

    # --- public API -----------------------------------------------------------------------

    @property
    def stopped(self) -> JudgeStopped | None:
        """Why this profile cannot judge (a refused key, an unknown model, ...): nothing more is sent."""
        return self.transport.stopped

    @property
    def usable(self) -> bool:
        """False once stopped or aborted: build a new judge to try again."""
        return self.transport.stopped is None and not self.transport.aborted

    def abort(self) -> None:
        """Stop now (Ctrl-C, the Stop button): queued questions are cancelled, waits and in-flight
        requests end within a fraction of a second, later submissions fail. Then ``close()``."""
        self.transport.abort()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _refuse(self, request: JudgeRequest) -> Future | None:
        if self.transport.stopped is not None:
            return _failed(self.transport.stopped.for_sample(request.sample_id))
        if self.transport.aborted:
            return _failed(Unjudged("interrupted before it was judged", request.sample_id))
        return None

    def submit(self, request: JudgeRequest) -> "Future[Verdict]":
        """Start judging; the future gives a Verdict or raises Unjudged. Never blocks."""
        refused = self._refuse(request)
        if refused is not None:
            return self._counted(refused)
        if request.reference2 is None:
            return _failed(Unjudged("the three-question protocol needs two references; use score mode for single-reference edits", request.sample_id))
        try:
            images = _Images(request.references + [request.output], self.profile.image_max_side)
        except ValueError as e:
            return _failed(Unjudged(f"bad image: {e}", request.sample_id))
        start = time.monotonic()
        parts = [self._executor.submit(self._ask_yes_no, images, request, q) for q in QUESTIONS]
        return self._counted(gather(parts, lambda answers: self._verdict(request, answers, start)))

    def judge(self, request: JudgeRequest) -> Verdict:
        return self.submit(request).result()

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[Verdict | Unjudged]:
        """All requests in flight together (up to ``concurrency`` HTTP calls); results in order."""
        return collect([self.submit(r) for r in requests])

    def submit_score(self, request: JudgeRequest) -> "Future[EditScore]":
        """The 0-10 GEdit-Bench/VIEScore-style score of a single-reference edit (reference2 unused)."""
        refused = self._refuse(request)
        if refused is not None:
            return self._counted(refused)
        try:
            images = _Images([request.reference1, request.output], self.profile.image_max_side)
        except ValueError as e:
            return _failed(Unjudged(f"bad image: {e}", request.sample_id))
        start = time.monotonic()
        parts = [self._executor.submit(self._ask_score, images, request, a) for a in SCORE_ASPECTS]
        return self._counted(gather(parts, lambda answers: self._edit_score(request, answers, start)))

    def _counted(self, future: Future) -> Future:
        def count(f):
            if f.cancelled() or f.exception() is not None:
                self.accounting.add(unjudged=1)
            else:
                self.accounting.add(verdicts=1)

        future.add_done_callback(count)
        return future

    def score(self, request: JudgeRequest) -> EditScore:
        return self.submit_score(request).result()

    def score_many(self, requests: Sequence[JudgeRequest]) -> list[EditScore | Unjudged]:
        return collect([self.submit_score(r) for r in requests])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)
            self.transport.close()

    # --- one question -------------------------------------------------------------------------

    def _key(self, images: _Images, instruction: str, question: str, mode: str) -> str:
        return cache_key(
            images=images.hashes(), instruction=instruction, question=question, model=self.profile.model,
            endpoint=urlsplit(self.profile.base_url).hostname, mode=mode,
            prompt_version=prompts.PROMPT_VERSION, image_max_side=self.profile.image_max_side,
        )

    def _ask_yes_no(self, images: _Images, request: JudgeRequest, question: str) -> _Answer:
        content = []
        references = len(request.references)  # 2, or 3+ for three-reference tasks (every image numbered)
        for label in prompts.image_labels(references):  # None: the image goes here, encoded only on a cache miss
            content += [{"type": "text", "text": label}, None]
        content.append({"type": "text", "text": prompts.question_text(question, request.instruction, references)})
        probability = self.mode == "probability"

        def interpret(choice, text):
            if choice is None:  # a cached answer: still an answer under today's parser?
                return None, "", parse_yes_no(text) is None
            answer = parse_yes_no(text)
            if answer is None:
                return None, "", True  # unparseable: ask again
            if not probability:
                return float(answer), "", False
            p_yes = yes_probability(choice)
            if p_yes is not None:
                return p_yes, "", False
            if self.profile.probability_fallback == "binary":
                return float(answer), "probability mode: no yes/no log-probs; binary fallback (profile setting)", False
            return None, "", False  # log-probs missing: resend as is

        return self._ask(images, request, question, self.mode, prompts.system_yes_no(references), content,
                         prompts.REASK_YES_NO, interpret, logprobs=probability)

    def _ask_score(self, images: _Images, request: JudgeRequest, aspect: str) -> _Answer:
        content = []
        for label in prompts.SCORE_IMAGE_LABELS:
            content += [{"type": "text", "text": label}, None]
        content.append({"type": "text", "text": prompts.score_question_text(aspect, request.instruction)})

        def interpret(choice, text):
            if choice is None:
                return None, "", parse_score_pair(text) is None
            pair = parse_score_pair(text)
            return pair, "", pair is None

        return self._ask(images, request, aspect, SCORE_MODE, prompts.SYSTEM_SCORE, content,
                         prompts.REASK_SCORE, interpret, logprobs=False)

    def _ask(self, images, request, question, mode, system, content, reask, interpret, logprobs) -> _Answer:
        try:
            return self._ask_once(images, request, question, mode, system, content, reask, interpret, logprobs)
        except Unjudged as failure:  # name the sample (transport errors only know the question)
            raise failure.for_sample(request.sample_id) from None

    def _ask_once(self, images, request, question, mode, system, content, reask, interpret, logprobs) -> _Answer:
        key = self._key(images, request.instruction, question, mode)
        if self.cache is not None:
            entry = self.cache.get(key)
            text = self.transport.scrub(entry.get("text", "")) if isinstance(entry, dict) else ""
            # An entry whose text today's parser no longer reads (a hedge kept by an older version) is a miss.
            if entry is not None and "value" in entry and not interpret(None, text)[2]:
                self.accounting.add(cache_hits=1)
                return _Answer(entry["value"], text, True, {}, entry.get("note", ""))
        urls = images.data_urls()
        slots = iter(range(len(urls)))
        filled = [part if part is not None else {"type": "image_url", "image_url": {"url": attachment(next(slots))}}
                  for part in content]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": filled}]
        context = f"[{question}] "
        spent = {"prompt_tokens": 0, "completion_tokens": 0}
        last_text = ""
        for attempt in range(self.profile.parse_retries + 1):
            def payload(messages=messages):
                body = {"model": self.profile.model, "messages": messages, **self.transport.generation_fields()}
                if logprobs:
                    body.update(logprobs=True, top_logprobs=self.profile.top_logprobs)
                return {**body, **self.profile.extra_body}

            body = self.transport.post(payload, context, urls)
            prompt_tokens, completion_tokens = usage_of(body)
            spent["prompt_tokens"] += prompt_tokens
            spent["completion_tokens"] += completion_tokens
            self.accounting.add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            choice = body["choices"][0]
            # Nothing the server says is stored or shown with the key in it (a server may echo it).
            text = self.transport.scrub(_message_text(choice.get("message") or {}) or "")
            value, note, reask_needed = interpret(choice, text)
            if value is not None:
                if self.cache is not None:
                    self.cache.put(key, {"value": value, "text": text, "note": note, "question": question, "mode": mode})
                return _Answer(value, text, False, spent, note)
            last_text = text
            if reask_needed:
                messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": reask}]
            log.info("judge %s: %sunusable reply (attempt %d): %r", self.profile.name, context, attempt + 1, redact(text, limit=120))
        what = "no yes/no log-probs in the reply" if logprobs and parse_yes_no(last_text) is not None else f"unparseable reply {redact(last_text, limit=160)!r}"
        raise Unjudged(f"{context}{what} after {self.profile.parse_retries + 1} attempts")

    # --- assembling results ---------------------------------------------------------------------

    def _totals(self, answers):
        usage = {"prompt_tokens": sum(a.usage.get("prompt_tokens", 0) for a in answers),
                 "completion_tokens": sum(a.usage.get("completion_tokens", 0) for a in answers)}
        return usage, self.accounting.cost(usage["prompt_tokens"], usage["completion_tokens"])

    def _verdict(self, request, answers: list[_Answer], start: float) -> Verdict:
        usage, cost = self._totals(answers)
        by_q = dict(zip(QUESTIONS, answers))
        return Verdict(
            **{q: a.value for q, a in by_q.items()}, judge=self.name, mode=self.mode,
            answers={q: a.text for q, a in by_q.items()}, prompt_version=prompts.PROMPT_VERSION,
            latency_s=time.monotonic() - start, cache_hit=all(a.cache_hit for a in answers),
            sample_id=request.sample_id, usage=usage, cost_usd=cost,
            notes={q: a.note for q, a in by_q.items() if a.note},
        )

    def _edit_score(self, request, answers: list[_Answer], start: float) -> EditScore:
        usage, cost = self._totals(answers)
        by_a = dict(zip(SCORE_ASPECTS, answers))
        return EditScore(
            **{a: min(ans.value) for a, ans in by_a.items()}, judge=self.name,
            sub_scores={a: list(ans.value) for a, ans in by_a.items()},
            answers={a: ans.text for a, ans in by_a.items()}, prompt_version=prompts.PROMPT_VERSION,
            latency_s=time.monotonic() - start, cache_hit=all(a.cache_hit for a in answers),
            sample_id=request.sample_id, usage=usage, cost_usd=cost,
        )


def _failed(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future
