"""The synthesis config: theme pools, per-task counts, the LLM and image endpoints, judge, budget.

A JSON, YAML or TOML file; relative paths are relative to the file. An example (tests/test_examples.py
loads it and checks its judge profile against judge/judges.example.json)::

    {
      "out": "synth_out",
      "pools": {
        "animals":  {"path": "pools/animals",  "source": "https://example.org/animals",  "licence": "CC-BY-4.0"},
        "scenes":   {"path": "pools/scenes",   "source": "https://example.org/scenes",   "licence": "CC0-1.0"},
        "people":   {"path": "pools/people",   "source": "own photos",                  "licence": "proprietary"},
        "clothing": {"path": "pools/clothing", "source": "https://example.org/clothing", "licence": "CC-BY-4.0"},
        "styles":   {"path": "pools/styles",   "source": "https://example.org/art",      "licence": "public domain"}
      },
      "tasks": {"animal_scene": 100, "person_scene": 100, "group_portrait": 100,
                "style_transfer": 100, "clothing_replace": 100},
      "themes": {"style_transfer": [["scenes", "people"], ["styles"]]},
      "seed": 0, "test_fraction": 0.2, "concurrency": 4, "max_plan_attempts": 3,
      "llm":   {"base_url": "https://api.openai.com/v1", "model": "gpt-5", "api_key_env": "OPENAI_API_KEY",
                "response_format": "json_object", "price_input_per_mtok": 1.25, "price_output_per_mtok": 10},
      "image": {"base_url": "https://api.openai.com/v1", "model": "gpt-image-1", "api_key_env": "OPENAI_API_KEY",
                "endpoint": "edits", "size": "1024x1024", "price_per_image": 0.04},
      "judge": {"profile": "gpt-5", "min_yes": 2},
      "budget": {"max_requests": 5000, "max_cost_usd": 50, "scope": "total"}
    }

``out`` receives manifest.jsonl, state.jsonl, spend.json, targets/ and images/ (every reference
image a kept sample uses, hard-linked from its pool, or copied where a link is impossible, and
named by its content hash): the folder is self-contained. Each pool is a folder of images
(``path``) with the ``source`` and ``licence`` they are used under (both required; every manifest
line carries them per image, and the image endpoint's ``model`` as the source of a generated
target, with ``image.licence`` when given, else "unknown"). ``tasks`` gives the samples to keep
per task; ``themes`` (optional) the image 1 / image 2 themes of a task. ``image``, ``judge`` and
``budget`` are optional. ``judge.min_yes`` keeps a sample when at least that many of the judge's
three questions (fidelity, consistency, realism) are answered yes (default 2: two of three; 3:
all three). ``budget.max_cost_usd`` is a hard cap (each call's price is reserved before it is
sent); ``budget.scope`` "total" (default) counts every run of ``out``, "run" this run only.

``llm`` and ``image`` take the judge profile's connection fields (``base_url``, ``model``,
``api_key_env``, ``timeout_s``, ``max_retries``, ``backoff_base_s``, ``backoff_max_s``, ``rpm``,
``max_tokens``, ``temperature``, ``token_param``, ``image_max_side``, ``extra_body``, prices,
``allow_insecure_http``) and are checked the same way: a key is never a config value, only the
name of the environment variable that holds it.

The image endpoint (OpenAI Images API shape):

* ``"endpoint": "edits"``: ``POST {base_url}/images/edits``, multipart form: ``model``, ``prompt``,
  ``n=1``, ``size``, both references as files under ``image_field`` (default ``image[]``, as
  gpt-image-1 takes several; use ``image`` for servers that take one, which then gets image 1),
  plus ``response_format`` when set and any ``extra_fields``.
* ``"endpoint": "generations"``: ``POST {base_url}/images/generations``, JSON body ``{model,
  prompt, n: 1, size, response_format?, **extra_fields}``: text only, from the plan.

Either answers ``{"data": [{"b64_json": ...} | {"url": ...}]}``. The prompt is
``prompt_template`` (default ``"{instruction}\\n\\nResult: {target_description}"``) filled from the plan.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from judge.config import Profile, ProfileError
from judge.manifest import TASKS

from ..config import ConfigError, read_config_file

THEMES = ("animals", "scenes", "people", "clothing", "styles")
# Image 1 / image 2 themes per task (paper Sec. 3.1): image 1 is what is edited, image 2 what is brought in.
DEFAULT_THEMES = {
    "animal_scene": (("scenes",), ("animals",)),
    "person_scene": (("scenes",), ("people",)),
    "group_portrait": (("people",), ("people",)),
    "style_transfer": (("scenes", "animals", "people"), ("styles",)),
    "clothing_replace": (("people",), ("clothing",)),
}
SYMMETRIC_TASKS = frozenset({"group_portrait"})  # (a, b) and (b, a) are the same pair
RESPONSE_FORMATS = ("json_object", "json_schema", "none")
IMAGE_ENDPOINTS = ("edits", "generations")
_SECRET_KEYS = ("api_key", "key", "token", "authorization", "password", "secret", "headers")
_LLM_ONLY = ("response_format",)
_IMAGE_ONLY = ("endpoint", "size", "image_field", "response_format", "prompt_template", "extra_fields", "price_per_image",
               "licence")
_POOL_FORM = '{"path": "pools/%s", "source": "https://...", "licence": "CC-BY-4.0"}'


@dataclass(frozen=True)
class Pool:
    path: Path  # a folder of images
    source: str  # where they came from (a URL, a collection, "own photos")
    licence: str  # the licence they are used under

    def provenance(self) -> dict:
        return {"source": self.source, "licence": self.licence}


@dataclass
class LLMConfig:
    profile: Profile
    response_format: str = "json_object"


@dataclass
class ImageConfig:
    profile: Profile
    endpoint: str = "edits"
    size: str | None = "1024x1024"
    image_field: str = "image[]"
    response_format: str | None = None  # e.g. "b64_json" for dall-e-2; gpt-image-1 always answers b64
    prompt_template: str = "{instruction}\n\nResult: {target_description}"
    extra_fields: dict = field(default_factory=dict)
    price_per_image: float = 0.0
    licence: str = "unknown"  # of the generated targets (the provider's terms), as the manifest states it

    def provenance(self) -> dict:
        return {"source": self.profile.model, "licence": self.licence}


@dataclass
class SynthConfig:
    out: Path
    pools: dict[str, Pool]
    tasks: dict[str, int]
    llm: LLMConfig
    themes: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    image: ImageConfig | None = None
    judge_profile: str | None = None
    judge_min_yes: int = 2  # keep a sample when at least this many of the 3 questions are yes
    max_requests: int | None = None
    max_cost_usd: float | None = None
    budget_scope: str = "total"  # "total": max_cost_usd covers every run of ``out``; "run": this run only
    seed: int = 0
    test_fraction: float = 0.1
    concurrency: int = 1
    max_plan_attempts: int = 3
    max_consecutive_errors: int = 5  # endpoint errors in a row before the run stops (it is down)
    source: str = "<config>"


def _check_no_secrets(section: dict, where: str) -> None:
    for key, value in section.items():
        if key.lower() in _SECRET_KEYS:
            raise ConfigError(
                f"{where} has a {key!r} field: keys never go in config files; put the key in an "
                "environment variable and name the variable in api_key_env"
            )
        if isinstance(value, dict):
            _check_no_secrets(value, f"{where}.{key}")


def _profile(name: str, raw: dict, where: str, defaults: dict, own: tuple) -> tuple[Profile, dict]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    _check_no_secrets(raw, where)
    mine = {k: raw[k] for k in own if k in raw}
    rest = {**defaults, **{k: v for k, v in raw.items() if k not in own}}
    known = {f.name for f in dataclasses.fields(Profile)} - {"name", "source", "kind"}
    unknown = sorted(set(rest) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known | set(own)))}")
    try:
        return Profile(name=name, kind="openai", source=where, cache=False, **rest), mine
    except (ProfileError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _themes(task: str, raw, where: str):
    if not (isinstance(raw, (list, tuple)) and len(raw) == 2):
        raise ConfigError(f"{where}.themes.{task} must be [[image 1 themes], [image 2 themes]]")
    pair = tuple(tuple([t] if isinstance(t, str) else t) for t in raw)
    for themes in pair:
        bad = [t for t in themes if t not in THEMES]
        if bad or not themes:
            raise ConfigError(f"{where}.themes.{task}: unknown theme(s) {bad}; use {', '.join(THEMES)}")
    return pair


def _pool(theme: str, raw, base: Path, source: str) -> Pool:
    if theme not in THEMES:
        raise ConfigError(f"{source}: unknown pool theme {theme!r}; use {', '.join(THEMES)}")
    form = f'"{theme}": ' + _POOL_FORM % theme
    if not isinstance(raw, dict):  # the old form, a bare folder: it said nothing of where the images came from
        raise ConfigError(f"{source}: pool {theme!r} must give its folder with the source and licence of its "
                          f"images (they go into every manifest line), e.g. {form}")
    unknown = sorted(set(raw) - {"path", "source", "licence"})
    if unknown:
        raise ConfigError(f"{source}: pool {theme!r}: unknown field(s) {', '.join(unknown)}; use {form}")
    for key in ("path", "source", "licence"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ConfigError(f"{source}: pool {theme!r} needs {key!r} (a non-empty string), e.g. {form}")
    return Pool((base / raw["path"]).resolve(), raw["source"].strip(), raw["licence"].strip())


def parse_config(data: dict, base: Path, source: str = "<config>") -> SynthConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be an object")
    _check_no_secrets({k: v for k, v in data.items() if k not in ("pools", "tasks", "themes")}, source)
    known = {"out", "pools", "tasks", "themes", "llm", "image", "judge", "budget", "seed", "test_fraction",
             "concurrency", "max_plan_attempts", "max_consecutive_errors"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("pools", "tasks", "llm"):
        if key not in data:
            raise ConfigError(f"{source}: missing {key!r} (see training/synth/config.py for the format)")
    if not isinstance(data["pools"], dict):
        raise ConfigError(f"{source}: pools must be an object of theme -> {_POOL_FORM % 'animals'}")
    pools = {theme: _pool(theme, raw, base, source) for theme, raw in data["pools"].items()}
    tasks = {}
    for task, count in data["tasks"].items():
        if task not in TASKS:
            raise ConfigError(f"{source}: unknown task {task!r}; use {', '.join(TASKS)}")
        if not isinstance(count, int) or count < 0:
            raise ConfigError(f"{source}: tasks.{task} must be a count of samples >= 0")
        tasks[task] = count
    themes = {t: DEFAULT_THEMES[t] for t in tasks}
    for task, raw in (data.get("themes") or {}).items():
        if task not in TASKS:
            raise ConfigError(f"{source}: themes names unknown task {task!r}")
        themes[task] = _themes(task, raw, source)
    llm_defaults = {"max_tokens": 2000, "temperature": 0.8, "timeout_s": 120.0, "max_retries": 4,
                    "backoff_max_s": 30.0, "max_retry_after_s": 120.0, "image_max_side": 768}
    llm_profile, llm_own = _profile("synth-llm", data["llm"], f"{source}: llm", llm_defaults, _LLM_ONLY)
    llm = LLMConfig(llm_profile, **llm_own)
    if llm.response_format not in RESPONSE_FORMATS:
        raise ConfigError(f"{source}: llm.response_format must be one of {', '.join(RESPONSE_FORMATS)}")
    image = None
    if data.get("image"):
        image_defaults = {"timeout_s": 300.0, "max_retries": 3, "backoff_max_s": 60.0, "max_retry_after_s": 300.0}
        image_profile, own = _profile("synth-image", data["image"], f"{source}: image", image_defaults, _IMAGE_ONLY)
        image = ImageConfig(image_profile, **own)
        if not isinstance(image.licence, str) or not image.licence.strip():
            raise ConfigError(f"{source}: image.licence must be a non-empty string (the generated targets' licence)")
        if image.endpoint not in IMAGE_ENDPOINTS:
            raise ConfigError(f"{source}: image.endpoint must be 'edits' or 'generations'")
        try:
            image.prompt_template.format(instruction="", task="", target_description="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{source}: image.prompt_template may use {{instruction}}, {{task}} and "
                              f"{{target_description}} only ({type(e).__name__}: {e})") from None
    judge = data.get("judge") or {}
    budget = data.get("budget") or {}
    if "threshold" in judge:  # a fraction rounds: 0.67 meant "all three" (two of three is 0.6667)
        raise ConfigError(f"{source}: judge.threshold is not used: state how many of the three questions must be "
                          "yes instead, e.g. \"min_yes\": 2 (keep when at least 2 of 3 are yes) or 3 (all three)")
    unknown = sorted(set(judge) - {"profile", "min_yes"}) + sorted(set(budget) - {"max_requests", "max_cost_usd", "scope"})
    if unknown:
        raise ConfigError(f"{source}: unknown judge/budget field(s) {', '.join(unknown)}")
    min_yes = judge.get("min_yes", 2)
    if isinstance(min_yes, bool) or min_yes not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: judge.min_yes must be 0, 1, 2 or 3 (questions of 3 answered yes), "
                          f"not {min_yes!r}")
    cfg = SynthConfig(
        out=(base / data.get("out", "synth_out")).resolve(), pools=pools, tasks=tasks, llm=llm, themes=themes,
        image=image, judge_profile=judge.get("profile"), judge_min_yes=min_yes,
        max_requests=budget.get("max_requests"), max_cost_usd=budget.get("max_cost_usd"),
        budget_scope=budget.get("scope", "total"),
        seed=int(data.get("seed", 0)), test_fraction=float(data.get("test_fraction", 0.1)),
        concurrency=int(data.get("concurrency", 1)), max_plan_attempts=int(data.get("max_plan_attempts", 3)),
        max_consecutive_errors=int(data.get("max_consecutive_errors", 5)), source=source,
    )
    if not 0.0 <= cfg.test_fraction <= 1.0:
        raise ConfigError(f"{source}: test_fraction must be within [0, 1]")
    if cfg.budget_scope not in ("total", "run"):
        raise ConfigError(f"{source}: budget.scope must be 'total' (the cap covers every run of out) or 'run'")
    if cfg.concurrency < 1 or cfg.max_plan_attempts < 1:
        raise ConfigError(f"{source}: concurrency and max_plan_attempts must be >= 1")
    return cfg


def load_config(path) -> SynthConfig:
    """The synthesis config file (JSON, YAML or TOML, read as every config of the project is)."""
    path = Path(path)
    return parse_config(read_config_file(path), path.parent, str(path))
