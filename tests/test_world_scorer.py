"""The programmatic scorer: detection against ground truth, GenEval decisions on true and violated
renders at 64 and 128 px (and after JPEG), the score_images API and `synergen eval geneval`."""

import io
import json
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image

from synergen_lightning.world import (
    CATEGORIES,
    make_eval_prompts,
    render_prompt,
    render_scene,
    sample_scene,
    score_images,
    violate_prompt,
)
from synergen_lightning.world.cli import geneval_main
from synergen_lightning.world.scorer import detect_objects, evaluate, label_components

PROMPTS = make_eval_prompts(600, seed=0)


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)  # PIL default 4:2:0 chroma subsampling: the harsh case
    return Image.open(io.BytesIO(buf.getvalue()))


def _bfs_components(mask):
    """Independent reference: 8-connected flood fill, returns a set of frozensets of pixels."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = set()
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                comp, q = [], deque([(y, x)])
                seen[y, x] = True
                while q:
                    cy, cx = q.popleft()
                    comp.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                q.append((ny, nx))
                comps.add(frozenset(comp))
    return comps


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6])
def test_label_components_matches_flood_fill(density):
    rng = np.random.default_rng(int(density * 100))
    mask = rng.random((37, 53)) < density
    labels, n = label_components(mask)
    ours = {frozenset(zip(*np.nonzero(labels == k))) for k in range(1, n + 1)}
    assert ours == _bfs_components(mask)
    assert ((labels > 0) == mask).all()


def test_detection_matches_scene_ground_truth():
    """Random scenes (with text): every object found with its shape and colour, text never detected."""
    wrong = 0
    for seed in range(150):
        scene = sample_scene(seed, canvas=128, text_prob=1.0)
        found = sorted((d.shape, d.color) for d in detect_objects(render_scene(scene)))
        truth = sorted((o.shape, o.color) for o in scene.objects)
        wrong += found != truth
    assert wrong <= 1, f"{wrong}/150 scenes mis-detected"


def _rates(canvas, jpeg=None, prompts=PROMPTS):
    passed, violated_passed = Counter(), Counter()
    for p in prompts:
        img = render_prompt(p, seed=p["index"], canvas=canvas)
        passed[p["tag"]] += evaluate(detect_objects(_jpeg(img, jpeg) if jpeg else img), p)[0]
        _, spec = violate_prompt(p, np.random.default_rng(p["index"]))
        bad = render_prompt(spec, seed=p["index"], canvas=canvas)
        violated_passed[p["tag"]] += evaluate(detect_objects(_jpeg(bad, jpeg) if jpeg else bad), p)[0]
    n = Counter(p["tag"] for p in prompts)
    return {t: passed[t] / n[t] for t in n}, {t: 1 - violated_passed[t] / n[t] for t in n}


@pytest.mark.parametrize("canvas", [64, 128])
def test_ground_truth_passes_and_violations_fail(canvas):
    pass_rate, fail_rate = _rates(canvas)
    assert set(pass_rate) == set(CATEGORIES)
    assert min(pass_rate.values()) >= 0.99, pass_rate
    assert min(fail_rate.values()) >= 0.99, fail_rate


def test_jpeg_artefacts_do_not_break_it():
    pass_rate, fail_rate = _rates(128, jpeg=85, prompts=PROMPTS[:240])
    assert min(pass_rate.values()) >= 0.99 and min(fail_rate.values()) >= 0.99, (pass_rate, fail_rate)
    # 64 px with 4:2:0 chroma is brutal for 10-pixel shapes; still nearly all right.
    pass_rate, fail_rate = _rates(64, jpeg=90, prompts=PROMPTS[:240])
    assert np.mean(list(pass_rate.values())) >= 0.97 and np.mean(list(fail_rate.values())) >= 0.97


def test_large_canvas_and_rgba():
    for p in PROMPTS[:12]:
        img = render_prompt(p, seed=1, canvas=512).convert("RGBA")
        assert evaluate(detect_objects(img), p)[0], p["prompt"]


def test_violation_kinds_cover_the_brief():
    kinds = {violate_prompt(p, np.random.default_rng(0))[0] for p in PROMPTS[:12]}
    assert kinds == {"missing_object", "wrong_count", "wrong_color", "swapped_position", "swapped_color"}


def test_score_images_api():
    prompts = PROMPTS[:12]
    images = [render_prompt(p, seed=3, canvas=64) for p in prompts]
    rep = score_images(images, prompts)
    assert {"overall", *CATEGORIES} <= set(rep) and rep["overall"] == 1.0
    # A blank image fails everything.
    blank = [Image.new("RGB", (64, 64), "white")] * len(prompts)
    assert score_images(blank, prompts)["overall"] == 0.0
    with pytest.raises(ValueError, match="one prompt per image"):
        score_images(images[:3], prompts)


def _write_prompts(path, prompts):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))


def test_geneval_cli_scores_named_images(tmp_path, capsys):
    prompts = PROMPTS[:12]
    _write_prompts(tmp_path / "p.jsonl", prompts)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, p in enumerate(prompts):
        render_prompt(p, seed=i, canvas=64).save(img_dir / f"{i:05d}_0.png")
        # a second sample per prompt that violates it: every category must score exactly 0.5
        _, spec = violate_prompt(p, np.random.default_rng(i))
        render_prompt(spec, seed=i, canvas=64).save(img_dir / f"{i:05d}_1.png")
    (img_dir / "notes.txt").write_text("not an image")
    assert geneval_main(["--images", str(img_dir), "--prompts", str(tmp_path / "p.jsonl"),
                         "--out", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["overall"] == 0.5 and all(rep[c] == 0.5 for c in CATEGORIES)
    assert rep["num_images"] == 24 and rep["skipped_files"] == 1
    assert "overall=0.5000" in capsys.readouterr().out
    # `synergen generate`'s metadata.jsonl says which prompt drew each file: one drawn for another prompt is refused
    (img_dir / "metadata.jsonl").write_text(json.dumps({"file": "00000_0.png", "prompt": prompts[0]["prompt"]}) + "\n"
                                            + json.dumps({"file": "00001_0.png", "prompt": "a red circle!"}) + "\n")
    with pytest.raises(SystemExit):
        geneval_main(["--images", str(img_dir), "--prompts", str(tmp_path / "p.jsonl")])
    assert "00001_0.png was drawn for 'a red circle!'" in capsys.readouterr().err


def test_geneval_cli_ground_truth(tmp_path, capsys):
    _write_prompts(tmp_path / "p.jsonl", PROMPTS[:60])
    assert geneval_main(["--prompts", str(tmp_path / "p.jsonl"), "--ground-truth", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["overall"] >= 0.99


def test_geneval_cli_bad_input(tmp_path, capsys):
    good = json.dumps(PROMPTS[0])
    (tmp_path / "bad.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(SystemExit) as e:
        geneval_main(["--prompts", str(tmp_path / "bad.jsonl"), "--ground-truth"])
    assert e.value.code == 2 and "line 3" in capsys.readouterr().err
    (tmp_path / "bad2.jsonl").write_text(json.dumps({**PROMPTS[0], "tag": "colours"}) + "\n")
    with pytest.raises(SystemExit):
        geneval_main(["--prompts", str(tmp_path / "bad2.jsonl"), "--ground-truth"])
    assert "line 1: unknown tag 'colours'" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text(good + "\n")
    with pytest.raises(SystemExit):
        geneval_main(["--prompts", str(tmp_path / "p.jsonl")])
    assert "give --images DIR (the generated images), or --ground-truth" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        geneval_main(["--images", str(tmp_path / "empty"), "--prompts", str(tmp_path / "p.jsonl")])
    assert e.value.code == 2 and "has no images" in capsys.readouterr().err
    Image.new("RGB", (64, 64)).save(tmp_path / "empty" / "00007_0.png")
    with pytest.raises(SystemExit):
        geneval_main(["--images", str(tmp_path / "empty"), "--prompts", str(tmp_path / "p.jsonl")])
    assert "names prompt 7" in capsys.readouterr().err
