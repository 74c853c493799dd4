"""`synergen ablations`: every arm's layered recipe builds a model and data that agree (fold, tokens per view,
views per image as the table claims), the small-object tagging, summaries / table / resume logic on fake
finished runs, and (slow) the whole --quick pipeline end to end on the real tiny artefacts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from synergen_lightning import ablations as abl
from synergen_lightning.cli import lightning_cli
from synergen_lightning.system import SynerGenVL

ROOT = Path(__file__).resolve().parents[1]


def _stage_cli(stage: abl.StageRun, tmp_path, init_from=None):
    run_yaml = tmp_path / f"{stage.name}.yaml"
    run_yaml.write_text(json.dumps(abl.run_overrides(tmp_path, stage, seed=3, steps=7, init_from=init_from)))
    args = []
    for c in stage.configs() + [str(run_yaml)]:
        args += ["--config", c if Path(c).is_absolute() else str(ROOT / c)]
    return lightning_cli(args, run=False)


@pytest.mark.parametrize("arm,stage", [(a.name, s.name) for a in abl.ARMS if a.study != "head" for s in a.stages])
def test_arm_recipes_compose(arm, stage, tiny_base, tmp_path, monkeypatch):
    """The tiny recipe + overrides + run YAML: the fold, view policy and trainable set the table states."""
    monkeypatch.setenv("SYNERGEN_TINY_BASE_LLM", str(tiny_base / "base.ckpt"))
    monkeypatch.setenv("SYNERGEN_TINY_TEXT_TOKENIZER", str(tiny_base / "tok"))
    monkeypatch.chdir(ROOT)  # recipes name data/tiny/... relative to the repository root
    st = next(s for s in abl.ARM_BY_NAME[arm].stages if s.name == stage)
    cli = _stage_cli(st, tmp_path, init_from=tmp_path / "prev.ckpt" if st.init_from else None)
    model, dm = cli.model, cli.datamodule
    assert isinstance(model, SynerGenVL)
    assert model.grid == (8, 8), "every ablation arm uses 64-px views (8x8 codes)"
    want_fold = (2, 4) if arm == "fold_on" else (1, 1)
    assert model.fold_size == want_fold
    assert model.tokens_per_view == dm.hparams.tokens_per_view == 64 // (want_fold[0] * want_fold[1])
    assert (dm.hparams.max_tiles, dm.hparams.thumbnail) == (st.max_tiles, st.thumbnail)
    assert dm.hparams.image_input == "pixels"
    assert cli.trainer.max_steps == 7 and dm.hparams.seed == 3
    stage_cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "StageCallback"]
    assert stage_cb[0].stage["name"] == st.stage
    # the full arm and the progressive arm differ only in what trains: same lr / schedule as the tiny stage recipe
    tiny = lightning_cli(["--config", str(ROOT / st.recipe), "--trainer.logger=false"], run=False).model.hparams
    assert (model.hparams.lr, model.hparams.schedule) == (tiny.lr, tiny.schedule)
    if st.init_from:
        assert model.hparams.init_from == str(tmp_path / "prev.ckpt")
    elif st.stage != "stage1" and st.stage != "full":
        assert model.hparams.init_from_base_llm and model.hparams.init_from is None
    tasks = {src.task for src in dm.sources}  # pinned: image data only, as the paper's pretraining ablations
    assert tasks == ({"understanding"} if abl.ARM_BY_NAME[arm].study == "folding" else {"generation", "understanding"})
    if stage == "read":  # the folding arms' first stage asks the reading question alone, in the arm's views
        assert [(s.format, s.options) for s in dm.sources] == [("qa", {"qa_kinds": ["text"]})]
    elif abl.ARM_BY_NAME[arm].study == "folding":
        assert {s.format for s in dm.sources} == {"caption", "qa"}


@pytest.mark.parametrize("arm,stage", [(a.name, s.name) for a in abl.HEAD_ARMS for s in a.stages])
def test_head_arms_change_only_the_head_width_or_depth(arm, stage, tiny_base, tmp_path, monkeypatch):
    """Table 6b: each arm is the tiny stage recipe as it is (fold, data, lr, trainable set) with the head at the
    width and depth the arm names; its condition stays the recipe's."""
    monkeypatch.setenv("SYNERGEN_TINY_BASE_LLM", str(tiny_base / "base.ckpt"))
    monkeypatch.setenv("SYNERGEN_TINY_TEXT_TOKENIZER", str(tiny_base / "tok"))
    monkeypatch.chdir(ROOT)
    st = next(s for s in abl.ARM_BY_NAME[arm].stages if s.name == stage)
    cli = _stage_cli(st, tmp_path, init_from=tmp_path / "prev.ckpt" if st.init_from else None)
    tiny = lightning_cli(["--config", str(ROOT / st.recipe), "--trainer.logger=false"], run=False).model
    model = cli.model
    llm_width = model.llm.model.config.hidden_size
    import yaml

    tiny_width = yaml.safe_load((ROOT / "recipes/tiny/base_llm.yaml").read_text())["model"]["init_args"]["config"]["hidden_size"]
    want = {"head_x1": llm_width, "head_x1_2": tiny_width // 2, "head_x1_4": tiny_width // 4,  # of the tiny LLM
            "head_x1_2_d4": tiny_width // 2}[arm]
    assert model.head.model.config.hidden_size == want
    depth = 4 if arm == "head_x1_2_d4" else tiny.head.model.config.num_layers
    assert model.head.model.config.num_layers == depth and model.head.model.condition == tiny.head.model.condition
    for key in ("fold", "lr", "schedule", "lr_scale", "image_size", "question_first"):
        assert model.hparams[key] == tiny.hparams[key], key
    stage_cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "StageCallback"]
    assert stage_cb[0].stage["name"] == st.stage and cli.trainer.max_steps == 7


