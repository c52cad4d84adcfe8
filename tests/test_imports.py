"""The import structure the README describes: no cycle among the project's modules, nothing ComfyUI
loads (nodes/, dual_rope/, judge/) imports training/, and no job-prefixed module at training/'s root."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "judge", "dual_rope", "nodes", "workflows")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod and not mod.startswith(target + ".") and not target.startswith(mod + "."):
                    graph[mod].add(target)
    return graph


def test_no_cycle_no_layer_breach_no_prefixed_module():
    mods = _modules()
    graph = _graph(mods)
    breaches = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                      if m.split(".")[0] in ("nodes", "dual_rope", "judge") and t.startswith("training"))
    assert not breaches, breaches
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in mods:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    prefixed = [m for m in mods if re.fullmatch(r"training\.(ddpo|synth|bench|toy|sft|memory)_\w+", m)]
    assert not prefixed, prefixed


def test_comfyui_side_imports_the_pack_relatively():
    """ComfyUI loads the pack as one package named after its folder: nodes/ must reach dual_rope/ and
    judge/ as ``..dual_rope`` / ``..judge``; an absolute import works in tests and fails on a user's install."""
    absolute = []
    for path in sorted((REPO / "nodes").glob("*.py")) + [REPO / "__init__.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            absolute += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not absolute, absolute
