"""From a profile name to a ready Judge: ``load_judge("gpt-5")``, ``load_judge("toy")``.

Backends are looked up by the profile's ``kind``; each factory imports its module only when
used, so the toy world's judge (and anything heavy it needs) loads only when asked for.
"""
from __future__ import annotations

import logging
from typing import Callable

from .base import Judge
from .config import Profile, ProfileError, load_profiles

log = logging.getLogger(__name__)

_FACTORIES: dict[str, Callable[..., Judge]] = {}
# Settings a caller (CLI flag, training config) may change; URL, key variable and kind stay in the file.
OVERRIDABLE = {
    "mode", "concurrency", "rpm", "timeout_s", "connect_timeout_s", "max_retries", "backoff_base_s",
    "backoff_max_s", "max_retry_after_s", "parse_retries", "cache", "cache_dir", "probability_fallback",
    "image_max_side", "max_tokens", "top_logprobs",
}


def register_backend(kind: str, factory: Callable[..., Judge]) -> None:
    """``factory(profile, profiles, **overrides) -> Judge``."""
    _FACTORIES[kind] = factory


def _openai(profile: Profile, profiles, **overrides) -> Judge:
    # a backend loads when a profile uses it: ComfyUI start-up imports this module
    from .openai_compat import OpenAIJudge

    profile.api_key()  # fail now, naming the variable, rather than at the first request
    return OpenAIJudge(profile)


def _toy(profile: Profile, profiles, **overrides) -> Judge:
    try:
        # a backend loads when a profile uses it: ComfyUI start-up imports this module
        from .toy import ToyJudge
    except ImportError as e:
        raise ProfileError(f"the toy judge (judge/toy/) could not be imported: {e}") from None
    return ToyJudge(**{"mode": profile.mode, **profile.options})


def _ensemble(profile: Profile, profiles, _depth: int = 0, **overrides) -> Judge:
    # a backend loads when a profile uses it: ComfyUI start-up imports this module
    from .ensemble import EnsembleJudge

    if _depth > 4:
        raise ProfileError(f"ensemble profile {profile.name!r}: members nest too deeply (a cycle?)")
    members = {name: _build(profiles[name], profiles, _depth + 1, **overrides) for name in profile.members}
    return EnsembleJudge(members, min_members=profile.min_members, name=profile.judge_id)


register_backend("openai", _openai)
register_backend("toy", _toy)
register_backend("ensemble", _ensemble)


def _build(profile: Profile, profiles, _depth: int = 0, **overrides) -> Judge:
    if profile.kind != "ensemble" and overrides:
        profile = profile.with_overrides(**overrides)
    factory = _FACTORIES.get(profile.kind)
    if factory is None:
        raise ProfileError(f"no judge backend for kind {profile.kind!r}; known: {', '.join(sorted(_FACTORIES))}")
    if profile.kind == "ensemble":
        return factory(profile, profiles, _depth, **overrides)
    return factory(profile, profiles, **overrides)


def load_judge(profile: str | Profile, *, config=None, config_dir=None, **overrides) -> Judge:
    """The judge for a profile name (or Profile). ``overrides``: see ``OVERRIDABLE``.

    Raises ProfileError (a ValueError) naming the profile and the fix when it is unknown or
    misconfigured, e.g. when its key variable is unset.
    """
    bad = set(overrides) - OVERRIDABLE
    if bad:
        raise ProfileError(f"cannot override {', '.join(sorted(bad))} when loading a judge; set it in the profile file")
    profiles = load_profiles(config, config_dir=config_dir)
    if isinstance(profile, Profile):
        profiles[profile.name] = profile
    else:
        if profile not in profiles:
            raise ProfileError(f"unknown judge profile {profile!r}; configured: {', '.join(sorted(profiles))} "
                               "(add it to judges.json, see judge/judges.example.json)")
        profile = profiles[profile]
    return _build(profile, profiles, **overrides)
