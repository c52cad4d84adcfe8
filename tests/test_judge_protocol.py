"""The judge's protocol pieces without a server: parsing, prompts, profiles, cache keys, limits."""
import json
import math
import os
import subprocess
import sys
import threading
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from judge import prompts
from judge.cache import AnswerCache, cache_key
from judge.config import ProfileError, load_profiles
from judge.edit_score import EditScore
from judge.images import image_hash, to_pil
from judge.parsing import parse_score_pair, parse_yes_no, yes_probability
from judge.registry import load_judge
from judge.transport import RateLimiter, parse_retry_after, redact
from judge.verdict import QUESTIONS, Verdict

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [
    ("Yes", True), ("yes", True), ("YES!", True), ("Yes, because the dog is in the park.", True),
    ("  **Yes** - it follows", True), ('"Yes."', True), ("Yes\nThe image...", True),
    ("No", False), ("NO.", False), ("no, the style is lost", False), ("- No: artifacts", False),
    ("<think>hmm, maybe no</think> Yes, it does.", True),
    ("Nope", None), ("Yesterday it was", None), ("No-one can say", None), ("Not really", None),
    ("I can't help with that.", None), ("The answer is yes", None), ("", None), (None, None),
    ("Maybe", None), ("Y", None),
    # hedges are no answer (issue 18): both words given, or a correction
    ("Yes and no", None), ("Yes and no.", None), ("yes or no?", None), ("Yes/No", None), ("No but yes", None),
    ("No. Wait, actually yes.", None), ("No. Actually, yes it does.", None), ("Yes. On second thought, no.", None),
    ("Yes, but no.", None), ("No \u2014 yes, partially.", None), ("Yes. However, looking more closely, no.", None),
    # ... while "no" as a word inside a yes stays a yes
    ("Yes, no artifacts are visible.", True), ("Yes, there is no visible seam.", True), ("Yes (no blur)", True),
    ("Yes, and no elements are lost.", True), ("No, it does not; answering yes would be wrong", False),
    ("Yes, the image is actually quite realistic, no seams.", True), ("Yes, no-one would notice.", True),
])
def test_yes_no_must_open_the_reply(text, expected):
    assert parse_yes_no(text) is expected


def _choice(pairs, first=None):
    entry = {"token": first or pairs[0][0], "logprob": pairs[0][1],
             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in pairs]}
    return {"logprobs": {"content": [entry]}}


def test_yes_probability_sums_variants_and_normalises_over_yes_and_no():
    pairs = [("Yes", math.log(0.5)), (" yes", math.log(0.1)), ("No", math.log(0.2)), ("NO", math.log(0.1)),
             ("Maybe", math.log(0.1))]
    assert yes_probability(_choice(pairs)) == pytest.approx(0.6 / 0.9)
    # byte-level / sentencepiece markers and a leading blank position
    blank = {"token": " ", "logprob": -0.01, "top_logprobs": [{"token": " ", "logprob": -0.01}]}
    answer = {"token": "\u0120Yes", "logprob": math.log(0.3),
              "top_logprobs": [{"token": "\u0120Yes", "logprob": math.log(0.3)}, {"token": "\u2581no", "logprob": math.log(0.1)}]}
    assert yes_probability({"logprobs": {"content": [blank, answer]}}) == pytest.approx(0.75)
    # the legacy completions shape
    legacy = {"logprobs": {"tokens": ["No"], "top_logprobs": [{"No": math.log(0.8), "Yes": math.log(0.2)}]}}
    assert yes_probability(legacy) == pytest.approx(0.2)


@pytest.mark.parametrize("choice", [
    {}, {"logprobs": None}, {"logprobs": {"content": []}}, {"logprobs": {"content": None}},
    _choice([("Maybe", -0.1), ("Perhaps", -2.0)]),
])
def test_yes_probability_is_none_when_it_cannot_be_measured(choice):
    assert yes_probability(choice) is None  # never a silent 0.5


@pytest.mark.parametrize("text, expected", [
    ('{"score": [7, 9], "reasoning": "ok"}', [7.0, 9.0]),
    ('```json\n{"score": [3.5, 10], "reasoning": "x"}\n```', [3.5, 10.0]),
    ('Sure. "score": [4, 6]', [4.0, 6.0]),
    ('{"score": [11, 3]}', None), ('{"score": [5]}', None), ("seven out of ten", None), ('{"score": "8"}', None),
])
def test_score_pair(text, expected):
    assert parse_score_pair(text) == expected