def _arms_run_on(tmp_path, monkeypatch, world: dict, only: str, fix: str) -> list[str]:
    """`--only ONLY` on a data/tiny of `world` must fail naming `fix`; the arms a run of every study then trains."""
    (tmp_path / "data" / "tiny" / "val").mkdir(parents=True)
    (tmp_path / "data" / "tiny" / "eval_prompts.jsonl").write_text("")
    (tmp_path / "data" / "tiny" / "world.json").write_text(json.dumps(world))
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # the harness reads the recipes where make runs it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=fix):
        abl.run([0], only, True, tmp_path / "out", tmp_path / "doc.md", 1, "test")
    ran = []
    monkeypatch.setattr(abl, "run_arm_seed", lambda arm, *a, **k: ran.append(arm.name) or {})
    monkeypatch.setattr(abl, "write_results", lambda *a, **k: {})
    abl.run([0], None, True, tmp_path / "out", tmp_path / "doc.md", 1, "test")
    return ran


def test_head_study_refuses_data_of_another_canvas(tmp_path, monkeypatch):
    """The head arms run the tiny recipes as they are: on a 128-px level `--only head` names the fix, and a run of
    every study leaves the head study out."""
    ran = _arms_run_on(tmp_path, monkeypatch, {"level": "full", "canvas": 128}, "head", "make data LEVEL=demo")
    assert ran and not any(name.startswith("head_") for name in ran)


def test_folding_study_refuses_data_without_its_views(tmp_path, monkeypatch):
    """The folding arms compare native 64-px tiles of a 128-px canvas with that canvas downsampled: on the 64-px demo
    level `--only folding` names the reading level, and a run of every study leaves the folding study out."""
    ran = _arms_run_on(tmp_path, monkeypatch, {"level": "demo", "canvas": 64}, "folding", "make ablations LEVEL=read")
    assert ran and not any(name.startswith("fold_") for name in ran) and any(n.startswith("head_") for n in ran)


def test_head_arms_train_the_tiny_recipes_at_their_own_steps_and_canvas(monkeypatch):
    """Table 6b runs stage 1 and 2 as `make demo` does: its steps and canvas are the recipes' own values."""
    import yaml

    monkeypatch.chdir(ROOT)
    recipes = [yaml.safe_load((ROOT / st.recipe).read_text()) for st in abl.ARM_BY_NAME["head_x1"].stages]
    for arm in abl.ARMS:
        if arm.study == "head":
            assert [st.full_steps() for st in arm.stages] == [r["trainer"]["max_steps"] for r in recipes]
    assert abl.head_canvas() == recipes[0]["model"]["init_args"]["image_size"]
    with pytest.raises(KeyError, match="sets no trainer.nothing"):
        abl.recipe_value(abl.HEAD_RECIPES[0], "trainer.nothing")


