"""Shape-world scenes, language, shards, text corpus and `synergen data synth` (bad input included)."""

import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from synergen_lightning.world import (
    CATEGORIES,
    COLORS,
    SHAPES,
    captions,
    make_eval_prompts,
    qa_pairs,
    render_scene,
    sample_scene,
    score_text_skill,
)
from synergen_lightning.world.cli import synth_main
from synergen_lightning.world.scene import check_canvas, gap_px, relative_position
from synergen_lightning.world.text_corpus import make_skill, skill_item

SMALL = ["--num-samples", "40", "--shard-size", "16", "--num-eval-prompts", "24", "--workers", "1", "--no-progress"]


def test_relative_position_follows_geneval():
    a, b = (0, 40, 20, 60), (80, 40, 100, 60)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position((40, 0, 60, 20), (40, 80, 60, 100)) == {"above"}
    assert relative_position((0, 0, 20, 20), (80, 80, 100, 100)) == {"left of", "above"}
    assert relative_position(a, (2, 42, 22, 62)) == set()  # offsets under 0.1 x box sizes


@pytest.mark.parametrize("canvas", [64, 128, 1024])
def test_scenes_are_valid_and_reproducible(canvas):
    for seed in range(40):
        s = sample_scene(seed, canvas=canvas)
        assert s.to_dict() == sample_scene(seed, canvas=canvas).to_dict()
        assert 1 <= len(s.objects) <= 4
        assert len({(o.shape, o.color) for o in s.objects}) == len(s.objects)
        boxes = [o.bbox for o in s.objects] + [t.bbox for t in s.texts]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= canvas and 0 <= y0 < y1 <= canvas
            for ox0, oy0, ox1, oy1 in boxes[i + 1:]:  # separated by at least the gap
                assert x1 + gap_px(canvas) <= ox0 or ox1 + gap_px(canvas) <= x0 or \
                    y1 + gap_px(canvas) <= oy0 or oy1 + gap_px(canvas) <= y0
    img = render_scene(sample_scene(1, canvas=canvas))
    assert img.size == (canvas, canvas) and img.mode == "RGB"


def test_render_puts_the_right_colour_at_each_centre():
    for seed in range(30):
        s = sample_scene(seed, canvas=128, text_prob=0.0)
        arr = np.asarray(render_scene(s)).astype(int)
        for o in s.objects:
            cx, cy = int(o.center[0]), int(o.center[1] + (3 if o.shape == "triangle" else 0))
            assert np.abs(arr[cy, cx] - COLORS[o.color]).max() <= 2, (o, arr[cy, cx])


def test_text_is_small_and_dark():
    s = sample_scene(5, canvas=128, text_prob=1.0)
    assert s.texts
    t = s.texts[0]
    assert t.bbox[2] - t.bbox[0] <= 12  # ~ 8% of the canvas: legible only at full resolution
    crop = np.asarray(render_scene(s))[t.bbox[1]:t.bbox[3], t.bbox[0]:t.bbox[2]]
    assert crop.min() < 120  # glyph pixels were drawn


def test_captions_and_qa_agree_with_ground_truth():
    kinds = Counter()
    for seed in range(200):
        s = sample_scene(seed, text_prob=0.5)
        caps = captions(s)
        assert len(caps) >= 4 and all(c for c in caps)
        for o in s.objects:
            assert f"{o.color} {o.shape}" in caps[1]
        for qa in qa_pairs(s, np.random.default_rng(seed)):
            kinds[qa["kind"]] += 1
            q, a = qa["question"], qa["answer"]
            if q == "How many shapes are there?":
                assert a == str(len(s.objects))
            elif qa["kind"] == "count":
                shape = next(sh for sh in SHAPES if f"many {sh}" in q)
                assert a == str(sum(o.shape == shape for o in s.objects))
            elif qa["kind"] == "relation":
                named = [o for o in s.objects if f"the {o.color} {o.shape}" in q]
                a_obj = min(named, key=lambda o: q.index(f"the {o.color} {o.shape}"))
                b_obj = max(named, key=lambda o: q.index(f"the {o.color} {o.shape}"))
                rel = next(r for r in ("left of", "right of", "above", "below") if r in q)
                assert a == ("yes" if rel in relative_position(a_obj.bbox, b_obj.bbox) else "no")
            elif qa["kind"] == "text":
                assert a == s.texts[0].text
            elif qa["kind"] == "yes_no":
                present = any(f"{o.color} {o.shape}?" in q for o in s.objects)
                assert a == ("yes" if present else "no")
            elif qa["kind"] == "position":
                assert a in {o.region for o in s.objects}
    assert set(kinds) == {"color", "shape", "count", "position", "relation", "yes_no", "text"}


