"""The vision-language judge: three yes/no questions -> a Verdict. Light imports only."""
from .verdict import MODES, QUESTIONS, JudgeRequest, Unjudged, Verdict

__all__ = ["MODES", "QUESTIONS", "JudgeRequest", "Unjudged", "Verdict"]
