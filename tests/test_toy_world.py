"""The DualShapes toy world: deterministic, exact targets, plans that say what goes where, contract 5."""
import hashlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from judge.manifest import SINGLE_TASKS, TASKS, parse_line
from judge.toy import scene as toy_scene
from training.toy.tasks import CONTRAST
from training.toy.templates import vocabulary
from training.toy.world import ALL_TASKS, WORLD_VERSION, generate_world, make_sample

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    info = generate_world(out, seed=3, train=6, test=2, single_train=8, single_test=2, progress=False)
    return out, info


def test_make_sample_is_deterministic_and_seed_dependent():
    for task in ALL_TASKS:
        a, b = make_sample(task, 5, 7), make_sample(task, 5, 7)
        assert a.instruction == b.instruction and a.plan == b.plan
        assert all(np.array_equal(x, y) for x, y in zip(a.refs + [a.target], b.refs + [b.target]))
        others = [make_sample(task, 6, 7), make_sample(task, 5, 8), make_sample(task, 5, 7, "test")]
        assert all(not np.array_equal(o.target, a.target) or o.instruction != a.instruction for o in others)


def test_world_on_disk_is_identical_for_the_same_seed_and_reruns_from_cache(world, tmp_path):
    out, info = world
    again = generate_world(tmp_path / "again", seed=3, train=6, test=2, single_train=8, single_test=2, progress=False)
    assert (out / "manifest.jsonl").read_bytes() == (tmp_path / "again" / "manifest.jsonl").read_bytes()
    for png in sorted((out / "images").glob("*.png")):
        assert hashlib.sha256(png.read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "again" / "images" / png.name).read_bytes()).digest(), png.name
    assert again["counts"] == info["counts"]
    stamp = (out / "manifest.jsonl").stat().st_mtime_ns
    assert generate_world(out, seed=3, train=6, test=2, single_train=8, single_test=2, progress=False) == info
    assert (out / "manifest.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    different = generate_world(tmp_path / "other", seed=4, train=6, test=2, single_train=8, single_test=2,
                               progress=False)
    assert (tmp_path / "other" / "manifest.jsonl").read_bytes() != (out / "manifest.jsonl").read_bytes()
    assert different["seed"] == 4


def test_manifest_follows_contract_5_and_targets_are_the_rendered_plan(world):
    out, info = world
    lines = (out / "manifest.jsonl").read_text().splitlines()
    samples = [parse_line(line, out / "manifest.jsonl", i + 1) for i, line in enumerate(lines)]
    assert len(samples) == info["samples"] == 5 * 8 + 10
    assert len({s.id for s in samples}) == len(samples)
    for task in TASKS:
        assert sum(s.task == task and s.split == "train" for s in samples) == 6
        assert sum(s.task == task and s.split == "test" for s in samples) == 2
    assert sum(s.task == "single_edit" and s.split == "train" for s in samples) == 8
    for s in samples:
        assert len(s.images) == (1 if s.task in SINGLE_TASKS else 2)
        assert not Path(s.target).is_absolute() and all(not Path(p).is_absolute() for p in s.images)
        refs = [_load(out / p) for p in s.images]
        target = _load(out / s.target)
        assert target.shape == refs[0].shape == (64, 64, 3) and target.dtype == np.uint8
        # Lossless: the PNGs are exactly the plan's scenes, so a judge can re-render them.
        assert np.array_equal(target, toy_scene.render(s.plan["target"]))
        for ref, spec in zip(refs, s.plan["refs"]):
            assert np.array_equal(ref, toy_scene.render(spec))
        assert s.plan["task"] == s.task and s.plan["version"] == 1 and s.plan["size"] == [64, 64]
    meta = json.loads((out / "world.json").read_text())
    assert meta["name"] == "DualShapes" and meta["seed"] == 3
    assert meta["counts"]["single_edit"] == {"train": 8, "test": 2}
    assert set(meta["vocabulary"]) == set(vocabulary())


def test_palette_is_well_separated():
    objects = list(toy_scene.OBJECT_COLOURS.values())
    gaps = [toy_scene.colour_distance(a, b) for a, b in itertools.combinations(objects, 2)]
    assert min(gaps) >= 100, min(gaps)
    assert len(toy_scene.OBJECT_COLOURS) >= 8 and len(toy_scene.SHAPES) >= 4


def _bg_colours(background):
    return toy_scene.background_samples(background)


