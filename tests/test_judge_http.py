"""The HTTP judge against a real server on 127.0.0.1 that misbehaves on purpose, one fault at a time."""
import math
import threading
import time
from concurrent.futures import CancelledError
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import numpy as np
import pytest

from judge import JudgePool, JudgeRequest, Unjudged
from judge.verdict import JudgeStopped
from judge.config import Profile
from judge.ensemble import EnsembleJudge
from judge.loopback import Reply, ScriptedChatServer
from judge.openai_compat import OpenAIJudge

KEY_ENV = "DUALREF_TEST_HTTP_KEY"


def image(value: int, size: int = 4):
    return np.full((size, size, 3), value, np.uint8)


def request(i: int = 0, instruction: str = "put the cat of image 2 on the sofa of image 1"):
    return JudgeRequest(instruction, image(10), image(20), image(i), sample_id=f"s{i}")


@pytest.fixture
def serve(monkeypatch):
    """serve(script, **profile) -> (server, judge); both are closed after the test."""
    monkeypatch.setenv(KEY_ENV, "sk-test-http-0123456789")
    opened = []

    def start(script, **settings):
        server = ScriptedChatServer(script).start()
        defaults = dict(name="loop", base_url=server.base_url, model="judge-vlm", api_key_env=KEY_ENV, cache=False,
                        backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=2.0, max_retries=4)
        judge = OpenAIJudge(Profile(**{**defaults, **settings}))
        opened.append((server, judge))
        return server, judge

    yield start
    for server, judge in opened:
        judge.close()
        server.stop()


def scripted(faults, answer=lambda call: Reply.answer("Yes.")):
    """Per question: a list of replies to give first (in order), then ``answer``."""
    lock, seen = threading.Lock(), {}

    def script(call):
        with lock:
            n = seen[call.question] = seen.get(call.question, 0) + 1
        queue = faults.get(call.question, faults.get("*", []))
        return queue[n - 1] if n <= len(queue) else answer(call)

    return script


def test_images_go_in_the_stated_order_with_temperature_zero(serve):
    server, judge = serve(lambda call: Reply.answer("Yes"))
    verdict = judge.judge(request(30))
    assert verdict.scores() == {"fidelity": 1.0, "consistency": 1.0, "realism": 1.0}
    assert verdict.prompt_version and verdict.judge == "judge-vlm@127.0.0.1"
    assert len(server.calls) == 3 and {c.question for c in server.calls} == {"fidelity", "consistency", "realism"}
    for call in server.calls:
        pixels = [int(np.asarray(im)[0, 0, 0]) for im in call.images()]
        assert pixels == [10, 20, 30]  # image 1 = reference 1, image 2 = reference 2, image 3 = output
        assert call.payload["temperature"] == 0 and call.payload["max_tokens"] == 64
        assert "logprobs" not in call.payload
        text = [p["text"] for p in call.messages[1]["content"] if p["type"] == "text"]
        assert text[:3] == ["Image 1 (reference 1):", "Image 2 (reference 2):", "Image 3 (the edited output):"]
    assert server.auth_seen == {"Bearer sk-test-http-0123456789"}


def test_yes_because_and_NO_dot_parse(serve):
    answers = {"fidelity": "Yes, because the cat sits on the sofa.", "consistency": "NO.", "realism": "no - seams"}
    _, judge = serve(lambda call: Reply.answer(answers[call.question]))
    verdict = judge.judge(request())
    assert verdict.scores() == {"fidelity": 1.0, "consistency": 0.0, "realism": 0.0}
    assert verdict.answers == answers and verdict.reward == pytest.approx(1 / 3)


def test_429_honours_retry_after_seconds(serve):
    server, judge = serve(scripted({"realism": [Reply.error(429, "slow down", {"Retry-After": "1"})]}))
    start = time.monotonic()
    verdict = judge.judge(request())
    assert time.monotonic() - start >= 0.95  # waited what the server asked, not the 10 ms backoff
    assert verdict.realism == 1.0 and judge.accounting.snapshot()["retries"] == 1