def test_edit_score_overall_is_the_geometric_mean():
    s = EditScore(semantic_consistency=4.0, perceptual_quality=9.0, judge="x")
    assert s.overall == pytest.approx(6.0)
    assert EditScore.from_dict(s.to_dict()).overall == pytest.approx(6.0)
    with pytest.raises(ValueError):
        EditScore(semantic_consistency=11, perceptual_quality=1, judge="x")


def test_prompts_state_the_image_order_and_cover_every_question():
    assert set(prompts.QUESTIONS) == set(QUESTIONS)
    assert [label.split(" (")[0] for label in prompts.IMAGE_LABELS] == ["Image 1", "Image 2", "Image 3"]
    assert "reference 1" in prompts.IMAGE_LABELS[0] and "reference 2" in prompts.IMAGE_LABELS[1]
    assert "output" in prompts.IMAGE_LABELS[2]
    for word in ("Image 1 is the first reference", "Image 2 is the second reference", "Image 3 is the edited output"):
        assert word in prompts.SYSTEM_YES_NO
    text = prompts.question_text("fidelity", "put {the} dog in")
    assert 'put {the} dog in' in text  # braces in an instruction are not format fields
    last_lines = [t.split("\n")[-1] for t in {**prompts.QUESTIONS, **prompts.SCORE_QUESTIONS}.values()]
    assert len(set(last_lines)) == len(last_lines)  # the loopback server tells questions apart by them


def test_verdict_keeps_new_fields_and_old_constructor():
    v = Verdict(1, 0, 1, judge="m", usage={"prompt_tokens": 3}, cost_usd=0.5)
    assert v.reward == pytest.approx(2 / 3)
    back = Verdict.from_dict(json.loads(json.dumps(v.to_dict())))
    assert back == v
    with pytest.raises(ValueError):
        Verdict(1.2, 0, 0, judge="m")


