"""Three references headless (issue 19, item 3): the manifest contract, SFT (one learned gate per
reference), the benchmark's headless generator with the toy judge, and a DDPO iteration, on the opt-in
three-reference toy task ``two_figures_scene``; and the VLM judge's prompt naming every reference.

The model is the micro toy architecture with random weights (tests/sft_helpers.micro_model): the real
loading, caching, layout, LoRA, sampling and judging code, in seconds.
"""
from __future__ import annotations

import json
import numpy as np
import pytest
from PIL import Image

from ddpo_helpers import ddpo_config, metrics
from judge import prompts
from judge.manifest import ManifestError, parse_line
from judge.verdict import JudgeRequest
from sft_helpers import micro_model, micro_world, sft_config
from training.toy.world import make_sample

TASK = "two_figures_scene"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    return micro_model(root / "micro"), micro_world(root / "world", tasks=(TASK,), train=8, test=2), root


def line(task, images):
    return json.dumps({"id": "a", "task": task, "images": images, "instruction": "Do it"})


def test_manifest_takes_two_or_three_images_for_dual_tasks_and_names_the_rule():
    assert len(parse_line(line("animal_scene", ["1.png", "2.png", "3.png"])).images) == 3
    assert len(parse_line(line("animal_scene", ["1.png", "2.png"])).images) == 2
    assert len(parse_line(line(TASK, ["1.png", "2.png", "3.png"])).images) == 3
    assert len(parse_line(line("single_edit", ["1.png"])).images) == 1
    for task, images, rule in [("animal_scene", ["1.png"], "a dual-reference task and takes 2 to 3"),
                               ("animal_scene", ["1", "2", "3", "4"], "takes 2 to 3"),
                               ("single_edit", ["1.png", "2.png"], "a single-reference task and takes 1"),
                               (TASK, ["1.png", "2.png"], "a three-reference task and takes 3")]:
        with pytest.raises(ManifestError, match=rule) as e:
            parse_line(line(task, images), "m.jsonl", 4)
        assert str(e.value).startswith("m.jsonl:4: 'images' has") and "one path per reference" in str(e.value)
    for images in (["1.png", ""], [], "1.png"):
        with pytest.raises(ManifestError, match="'images' must be a list of image paths"):
            parse_line(line("animal_scene", images), "m.jsonl", 1)


def test_judge_prompts_name_every_reference_and_keep_the_two_reference_wording():
    # two references: the exact text every cached answer was given (PROMPT_VERSION unchanged)
    assert prompts.image_labels(2) == prompts.IMAGE_LABELS and prompts.system_yes_no(2) == prompts.SYSTEM_YES_NO
    assert all(prompts.question_text(q, "x", 2) == prompts.QUESTIONS[q].format(instruction="x")
               for q in prompts.QUESTIONS)
    assert prompts.image_labels(3) == ("Image 1 (reference 1):", "Image 2 (reference 2):",
                                       "Image 3 (reference 3):", "Image 4 (the edited output):")
    consistency = prompts.question_text("consistency", "x", 3)
    assert "from all three references" in consistency and "from Image 1, from Image 2 and from Image 3?" in consistency
    assert all("Image 4" in prompts.question_text(q, "x", 3) for q in prompts.QUESTIONS)
    system = prompts.system_yes_no(3)
    assert "four images in this fixed order: Image 1 is reference 1, Image 2 is reference 2, Image 3 is " \
           "reference 3, and Image 4 is the edited output" in system
    with pytest.raises(ValueError, match="two or more references"):
        prompts.system_yes_no(1)