def test_429_honours_retry_after_http_date(serve):
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
    server, judge = serve(scripted({"fidelity": [Reply.error(429, headers={"Retry-After": when})]}))
    start = time.monotonic()
    assert judge.judge(request()).fidelity == 1.0
    assert time.monotonic() - start >= 0.9  # the date has one-second resolution


def test_retry_after_beyond_the_limit_gives_up_without_a_score(serve):
    _, judge = serve(lambda call: Reply.error(429, headers={"Retry-After": "3600"}), max_retry_after_s=5)
    with pytest.raises(Unjudged, match="retry after 3600s"):
        judge.judge(request())


def test_500s_are_retried_with_backoff_then_give_up(serve):
    server, judge = serve(scripted({"*": [Reply.error(500), Reply.error(503), Reply.error(502)]}))
    assert judge.judge(request()).reward == 1.0
    assert len(server.calls) == 3 * 4
    server2, judge2 = serve(lambda call: Reply.error(500, "boom"), max_retries=2)
    with pytest.raises(Unjudged, match="gave up after 3 attempts; last error: HTTP 500"):
        judge2.judge(request())
    assert len(server2.calls) == 3 * 3


def test_slow_responses_time_out_and_are_retried(serve):
    server, judge = serve(scripted({"consistency": [Reply.answer("Yes", delay_s=1.0)]},
                                   answer=lambda call: Reply.answer("No")), timeout_s=0.3)
    verdict = judge.judge(request())
    assert verdict.consistency == 0.0  # the answer of the retry, not the late one
    _, judge2 = serve(lambda call: Reply.answer("Yes", delay_s=0.6), timeout_s=0.2, max_retries=1)
    with pytest.raises(Unjudged, match="Timeout"):
        judge2.judge(request())


@pytest.mark.parametrize("fault", [
    Reply.raw(b'{"id": "x", "choices": [{"message": {"content": "Ye'),  # truncated JSON, length matches
    Reply.short(b'{"choices": [{"mess', declared=400),  # connection closed mid-body
    Reply.drop(),  # connection closed before any response
    Reply("answer", 200, {"choices": [], "usage": {}}),  # empty choices
    Reply("answer", 200, {"error": {"message": "overloaded"}}),  # 200 without choices
    Reply.error(408), Reply.error(504),
])
def test_transient_faults_are_retried(serve, fault):
    server, judge = serve(scripted({"fidelity": [fault, fault]}))
    verdict = judge.judge(request())
    assert verdict.fidelity == 1.0
    assert judge.accounting.snapshot()["retries"] == 2


def test_refusals_are_asked_again_then_unjudged(serve):
    server, judge = serve(scripted({"realism": [Reply.answer("I'm sorry, I can't help with that.")]},
                                   answer=lambda call: Reply.answer("No, the sofa is warped.")))
    verdict = judge.judge(request())
    assert verdict.realism == 0.0
    reasks = [c for c in server.calls if c.is_reask]
    assert len(reasks) == 1 and reasks[0].messages[-1]["content"].startswith("Your reply must begin with Yes or No")
    refusal = {"role": "assistant", "content": None, "refusal": "I can't assist with that."}
    server2, judge2 = serve(lambda call: Reply("answer", 200, {"choices": [{"message": refusal}]}) if call.question == "fidelity"
                            else Reply.answer("Yes"), parse_retries=2)
    with pytest.raises(Unjudged, match=r"\[fidelity\] unparseable reply \"I can't assist") as info:
        judge2.judge(request(5))
    assert info.value.sample_id == "s5"
    assert sum(c.question == "fidelity" for c in server2.calls) == 3
    assert judge2.accounting.snapshot()["unjudged"] == 1