def test_folding_arms_image_token_counts(tiny_base):
    """The table's LLM tokens per image (64 vs 40): image slots of a real understanding row of a 128-px canvas."""
    import io

    from PIL import Image

    from synergen_lightning.data.sequences import SequenceBuilder
    from synergen_lightning.text_tokenizer import TextTokenizer

    buf = io.BytesIO()
    Image.new("RGB", (128, 128), "white").save(buf, format="JPEG")
    raw = {"__key__": "k", "jpg": buf.getvalue(), "txt": b"a red circle"}
    tok = TextTokenizer(tiny_base / "tok")
    for arm, tpv, tiles, thumb in (("fold_off", 64, 1, False), ("fold_on", 8, 4, True)):
        b = SequenceBuilder(tok, tokens_per_view=tpv, image_size=64, max_seq_len=192, max_tiles=tiles, thumbnail=thumb)
        row = b.build(raw, "understanding", "caption")
        assert sum(row.image_mask) == abl.ARM_BY_NAME[arm].stages[0].image_tokens


def test_small_object_question():
    meta = {"objects": [{"shape": "triangle", "color": "yellow", "size": "small"},
                        {"shape": "cross", "color": "blue", "size": "large"},
                        {"shape": "cross", "color": "yellow", "size": "large"}]}
    assert abl.small_object_question("What color is the triangle on the right?", meta)
    assert abl.small_object_question("How many triangles are there?", meta)
    assert not abl.small_object_question("Is the yellow triangle right of the blue cross?", meta)  # names a large one
    assert not abl.small_object_question("What color is the cross on the left?", meta)
    assert not abl.small_object_question("How many shapes are there?", meta)  # names no object


def _fake_runs(tmp_path, values):
    """Finished (train.json + eval.json + last.ckpt) stage folders for every arm and seed in `values`."""
    for (arm, stage, seed), ev in values.items():
        d = tmp_path / arm / f"seed{seed}" / stage
        d.mkdir(parents=True, exist_ok=True)
        (d / "last.ckpt").write_text("x")
        (d / "train.json").write_text(json.dumps({"steps": 10, "wall_s": 20.0, "s_per_step": 2.0, "loadavg_start": 4.0,
                                                  "loadavg_end": 4.0, "command": f"fit {arm} {stage}"}))
        (d / "eval.json").write_text(json.dumps(ev))


