"""The VLMJudge node in the real ComfyUI host, against a loopback judge server."""
import asyncio
import importlib
import json
import threading
import time

import pytest
import torch

from judge.loopback import Reply, ScriptedChatServer

pytestmark = pytest.mark.host

# Per output image (R channel = index): fidelity, consistency, realism answers.
TRUTH = {0: ("Yes", "No", "No"), 1: ("Yes, because it matches.", "Yes", "YES."), 2: ("No.", "Yes", "Yes")}
QUESTIONS = ("fidelity", "consistency", "realism")


@pytest.fixture(scope="module")
def node_module(pack):
    module = importlib.import_module(pack.__name__ + ".nodes.vlm_judge")
    yield module
    for _, _, pool in module._JUDGES.values():
        pool.close(close_judge=True)
    module._JUDGES.clear()


def batch(values):
    images = torch.zeros(len(values), 6, 6, 3)
    for n, v in enumerate(values):
        images[n, ..., 0] = v / 255.0
    return images


def serve(tmp_path, monkeypatch, script, **extra):
    server = ScriptedChatServer(script).start()
    profile = {"base_url": server.base_url, "model": "node-vlm", "api_key_env": "DUALREF_NODE_TEST_KEY",
               "max_retries": 1, "backoff_base_s": 0.01, "cache_dir": str(tmp_path / "cache"), **extra}
    path = tmp_path / "judges.json"
    path.write_text(json.dumps({"profiles": {"loop": profile}}))
    monkeypatch.setenv("DUALREF_JUDGE_CONFIG", str(path))
    monkeypatch.setenv("DUALREF_NODE_TEST_KEY", "sk-node-test-abcdef123456")
    return server


def truth_script(call):
    index = round(call.images()[2].getpixel((0, 0))[0])
    return Reply.answer(TRUTH[index][QUESTIONS.index(call.question)])


def test_schema_offers_profiles_by_name_only(node_module, pack, tmp_path, monkeypatch):
    server = serve(tmp_path, monkeypatch, truth_script)
    try:
        schema = node_module.VLMJudge.define_schema()
        info = node_module.VLMJudge.GET_NODE_INFO_V1()  # what /object_info serves
    finally:
        server.stop()
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    assert node_module.VLMJudge in nodes
    assert info["output_is_list"] == [True, False, False, False, False]
    assert schema.category == "DualRef/Judge" and schema.description
    profile = next(i for i in schema.inputs if i.id == "profile")
    assert profile.options == ["loop"]  # the toy judge needs toy images with plans: not offered to artists
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    ids = {i.id for i in schema.inputs}
    assert not ids & {"url", "base_url", "api_key", "key", "endpoint"}
    assert [o.id for o in schema.outputs] == ["scores", "scores_text", "verdict", "best_image", "best_index"]


def test_scores_a_batch_and_picks_the_best(node_module, tmp_path, monkeypatch, comfy_host):
    import comfy.utils

    ticks = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append((value, total)))
    server = serve(tmp_path, monkeypatch, truth_script)
    images = batch([0, 1, 2])
    try:
        out = node_module.VLMJudge.execute(images, batch([50]), batch([90]), "put the cat on the sofa", "loop")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        server.stop()
    scores, scores_text, verdict, best_image, best_index = out.result
    assert scores == pytest.approx([1 / 3, 1.0, 2 / 3])
    assert best_index == 1 and torch.equal(best_image, images[1:2])
    assert "image 1: reward 1.000" in scores_text and "Yes, because it matches." in verdict
    assert "node-vlm@127.0.0.1" in verdict and "sk-node" not in verdict
    assert ticks[-1] == (3, 3) and len(ticks) == 3
    for call in server.calls:  # reference 1, reference 2, output in that order
        assert [round(im.getpixel((0, 0))[0]) for im in call.images()][:2] == [50, 90]