def test_probability_mode_reads_top_logprobs(serve):
    tops = [("Yes", math.log(0.6)), (" yes", math.log(0.1)), ("No", math.log(0.2)), ("The", math.log(0.1))]
    server, judge = serve(lambda call: Reply.answer("Yes, it does.", top_logprobs=tops), mode="probability", top_logprobs=5)
    verdict = judge.judge(request())
    assert verdict.mode == "probability"
    assert verdict.fidelity == pytest.approx(0.7 / 0.9) and verdict.realism == pytest.approx(0.7 / 0.9)
    assert all(c.payload["logprobs"] is True and c.payload["top_logprobs"] == 5 for c in server.calls)


def test_missing_logprobs_are_retried_then_unjudged_never_half(serve):
    tops = [("No", math.log(0.9)), ("Yes", math.log(0.1))]
    server, judge = serve(scripted({"consistency": [Reply.answer("No.")]},
                                   answer=lambda call: Reply.answer("No.", top_logprobs=tops)), mode="probability")
    assert judge.judge(request()).consistency == pytest.approx(0.1)  # retried once, then measured
    server2, judge2 = serve(lambda call: Reply.answer("Yes."), mode="probability", parse_retries=1)
    with pytest.raises(Unjudged, match="no yes/no log-probs"):
        judge2.judge(request())
    # only a fallback the profile asks for scores from the text, and the verdict says so
    server3, judge3 = serve(lambda call: Reply.answer("Yes."), mode="probability", probability_fallback="binary")
    verdict = judge3.judge(request())
    assert verdict.reward == 1.0 and set(verdict.notes) == set(verdict.scores())
    assert "binary fallback" in verdict.notes["fidelity"]


def test_client_errors_fail_at_once_and_redact(serve):
    echo = "Incorrect API key provided: sk-test-http-0123456789. You can find your API key at ..."
    server, judge = serve(lambda call: Reply.error(401, echo))
    with pytest.raises(Unjudged, match=r"rejected the key in \$DUALREF_TEST_HTTP_KEY") as info:
        judge.judge(request())
    assert "sk-test" not in str(info.value) and 1 <= len(server.calls) <= 3  # not retried; once refused, nothing new is sent
    server2, judge2 = serve(lambda call: Reply.error(404, "model 'judge-vlm' not found"))
    with pytest.raises(Unjudged, match="HTTP 404 .*not found"):
        judge2.judge(request())


def test_adapts_to_max_completion_tokens_and_default_temperature(serve):
    def script(call):
        if "max_tokens" in call.payload:
            return Reply.error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.")
        if "temperature" in call.payload:
            return Reply.error(400, "Unsupported value: 'temperature' does not support 0 with this model.")
        return Reply.answer("Yes")

    server, judge = serve(script)
    assert judge.judge(request()).reward == 1.0
    assert "max_completion_tokens" in server.calls[-1].payload and "temperature" not in server.calls[-1].payload


def test_concurrency_limit_is_respected_and_used(serve):
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def script(call):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return Reply.answer("Yes")

    _, judge = serve(script, concurrency=3)
    results = judge.judge_many([request(i) for i in range(6)])
    assert all(r.reward == 1.0 for r in results) and state["peak"] == 3


def test_requests_per_minute_limit(serve):
    server, judge = serve(lambda call: Reply.answer("Yes"), rpm=600, concurrency=1)  # 10 per second
    start = time.monotonic()
    judge.judge_many([request(i) for i in range(2)])  # 6 requests
    assert time.monotonic() - start >= 0.45


def test_cache_hits_skip_the_server_and_count_no_tokens(serve, tmp_path):
    server, judge = serve(lambda call: Reply.answer("No", usage=(50, 2)), cache=True, cache_dir=str(tmp_path),
                          price_input_per_mtok=2.0, price_output_per_mtok=10.0)
    first = judge.judge(request(7))
    assert not first.cache_hit and first.usage == {"prompt_tokens": 150, "completion_tokens": 6}
    assert first.cost_usd == pytest.approx((150 * 2 + 6 * 10) / 1e6)
    again = judge.judge(request(7))
    assert again.cache_hit and again.scores() == first.scores() and again.usage["prompt_tokens"] == 0
    assert len(server.calls) == 3
    other = judge.judge(JudgeRequest("a different instruction", image(10), image(20), image(7)))
    assert not other.cache_hit and len(server.calls) == 6


