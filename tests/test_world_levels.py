"""The shape world's levels: every level draws what its rules say, its eval prompts come from its own scenes, its
ground-truth renders pass the scorer, and the full level is the world as it always was."""

import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from synergen_lightning.world import CATEGORIES, captions, make_eval_prompts, qa_pairs, render_scene, sample_scene
from synergen_lightning.world.cli import synth_main
from synergen_lightning.world.language import OPPOSITE
from synergen_lightning.world.levels import LEVELS, cell_box, get_level, sample_level_scene
from synergen_lightning.world.prompts import prompt_scene, render_prompt
from synergen_lightning.world.scene import FINE_GLYPHS, FINE_INK, Scene, relative_position
from synergen_lightning.world.scorer import detect_objects, score_images
from synergen_lightning.world.shards import find_world_info, read_world_info

# sha256 of the first 50 scenes' records of the levels without characters, before characters could be drawn in a cell
PINNED_DIGESTS = {"demo": "3379d3eb336f1197", "grid": "144e1b35afc717b0"}
SMALL = ["--num-samples", "60", "--shard-size", "30", "--num-eval-prompts", "36", "--workers", "1", "--no-progress"]


def test_full_level_is_the_original_sampler():
    for seed in range(30):
        a = sample_level_scene(np.random.default_rng(seed), LEVELS["full"])
        b = sample_scene(np.random.default_rng(seed))
        assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("name", [n for n, lv in LEVELS.items() if lv.grid])
