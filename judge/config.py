"""Judge endpoint profiles: name -> URL, model, the *name* of the key's environment variable, limits, price.

Where profiles come from, first match wins for the file:
  1. ``$DUALREF_JUDGE_CONFIG`` (a .json or .toml file; an error if it is set but missing),
  2. ``<ComfyUI>/user/__dualref/judges.json`` when running inside ComfyUI (a "system user"
     folder, which ComfyUI never serves over HTTP, so no client can read or rewrite it),
  3. ``$XDG_CONFIG_HOME/dualref/judges.json`` (default ``~/.config/dualref/judges.json``).
Plus the built-in ``toy`` profile, and an ``env`` profile when ``$DUALREF_JUDGE_URL`` and
``$DUALREF_JUDGE_MODEL`` are set (key variable name in ``$DUALREF_JUDGE_KEY_ENV``).

A profile never holds a key, only the variable's name; the key is read from the environment
when a request is sent. Workflows and CLIs choose a profile by name, so nothing a workflow
carries can point the server's key at another URL.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

KINDS = ("openai", "toy", "ensemble")
JUDGE_MODES = ("binary", "probability")
CONFIG_ENV = "DUALREF_JUDGE_CONFIG"
PROFILE_ENV = "DUALREF_JUDGE_PROFILE"
CACHE_ENV = "DUALREF_JUDGE_CACHE"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_FIELDS = ("api_key", "key", "token", "authorization", "headers", "password", "secret")
# Field names that carry credentials, compared lowercased without separators ("x-api-key" -> "xapikey").
_CREDENTIAL_NAMES = {"key", "token", "auth", "authorization", "bearer", "cookie", "password", "passwd", "secret",
                     "credential", "credentials", "headers", "extraheaders", "defaultheaders"}
_CREDENTIAL_ENDINGS = ("apikey", "secret", "secretkey", "privatekey", "password", "accesstoken", "authtoken",
                       "bearertoken", "idtoken", "refreshtoken", "sessiontoken", "apitoken", "credential", "credentials",
                       "authorization")
# Values that look like credentials: well-known key shapes, a bearer header, or a long run of
# letters and digits (a random token; model names and words are broken up by -, /, . or spaces).
_CREDENTIAL_VALUE = re.compile(
    r"(?i:^\s*(?:bearer|basic)\s+\S)"
    r"|\b(?:sk|pk|rk)[-_][A-Za-z0-9_-]{8,}|\bsk-ant-|\bhf_[A-Za-z0-9]{16,}|\bAIza[0-9A-Za-z_-]{16,}"
    r"|\b(?:ghp|gho|ghs|ghu|ghr)_[A-Za-z0-9]{16,}|\bgithub_pat_|\bglpat-|\bxox[abprs]-|\bAKIA[0-9A-Z]{16}\b|\bya29\."
    r"|\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # a JWT
    r"|(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}",
)  # case-sensitive: keys are "sk-...", a variable may well be called SK_SERVICE_KEY


def looks_like_credential(value: str) -> bool:
    """True for a string shaped like an API key or token (never printed by the checks that use it)."""
    return isinstance(value, str) and bool(_CREDENTIAL_VALUE.search(value))


def _credential_name(name) -> bool:
    flat = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return flat in _CREDENTIAL_NAMES or flat.endswith(_CREDENTIAL_ENDINGS)


def _credential_path(value, path: str = "extra_body") -> str | None:
    """Where in a (nested) extra_body a credential-looking field name or value sits, or None."""
    if isinstance(value, dict):
        for name, item in value.items():
            where = f"{path}.{name}" if not looks_like_credential(str(name)) else f"{path}.<a key-like field name>"
            if _credential_name(name) or looks_like_credential(str(name)):
                return where
            found = _credential_path(item, where)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _credential_path(item, f"{path}[{i}]")
            if found:
                return found
    elif looks_like_credential(value):
        return path
    return None


def _key_like_variable(name: str) -> bool:
    """A valid variable name that is really a key: a known key shape, or a segment (between
    underscores) of 20+ letters and digits mixed ("hf_AbC123...", "AKIA..." ids)."""
    if looks_like_credential(name):
        return True
    return any(len(part) >= 20 and re.search(r"[0-9]", part) and re.search(r"[A-Za-z]", part)
               for part in name.split("_"))


class ProfileError(ValueError):
    """A misconfigured judge profile, naming the profile, the file and the fix."""


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str = "openai"
    base_url: str | None = None  # e.g. https://api.openai.com/v1 ("/chat/completions" is appended)
    model: str | None = None
    api_key_env: str | None = None  # the NAME of the variable holding the key; None = no key sent
    mode: str = "binary"  # binary (the paper) | probability (P(yes) from top log-probs)
    concurrency: int = 4  # requests in flight at once
    rpm: float | None = None  # requests per minute; None = no limit
    timeout_s: float = 60.0  # read timeout per request
    connect_timeout_s: float = 10.0
    max_retries: int = 5  # transport retries (408/429/5xx/timeouts/dropped connections/bad bodies)
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0  # a longer Retry-After gives up instead of stalling
    parse_retries: int = 2  # re-asks after a reply that does not begin with yes/no
    token_param: str = "max_tokens"  # or "max_completion_tokens" (OpenAI reasoning models)
    max_tokens: int = 64
    temperature: float | None = 0.0  # None: leave it out (models that only accept the default)
    top_logprobs: int = 20  # probability mode
    probability_fallback: str = "none"  # "binary": score 0/1 from the text when log-probs are missing
    image_max_side: int | None = 1024
    price_input_per_mtok: float = 0.0  # USD per million prompt tokens
    price_output_per_mtok: float = 0.0  # USD per million completion tokens
    cache: bool = True
    cache_dir: str | None = None
    extra_body: dict = field(default_factory=dict)  # extra request fields, e.g. reasoning_effort
    members: tuple = ()  # ensemble: member profile names
    min_members: int | None = None  # ensemble: members that must answer (default: all)
    options: dict = field(default_factory=dict)  # constructor options for other kinds (toy)
    allow_insecure_http: bool = False  # allow sending a key over plain http to a non-loopback host
    source: str = "<built-in>"

    def __post_init__(self):
        self._check()

    @property
    def judge_id(self) -> str:
        """What a verdict's ``judge`` field says: model@host, or the kind for programmatic judges."""
        if self.kind == "openai":
            return f"{self.model}@{urlsplit(self.base_url).hostname}"
        if self.kind == "ensemble":
            return "ensemble(" + ",".join(self.members) + ")"
        return self.name

    def api_key(self) -> str | None:
        """The key, read from the environment now; an error naming the variable when unset."""
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env, "").strip()
        if not value:
            raise ProfileError(
                f"judge profile {self.name!r} needs an API key in the environment variable "
                f"${self.api_key_env}, which is not set; export it where the server/CLI runs"
            )
        return value

    def with_overrides(self, **changes) -> "Profile":
        forbidden = {"base_url", "api_key_env", "allow_insecure_http", "kind", "name"} & set(changes)
        if forbidden:
            raise ProfileError(f"{', '.join(sorted(forbidden))} can only be set in the profile config file")
        return dataclasses.replace(self, **changes)

    def public_dict(self) -> dict:
        """Everything about the profile that is safe to print or record (it holds no key)."""
        d = dataclasses.asdict(self)
        d["members"] = list(self.members)
        d["api_key_set"] = bool(self.api_key_env and os.environ.get(self.api_key_env))
        return d

    def _check(self):
        where = f"judge profile {self.name!r} ({self.source})"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ProfileError(f"{where}: name must be 1-64 letters, digits or _.:@+- characters")
        if self.kind not in KINDS:
            raise ProfileError(f"{where}: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.mode not in JUDGE_MODES:
            raise ProfileError(f"{where}: unknown mode {self.mode!r}; use binary or probability")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str) or not _ENV_NAME.match(self.api_key_env)
                                             or _key_like_variable(self.api_key_env)):
            # Never echo the value: it may be the key itself, pasted in the wrong place.
            raise ProfileError(
                f"{where}: api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY), "
                "not the key itself; the value given is not shown (it may be a key: if so, revoke it)"
            )
        if self.token_param not in ("max_tokens", "max_completion_tokens"):
            raise ProfileError(f"{where}: token_param must be max_tokens or max_completion_tokens")
        if self.probability_fallback not in ("none", "binary"):
            raise ProfileError(f"{where}: probability_fallback must be 'none' or 'binary'")
        if int(self.concurrency) < 1 or (self.rpm is not None and float(self.rpm) <= 0):
            raise ProfileError(f"{where}: concurrency must be >= 1 and rpm > 0 (or null for no limit)")
        if not 0 <= int(self.top_logprobs) <= 20:
            raise ProfileError(f"{where}: top_logprobs must be within 0-20")
        if not isinstance(self.extra_body, dict):
            raise ProfileError(f"{where}: extra_body must be an object without credentials")
        found = _credential_path(self.extra_body)
        if found:  # named by its place, never by its value
            raise ProfileError(
                f"{where}: extra_body must be an object without credentials; {found} looks like one (its value is "
                "not shown). Keys go in an environment variable named by api_key_env")
        if self.kind == "openai":
            self._check_url(where)
        if self.kind == "ensemble" and not self.members:
            raise ProfileError(f"{where}: an ensemble needs 'members': a list of profile names")

    def _check_url(self, where: str):
        if not self.base_url or not self.model:
            raise ProfileError(f"{where}: an openai-kind profile needs base_url and model")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProfileError(f"{where}: base_url must be an http(s) URL, got {self.base_url!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ProfileError(
                f"{where}: base_url must not carry credentials or a query string; name the key's "
                "environment variable in api_key_env instead"
            )
        if parts.scheme == "http" and self.api_key_env and not self.allow_insecure_http and not _is_loopback(parts.hostname):
            raise ProfileError(
                f"{where}: refusing to send the key in ${self.api_key_env} over plain http to "
                f"{parts.hostname}; use https or set allow_insecure_http: true for a trusted network"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


BUILTIN = {"toy": Profile(name="toy", kind="toy", cache=False)}


def find_config(config_dir: str | os.PathLike | None = None) -> Path | None:
    """The judges config file; ``config_dir``: a folder that may hold judges.json (ComfyUI's)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ProfileError(f"${CONFIG_ENV} points at {path}, which does not exist; fix or unset it")
        return path
    candidates = []
    if config_dir:
        candidates.append(Path(config_dir) / "judges.json")
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    candidates.append(Path(xdg) / "dualref" / "judges.json")
    return next((p for p in candidates if p.is_file()), None)


def _read(path: Path) -> dict:
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser as a package (requirements.txt)
                import tomli as tomllib

            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProfileError(f"cannot read judge config {path}: {e}") from None


def _profile_from(name: str, raw: dict, source: str) -> Profile:
    if not isinstance(raw, dict):
        raise ProfileError(f"judge profile {name!r} ({source}) must be an object")
    fields = {f.name for f in dataclasses.fields(Profile)} - {"name", "source"}
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" and the like
    for key in raw:
        if key.lower() in _SECRET_FIELDS:
            raise ProfileError(
                f"judge profile {name!r} ({source}) has a {key!r} field: keys never go in config files; "
                "put the key in an environment variable and name it in api_key_env"
            )
        if key not in fields:
            shown = "(a key-like name, not shown)" if looks_like_credential(key) else repr(key)
            raise ProfileError(f"judge profile {name!r} ({source}): unknown field {shown}; known: {', '.join(sorted(fields))}")
    raw = dict(raw)
    if "members" in raw:
        raw["members"] = tuple(raw["members"])
    try:
        return Profile(name=name, source=source, **raw)
    except TypeError as e:
        raise ProfileError(f"judge profile {name!r} ({source}): {e}") from None


def _env_profile() -> Profile | None:
    url, model = os.environ.get("DUALREF_JUDGE_URL"), os.environ.get("DUALREF_JUDGE_MODEL")
    if not (url and model):
        return None
    return Profile(
        name="env", base_url=url, model=model, api_key_env=os.environ.get("DUALREF_JUDGE_KEY_ENV") or None,
        mode=os.environ.get("DUALREF_JUDGE_MODE", "binary"), source="environment (DUALREF_JUDGE_URL)",
    )


def load_profiles(path: str | os.PathLike | None = None, config_dir=None) -> dict[str, Profile]:
    """All profiles by name: built-ins, then the environment, then the config file (which wins)."""
    profiles = dict(BUILTIN)
    env = _env_profile()
    if env is not None:
        profiles[env.name] = env
    path = Path(path) if path else find_config(config_dir)
    if path is not None:
        data = _read(path)
        section = data.get("profiles", {}) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise ProfileError(f"judge config {path}: expected {{\"profiles\": {{name: {{...}}}}}}")
        for name, raw in section.items():
            profiles[name] = _profile_from(name, raw, str(path))
    for profile in profiles.values():
        missing = [m for m in profile.members if m not in profiles or m == profile.name]
        if missing:
            raise ProfileError(f"ensemble profile {profile.name!r} names unknown members {missing}; known: {sorted(profiles)}")
    return profiles


def default_profile_name(profiles: dict[str, Profile]) -> str:
    name = os.environ.get(PROFILE_ENV)
    if name:
        return name
    return next((n for n in profiles if n != "toy"), "toy")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dualref" / "judge")