def test_edits_stand_out_from_what_lies_under_them():
    for task in ALL_TASKS:
        for i in range(40):
            plan = make_sample(task, 0, i).plan
            target = plan["target"]
            for e in plan["edited"]:
                element = target["elements"][e]
                names = [element[k] for k in ("colour", "garment", "legs", "colour2") if element.get(k)]
                for name in names:
                    colour = toy_scene.rgb(name)
                    gap = min(toy_scene.colour_distance(colour, c) for c in _bg_colours(target["background"]))
                    assert gap >= CONTRAST - 1e-3, (task, i, name)


def test_plans_say_which_attribute_comes_from_which_reference():
    scales = set()
    for i in range(30):
        s = make_sample("animal_scene", 1, i)
        ref2_object = s.plan["refs"][1]["elements"][0]
        inserted = s.plan["target"]["elements"][s.plan["edited"][0]]
        assert (inserted["shape"], inserted["colour"]) == (ref2_object["shape"], ref2_object["colour"])
        assert toy_scene.PLACES.index(s.plan["roles"]["place"]) == _cell(inserted["box"], 64, 64)
        assert s.plan["base"] == s.plan["refs"][0]  # image 1's scene, untouched except the insertion
        assert s.plan["target"]["elements"][:-1] == s.plan["refs"][0]["elements"]

        s = make_sample("person_scene", 1, i)
        figure = s.plan["target"]["elements"][-1]
        source = s.plan["refs"][1]["elements"][0]
        assert all(figure[k] == source[k] for k in ("skin", "garment", "texture", "colour2", "legs", "pose"))
        height = figure["box"][3] - figure["box"][1]
        source_height = source["box"][3] - source["box"][1]
        scale = s.plan["roles"]["scale"]
        scales.add(scale)
        assert {"small": height < 30, "medium": height == source_height, "large": height > 40}[scale]
        column = _centre(figure["box"])[0] / 64
        assert abs(column - toy_scene.FIGURE_COLUMNS[s.plan["roles"]["side"]]) < 0.05

        s = make_sample("group_portrait", 1, i)
        left, right = sorted((s.plan["target"]["elements"][k] for k in (0, 1)), key=lambda e: e["box"][0])
        from_1 = left if s.plan["roles"]["left"]["from"] == 1 else right
        assert from_1["garment"] == s.plan["refs"][0]["elements"][0]["garment"]
        assert left["box"][2] <= right["box"][0]  # side by side, not overlapping
        assert from_1 == s.plan["refs"][0]["elements"][0]  # image 1's figure stays where it stands
        assert s.plan["target"]["background"] == s.plan["refs"][0]["background"]

        s = make_sample("style_transfer", 1, i)
        roles = s.plan["roles"]
        assert [e["box"] for e in s.plan["target"]["elements"]] == [e["box"] for e in s.plan["refs"][0]["elements"]]
        style = s.plan["refs"][1]
        assert s.plan["target"]["background"] == s.plan["refs"][0]["background"]  # the style goes onto the shapes
        if roles["mode"] in ("palette", "both"):
            assert all(e["colour"] == style["elements"][0]["colour"] for e in s.plan["target"]["elements"])
        if roles["mode"] in ("texture", "both"):
            assert all(e["texture"] == style["elements"][0]["texture"] != "solid" for e in s.plan["target"]["elements"])

        s = make_sample("clothing_replace", 1, i)
        before, after = s.plan["refs"][0]["elements"][-1], s.plan["target"]["elements"][-1]
        donor = s.plan["refs"][1]["elements"][0]
        assert (after["box"], after["pose"], after["skin"]) == (before["box"], before["pose"], before["skin"])
        garment = ("garment", "texture", "colour2")
        assert [after[k] for k in garment] == [donor[k] for k in garment]
        assert after["garment"] != before["garment"]
    assert scales == {"small", "medium", "large"}  # medium keeps image 2's size (world v5)