def test_eval_prompts_balanced_and_valid():
    from synergen_lightning.world.prompts import validate_prompt

    prompts = make_eval_prompts(600, seed=3)
    assert Counter(p["tag"] for p in prompts) == {c: 100 for c in CATEGORIES}
    assert all(validate_prompt(p) is None for p in prompts)
    assert [p["index"] for p in prompts] == list(range(600))


def test_check_canvas():
    assert check_canvas(128) is None and check_canvas(64) is None and check_canvas(1024) is None
    assert "too small" in check_canvas(40)
    assert "outside" in check_canvas(2048)


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_same_seed_same_bytes(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "a"), "--seed", "3", *SMALL]) == 0
    assert "synth: level demo, 37 train + 3 val samples" in capsys.readouterr().out
    assert synth_main(["--out", str(tmp_path / "b"), "--seed", "3", *SMALL[:-3], "--workers", "2", "--no-progress"]) == 0
    assert synth_main(["--out", str(tmp_path / "c"), "--seed", "4", *SMALL]) == 0
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert a == b  # same seed, same bytes, whatever the worker count
    assert a.keys() == c.keys() and a["train/shard-000000.tar"] != c["train/shard-000000.tar"]
    assert set(a) == {"train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar",
                      "val/shard-000000.tar", "eval_prompts.jsonl", "text/train.jsonl", "text/val.jsonl",
                      "text/skill_train.jsonl", "text/skill_val.jsonl", "text/colour_binding.jsonl",
                      "text/relation_binding.jsonl", "text/scene_binding.jsonl", "world.json"}
    assert not list(tmp_path.glob(".*partial*"))


def test_synth_shards_read_back_with_webdataset(tmp_path):
    out = tmp_path / "d"
    assert synth_main(["--out", str(out), "--canvas", "96", *SMALL]) == 0
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "train").glob("*.tar")), shardshuffle=False))
    assert len(samples) == 37
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        meta = json.loads(s["json"])
        assert img.size == (96, 96) and meta["key"] == s["__key__"]
        assert s["txt"].decode() == meta["caption"] and meta["caption"] in meta["captions"]
        assert meta["qa"] and all({"kind", "question", "answer"} <= set(q) for q in meta["qa"])
        assert meta["conversations"][0]["value"].startswith("<image>\n")
        for o in meta["objects"]:
            assert {"shape", "color", "size", "center", "bbox", "region"} <= set(o)
    prompts = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert Counter(p["tag"] for p in prompts) == {c: 4 for c in CATEGORIES}


def test_text_corpus_holds_out_the_skill(tmp_path):
    out = tmp_path / "t"
    assert synth_main(["--out", str(out), "--scene-qa-text", "bare", *SMALL]) == 0
    read = lambda name: [json.loads(x) for x in (out / "text" / name).read_text().splitlines()]  # noqa: E731
    train_text = {r["text"] for r in read("train.jsonl")}
    val_text = {r["text"] for r in read("val.jsonl")}
    skill_train, skill_val = read("skill_train.jsonl"), read("skill_val.jsonl")
    assert len(skill_val) == 500 and len(skill_train) > 5000
    assert all(f"{it['prompt']} {it['answer']}" in train_text for it in skill_train)
    assert not any(it["prompt"] in t for it in skill_val for t in train_text | val_text if t.startswith("Q: "))
    pairs = lambda items: {frozenset(int(w.strip("?,")) for w in it["prompt"].split() if w.strip("?,").isdigit())  # noqa: E731
                           for it in items}
    assert not pairs(skill_train) & pairs(skill_val)  # held-out pairs never seen under any template
    assert any(t.startswith("Q: What color") for t in train_text) and len(val_text) > 10
    assert max(len(t) for t in train_text if t.startswith("Q: which") or t.startswith("Q: is")) < 60