def test_a_judge_failure_is_an_error_not_a_score(node_module, tmp_path, monkeypatch):
    def script(call):
        if round(call.images()[2].getpixel((0, 0))[0]) == 2 and call.question == "realism":
            return Reply.error(503, "overloaded")
        return truth_script(call)

    server = serve(tmp_path, monkeypatch, script)
    try:
        with pytest.raises(RuntimeError, match=r"could not judge 1 of 3 images.*image 2: \[realism\] gave up"):
            node_module.VLMJudge.execute(batch([0, 1, 2]), batch([1]), batch([2]), "x", "loop")
        with pytest.raises(ValueError, match="unknown judge profile 'elsewhere'"):
            node_module.VLMJudge.execute(batch([0]), batch([1]), batch([2]), "x", "elsewhere")
        with pytest.raises(ValueError, match="instruction is empty"):
            node_module.VLMJudge.execute(batch([0]), batch([1]), batch([2]), "  ", "loop")
    finally:
        server.stop()


def test_stop_button_interrupts_a_slow_judge(node_module, tmp_path, monkeypatch):
    import comfy.model_management as mm

    server = serve(tmp_path, monkeypatch, lambda call: Reply.answer("Yes", delay_s=1.5), concurrency=1, timeout_s=5)
    timer = threading.Timer(0.3, mm.interrupt_current_processing, args=(True,))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node_module.VLMJudge.execute(batch([0, 1, 2, 3]), batch([1]), batch([2]), "x", "loop")
        assert time.monotonic() - start < 1.2  # did not wait for twelve 1.5 s answers
        mm.interrupt_current_processing(False)
        server.script = truth_script  # the next run builds a fresh judge (the stopped one walked away)
        out = node_module.VLMJudge.execute(batch([1]), batch([1]), batch([2]), "x", "loop")
        assert out.result[0] == pytest.approx([1.0])
    finally:
        mm.interrupt_current_processing(False)
        timer.cancel()
        server.stop()