def test_geometry_sits_on_the_token_grid_so_a_move_is_a_whole_token_shift():
    token = toy_scene.TOKEN
    for task, i in itertools.product(TASKS + SINGLE_TASKS, range(12)):
        s = make_sample(task, 2, i)
        for element in (e for sc in s.plan["refs"] + [s.plan["target"]] for e in sc["elements"]):
            x0, y0, x1, y1 = element["box"]
            if element["kind"] == "shape":
                assert all(v % token == 0 for v in element["box"]), (task, element)
            else:  # a figure: feet, head line and centre line on the grid
                assert (y0 % token, y1 % token, (x0 + x1) / 2 % token) == (0, 0, 0), (task, element)
        if task == "animal_scene":  # image 2's object is centred, as in a product photo
            assert _centre(s.plan["refs"][1]["elements"][0]["box"]) == (32, 32)
    # The same shape at two places: the same pixels, shifted by whole tokens.
    background = {"kind": "flat", "colour": "cream"}
    for shape, texture in (("circle", "solid"), ("triangle", "checks"), ("cross", "dots")):
        element = {"kind": "shape", "shape": shape, "colour": "red", "texture": texture, "colour2": "blue"}
        a, b = (toy_scene.render({"size": [64, 64], "background": background,
                                  "elements": [dict(element, box=toy_scene.shape_box(p, 64, 64))]})
                for p in ("top left", "bottom right"))
        dx, dy = (np.subtract(toy_scene.place_centre("bottom right", 64, 64),
                              toy_scene.place_centre("top left", 64, 64)))
        assert dx % token == 0 and dy % token == 0
        assert np.array_equal(np.roll(a, (int(dy), int(dx)), axis=(0, 1)), b), shape


def _cell(box, h, w):
    cx, cy = _centre(box)
    return min(2, int(cy * 3 / h)) * 3 + min(2, int(cx * 3 / w))


def test_single_edits_cover_all_operations_and_match_their_instruction():
    ops = {}
    for i in range(60):
        s = make_sample("single_edit", 2, i)
        roles, base, target = s.plan["roles"], s.plan["base"], s.plan["target"]
        ops[roles["op"]] = ops.get(roles["op"], 0) + 1
        assert roles["shape"] in s.instruction
        assert len({e["shape"] for e in base["elements"]}) == len(base["elements"])  # "the circle" is unambiguous
        if roles["op"] == "remove":
            assert len(target["elements"]) == len(base["elements"]) - 1 and s.plan["edited"] == []
        elif roles["op"] == "add":
            assert roles["colour"] in s.instruction and len(target["elements"]) == len(base["elements"]) + 1
        elif roles["op"] == "recolour":
            assert target["elements"][s.plan["edited"][0]]["colour"] == roles["new_colour"] in s.instruction
        else:
            moved = target["elements"][s.plan["edited"][0]]
            assert _cell(moved["box"], 64, 64) == toy_scene.PLACES.index(roles["new_place"])
    assert set(ops) == {"recolour", "move", "add", "remove"}


def test_instructions_are_varied_and_use_the_vocabulary():
    words = set(vocabulary())
    for task in ALL_TASKS:
        texts = [make_sample(task, 0, i).instruction for i in range(60)]
        openings = {" ".join(t.split()[:2]) for t in texts}
        assert len(openings) >= 3, (task, openings)
        for text in texts:
            assert set(re.findall(r"[a-z0-9]+|[.,:]", text.lower())) <= words, text
        if task not in SINGLE_TASKS:
            assert all(re.search(r"image 2|second (image|picture)", t) or task == "style_transfer" and
                       re.search(r"image 2|second", t) for t in texts)
            assert len({n for t in texts for n in re.findall(r"image 1|first image|first picture", t)}) == 3


def test_aspect_mix_gives_other_reference_shapes_and_target_takes_image_1s_size():
    shapes = set()
    for task in TASKS:
        for i in range(12):
            s = make_sample(task, 0, i, aspect_mix=True)
            shapes.update(r.shape[:2] for r in s.refs)
            assert s.target.shape == s.refs[0].shape and s.plan["size"] == list(s.refs[0].shape[:2])
    assert {(64, 64), (48, 64), (64, 48)} <= shapes


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown toy task"):
        make_sample("cat_scene", 0, 0)
    with pytest.raises(ValueError, match="split"):
        make_sample("animal_scene", 0, 0, split="val")
    with pytest.raises(ValueError, match="at least 32"):
        make_sample("animal_scene", 0, 0, size=16)
    with pytest.raises(ValueError, match="unknown toy task"):
        generate_world("/nonexistent-never-written", tasks=("dog",))