def test_vlm_judge_sends_four_images_and_the_three_reference_questions(tmp_path):
    """The HTTP judge against a scripted OpenAI-compatible server on 127.0.0.1: a three-reference request
    sends the references in order and the output last, with the k-reference wording."""
    from judge.config import Profile
    from judge.loopback import Reply, ScriptedChatServer
    from judge.openai_compat import OpenAIJudge

    calls = []

    def script(call):
        calls.append(call)
        return Reply.answer("Yes, it does.")

    sample = make_sample(TASK, 0, 1, "test")
    with ScriptedChatServer(script) as server:
        judge = OpenAIJudge(Profile(name="loop", base_url=server.base_url, model="judge-vlm", api_key_env=None,
                                    cache=False, timeout_s=5.0))
        try:
            verdict = judge.judge(JudgeRequest.of(sample.instruction, sample.refs, sample.target, "s1", TASK))
        finally:
            judge.close()
    assert verdict.reward == 1.0 and len(calls) == 3
    assert {c.question for c in calls} == set(prompts.QUESTIONS)
    for call in calls:
        images = [np.asarray(im) for im in call.images()]
        assert len(images) == 4
        for got, want in zip(images, sample.refs + [sample.target]):
            assert np.abs(got.astype(int) - want.astype(int)).mean() < 8  # the same picture, in this order
        assert "Image 4 (the edited output):" in call.user_text
        assert call.messages[0]["content"] == prompts.system_yes_no(3)
    consistency = next(c for c in calls if c.question == "consistency")
    assert "from Image 1, from Image 2 and from Image 3?" in consistency.user_text


@pytest.fixture(scope="module")
def sft_lora(setup):
    from training.sft.trainer import train

    model, manifest, root = setup
    cfg = sft_config(model, manifest, root / "sft", train={"max_steps": 3},
                     lora={"learn_gates": True, "gate_lr": 0.05}, run={"val_at_start": False})
    return train(cfg).lora_path


def test_sft_trains_on_three_references_with_one_gate_each(sft_lora):
    from training.lora_io import load_lora

    _, meta = load_lora(sft_lora)
    assert meta.gates is not None and len(meta.gates) == 3 and all(g > 0 for g in meta.gates)
    assert len(set(meta.gates)) == 3  # each reference's gate moved on its own


def test_benchmark_headless_on_a_three_reference_manifest(setup, tmp_path, capsys):
    """python -m training.bench on three-reference samples: generated by the headless sampler, judged by
    the toy judge with all three references (exact targets put in place score 1)."""
    from training.bench.cli import main

    model, manifest, _ = setup
    run = tmp_path / "bench"
    (run / "outputs").mkdir(parents=True)
    exact = f"{TASK}-test-00000"
    Image.fromarray(make_sample(TASK, 0, 0, "test").target).save(run / "outputs" / f"{exact}.png")
    assert main(["--manifest", str(manifest), "--model", str(model), "--tasks", TASK, "--out", str(run),
                 "--cache-dir", str(tmp_path / "cache"), "--steps", "2", "-q"]) == 0
    verdicts = {json.loads(t)["id"]: json.loads(t) for t in
                (run / "judge" / "toy-binary" / "verdicts.jsonl").read_text().splitlines()}
    assert set(verdicts) == {exact, f"{TASK}-test-00001"}
    assert all(v["status"] == "judged" for v in verdicts.values())
    assert verdicts[exact]["verdict"]["reward"] == 1.0
    generated = [json.loads(t) for t in (run / "generated.jsonl").read_text().splitlines()]
    assert [g["id"] for g in generated if g["status"] == "ok"] == [f"{TASK}-test-00001"]
    with Image.open(run / "outputs" / f"{TASK}-test-00001.png") as im:
        assert im.size == (64, 64)
    assert f"| {TASK} |" in capsys.readouterr().out


def test_ddpo_iteration_on_three_references(setup, sft_lora, tmp_path):
    """Rollouts read three references (under the SFT LoRA's three learned gates), the toy judge answers
    the three questions for each."""
    from training.ddpo.loop import train_ddpo

    model, manifest, _ = setup
    train_ddpo(ddpo_config(model, manifest, sft_lora, tmp_path / "ddpo", ddpo={
        "iterations": 1, "prompts_per_iteration": 2, "group_size": 2, "rollout_batch": 2, "train_batch": 2,
        "train_chunk": 2, "clip_range": 1e-3}))
    (row,) = metrics(tmp_path / "ddpo")
    assert row["n_judged"] == 4 and row["n_unjudged"] == 0 and 0 <= row["reward"] <= 1
    assert any((tmp_path / "ddpo").glob("*.safetensors"))
