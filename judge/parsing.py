"""Strict reading of the judge model's replies. ``None`` means "unparseable": ask again, never guess."""
from __future__ import annotations

import json
import math
import re
import string

_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LEADING_JUNK = re.compile(r"^[\s" + re.escape(string.punctuation) + r"\u2018\u2019\u201c\u201d]+")
# "yes"/"no" as a whole first word: "Yes, because..." and "NO." parse; "Nope", "No-one", "Yesterday" do not.
_YES_NO = re.compile(r"^(yes|no)(?![a-z0-9'\-])")
# Hedges: a reply that opens with one answer and also gives the other is no answer at all.
#  - "Yes and no", "yes or no", "Yes/No", "No but yes": the other word joined to the first;
#  - "No. Wait, actually yes.", "Yes. On second thought, no": the other word after a correction;
#  - "Yes, ... no." : the other word standing alone (followed by punctuation or the end), which
#    keeps "Yes, no artifacts are visible" (a determiner) a yes.
_JOINED = r"^{first}\s*(?:(?:and|or|but)\s+|[/&]\s*)(?:maybe\s+)?{other}\b"
_CORRECTED = (r"\b(?:actually|wait|rather|correction|i mean|on second thought|on reflection|on closer inspection"
              r"|scratch that|make that|instead|sorry|hmm+)\W+(?:\w+\W+)?{other}\b")
_ALONE = r"\b{other}\b[\s\"'*\u2019\u201d)]*(?:[.!?,;:\u2026\u2014]|$)"
_HEDGES = {
    first: re.compile("|".join(p.format(first=first, other=other) for p in (_JOINED, _CORRECTED, _ALONE)))
    for first, other in (("yes", "no"), ("no", "yes"))
}
# What byte-level / sentencepiece tokenizers put in front of a word.
_TOKEN_MARKS = "\u2581\u0120"


def parse_yes_no(text: str | None) -> bool | None:
    """True for a reply that begins with "yes", False for "no", None for anything else, hedges
    ("Yes and no", "No. Wait, actually yes.") included."""
    if not isinstance(text, str):
        return None
    text = _THINK.sub("", text)  # reasoning models served by vLLM/Ollama may prefix their thoughts
    text = _LEADING_JUNK.sub("", text).lower()
    match = _YES_NO.match(text)
    if match is None or _HEDGES[match.group(1)].search(text):
        return None
    return match.group(1) == "yes"


def _normalise_token(token) -> str:
    if not isinstance(token, str):
        return ""
    return token.strip().strip(_TOKEN_MARKS + string.punctuation + string.whitespace).lower()


def _position_candidates(choice: dict):
    """Yield, per generated position, a list of (token, logprob) alternatives (OpenAI or legacy shape)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return
    content = logprobs.get("content")
    if isinstance(content, list):  # chat-completions shape (OpenAI, vLLM, SGLang, Ollama)
        for entry in content:
            if not isinstance(entry, dict):
                continue
            alts = entry.get("top_logprobs") or []
            pairs = [(a.get("token"), a.get("logprob")) for a in alts if isinstance(a, dict)]
            if not pairs:
                pairs = [(entry.get("token"), entry.get("logprob"))]
            yield entry.get("token"), pairs
        return
    tokens, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
    if isinstance(tokens, list) and isinstance(tops, list):  # legacy completions shape
        for token, top in zip(tokens, tops):
            if isinstance(top, dict):
                yield token, list(top.items())


def yes_probability(choice: dict) -> float | None:
    """P(yes) / (P(yes) + P(no)) at the first non-blank answer token, from its top log-probs.

    Every variant that normalises to "yes" ("Yes", " yes", "YES", "▁Yes") counts toward yes, and
    likewise for no. ``None`` when the server sent no log-probs or neither word is among them.
    """
    for token, pairs in _position_candidates(choice):
        if not _normalise_token(token) and not any(_normalise_token(t) in ("yes", "no") for t, _ in pairs):
            continue  # a leading space/quote/newline position; the answer comes next
        p_yes = p_no = 0.0
        for alt, logprob in pairs:
            if not isinstance(logprob, (int, float)) or math.isnan(logprob):
                continue
            word = _normalise_token(alt)
            if word == "yes":
                p_yes += math.exp(min(float(logprob), 0.0))
            elif word == "no":
                p_no += math.exp(min(float(logprob), 0.0))
        total = p_yes + p_no
        return p_yes / total if total > 0 else None
    return None


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_SCORE_LIST = re.compile(r'"?score"?\s*[:=]\s*\[([^\]]*)\]', re.IGNORECASE)


def parse_score_pair(text: str | None) -> list[float] | None:
    """The two 0-10 numbers of a VIEScore-style JSON reply, or None."""
    if not isinstance(text, str):
        return None
    text = _THINK.sub("", text)
    numbers = None
    match = _JSON_OBJECT.search(text)
    if match:
        try:
            obj = json.loads(match.group(0))
            if isinstance(obj, dict) and isinstance(obj.get("score"), list):
                numbers = obj["score"]
        except json.JSONDecodeError:
            pass
    if numbers is None:
        match = _SCORE_LIST.search(text)
        if match:
            try:
                numbers = [float(x) for x in match.group(1).split(",") if x.strip()]
            except ValueError:
                return None
    if not isinstance(numbers, list) or len(numbers) != 2:
        return None
    try:
        values = [float(x) for x in numbers]
    except (TypeError, ValueError):
        return None
    if not all(0.0 <= v <= 10.0 for v in values):
        return None
    return values
