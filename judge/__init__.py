"""The vision-language judge: three yes/no questions -> a Verdict. Light imports only."""
from .base import Judge
from .verdict import MODES, QUESTIONS, JudgeRequest, Unjudged, Verdict

__all__ = ["Judge", "MODES", "QUESTIONS", "JudgeRequest", "Unjudged", "Verdict"]