def test_images_accept_arrays_tensors_and_hash_pixels():
    import torch

    a = np.zeros((4, 5, 3), np.uint8)
    a[1, 2] = (255, 0, 7)
    t = torch.from_numpy(a.astype(np.float32) / 255.0)
    assert to_pil(a).size == (5, 4)
    assert image_hash(to_pil(a)) == image_hash(to_pil(t)) == image_hash(to_pil(t[None]))
    b = a.copy()
    b[0, 0, 0] = 1
    assert image_hash(to_pil(b)) != image_hash(to_pil(a))
    with pytest.raises(ValueError, match="shape"):
        to_pil(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(ValueError, match="cannot read image"):
        to_pil("/nonexistent/ref.png")


def test_cache_key_covers_every_field_and_writes_atomically(tmp_path):
    base = dict(images=["a", "b", "c"], instruction="i", question="fidelity", model="m", mode="binary",
                prompt_version="v1", endpoint="h", image_max_side=1024)
    key = cache_key(**base)
    assert key == cache_key(**dict(reversed(list(base.items()))))
    for field, other in [("images", ["a", "b", "d"]), ("instruction", "j"), ("question", "realism"), ("model", "n"),
                         ("mode", "probability"), ("prompt_version", "v2"), ("endpoint", "g")]:
        assert cache_key(**{**base, field: other}) != key, field
    cache = AnswerCache(tmp_path)
    assert cache.get(key) is None

    def writer(n):
        for _ in range(50):
            cache.put(key, {"value": n, "text": "x" * 2000})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    seen = []
    while any(th.is_alive() for th in threads):
        entry = cache.get(key)
        if entry is not None:
            seen.append(entry["value"])  # whole entries only: get() never sees a torn file
    for th in threads:
        th.join()
    assert set(seen) <= {0, 1, 2, 3} and cache.get(key)["text"] == "x" * 2000
    assert not list(tmp_path.rglob("*.tmp"))


def test_retry_after_parses_seconds_and_http_dates():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    when = format_datetime(datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(when, now=now) == pytest.approx(30, abs=1.0)
    past = format_datetime(datetime.fromtimestamp(now, timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(past, now=now) is None  # issue 18: the normal backoff, not zero
    assert parse_retry_after("-3") is None and parse_retry_after("nan") is None and parse_retry_after("0") == 0.0


def test_rate_limiter_spaces_requests_and_pauses():
    limiter = RateLimiter(rpm=1200, burst=1)  # one every 50 ms
    start = time.monotonic()
    for _ in range(6):
        limiter.acquire()
    assert time.monotonic() - start >= 0.24
    limiter = RateLimiter(rpm=None)
    limiter.pause_until(time.monotonic() + 0.2)
    start = time.monotonic()
    limiter.acquire()
    assert time.monotonic() - start >= 0.18


def test_redaction_removes_keys_and_key_like_tokens():
    key = "sk-proj-AbCdEf0123456789xyz"
    text = f"Incorrect API key provided: {key}. Also sk-abc***********xyz and Bearer {key}"
    out = redact(text, key)
    assert key not in out and "AbCdEf" not in out and "sk-abc" not in out


def _write(tmp_path, profiles):
    path = tmp_path / "judges.json"
    path.write_text(json.dumps({"profiles": profiles}))
    return path


def test_profiles_load_from_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DUALREF_JUDGE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert set(load_profiles()) == {"toy"}
    path = _write(tmp_path, {"local": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "_comment": "ok"}})
    monkeypatch.setenv("DUALREF_JUDGE_CONFIG", str(path))
    monkeypatch.setenv("DUALREF_JUDGE_URL", "https://example.org/v1")
    monkeypatch.setenv("DUALREF_JUDGE_MODEL", "vlm")
    monkeypatch.setenv("DUALREF_JUDGE_KEY_ENV", "SOME_KEY")
    profiles = load_profiles()
    assert set(profiles) == {"toy", "local", "env"}
    assert profiles["env"].api_key_env == "SOME_KEY" and profiles["local"].judge_id == "m@127.0.0.1"
    comfy_dir = tmp_path / "user" / "__dualref"
    comfy_dir.mkdir(parents=True)
    (comfy_dir / "judges.json").write_text(json.dumps({"profiles": {"u": {"kind": "toy"}}}))
    monkeypatch.delenv("DUALREF_JUDGE_CONFIG")
    assert "u" in load_profiles(config_dir=comfy_dir)
    monkeypatch.setenv("DUALREF_JUDGE_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ProfileError, match="does not exist"):
        load_profiles()


@pytest.mark.parametrize("raw, match", [
    ({"base_url": "https://x/v1", "model": "m", "api_key": "sk-live"}, "keys never go in config"),
    ({"base_url": "https://x/v1", "model": "m", "api_key_env": "sk-live-123"}, "NAME of an environment variable"),
    ({"base_url": "https://user:pw@x/v1", "model": "m"}, "credentials"),
    ({"base_url": "https://x/v1?key=abc", "model": "m"}, "query string"),
    ({"base_url": "http://judge.example.org/v1", "model": "m", "api_key_env": "K"}, "plain http"),
    ({"base_url": "https://x/v1", "model": "m", "headers": {"Authorization": "x"}}, "keys never go in config"),
    ({"base_url": "https://x/v1", "model": "m", "extra_body": {"api_key": "x"}}, "without credentials"),
    ({"base_url": "https://x/v1", "model": "m", "mode": "fuzzy"}, "unknown mode"),
    ({"base_url": "https://x/v1", "model": "m", "colour": 1}, "unknown field 'colour'"),
    ({"kind": "ensemble", "members": ["nope"]}, "unknown members"),
    ({"model": "m"}, "needs base_url and model"),
])
def test_bad_profiles_are_refused_with_the_fix(tmp_path, raw, match):
    with pytest.raises(ProfileError, match=match):
        load_profiles(_write(tmp_path, {"p": raw}))


@pytest.mark.parametrize("pasted", [
    "sk-proj-AbCdEf0123456789xyzXYZ",  # not a variable name
    "hf_AbCdEfGhIjKlMnOpQrStUv0123",  # a valid variable name that is a Hugging Face token
    "AKIAIOSFODNN7EXAMPLE",  # an AWS key id
    "AIzaSyA1234567890abcdefghijklmnopq",  # a Google API key
    "OPENAI KEY",
])
def test_a_key_pasted_into_api_key_env_is_refused_and_never_printed(tmp_path, monkeypatch, capsys, pasted):
    """Issue 18 item 6: a valid-variable-name key was accepted and printed by --list-profiles."""
    from judge.cli import main

    monkeypatch.delenv("DUALREF_JUDGE_URL", raising=False)
    path = _write(tmp_path, {"p": {"base_url": "https://x.example/v1", "model": "m", "api_key_env": pasted}})
    with pytest.raises(ProfileError, match="NAME of an environment variable") as info:
        load_profiles(path)
    assert pasted not in str(info.value) and pasted[:8] not in str(info.value)
    assert main(["--list-profiles", "--config", str(path)]) == 2
    monkeypatch.setenv("DUALREF_JUDGE_URL", "https://x.example/v1")
    monkeypatch.setenv("DUALREF_JUDGE_MODEL", "m")
    monkeypatch.setenv("DUALREF_JUDGE_KEY_ENV", pasted)
    monkeypatch.setenv("DUALREF_JUDGE_CONFIG", str(_write(tmp_path, {})))
    assert main(["--list-profiles"]) == 2
    captured = capsys.readouterr()
    assert "NAME of an environment variable" in captured.err
    assert pasted not in captured.out + captured.err and pasted[:8] not in captured.out + captured.err


@pytest.mark.parametrize("extra_body, where", [
    ({"x-api-key": "abc"}, "extra_body.x-api-key"),
    ({"apiKey": "abc"}, "extra_body.apiKey"),
    ({"access_token": "abc"}, "extra_body.access_token"),
    ({"extra_headers": {"X-Custom": "v"}}, "extra_body.extra_headers"),
    ({"metadata": {"note": "sk-live-0123456789abcdef"}}, "extra_body.metadata.note"),
    ({"user": "Bearer 0123456789"}, "extra_body.user"),
    ({"tags": ["ok", "hf_AbCdEfGhIjKlMnOpQrStUv0123"]}, r"extra_body.tags\[1\]"),
])
def test_credentials_in_extra_body_are_refused_without_being_shown(tmp_path, extra_body, where):
    path = _write(tmp_path, {"p": {"base_url": "https://x.example/v1", "model": "m", "extra_body": extra_body}})
    with pytest.raises(ProfileError, match=rf"{where} looks like one") as info:
        load_profiles(path)
    for value in json.dumps(extra_body).split('"'):
        if len(value) > 6 and value not in where:
            assert value not in str(info.value)


def test_ordinary_extra_body_fields_are_kept(tmp_path):
    body = {"reasoning_effort": "minimal", "skip_special_tokens": True, "stop_token_ids": [1, 2], "max_tokens": 9,
            "chat_template_kwargs": {"enable_thinking": False}, "top_k": 20, "guided_choice": ["Yes", "No"]}
    path = _write(tmp_path, {"p": {"base_url": "https://x.example/v1", "model": "m", "extra_body": body,
                                   "api_key_env": "PK_SERVICE_TOKEN_2"}})
    assert load_profiles(path)["p"].extra_body == body


def test_profile_holds_no_key_and_load_names_the_missing_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALREF_TEST_PROTO_KEY", "sk-proto-secret-value-123")
    path = _write(tmp_path, {"p": {"base_url": "https://x.example/v1", "model": "m", "api_key_env": "DUALREF_TEST_PROTO_KEY"}})
    profile = load_profiles(path)["p"]
    for text in (repr(profile), str(profile), json.dumps(profile.public_dict())):
        assert "sk-proto-secret" not in text
    assert profile.api_key() == "sk-proto-secret-value-123"
    judge = load_judge("p", config=path, cache=False)
    assert "sk-proto" not in repr(judge) and "sk-proto" not in repr(judge.transport)
    judge.close()
    with pytest.raises(ProfileError, match="base_url"):
        profile.with_overrides(base_url="https://evil.example/v1")
    with pytest.raises(ProfileError, match="cannot override"):
        load_judge("p", config=path, base_url="https://evil.example/v1")
    monkeypatch.delenv("DUALREF_TEST_PROTO_KEY")
    with pytest.raises(ProfileError, match=r"\$DUALREF_TEST_PROTO_KEY"):
        load_judge("p", config=path)
    with pytest.raises(ProfileError, match="unknown judge profile 'nope'"):
        load_judge("nope", config=path)


def test_toy_profile_is_built_lazily_by_name():
    """'toy' is built in; its package (judge/toy/, the toy world's judge) is imported only when asked for."""
    code = "import sys, judge; judge.load_profiles; assert 'judge.toy' not in sys.modules; " \
           "assert not any(m.split('.')[0] in ('diffusers', 'peft', 'transformers', 'training') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "DUALREF_JUDGE_CONFIG": ""})
    if (REPO / "judge" / "toy" / "__init__.py").exists():
        judge = load_judge("toy", config=None)
        assert type(judge).__name__ == "ToyJudge" and "judge.toy" in sys.modules
        judge.close()
    else:
        with pytest.raises(ProfileError, match="judge/toy/"):
            load_judge("toy")