def test_config_lives_in_a_folder_comfyui_never_serves(node_module, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.delenv("DUALREF_JUDGE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path / "user"))
    folder = tmp_path / "user" / "__dualref"
    folder.mkdir(parents=True)
    (folder / "judges.json").write_text(json.dumps({"profiles": {"house-vlm": {
        "base_url": "https://vlm.example.org/v1", "model": "m", "api_key_env": "HOUSE_VLM_KEY"}}}))
    assert node_module.profile_names() == ["house-vlm"]
    assert folder_paths.get_public_user_directory("__dualref") is None  # not reachable through /userdata


def test_with_no_profile_the_node_lists_none_and_says_where_the_config_goes(node_module, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.delenv("DUALREF_JUDGE_CONFIG", raising=False)
    monkeypatch.delenv("DUALREF_JUDGE_URL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path / "user"))
    schema = node_module.VLMJudge.define_schema()
    profile = next(i for i in schema.inputs if i.id == "profile")
    assert profile.options == [node_module.NO_PROFILE] and "toy" not in profile.options
    assert "ComfyUI/user/__dualref/judges.json" in profile.tooltip
    with pytest.raises(ValueError, match=r"no judge profile is configured.*ComfyUI/user/__dualref/judges\.json"):
        node_module.VLMJudge.execute(batch([0]), batch([1]), batch([2]), "x", node_module.NO_PROFILE)


def _endpoint_error(node_module, tmp_path, monkeypatch, script=None, url=None):
    tmp_path.mkdir()
    server = serve(tmp_path, monkeypatch, script or (lambda call: Reply.answer("Yes")))
    try:
        if url is not None:  # the profile points at a port nobody listens on
            path = tmp_path / "judges.json"
            config = json.loads(path.read_text())
            config["profiles"]["loop"]["base_url"] = url
            path.write_text(json.dumps(config))
        with pytest.raises(RuntimeError) as e:
            node_module.VLMJudge.execute(batch([0]), batch([1]), batch([2]), "x", "loop")
    finally:
        server.stop()
        for _, _, pool in node_module._JUDGES.values():
            pool.close(close_judge=True)
        node_module._JUDGES.clear()
    message = str(e.value)
    assert message.startswith("VLMJudge: profile 'loop' could not judge 1 of 1 images") and len(message) < 800
    assert "sk-node-test" not in message and "Traceback" not in message
    return message


def test_endpoint_errors_are_readable_node_errors(node_module, tmp_path, monkeypatch):
    """A real endpoint's 401, rate limit and absence each name the cause and the fix."""
    from comfy_host import free_port

    message = _endpoint_error(node_module, tmp_path / "401", monkeypatch,
                              lambda call: Reply.error(401, "Incorrect API key provided"))
    assert "refused the key: set $DUALREF_NODE_TEST_KEY on the ComfyUI server" in message
    message = _endpoint_error(node_module, tmp_path / "429", monkeypatch,
                              lambda call: Reply.error(429, "Rate limit reached", headers={"Retry-After": "0"}))
    assert "rate limit was hit" in message and "'rpm'" in message
    url = f"http://127.0.0.1:{free_port()}/v1"
    message = _endpoint_error(node_module, tmp_path / "down", monkeypatch, url=url)
    assert f"the endpoint {url} could not be reached" in message


def test_answers_echoing_the_key_never_reach_the_node_output(node_module, tmp_path, monkeypatch):
    """Issue 18 item 6: the key a server echoes in its answers is scrubbed from the node's outputs and errors."""
    def script(call):
        index = round(call.images()[2].getpixel((0, 0))[0])
        if index == 1:
            return Reply.answer(f"I refuse. You sent {call.auth}")
        return Reply.answer(f"{TRUTH[index][QUESTIONS.index(call.question)]} Your key: {call.auth.split()[-1]}")

    server = serve(tmp_path, monkeypatch, script, parse_retries=0)
    try:
        out = node_module.VLMJudge.execute(batch([0, 2]), batch([1]), batch([2]), "x", "loop")
        with pytest.raises(RuntimeError) as info:
            node_module.VLMJudge.execute(batch([1]), batch([1]), batch([2]), "x", "loop")
    finally:
        server.stop()
    shown = "\n".join(str(x) for x in out.result[:3]) + str(info.value)
    assert "Your key: [REDACTED]" in shown and "You sent [REDACTED]" in shown
    assert "sk-node-test" not in shown and "abcdef123456" not in shown


def test_a_rejected_key_stops_the_node_after_the_first_answer(node_module, tmp_path, monkeypatch):
    server = serve(tmp_path, monkeypatch, lambda call: Reply.error(403, "Project lacks access to model"), concurrency=1)
    try:
        with pytest.raises(RuntimeError, match="HTTP 403 .*Project lacks access"):
            node_module.VLMJudge.execute(batch([0, 1, 2, 3]), batch([1]), batch([2]), "x", "loop")
        assert server.count == 1  # twelve questions, one request
        server.script = truth_script  # access granted: the next run rebuilds the judge and asks again
        out = node_module.VLMJudge.execute(batch([0]), batch([1]), batch([2]), "x", "loop")
        assert out.result[0] == pytest.approx([1 / 3])
    finally:
        server.stop()


def test_optional_image_3_is_sent_third_and_named_in_the_question(node_module, tmp_path, monkeypatch):
    """Issue 19: with image_3 the judge sees reference 1, 2, 3 and then the output, and the consistency
    question names all three references."""
    def script(call):
        index = round(call.images()[3].getpixel((0, 0))[0])
        return Reply.answer(TRUTH[index][QUESTIONS.index(call.question)])

    server = serve(tmp_path, monkeypatch, script)
    try:
        out = node_module.VLMJudge.execute(batch([1, 2]), batch([50]), batch([90]), "x", "loop", image_3=batch([120]))
    finally:
        server.stop()
    scores, *_, best_index = out.result
    assert scores == pytest.approx([1.0, 2 / 3]) and best_index == 0
    for call in server.calls:
        assert [round(im.getpixel((0, 0))[0]) for im in call.images()][:3] == [50, 90, 120]
        assert "Image 4 (the edited output):" in call.user_text
    consistency = [c for c in server.calls if c.question == "consistency"]
    assert consistency and all("from Image 1, from Image 2 and from Image 3?" in c.user_text for c in consistency)