def test_grid_levels_put_each_object_in_one_folded_cell(name):
    level = LEVELS[name]
    cell = level.canvas // level.grid
    assert cell == 32  # 4x4 codes of the 8-px tokenizer: one 4x4-folded LLM token per cell
    shapes_per_scene, same_shape = Counter(), 0
    for seed in range(300):
        s = sample_level_scene(np.random.default_rng(seed), level)
        assert s.canvas == level.canvas and len(s.texts) == (level.text_prob == 1) and s.background in level.backgrounds
        assert 1 <= len(s.objects) <= level.max_objects
        assert len({(o.shape, o.color) for o in s.objects}) == len(s.objects)
        cells = set()
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert x0 // cell == (x1 - 1) // cell and y0 // cell == (y1 - 1) // cell  # never cut by a cell border
            cells.add((x0 // cell, y0 // cell))
            assert o.size in level.sizes
        assert len(cells) == len(s.objects)
        shapes_per_scene[len(s.objects)] += 1
        same_shape += len(s.objects) >= 2 and len({o.shape for o in s.objects}) == 1
    # counting is shown: with same_shape_prob 0.3 at least ~1 in 5 multi-object scenes repeats one shape
    assert same_shape > 0.15 * sum(v for k, v in shapes_per_scene.items() if k >= 2)


def test_read_level_puts_one_fine_print_character_on_the_code_grid_in_a_cell_of_its_own():
    """Table 6's reading level: a character in every scene, in a cell no object takes, as one 8x8 glyph on the 8-px
    code grid (one image-tokenizer patch) in an ink of the level's range, every character shown, drawn where the
    record says, and asked about."""
    level = LEVELS["read"]
    cell = level.canvas // level.grid
    shown, inks = Counter(), set()
    for seed in range(300):
        s = sample_level_scene(np.random.default_rng(seed), level)
        (t,) = s.texts
        x0, y0, x1, y1 = t.bbox
        assert (x1 - x0, y1 - y0) == (8, 8) and x0 % 8 == 0 and y0 % 8 == 0 and t.style == "fine"
        col, row = x0 // cell, y0 // cell
        assert (x1 - 1) // cell == col and (y1 - 1) // cell == row  # inside one cell
        assert all((o.bbox[0] // cell, o.bbox[1] // cell) != (col, row) for o in s.objects)
        assert t.text in level.text_chars and FINE_INK[0] <= t.ink <= FINE_INK[1]
        shown[t.text] += 1
        inks.add(t.ink)
        assert {"kind": "text", "question": "What character is written in the image?",
                "answer": t.text} in qa_pairs(s, np.random.default_rng(seed))
        assert type(s).from_dict(json.loads(json.dumps(s.to_dict()))) == s  # style and ink survive the shard's JSON
    assert set(shown) == set(level.text_chars) and len(inks) > 50
    # the glyph's pixels are its bitmap in its ink, and the character changes no pixel outside its box
    img = np.asarray(render_scene(s), dtype=np.int32)
    bare = np.asarray(render_scene(type(s)(s.canvas, s.background, s.objects, [])), dtype=np.int32)
    changed = (img != bare).any(axis=2)
    assert changed.sum() == changed[y0:y1, x0:x1].sum() == FINE_GLYPHS[t.text].sum()
    assert (img[y0:y1, x0:x1][FINE_GLYPHS[t.text]] == t.ink).all()


def test_fine_print_is_legible_at_full_resolution_and_not_after_a_2x_downsample():
    """One scene with each of the ten characters: at 128 px any two differ in at least 6 pixels by more than the
    lightest ink's contrast; the no-folding arm's 64-px view (`dynamic_tiles`, bicubic) and a box filter leave them at
    most 12 grey levels apart, where the same character in the level's darkest and lightest ink is 40+ apart."""
    from itertools import combinations

    from PIL import Image

    from synergen_lightning.data.views import dynamic_tiles

    level = LEVELS["read"]
    base = sample_level_scene(np.random.default_rng(0), level).to_dict()

    def views(ch: str, ink: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        img = render_scene(Scene.from_dict({**base, "texts": [{**base["texts"][0], "text": ch, "ink": ink}]}))
        (bicubic,) = dynamic_tiles(img, 64)
        return np.asarray(img, dtype=np.int32), {"bicubic": np.asarray(bicubic, dtype=np.int32),
                                                 "box": np.asarray(img.resize((64, 64), Image.BOX), dtype=np.int32)}

    for ink in FINE_INK:
        natives, smalls = zip(*(views(ch, ink) for ch in level.text_chars))
        for a, b in combinations(natives, 2):
            assert (np.abs(a - b).max(axis=2) >= 255 - FINE_INK[1]).sum() >= 6
        for filt in ("bicubic", "box"):
            assert max(np.abs(a[filt] - b[filt]).max() for a, b in combinations(smalls, 2)) <= 12, (filt, ink)
    for ch in level.text_chars:
        dark, light = views(ch, FINE_INK[0])[1], views(ch, FINE_INK[1])[1]
        assert all(np.abs(dark[f] - light[f]).max() >= 40 for f in dark)


def test_levels_without_characters_draw_the_same_scenes_as_before_characters_could_be_drawn():
    """The character draw is skipped where a level has none: the demo and grid levels' scenes (and so their data and
    every figure measured on them) depend only on the seed, pinned here by a digest of their records."""
    import hashlib

    digest = {name: hashlib.sha256(json.dumps([sample_level_scene(np.random.default_rng(seed), LEVELS[name]).to_dict()
                                               for seed in range(50)]).encode()).hexdigest()[:16]
              for name in ("demo", "grid")}
    assert digest == PINNED_DIGESTS, digest


def test_full_captions_name_every_object():
    level = LEVELS["demo"]
    for seed in range(200):
        s = sample_level_scene(np.random.default_rng(seed), level)
        for cap in captions(s, full=level.full_captions):
            named = sum(cap.count(sh) for sh in ("circle", "square", "triangle", "cross"))
            n_words = sum(cap.count(w) for w in ("two ", "three ", "four "))
            assert named + n_words >= len(s.objects) or cap.startswith(("one", "two", "three", "four")), (cap, s)
    # a two-object scene gives every relation from both objects
    two = next(s for seed in range(200) if len((s := sample_level_scene(np.random.default_rng(seed), level)).objects) == 2)
    caps = captions(two, full=True)
    a, b = two.objects
    for rel in relative_position(a.bbox, b.bbox):
        assert f"a {a.shape} {rel} a {b.shape}" in caps and f"a {b.shape} {OPPOSITE[rel]} a {a.shape}" in caps
    # the full level keeps its partial relation captions (rules unchanged)
    s = next(s for seed in range(200) if len((s := sample_scene(seed, text_prob=0)).objects) == 4)
    assert any(" left of " in c or " right of " in c or " above " in c or " below " in c for c in captions(s))
    assert not any(" left of " in c or " above " in c or " right of " in c or " below " in c
                   for c in captions(s, full=True))


@pytest.mark.parametrize("name", list(LEVELS))
def test_level_prompts_come_from_the_level_and_its_renders_pass(name):
    level = LEVELS[name]
    prompts = make_eval_prompts(60, seed=1, max_objects=level.max_objects)
    assert Counter(p["tag"] for p in prompts) == {c: 10 for c in CATEGORIES}
    counts = {r["count"] for p in prompts if p["tag"] == "counting" for r in p["include"]}
    assert counts and max(counts) <= level.max_objects  # no "four" on a three-object level
    images = [render_prompt(p, seed=i, canvas=level.canvas, level=level) for i, p in enumerate(prompts)]
    assert all(im.size == (level.canvas, level.canvas) for im in images)
    report = score_images(images, prompts)
    assert report["overall"] == 1.0, report
    if level.grid:
        for i, p in enumerate(prompts):
            scene = prompt_scene(p, seed=i, canvas=level.canvas, level=level)
            assert {o.bbox for o in scene.objects} <= {cell_box(c, level.grid, level.canvas, sz)
                                                      for c in range(level.grid ** 2) for sz in level.sizes}


def test_demo_level_questions_answerable_from_the_image():
    """Every question kind the demo level can ask, asked often enough, and the answer true of the rendered image."""
    level = LEVELS["demo"]
    kinds = Counter()
    for seed in range(200):
        s = sample_level_scene(np.random.default_rng(seed), level)
        found = detect_objects(render_scene(s))
        assert sorted((d.shape, d.color) for d in found) == sorted((o.shape, o.color) for o in s.objects)
        for qa in qa_pairs(s, np.random.default_rng(seed)):
            kinds[qa["kind"]] += 1
    assert set(kinds) == {"color", "shape", "count", "position", "relation", "yes_no"}  # no characters to read
    assert min(kinds.values()) >= 50


@pytest.mark.parametrize("name", [n for n, lv in LEVELS.items() if lv.grid])
def test_relation_choice_questions_name_the_side_the_image_shows_each_side_as_often(name):
    """The choice form's answer is where the scorer finds the first object from the second on the asked axis, and
    each axis's two answers are about equally common (the yes/no form's answer is mostly "no")."""
    level, answers = LEVELS[name], Counter()
    sides = {"left or right of": ("left", "right"), "above or below": ("above", "below")}
    for seed in range(300):
        s = sample_level_scene(np.random.default_rng(seed), level)
        boxes = {(d.color, d.shape): d.bbox for d in detect_objects(render_scene(s))}
        for qa in qa_pairs(s, np.random.default_rng(seed), relation_choice=True):
            if qa["kind"] != "relation":
                continue
            q = qa["question"]
            ask = next(a for a in sides if f" {a} " in q)
            (ca, sa), (cb, sb) = (part.split()[-2:] for part in q.removeprefix("Is the ").rstrip("?").split(f" {ask} the "))
            truth = relative_position(boxes[(ca, sa)], boxes[(cb, sb)])
            assert qa["answer"] in sides[ask] and {"left": "left of", "right": "right of"}.get(qa["answer"], qa["answer"]) in truth, (q, truth)
            answers[qa["answer"]] += 1
    assert set(answers) == {"left", "right", "above", "below"}
    for seed in range(300, 2000):  # the balance over more scenes (answers only, no renders)
        s = sample_level_scene(np.random.default_rng(seed), level)
        answers.update(qa["answer"] for qa in qa_pairs(s, np.random.default_rng(seed), relation_choice=True)
                       if qa["kind"] == "relation")
    assert 0.4 < answers["left"] / (answers["left"] + answers["right"]) < 0.6
    assert 0.4 < answers["above"] / (answers["above"] + answers["below"]) < 0.6
    # the demo and read levels ask the choice form; grid and the full world yes/no
    assert {n: lv.relation_questions for n, lv in LEVELS.items()} == {"demo": "choice", "grid": "yes-no",
                                                                       "read": "choice", "full": "yes-no"}


def test_synth_asks_relations_in_the_form_asked_for_and_records_it(tmp_path):
    assert synth_main(["--out", str(tmp_path / "c"), *SMALL]) == 0  # the demo level's form
    assert synth_main(["--out", str(tmp_path / "y"), "--relation-questions", "yes-no", *SMALL]) == 0
    for name, form, answers in (("c", "choice", {"left", "right", "above", "below"}), ("y", "yes-no", {"yes", "no"})):
        assert read_world_info(tmp_path / name)["relation_questions"] == form
        shard = (tmp_path / name / "train" / "shard-000000.tar")
        with tarfile.open(shard) as tar:
            metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        got = {qa["answer"] for meta in metas for qa in meta["qa"] if qa["kind"] == "relation"}
        assert got and got <= answers
        corpus = (tmp_path / name / "text" / "train.jsonl").read_text()
        assert (" or right of the " in corpus or " or below the " in corpus) == (form == "choice")  # the base corpus mirrors it


def test_synth_writes_the_level_and_the_demo_default(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "d"), *SMALL]) == 0
    assert "level demo" in capsys.readouterr().out
    info = read_world_info(tmp_path / "d")
    assert info["level"] == "demo" and info["canvas"] == 64 and info["rules"]["grid"] == 2
    assert info["scene_qa_text"] == "cells"  # the base LLM reads the MLLM's tasks with the image as one word per token
    corpus = (tmp_path / "d" / "text" / "train.jsonl").read_text()
    assert "\\nWhat color is" in corpus and "Generate an image of: " in corpus and "Q: What color" not in corpus
    assert find_world_info(str(tmp_path / "d" / "codes" / "train" / "shard-*.tar")) == info  # pretokenized copies
    assert synth_main(["--out", str(tmp_path / "f"), "--level", "full", *SMALL]) == 0
    assert read_world_info(tmp_path / "f")["canvas"] == 128
    prompts = [json.loads(x) for x in (tmp_path / "d" / "eval_prompts.jsonl").read_text().splitlines()]
    assert all(r["count"] <= 3 for p in prompts for r in p["include"])


def test_unknown_level_lists_the_levels():
    with pytest.raises(ValueError, match="unknown shape-world level 'hard'; choose one of: demo .*grid .*full"):
        get_level("hard")


def test_synth_help_describes_every_level(capsys):
    with pytest.raises(SystemExit):
        synth_main(["--help"])
    out = capsys.readouterr().out
    for name, level in LEVELS.items():
        assert name in out and level.summary in out
    assert "64 px, 1-3 objects centred in a 2x2 grid" in out


def test_scoring_against_another_level_warns_with_both_names(tmp_path, capsys):
    import io as _io

    import torch

    from synergen_lightning.eval.demo_report import checkpoint_level, warn_level_mismatch

    assert synth_main(["--out", str(tmp_path / "demo"), *SMALL]) == 0
    assert synth_main(["--out", str(tmp_path / "full"), "--level", "full", *SMALL]) == 0
    ckpt = tmp_path / "last.ckpt"
    # what `synergen fit` stores of the data: the sources (pretokenized copies live under the data directory)
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": {"sources": [
        {"name": "gen", "urls": str(tmp_path / "full" / "codes" / "train" / "shard-*.tar"), "task": "generation"}]}},
        ckpt)
    assert checkpoint_level(str(ckpt)) == "full"
    err = _io.StringIO()
    assert warn_level_mismatch(str(ckpt), tmp_path / "demo", out=err) == ("full", "demo")
    assert "trained on shape-world level 'full'" in err.getvalue() and "holds level 'demo'" in err.getvalue()
    quiet = _io.StringIO()
    warn_level_mismatch(str(ckpt), tmp_path / "full", out=quiet)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("name", [n for n, lv in LEVELS.items() if lv.grid])
def test_grid_levels_name_objects_in_reading_order(name):
    """The n-th object named is the n-th drawn: objects top row first, left to right, so the caption that names every
    colour ("a red circle and a blue square") lists them in the order of the image's tokens."""
    level = LEVELS[name]
    cell = level.canvas // level.grid
    for seed in range(200):
        s = sample_level_scene(np.random.default_rng(seed), level)
        cells = [(o.bbox[1] // cell, o.bbox[0] // cell) for o in s.objects]
        assert cells == sorted(cells), cells
        named = captions(s, full=True)[1]
        at = [named.index(f"{o.color} {o.shape}") for o in s.objects]
        assert at == sorted(at), (named, cells)
