"""The vision-language judge: three yes/no questions -> a Verdict. Light imports only.

Public API (what training, the benchmark and the ComfyUI node call):
    judge = load_judge("gpt-5")              # a profile name from judges.json, or "toy"
    verdict = judge.judge(request)           # Verdict, or raises Unjudged
    results = judge.judge_many(requests)     # concurrent; Verdict | Unjudged per request, in order
    pool = JudgePool(judge); fut = pool.submit(request)   # Future[Verdict]: overlap with sampling
"""
from .base import Judge
from .config import Profile, ProfileError, load_profiles
from .edit_score import EditScore
from .pool import JudgePool
from .prompts import PROMPT_VERSION
from .registry import load_judge, register_backend
from .verdict import MODES, QUESTIONS, JudgeRequest, Unjudged, Verdict

__all__ = [
    "EditScore", "Judge", "JudgePool", "JudgeRequest", "MODES", "PROMPT_VERSION", "Profile", "ProfileError",
    "QUESTIONS", "Unjudged", "Verdict", "load_judge", "load_profiles", "register_backend",
]
