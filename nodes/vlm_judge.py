"""VLMJudge: score a batch of edited images against both references with a judge profile (best-of-N).

The node takes a profile NAME only; the endpoint URL and the key's environment variable live in
the server's judges.json (see judge/config.py), so a workflow can neither carry a key nor point
the server's key at another URL.
"""
from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import FIRST_COMPLETED, wait

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..judge.config import ProfileError, find_config, load_profiles
from ..judge.pool import JudgePool
from ..judge.registry import load_judge
from ..judge.verdict import QUESTIONS, JudgeRequest, Unjudged

log = logging.getLogger(__name__)

NO_PROFILE = "none configured (see tooltip)"  # the only choice until judges.json names an endpoint
CONFIG_HELP = (
    "Judge profiles live on the ComfyUI server, never in a workflow: put them in "
    "ComfyUI/user/__dualref/judges.json (or the file $DUALREF_JUDGE_CONFIG names, or "
    "~/.config/dualref/judges.json), starting from judge/judges.example.json in the DualRef folder; each "
    "profile gives an endpoint URL, a model and the NAME of the environment variable holding the key. "
    "Then refresh the page and pick the profile here."
)
_UNREACHABLE = ("ConnectionError", "Failed to establish", "Max retries exceeded", "Timeout", "timed out",
                "Connection refused")

_LOCK = threading.Lock()
_JUDGES: dict[str, tuple] = {}  # profile name -> (config signature, judge, pool); reused across runs


def _config_dir():
    """<ComfyUI>/user/__dualref: a system-user folder, never served over ComfyUI's /userdata API."""
    try:
        return folder_paths.get_system_user_directory("dualref")
    except Exception:  # noqa: BLE001 - an older ComfyUI: fall back to $DUALREF_JUDGE_CONFIG / ~/.config
        return None


def _config_signature():
    path = find_config(_config_dir())
    return (str(path), path.stat().st_mtime_ns) if path else None


def profile_names() -> list[str]:
    """Profiles an artist can use: endpoints from the server's config. The built-in ``toy`` judge is
    left out (it only works on toy-world images that carry a plan); with nothing configured the one
    choice is :data:`NO_PROFILE`."""
    try:
        profiles = load_profiles(config_dir=_config_dir())
    except ProfileError as e:
        log.error("DualRef judge config: %s", e)
        return [NO_PROFILE]
    names = sorted(n for n, p in profiles.items() if p.kind != "toy"
                   and not (p.kind == "ensemble" and all(profiles[m].kind == "toy" for m in p.members)))
    return names or [NO_PROFILE]


def _failure_message(profile: str, failed: dict, total: int) -> str:
    """A node error a user can act on: what the endpoint said, and the fix for the usual causes."""
    reasons = [r.reason for r in failed.values()]
    text = " ".join(reasons)
    try:
        settings = load_profiles(config_dir=_config_dir()).get(profile)
    except ProfileError:
        settings = None
    url = getattr(settings, "base_url", None) or "the profile's base_url"
    key = f"${settings.api_key_env}" if settings is not None and settings.api_key_env else "its key variable"
    if "HTTP 401" in text or "HTTP 403" in text:
        fix = (f"the endpoint refused the key: set {key} on the ComfyUI server to a valid key for {url} "
               "and restart ComfyUI")
    elif "HTTP 429" in text:
        fix = (f"the endpoint's rate limit was hit: wait a minute and queue again, or lower 'rpm' or "
               f"'concurrency' of profile {profile!r} in judges.json")
    elif any(marker in text for marker in _UNREACHABLE):
        fix = (f"the endpoint {url} could not be reached: check that it is running and that base_url in "
               "judges.json is right, then queue again")
    else:
        fix = "queue again to retry; answers already received are cached"
    first = f"image {next(iter(failed))}: {reasons[0]}"
    first = first if len(first) <= 240 else first[:237] + "..."
    return (f"VLMJudge: profile {profile!r} could not judge {len(failed)} of {total} images, so nothing was "
            f"scored: {fix}. (First failure: {first})")


def _pool_for(profile: str) -> JudgePool:
    """A judge for the profile, kept warm between queue runs; rebuilt when the config file changes."""
    with _LOCK:
        try:
            signature = _config_signature()
            cached = _JUDGES.get(profile)
            # A judge stopped by the server (bad key, unknown model) or by the Stop button is rebuilt:
            # the next queue run tries again.
            if cached is not None and cached[0] == signature and cached[2].usable:
                return cached[2]
            judge = load_judge(profile, config_dir=_config_dir())
        except ProfileError as e:
            raise ValueError(f"VLMJudge: {e}") from None
        if cached is not None:
            cached[2].close(close_judge=True)
        pool = JudgePool(judge)
        _JUDGES[profile] = (signature, judge, pool)
        return pool