def test_summary_table_and_notes_kept(tmp_path):
    vals = {("fold_off", "und", 0): {"und": 0.4, "und_text": 0.1, "und_small": 0.3},
            ("fold_off", "und", 1): {"und": 0.5, "und_text": 0.3, "und_small": 0.4},
            ("fold_on", "und", 0): {"und": 0.6, "und_text": 0.5, "und_small": 0.5, "prior_und": 0.375,
                                    "prior_und_text": 0.125, "prior_und_small": 0.25, "prior_und_count": 0.5},
            ("fold_on", "read", 0): {"und": 0.1, "und_text": 0.7, "und_small": 0.0},
            ("full", "s2", 0): {"und": 0.2, "geneval": 0.1, "text": 0.3, "text_base": 0.9, "text_retention": 1 / 3},
            ("progressive", "s2", 0): {"und": 0.2, "geneval": 0.1, "text": 0.8, "text_base": 0.9, "text_retention": 0.8 / 0.9,
                                       "und_top_answer": {"color": "1"}, "und_top_answer_share": {"color": 1.0}}}
    _fake_runs(tmp_path, vals)
    runs = abl.collect(tmp_path, [], list(abl.ARMS))
    s = abl.summarize(runs, "und_text", "fold_off", "und")
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.2) and s["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert (s["min"], s["max"]) == (0.1, 0.3)
    assert abl.summarize(runs, "und", "s2_only", "s2") is None
    doc = tmp_path / "doc.md"
    doc.write_text(f"stale header\n{abl.NOTES_BEGIN}\nmy analysis\n{abl.NOTES_END}\n")
    res = abl.write_results(tmp_path, doc, quick=False, jobs=2, command="synergen ablations run", wall_s=5.0,
                            loadavg=[4.0, 4.0], settings=abl.EvalSettings())
    text = doc.read_text()
    assert "my analysis" in text and "stale header" not in text.split(abl.NOTES_BEGIN)[0]
    assert f"from `{tmp_path / 'results.json'}`" in text  # names the results it was written from
    assert "| w/o token folding | 64 | 45.0 ± 7.1 [40.0–50.0] | 20.0 ± 14.1 [10.0–30.0] |" in text
    assert "+30.0 points with folding (per seed: +40.0)" in text  # tiny characters: mean diff; seed-0 pair
    # the reading stage asks the reading question only: its other columns stay empty
    assert "| w/ token folding, after the reading stage alone | 40 | – | 70.0 | – | – | – | – | – | – | – | – |" in text
    # the prior row of each table: the recorded values in the table's columns, '–' where none was recorded
    assert "| question-type prior (a constant answer per kind, no image) | – | 37.5 | 12.5 | 25.0 | 50.0 | – | – | – | – | – | – |" in text
    assert "| question-type prior (a constant answer per kind, no image) | – | 37.5 | 12.5 | – | – | – | – | – | – | – | – | – | – |" in text
    assert "full tuning 33% of the base LLM's, progressive 89%" in text
    assert "LOADED" in text and json.loads((tmp_path / "results.json").read_text())["meta"]["seeds_found"] == [0, 1]
    assert res["summary"]["fold_on/und"]["und"]["mean"] == 0.6


def test_finished_stages_are_skipped(tmp_path, monkeypatch):
    """Resumable: a stage with train.json + eval.json + last.ckpt runs nothing; a half-done one is retrained."""
    _fake_runs(tmp_path, {("progressive", "s1", 0): {"und": 0.1}, ("progressive", "s2", 0): {"und": 0.2}})
    calls = []
    monkeypatch.setattr(abl, "_run", lambda cmd, log, usage=None: calls.append(cmd) or 1.0)
    out = abl.run_arm_seed(abl.ARM_BY_NAME["progressive"], 0, tmp_path, quick=True, settings=abl.QUICK_EVAL)
    assert calls == [] and out["s2"]["eval"] == {"und": 0.2}
    (tmp_path / "progressive" / "seed0" / "s2" / "train.json").unlink()  # interrupted fit of stage 2
    (tmp_path / "progressive" / "seed0" / "s2" / "eval.json").unlink()

    def fake_run(cmd, log, usage=None):
        calls.append(cmd)
        if "fit" in cmd:
            (tmp_path / "progressive" / "seed0" / "s2" / "last.ckpt").write_text("x")
        else:
            Path(cmd[cmd.index("--out") + 1]).write_text('{"und": 0.5}')
        return 1.0

    monkeypatch.setattr(abl, "_run", fake_run)
    out = abl.run_arm_seed(abl.ARM_BY_NAME["progressive"], 0, tmp_path, quick=True, settings=abl.QUICK_EVAL)
    assert len(calls) == 2 and "fit" in calls[0] and out["s2"]["eval"] == {"und": 0.5}
    assert str(tmp_path / "progressive" / "seed0" / "s1" / "last.ckpt") in (tmp_path / "progressive" / "seed0" / "s2" / "run.yaml").read_text()


def test_cli_errors_name_the_bad_value(tmp_path):
    with pytest.raises(SystemExit):
        abl.main(["run", "--only", "nonsense"])
    with pytest.raises(SystemExit):
        abl.main(["eval", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "e.json")])


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    """`synergen ablations run --quick`: every arm trains a few steps on the real tiny artefacts, is evaluated,
    and results.json + the markdown table are written (about 3 min on 2 loaded cores)."""
    for need in ("data/tiny/val", "runs/tiny/base_llm/last.ckpt", "runs/tiny/tokenizer/checkpoints/last.ckpt"):
        if not (ROOT / need).exists():
            pytest.skip(f"{need} missing: run make data tokenizer base-llm first")
    out = tmp_path / "abl"
    r = subprocess.run([sys.executable, "-m", "synergen_lightning.cli", "ablations", "run", "--quick", "--seeds", "0",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    # each study runs on its canvas only: the head study on the demo level's, the folding study on the 128-px levels'
    canvas = abl._data_canvas(ROOT / "data" / "tiny")
    runs = {"head": canvas in (None, abl.head_canvas()), "folding": canvas in (None, abl.FOLDING_CANVAS)}
    head_runs = runs["head"]
    ran = [a for a in abl.ARMS if runs.get(a.study, True)]
    assert set(res["runs"]) == {a.name for a in ran}
    for arm in ran:
        for st in arm.stages:
            ev = res["runs"][arm.name][st.name]["0"]["eval"]
            if "und" in st.suites:
                assert 0.0 <= ev["und"] <= 1.0
            if "grounding" in st.suites:  # the head study
                assert 0.0 <= ev["geneval"] <= 1.0 and ev["image_loss"] > 0 and ev["head_width"] > 0
            if "text" in st.suites:
                assert ev["text_base"] > 0 and 0.0 <= ev["geneval"] <= 1.0
    md = (out / "ablations.md").read_text()
    assert "QUICK" in md and "| S.1 + S.2 | Progressive |" in md and ("| head_x1_2 |" in md) == head_runs
