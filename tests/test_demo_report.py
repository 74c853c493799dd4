"""`synergen demo report`'s own pieces: per-image verdicts, the learning-curve subsets, the grids a person reads."""

import json

import pytest
from PIL import Image

from synergen_lightning.eval.demo_report import (
    grid_answers,
    save_curve,
    save_samples,
    subset_geneval,
    subset_und,
    verdicts,
)
from synergen_lightning.world import make_eval_prompts
from synergen_lightning.world.levels import LEVELS
from synergen_lightning.world.prompts import render_prompt
from synergen_lightning.world.scorer import score_images


def test_verdicts_agree_with_the_scorer_and_name_the_failed_constraint():
    level = LEVELS["demo"]
    prompts = make_eval_prompts(12, seed=2, max_objects=level.max_objects)
    right = [render_prompt(p, seed=i, level=level) for i, p in enumerate(prompts)]
    wrong = right[1:] + right[:1]  # each image drawn for the next prompt
    v_right, v_wrong = verdicts(right, prompts), verdicts(wrong, prompts)
    assert all(ok for ok, _, _ in v_right) and all(why == "" for _, why, _ in v_right)
    failed = [(ok, why) for ok, why, _ in v_wrong if not ok]
    assert failed and all(why.startswith(("expected", "no ")) for _, why in failed)
    # the subset summary is the scorer's own summary of those images
    assert subset_geneval(prompts, [ok for ok, _, _ in v_wrong], 12)["overall"] == score_images(wrong, prompts)["overall"]
    assert subset_geneval(prompts, [ok for ok, _, _ in v_right], 6)["num_images"] == 6


def test_grid_answers_show_every_kind_from_distinct_scenes_first():
    items = [{"key": f"s{i // 3}", "kind": k, "answer": "x"} for i, k in enumerate(["color", "count", "shape"] * 4)]
    shown = grid_answers(items, 4)
    assert len(shown) == 4 and len({items[i]["key"] for i in shown}) == 4
    assert {items[i]["kind"] for i in shown[:3]} == {"color", "count", "shape"}
    assert subset_und(items, ["x", "y"] * 6, 4) == 0.5


def test_samples_and_curve_pictures_are_written(tmp_path):
    level = LEVELS["demo"]
    prompts = make_eval_prompts(6, seed=1, max_objects=level.max_objects)
    images = [render_prompt(p, seed=i, level=level) for i, p in enumerate(prompts)]
    items = [{"image": images[0], "question": "How many shapes are there?", "answer": "1", "kind": "count", "key": "a"}]
    path = save_samples(tmp_path / "samples.png", images, prompts, verdicts(images, prompts), items, ["2"], "demo")
    assert Image.open(path).size[0] > 8 * 64
    curve = [{"stage": s, "geneval": g, "und": u, "prompts": 6, "questions": 1}
             for s, g, u in (("stage1", 0.1, 0.0), ("stage2", 0.4, 0.5), ("sft", 0.8, 0.9))]
    assert Image.open(save_curve(tmp_path / "curve.png", curve, 0.4)).size[0] > 100
    json.dumps(curve)  # what report.json holds


def test_a_count_below_one_is_refused_before_the_model_loads(capsys):
    from synergen_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "report", "--ckpt", "missing.ckpt", "--base-llm", "missing.ckpt", "--num-prompts", "0"])
    assert e.value.code == 2 and "--num-prompts 0 must be >= 1" in capsys.readouterr().err