def test_command_line_writes_a_world(tmp_path):
    run = subprocess.run([sys.executable, "-m", "training.toy.world", "--out", str(tmp_path / "w"), "--seed", "1",
                          "--train", "2", "--test", "1", "--tasks", "animal_scene", "single_edit"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"DualShapes v{WORLD_VERSION}: 6 samples" in run.stdout
    lines = (tmp_path / "w" / "manifest.jsonl").read_text().splitlines()
    assert {parse_line(line).task for line in lines} == {"animal_scene", "single_edit"}
    bad = subprocess.run([sys.executable, "-m", "training.toy.world", "--out", str(tmp_path / "x"), "--tasks", "dog"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "dog" in bad.stderr


# sha256 (first 16 hex) of refs + target pixels, instruction and plan of a few samples per task, computed
# on main before the three-reference task existed: the opt-in task must change none of them (the toy
# base's VAE images and pretraining data and the main job's world come from these streams).
SAMPLE_DIGESTS = {
    "animal_scene": ["bca37cf8803d3ef3", "fb4a4ff84624e499", "93d6c539b6d0ff05"],
    "person_scene": ["27f95cedf449190c", "72dc70c45f92c789", "113b9e12e280bf00"],
    "group_portrait": ["a68cdc511bedccbe", "c68292a2d01af766", "780c6c903dbe942b"],
    "style_transfer": ["6a969f310046e63a", "f433621a312724a8", "d367f84c23d47ef5"],
    "clothing_replace": ["57e84060d170e208", "3f7ec3391b344fd0", "f9b86c33f1eb1ade"],
    "single_edit": ["7453ec120bd15e69", "4af1f63d05c26cbd", "7a6ec4e01e28f3a5"],
}
VOCABULARY_DIGEST = "49d8f06828d7ab46"  # the toy base's tokenizer is built from vocabulary()


def _sample_digest(s) -> str:
    h = hashlib.sha256()
    for a in s.refs + [s.target]:
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    h.update(s.instruction.encode())
    h.update(json.dumps(s.plan, sort_keys=True).encode())
    return h.hexdigest()[:16]


def test_existing_tasks_and_the_vocabulary_are_byte_identical_to_before_three_references():
    assert ALL_TASKS == TASKS + SINGLE_TASKS == ("animal_scene", "person_scene", "group_portrait", "style_transfer",
                                                 "clothing_replace", "single_edit")
    got = {t: [_sample_digest(make_sample(t, 0, i, split, 64, mix))
               for i, split, mix in ((0, "train", False), (3, "test", False), (1, "train", True))] for t in ALL_TASKS}
    assert got == SAMPLE_DIGESTS
    assert hashlib.sha256(" ".join(vocabulary()).encode()).hexdigest()[:16] == VOCABULARY_DIGEST


def test_three_reference_task_is_opt_in_and_draws_three_references(tmp_path):
    from judge.manifest import MULTI_TASKS
    from training.toy.world import TOY_TASKS

    assert MULTI_TASKS == ("two_figures_scene",) and "two_figures_scene" not in ALL_TASKS
    assert TOY_TASKS[:len(ALL_TASKS)] == ALL_TASKS  # every existing task keeps its seed stream
    info = generate_world(tmp_path / "w3", seed=0, train=3, test=2, tasks=("two_figures_scene",), progress=False)
    assert info["counts"] == {"two_figures_scene": {"train": 3, "test": 2}}
    lines = (tmp_path / "w3" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 5
    for line in lines:
        sample = parse_line(line)
        assert sample.task == "two_figures_scene" and len(sample.images) == 3
        plan = sample.plan
        assert len(plan["refs"]) == 3 and len(plan["edited"]) == 2 and plan["base"] == plan["refs"][0]
        target = _load(tmp_path / "w3" / sample.target)
        assert np.array_equal(target, toy_scene.render(plan["target"]))
        # each figure comes from its reference, on the side the instruction gives image 2's
        sides = {role["from"]: side for side, role in plan["roles"].items() if isinstance(role, dict)}
        assert set(sides) == {2, 3} and sides[2] != sides[3]
        assert re.search(rf"(image 2|second (image|picture))[^,.]* on the {sides[2]}", sample.instruction.lower()) \
            or re.search(rf"(image 3|third (image|picture))[^,.]* on the {sides[3]}", sample.instruction.lower())
        figures = [plan["target"]["elements"][i] for i in plan["edited"]]
        for k, figure in ((2, figures[0]), (3, figures[1])):
            drawn = plan["refs"][k - 1]["elements"][0]
            assert all(figure[key] == drawn[key] for key in ("skin", "garment", "texture", "colour2", "legs"))
            assert (_centre(figure["box"])[0] < 32) == (sides[k] == "left")
    default = generate_world(tmp_path / "w", seed=0, train=1, test=1, progress=False)
    assert "two_figures_scene" not in default["counts"]