def test_score_mode_vie_style(serve):
    replies = {"semantic_consistency": '{"score": [8, 6], "reasoning": "mostly"}',
               "perceptual_quality": 'Here: {"score": [9, 4], "reasoning": "blur"}'}
    server, judge = serve(lambda call: Reply.answer(replies[call.question]))
    score = judge.score(JudgeRequest("make it winter", image(1), None, image(2), sample_id="g1"))
    assert score.semantic_consistency == 6 and score.perceptual_quality == 4
    assert score.overall == pytest.approx(math.sqrt(24))
    assert all(len(c.images()) == 2 for c in server.calls)
    _, judge2 = serve(lambda call: Reply.answer("I would say 7."), parse_retries=1)
    with pytest.raises(Unjudged):
        judge2.score(JudgeRequest("x", image(1), None, image(2)))


def test_ensemble_keeps_each_member_and_never_counts_a_failure_as_no(serve):
    _, yes = serve(lambda call: Reply.answer("Yes"))
    _, no_realism = serve(lambda call: Reply.answer("No" if call.question == "realism" else "Yes"))
    _, broken = serve(lambda call: Reply.error(500), max_retries=0)
    both = EnsembleJudge({"a": yes, "b": no_realism})
    verdict = both.judge(request())
    assert verdict.realism == 0.5 and verdict.fidelity == 1.0
    assert verdict.members["a"].realism == 1.0 and verdict.members["b"].realism == 0.0
    assert verdict.to_dict()["members"]["b"]["reward"] == pytest.approx(2 / 3)
    with pytest.raises(Unjudged, match="1/2 ensemble members answered"):
        EnsembleJudge({"a": yes, "c": broken}).judge(request())
    lenient = EnsembleJudge({"a": yes, "c": broken}, min_members=1).judge(request())
    assert lenient.reward == 1.0 and "c" in lenient.unjudged_members


def test_pool_submit_overlaps_and_returns_futures(serve):
    server, judge = serve(lambda call: Reply.answer("Yes", delay_s=0.2), concurrency=8)
    pool = JudgePool(judge)
    start = time.monotonic()
    futures = [pool.submit(request(i)) for i in range(4)]  # 12 requests, 8 at a time
    assert time.monotonic() - start < 0.1  # submit does not wait
    assert [f.result().reward for f in futures] == [1.0] * 4
    assert time.monotonic() - start < 0.9  # two waves of 0.2 s, not twelve
    assert pool.submit(JudgeRequest("x", image(1), None, image(2))).exception() is not None


def test_images_are_taken_at_submit_and_bad_ones_are_unjudged(serve):
    server, judge = serve(lambda call: Reply.answer("Yes" if np.asarray(call.images()[2])[0, 0, 0] == 40 else "No"))
    output = image(40)
    future = judge.submit(JudgeRequest("x", image(1), image(2), output))
    output[:] = 99  # the caller reuses its buffer right away
    assert future.result().reward == 1.0
    results = judge.judge_many([JudgeRequest("x", image(1), image(2), np.zeros((4, 4, 2), np.uint8), sample_id="bad"),
                                request(40)])
    assert isinstance(results[0], Unjudged) and "bad image" in results[0].reason and results[1].reward == 1.0


# --- issue 18 items 6 and 7 -----------------------------------------------------------------------