def layout_objects(layout: str) -> list[tuple[str, str, int, int]]:
    """(colour, shape, row, col) of each object of a demo scene in words: the mirror layout ("a red circle in the top
    left and ...") or the cells form's image words ("<boi> redcircle empty ...<eoi>", raster order over 2x2 cells)."""
    from synergen_lightning.world.scene import COLORS

    if layout.startswith("<boi>"):
        words = layout.removeprefix("<boi>").removesuffix("<eoi>").split()
        assert len(words) == 4, layout
        found = []
        for k, w in enumerate(words):
            if w != "empty":
                colour = next(c for c in COLORS if w.startswith(c))
                found.append((colour, w.removeprefix(colour), k // 2, k % 2))
        return found
    found = []
    for part in layout.replace(" and ", ", ").split(", "):
        words = part.split()  # "a red circle in the top left"
        found.append((words[1], words[2], {"top": 0, "bottom": 1}[words[-2]], {"left": 0, "right": 1}[words[-1]]))
    return found


def chat_turn(row: str) -> tuple[str, str]:
    """(user, assistant) of a corpus chat line; the assistant's leading space (a word answer) dropped."""
    user, answer = row.split("<|im_end|>\n<|im_start|>assistant\n")
    return user.removeprefix("<|im_start|>user\n"), answer.removesuffix("<|im_end|>").removeprefix(" ")


@pytest.mark.parametrize("form", ["mirror", "cells"])
def test_colour_binding_lines_ask_the_colour_the_scene_shows(tmp_path, form):
    """text/colour_binding.jsonl, per train scene in the mirror and the cells chat forms: a colour question whose answer
    is the colour of the one object in the scene's words the question names, and a generation prompt naming every
    object's colour whose answer is the scene in words (the same colour-shape pairs, in raster order)."""
    from synergen_lightning.data.sequences import GENERATION_PROMPT

    out = tmp_path / "b"
    assert synth_main(["--out", str(out), "--level", "demo", "--scene-qa-text", form, *SMALL]) == 0
    rows = [json.loads(x)["text"] for x in (out / "text" / "colour_binding.jsonl").read_text().splitlines()]
    train_text = (out / "text" / "train.jsonl").read_text()
    asked, generated = Counter(), 0

    def pairs(phrase: str) -> list[tuple[str, str]]:  # "a red circle and a blue square" -> pairs
        parts = phrase.replace(" and ", ", ").split(", ")
        return sorted((p.split()[1], p.split()[2]) for p in parts)

    regions = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
    for row in rows:
        user, answer = chat_turn(row)
        if user.startswith(GENERATION_PROMPT):
            prompt = user.removeprefix(GENERATION_PROMPT)
            assert answer in train_text and pairs(prompt) == sorted((c, s) for c, s, _, _ in layout_objects(answer))
            generated += 1
            continue
        layout, question = user.split("\n")
        assert question.startswith("What color is the ") and layout in train_text
        # the named object: its shape, and its region where the shape alone does not name one
        ref = question.removeprefix("What color is the ").removesuffix("?")
        shape, _, region = ref.partition(" in the ")
        hits = [c for c, s, r, k in layout_objects(layout) if s == shape and (not region or regions[r, k] == region)]
        assert hits == [answer], (layout, question, answer)
        asked[answer] += 1
    assert sum(asked.values()) == generated == 37  # demo scenes stand in distinct cells: every object has a name
    assert len(asked) >= 4  # colours vary


def holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Does an object at grid cell `a` (row, col) stand in relation `rel` to one at `b`?"""
    return {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[rel]


@pytest.mark.parametrize("form", ["mirror", "cells"])
def test_scene_binding_lines_are_answered_by_their_layout(tmp_path, form):
    """text/scene_binding.jsonl, per train scene in the mirror and the cells chat forms: where an object stands,
    whether a relation holds (yes and no alike), whether a colour-shape pair is present (yes and no alike), and for a
    two-object scene a relation prompt whose answer is the scene in words. Every answer is checked against the scene
    read as a grid (an object's row and column from its region words or its cell; "left of" = a smaller column,
    "above" = a smaller row)."""
    from synergen_lightning.data.sequences import GENERATION_PROMPT

    out = tmp_path / "s"
    assert synth_main(["--out", str(out), "--level", "demo", "--scene-qa-text", form, *SMALL]) == 0
    rows = [json.loads(x)["text"] for x in (out / "text" / "scene_binding.jsonl").read_text().splitlines()]
    train_text = (out / "text" / "train.jsonl").read_text()

    def objects(layout: str) -> dict[tuple[str, str], tuple[int, int]]:  # (colour, shape) -> (row, col)
        return {(c, s): (r, k) for c, s, r, k in layout_objects(layout)}

    seen = Counter()
    for row in rows:
        user, answer = chat_turn(row)
        if user.startswith(GENERATION_PROMPT):
            x_colour, x_shape, *rel, _, y_colour, y_shape = user.removeprefix(GENERATION_PROMPT).split()[1:]
            rel = " ".join(rel)  # the article before y's colour went to _
            scene = objects(answer)
            assert answer in train_text and len(scene) == 2
            assert holds(rel, scene[(x_colour, x_shape)], scene[(y_colour, y_shape)]), (user, answer)
            seen["relation prompt"] += 1
            continue
        layout, question = user.split("\n")
        scene = objects(layout)
        assert layout in train_text
        words = question.rstrip("?").split()
        if question.startswith("Where is the "):
            row, col = answer.split()
            assert ({"top": 0, "bottom": 1}[row], {"left": 0, "right": 1}[col]) == scene[(words[3], words[4])]
            seen["position"] += 1
        elif question.startswith("Is there "):
            assert answer == ("yes" if (words[3], words[4]) in scene else "no"), (layout, question, answer)
            seen[f"exists {answer}"] += 1
        else:  # "Is the red circle left of the blue square?"
            a, b = (words[2], words[3]), (words[-2], words[-1])
            rel = " ".join(words[4:-3])
            assert answer == ("yes" if holds(rel, scene[a], scene[b]) else "no"), (layout, question, answer)
            seen[f"relation {answer}"] += 1
    assert seen["position"] == seen["exists yes"] + seen["exists no"] == 37  # one of each per scene
    assert min(seen[k] for k in ("exists yes", "exists no", "relation yes", "relation no", "relation prompt")) >= 3, seen


@pytest.mark.parametrize("form", ["mirror", "cells"])
def test_relation_binding_lines_name_every_relation_from_both_objects(tmp_path, form):
    """text/relation_binding.jsonl, per two-object train scene in the mirror and the cells chat forms: every relation
    from both objects, so half of them name the later-drawn object first, each answered by the scene in words in
    which the relation holds; short prompts name their shapes alone only where the shapes differ."""
    from synergen_lightning.data.sequences import GENERATION_PROMPT

    out = tmp_path / "r"
    assert synth_main(["--out", str(out), "--level", "demo", "--scene-qa-text", form, *SMALL]) == 0
    rows = [json.loads(x)["text"] for x in (out / "text" / "relation_binding.jsonl").read_text().splitlines()]
    train_text = (out / "text" / "train.jsonl").read_text()
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    checked, named_later_first, short = Counter(), 0, 0
    for row in rows:
        user, answer = chat_turn(row)
        assert user.startswith(GENERATION_PROMPT) and answer in train_text
        scene = layout_objects(answer)  # (colour, shape, row, col) in raster order
        assert len(scene) == 2
        prompt = user.removeprefix(GENERATION_PROMPT)
        rel = next(r for r in flip if f" {r} " in prompt)
        x, y = (part.split()[1:] for part in prompt.split(f" {rel} "))  # [colour,] shape of each
        where = [next((r, k) for c, s, r, k in scene if [c, s][-len(obj):] == obj) for obj in (x, y)]
        assert holds(rel, *where), (prompt, answer)
        named_later_first += where[0] > where[1]
        short += len(x) == 1
        assert len(x) == 2 or scene[0][1] != scene[1][1]  # a short prompt only where the shapes differ
        checked[(answer, rel)] += 1
    # every relation of a scene from both objects: each (scene, relation) has its opposite from the other object
    assert checked and all(checked[(a, flip[r])] == n for (a, r), n in checked.items())
    assert named_later_first == len(rows) // 2 and 0 < short < len(rows)


def test_scene_questions_come_with_a_description_that_answers_them(tmp_path):
    """Every Q/A pair of a scene is one corpus line behind the scene's description, and the description names the
    answer of every colour / shape / position / character question (a reader can answer from the text)."""
    import tarfile

    from synergen_lightning.world.text_corpus import scene_description, scene_text_lines

    out = tmp_path / "t"
    assert synth_main(["--out", str(out), "--level", "full", "--scene-qa-text", "described", *SMALL]) == 0
    train_text = [json.loads(x)["text"] for x in (out / "text" / "train.jsonl").read_text().splitlines()]
    assert any(". Q: What color" in t for t in train_text) and not any(t.startswith("Q: What color") for t in train_text)
    tar = tarfile.open(next((out / "train").glob("shard-*.tar")))
    metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    checked = Counter()
    for meta in metas:
        lines, desc = scene_text_lines(meta, qa_text="described"), scene_description(meta)
        assert lines[: len(meta["captions"][:3])] == meta["captions"][:3]
        assert lines[len(meta["captions"][:3]):] == [f"{desc}. Q: {p['question']} A: {p['answer']}" for p in meta["qa"]]
        for p in meta["qa"]:
            if p["kind"] in ("color", "shape", "position", "text"):
                assert re.search(rf"\b{re.escape(p['answer'])}\b", desc), (p, desc)
                checked[p["kind"]] += 1
    assert set(checked) == {"color", "shape", "position", "text"}, checked
    assert scene_text_lines(metas[0])[-1].startswith("Q: ")  # the shipped default: bare
    assert scene_text_lines(metas[0], qa_text="chat")[-1].startswith("<|im_start|>user")
    with pytest.raises(ValueError, match="qa_text='story'"):
        scene_text_lines(metas[0], qa_text="story")


def test_chat_corpus_lines_tokenize_as_the_mllm_chat_template(tmp_path):
    """--scene-qa-text chat: every scene pair also appears as a chat turn whose ids, tokenized whole by the corpus's
    own BPE, are exactly the ids the MLLM builds for that question and answer (TextTokenizer.encode_chat)."""
    from synergen_lightning.text_tokenizer import train_bpe

    out = tmp_path / "t"
    assert synth_main(["--out", str(out), "--scene-qa-text", "chat", *SMALL]) == 0
    train = out / "text" / "train.jsonl"
    lines = [json.loads(x)["text"] for x in train.read_text().splitlines()]
    chats = [t for t in lines if t.startswith("<|im_start|>user")]
    assert chats and any(t.startswith("Q: What color") for t in lines)  # the bare pairs stay
    tok = train_bpe([train], 400, tmp_path / "tok")
    for line in chats[:200]:
        question = line.split("user\n", 1)[1].split("<|im_end|>")[0]
        answer = line.split("assistant\n", 1)[1].split("<|im_end|>")[0].strip()
        assert [tok.bos_id] + tok.encode(line) + [tok.eos_id] == tok.encode_chat(question, answer)[0], line


def test_mirror_corpus_lines_are_the_mllm_prompts_with_the_image_in_words(tmp_path):
    """--scene-qa-text mirror: a generation line is, token for token, the MLLM's generation prompt (ids of
    `generation_prompt_ids` up to `<boi>`) followed by the scene's layout in raster order; an understanding line is
    the MLLM's question turn with the layout where the image stands, and the layout names the answer."""
    import tarfile

    from synergen_lightning.data.sequences import generation_prompt_ids
    from synergen_lightning.text_tokenizer import train_bpe
    from synergen_lightning.world.text_corpus import layout_text, scene_text_lines

    out = tmp_path / "t"
    assert synth_main(["--out", str(out), "--level", "demo", "--scene-qa-text", "mirror", *SMALL]) == 0
    train = out / "text" / "train.jsonl"
    tok = train_bpe([train], 400, tmp_path / "tok")
    tar = tarfile.open(next((out / "train").glob("shard-*.tar")))
    metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    kinds = Counter()
    for meta in metas:
        layout = layout_text(meta)
        cells = [(o["center"][1], o["center"][0]) for o in meta["objects"]]
        named = [(layout.index(f"{o['color']} {o['shape']} "), (o["center"][1], o["center"][0])) for o in meta["objects"]]
        assert [c for _, c in sorted(named)] == sorted(cells)  # raster order: the order the image's tokens take
        for line in scene_text_lines(meta, qa_text="mirror"):
            if not line.startswith("<|im_start|>"):
                assert line in meta["captions"]
                continue
            user, assistant = line.split("<|im_start|>assistant\n")
            ids = tok.encode(user + "<|im_start|>assistant\n")
            if "Generate an image of: " in user:
                caption = user.split("Generate an image of: ", 1)[1].split("<|im_end|>")[0]
                assert caption in meta["captions"][1:] and assistant == f" {layout}<|im_end|>"
                assert [tok.bos_id] + ids == generation_prompt_ids(tok, caption)[:-1], line
                kinds["generation"] += 1
            else:
                question = user.split("\n", 2)[2].split("<|im_end|>")[0]
                pair = next(p for p in meta["qa"] if p["question"] == question)
                assert user.startswith(f"<|im_start|>user\n{layout}\n")
                assert assistant == f" {pair['answer']}<|im_end|>"
                if pair["kind"] in ("color", "shape", "position"):
                    assert re.search(rf"\b{re.escape(pair['answer'])}\b", layout), (pair, layout)
                kinds[pair["kind"]] += 1
    assert kinds["generation"] and kinds["color"] and kinds["position"], kinds


def test_skill_items_and_scoring():
    assert skill_item("larger", 37, 52) == {"prompt": "Q: which is larger, 37 or 52? A:", "answer": "52"}
    assert skill_item("smaller", 37, 52)["answer"] == "37"
    assert skill_item("is_larger", 37, 52)["answer"] == "no"
    train, val = make_skill(seed=0)
    assert train == make_skill(seed=0)[0]
    assert score_text_skill([" 52", "no", "3"], ["52", "no ", "4"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one per item"):
        score_text_skill(["1"], ["1", "2"])


@pytest.mark.parametrize("args,message", [
    (["--num-samples", "0"], "--num-samples 0"),
    (["--canvas", "16"], "--canvas 16"),
    (["--canvas", "40", "--level", "full"], "too small: small shapes would be 6 px"),
    (["--canvas", "40"], "needs a multiple of 16"),
    (["--level", "nightmare"], "--level 'nightmare' is not a level; choose one of: demo, grid, read, full"),
    (["--text-prob", "0.5"], "level 'demo' draws no characters"),
    (["--max-objects", "1"], "two-object and counting prompts need at least 2"),
    (["--shapes", "circle,hexagon"], "unknown shape 'hexagon'"),
    (["--colors", "red,mauve"], "unknown color 'mauve'"),
    (["--max-objects", "9"], "--max-objects 9"),
])
def test_synth_bad_input(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        synth_main(["--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_synth_refuses_unwritable_and_non_empty_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        synth_main(["--out", str(tmp_path / "file" / "sub"), *SMALL])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:
        synth_main(["--out", str(tmp_path / "full"), *SMALL])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert synth_main(["--out", str(tmp_path / "full"), "--overwrite", *SMALL]) == 0
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "eval_prompts.jsonl").exists()


def test_synth_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    import synergen_lightning.world.shards as shards

    calls = {"n": 0}
    real = shards.make_sample

    def flaky(cfg, split, index):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk on fire")
        return real(cfg, split, index)

    monkeypatch.setattr(shards, "make_sample", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        synth_main(["--out", str(tmp_path / "o"), *SMALL])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("level", ["demo", "grid"])
def test_cells_corpus_writes_one_word_where_each_folded_image_token_stands(tmp_path, level):
    """--scene-qa-text cells: a generation line is, token for token, the MLLM's generation sequence with each image
    slot (one 4x4-folded token per 32-px cell, 8-px codes) holding one word that names what that cell shows; an
    understanding line holds the same words where the image stands."""
    import tarfile

    from synergen_lightning.data.sequences import generation_prompt_ids
    from synergen_lightning.text_tokenizer import train_bpe
    from synergen_lightning.world.text_corpus import scene_text_lines

    out = tmp_path / "t"
    assert synth_main(["--out", str(out), "--level", level, "--scene-qa-text", "cells", *SMALL]) == 0
    tok = train_bpe([out / "text" / "train.jsonl"], 600, tmp_path / "tok")
    tar = tarfile.open(next((out / "train").glob("shard-*.tar")))
    metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    seen = Counter()
    for meta in metas:
        canvas = meta["canvas"]
        per_row = canvas // 8 // 4  # folded tokens per row of the image: 8-px codes, 4x4 folding
        slots, side = per_row ** 2, canvas // per_row  # the image's folded tokens in raster order, each a cell
        words = ["empty"] * slots
        for o in meta["objects"]:  # the cell whose box holds the object's box
            x0, y0, x1, y1 = o["bbox"]
            (cell,) = [k for k in range(slots) if (k % per_row) * side <= x0 and x1 <= (k % per_row + 1) * side
                       and (k // per_row) * side <= y0 and y1 <= (k // per_row + 1) * side]
            words[cell] = o["color"] + o["shape"]
        image = "<boi> " + " ".join(words) + "<eoi>"
        for line in scene_text_lines(meta, qa_text="cells"):
            if not line.startswith("<|im_start|>"):
                continue
            user, assistant = line.split("<|im_start|>assistant\n")
            if "Generate an image of: " in user:
                caption = user.split("Generate an image of: ", 1)[1].split("<|im_end|>")[0]
                assert assistant == f"{image}<|im_end|>", (line, image)
                ids = [tok.bos_id] + tok.encode(line)
                prompt = generation_prompt_ids(tok, caption)  # up to and including <boi>
                assert ids[:len(prompt)] == prompt
                assert ids[len(prompt) + slots:] == [tok.eoi_id, tok.im_end_id]
                seen["generation"] += 1
            else:
                assert user.startswith(f"<|im_start|>user\n{image}\n"), (line, image)
                seen["understanding"] += 1
    assert seen["generation"] and seen["understanding"], seen


def test_cells_corpus_refuses_a_scene_off_the_grid(tmp_path):
    from synergen_lightning.world.text_corpus import image_words

    meta = {"key": "k", "canvas": 128, "grid": 4, "objects": [{"shape": "circle", "color": "red", "center": [40.0, 21.5]}]}
    with pytest.raises(ValueError, match="grid level"):
        image_words(meta)