def _plan(plan_json: str) -> dict | None:
    if not plan_json or not plan_json.strip():
        return None
    try:
        plan = json.loads(plan_json)
    except ValueError as e:
        raise ValueError(f"VLMJudge: 'plan' must be a JSON object ({e})") from None
    if not isinstance(plan, dict):
        raise ValueError("VLMJudge: 'plan' must be a JSON object")
    return plan


def _judge_batch(pool: JudgePool, requests: list[JudgeRequest]) -> list:
    """Submit all, collect as they finish; progress per image; the Stop button cancels the rest."""
    bar = comfy.utils.ProgressBar(len(requests))
    index = {pool.submit(r): i for i, r in enumerate(requests)}
    results: list = [None] * len(requests)
    pending = set(index)
    try:
        while pending:
            comfy.model_management.throw_exception_if_processing_interrupted()
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    results[index[future]] = future.result()
                except Unjudged as failure:
                    results[index[future]] = failure
                bar.update(1)
    except BaseException:
        for future in pending:
            future.cancel()
        if pending:  # the Stop button: walk away from in-flight requests too (the judge is rebuilt next run)
            pool.abort()
        raise
    return results


def _line(i: int, verdict) -> str:
    parts = ", ".join(f"{q} {getattr(verdict, q):.3g}" for q in QUESTIONS)
    return f"image {i}: reward {verdict.reward:.3f} ({parts})"


class VLMJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = profile_names()
        return io.Schema(
            node_id="VLMJudge",
            display_name="VLM Judge (DualRef)",
            category="DualRef/Judge",
            description=(
                "Asks a vision-language judge the paper's three yes/no questions about each edited image "
                "(follows the instruction? keeps what it takes from both references? realistic?) and scores "
                "it as their mean. Images are sent in a fixed order: image 1 = reference 1, image 2 = "
                "reference 2, image 3 = the output (with the optional image_3: image 3 = reference 3, image 4 = "
                "the output, and the consistency question names all three). Picks the best image of the batch "
                "(best-of-N). The "
                "endpoint and its key come from the server's judges.json profile, never from the workflow; "
                "a judge that cannot answer stops the run with an error instead of giving a score."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The edited outputs to score; a batch is judged image by image and the best one is picked."),
                io.Image.Input("image_1", tooltip="Reference 1, shown to the judge as Image 1 (first image of the batch is used)."),
                io.Image.Input("image_2", tooltip="Reference 2, shown to the judge as Image 2 (first image of the batch is used)."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip="The editing instruction the outputs were made from, e.g. 'put the dog from image 2 into the park of image 1'."),
                io.Combo.Input("profile", options=names, default=names[0],
                               tooltip="Judge profile by name (URL, model, key variable and limits stay on the server). "
                                       + CONFIG_HELP),
                io.String.Input("plan", multiline=True, default="", optional=True,
                                tooltip="Optional JSON edit plan; only the toy world's programmatic judge "
                                        "(headless, `python -m judge --profile toy`) uses it."),
                io.Image.Input("image_3", optional=True, tooltip=(
                    "Optional reference 3, shown to the judge as Image 3 (the output then comes fourth); "
                    "connect it when the edit used three references.")),
            ],
            outputs=[
                io.Float.Output("scores", is_output_list=True, tooltip="Reward per image (mean of the three answers, 0-1), in batch order."),
                io.String.Output("scores_text", tooltip="One line per image: reward and each question's score."),
                io.String.Output("verdict", tooltip="The judge's answer to each question for each image, with the judge model and prompt version."),
                io.Image.Output("best_image", tooltip="The highest-scoring image of the batch (first one on ties)."),
                io.Int.Output("best_index", tooltip="Batch index (0-based) of the best image."),
            ],
        )

    @classmethod
    def execute(cls, images, image_1, image_2, instruction, profile, plan="", image_3=None) -> io.NodeOutput:
        if not instruction or not instruction.strip():
            raise ValueError("VLMJudge: the instruction is empty; connect or type the editing instruction")
        if profile == NO_PROFILE:
            raise ValueError(f"VLMJudge: no judge profile is configured. {CONFIG_HELP}")
        plan_dict = _plan(plan)
        pool = _pool_for(profile)
        more = [image_3[0]] if image_3 is not None else []
        requests = [
            JudgeRequest(instruction, image_1[0], image_2[0], images[i], sample_id=f"image {i}", plan=plan_dict,
                         more_references=more)
            for i in range(images.shape[0])
        ]
        results = _judge_batch(pool, requests)
        failed = {i: r for i, r in enumerate(results) if isinstance(r, Unjudged)}
        if failed:
            raise RuntimeError(_failure_message(profile, failed, len(results)))
        rewards = [v.reward for v in results]
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        verdict_text = "\n\n".join(
            f"image {i} — {v.judge}, {v.mode}, prompts {v.prompt_version}"
            + "".join(f"\n  {q}: {v.answers.get(q, '')}" for q in QUESTIONS)
            for i, v in enumerate(results)
        )
        scores_text = "\n".join(_line(i, v) for i, v in enumerate(results))
        return io.NodeOutput(rewards, scores_text, verdict_text, images[best: best + 1], best)