def test_hedges_are_asked_again_never_scored(serve):
    """"Yes and no" and "No. Wait, actually yes." scored 1 and 0 before; now they are re-asked."""
    hedges = {"fidelity": "Yes and no.", "consistency": "No. Wait, actually yes.", "realism": "Yes. On second thought, no."}
    server, judge = serve(scripted({q: [Reply.answer(t)] for q, t in hedges.items()},
                                   answer=lambda call: Reply.answer("No, it does not.")))
    verdict = judge.judge(request())
    assert verdict.scores() == {"fidelity": 0.0, "consistency": 0.0, "realism": 0.0}  # the clear second answers
    assert sum(c.is_reask for c in server.calls) == 3
    _, judge2 = serve(lambda call: Reply.answer("Yes and no"), parse_retries=1)
    with pytest.raises(Unjudged, match="unparseable reply 'Yes and no'"):
        judge2.judge(request())


def test_a_retry_after_date_in_the_past_means_the_normal_backoff(serve):
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    times = []

    def script(call):
        times.append(time.monotonic())
        return Reply.error(429, headers={"Retry-After": past}) if len(times) <= 2 else Reply.answer("Yes")

    _, judge = serve(script, concurrency=1, backoff_base_s=0.3, backoff_max_s=1.0)
    assert judge.judge(request()).fidelity == 1.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3, gaps  # 0.3 * 2**attempt, jitter down to half: not zero


def test_redirects_to_another_host_are_not_followed_with_images(serve):
    elsewhere = ScriptedChatServer().start()
    try:
        target = elsewhere.base_url.replace("127.0.0.1", "localhost") + "/chat/completions"
        server, judge = serve(lambda call: Reply.error(307, "moved", {"Location": target}))
        with pytest.raises(Unjudged, match=r"redirects to http://localhost:\d+/v1/chat/completions, another host"):
            judge.judge(request())
        assert elsewhere.count == 0 and judge.stopped is not None
        calls = len(server.calls)
        with pytest.raises(Unjudged, match="another host"):
            judge.judge(request(2))
        assert len(server.calls) == calls  # stopped: nothing more is sent
    finally:
        elsewhere.stop()

    # a 308 to another path on the same server is followed, payload and all
    server2, judge2 = serve(lambda call: Reply.answer("Yes") if call.path.startswith("/v2/")
                            else Reply.error(308, headers={"Location": "/v2/chat/completions"}))
    assert judge2.judge(request()).reward == 1.0
    assert server2.paths_seen == {"/v1/chat/completions", "/v2/chat/completions"}
    assert all(len(c.images()) == 3 for c in server2.calls)


def test_a_rejected_key_stops_the_judge_after_the_first_answer(serve):
    server, judge = serve(lambda call: Reply.error(401, "Incorrect API key provided: sk-test-http-0123456789."),
                          concurrency=2)
    results = judge.judge_many([request(i) for i in range(20)])
    assert all(isinstance(r, JudgeStopped) for r in results)
    assert len(server.calls) <= 2  # what was in flight; 60 rejected requests before
    assert "rejected the key in $DUALREF_TEST_HTTP_KEY" in results[-1].reason
    assert "Incorrect API key provided" in results[-1].reason and "sk-test-http" not in results[-1].reason
    assert not judge.usable


def test_abort_walks_away_from_hanging_requests(serve):
    release = threading.Event()
    server, judge = serve(lambda call: (release.wait(30), Reply.answer("Yes"))[1], timeout_s=30, concurrency=4)
    try:
        futures = [judge.submit(request(i)) for i in range(5)]
        time.sleep(0.3)
        start = time.monotonic()
        judge.abort()
        for f in futures:
            with pytest.raises((Unjudged, CancelledError)):
                f.result(timeout=5)
        judge.close()
        assert time.monotonic() - start < 1.0
    finally:
        release.set()


def test_answers_echoing_the_key_are_scrubbed(serve, tmp_path):
    key = "sk-test-http-0123456789"
    server, judge = serve(lambda call: Reply.answer(f"Yes. Sent with {call.auth} (key {key})."),
                          cache=True, cache_dir=str(tmp_path))
    verdict = judge.judge(request())
    assert all(key not in text and "[REDACTED]" in text for text in verdict.answers.values())
    assert not any(key.encode() in p.read_bytes() for p in tmp_path.rglob("*.json"))
