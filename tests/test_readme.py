"""The README opens with the ComfyUI user's path and keeps the researcher's commands (issue 22 item 7)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAIN_JOB = 'pip install -e ".[train]" && python -m training.ddpo'
TESTS = 'pip install -e ".[train,dev]" && python -m pytest -q'
# The files of ComfyUI's own Kontext template (comfyui_workflow_templates: flux_kontext_dev_basic).
MODEL_FILES = ("flux1-dev-kontext_fp8_scaled.safetensors", "clip_l.safetensors",
               "t5xxl_fp8_e4m3fn_scaled.safetensors", "ae.safetensors")


def _halves() -> tuple[str, str]:
    user = README.index("\n# Part 1")
    research = README.index("\n# Part 2")
    assert user < research, "Part 1 (ComfyUI users) must come before Part 2 (researchers)"
    return README[user:research], README[research:]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_opens_with_the_comfyui_user():
    user, research = _halves()
    first_section = re.search(r"^#{1,2} (.+)$", README[README.index("\n#"):], re.M)[1]
    assert first_section.startswith("Part 1")
    for topic in ("## Install", "## Model files", "## The templates", "## Without a LoRA", "## VRAM and time",
                  "## Troubleshooting", "value_not_in_list"):
        assert topic in user, f"Part 1 lacks {topic!r}"
    assert "pip install -e" not in user.replace("`pip install -e .` is for", ""), \
        "Part 1 must not tell ComfyUI users to pip install -e the pack"
    assert MAIN_JOB in research and TESTS in research
    assert research.index("venv") < research.index(MAIN_JOB), "Part 2 sets up its own venv before installing"


def test_model_files_have_download_links():
    user, _ = _halves()
    for name in MODEL_FILES:
        assert re.search(rf"\(https://huggingface\.co/[^)\s]+/{re.escape(name)}\)", user), f"no link for {name}"


def test_ci_runs_the_readme_test_command():
    assert '-e ".[train,dev]" && python -m pytest -q' in (REPO / ".ci" / "run").read_text()


def test_internal_links_resolve():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", README, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links
    assert not [link for link in links if link not in anchors], anchors
