"""End to end on a miniature shape world: stage1 -> stage2 -> sft through the shipped tiny recipes (a few
steps each, chained checkpoints), then `synergen generate`, `synergen answer` and `synergen demo report`. Compiled
decoding draws the eager codes: tests/test_generation_decode.py, and `make gpu-check`'s generation rows."""

import json
from pathlib import Path

import pytest
import torch

from synergen_lightning.cli import main as synergen

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_stage_chain_generate_answer_report(tmp_path, monkeypatch):
    from tiny_world import make_tiny_world

    make_tiny_world(tmp_path, num_samples=240)
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
             "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "16",
             "--data.init_args.batch_size", '{"generation": 2, "understanding": 2, "text": 2}']
    for stage in ("stage1", "stage2", "sft"):
        extra = [] if stage != "stage1" else ['--data.init_args.batch_size={"generation": 2, "understanding": 2}']  # stage 2 and SFT also train on text
        synergen(["fit", "--config", str(ROOT / f"recipes/tiny/{stage}.yaml"), *quick, *extra])
        assert Path(f"runs/tiny/{stage}/last.ckpt").is_file()
    s1 = torch.load("runs/tiny/stage1/last.ckpt", weights_only=False)["state_dict"]
    base = torch.load("runs/tiny/base_llm/last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(s1["llm.model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen in stage 1
    assert synergen(["generate", "--ckpt", "runs/tiny/sft/last.ckpt", "--prompt", "a red circle", "--num", "2",
                     "--out", "gen", "--device", "cpu"]) == 0
    assert sorted(p.name for p in Path("gen").iterdir()) == ["000_00.png", "000_01.png", "metadata.jsonl"]
    drawn = [json.loads(line) for line in Path("gen/metadata.jsonl").read_text().splitlines()]
    assert [(d["file"], d["prompt"], d["sample"], d["seed"]) for d in drawn] == [
        ("000_00.png", "a red circle", 0, 0), ("000_01.png", "a red circle", 1, 0)]
    assert synergen(["answer", "--ckpt", "runs/tiny/sft/last.ckpt", "--image", "gen/000_00.png", "--question",
                     "How many shapes are there?", "--device", "cpu"]) == 0
    assert synergen(["demo", "report", "--ckpt", "runs/tiny/sft/last.ckpt", "--base-llm", "runs/tiny/base_llm/last.ckpt",
                     "--curve", "runs/tiny/stage1/last.ckpt", "runs/tiny/stage2/last.ckpt", "--curve-prompts", "4",
                     "--curve-questions", "4", "--out", "runs/demo", "--und-questions", "8", "--text-examples", "8",
                     "--device", "cpu"]) == 0
    report = json.loads(Path("runs/demo/report.json").read_text())
    assert report["level"] == report["trained_level"] == "demo"  # data/tiny's world.json, through the checkpoint
    assert [c["stage"] for c in report["curve"]] == ["stage1", "stage2", "sft"] and Path("runs/demo/curve.png").is_file()
    assert set(report["geneval"]) >= {"overall", "single_object", "two_objects", "counting", "colors", "position",
                                      "color_attr"}
    assert {"accuracy", "prior_accuracy", "top_answer_share"} <= set(report["und"]) and {"accuracy_base", "accuracy_final"} <= set(report["text"])
    assert {"objects_per_image", "rejected_per_image"} <= set(report["geneval"])
    g = report["grounding"]  # caption / image gain: finite numbers from the same losses as training
    assert {"caption_gain_nats", "image_gain_nats"} <= set(g)
    assert all(abs(g[k]) < 10 for k in ("caption_gain_nats", "image_gain_nats"))
    assert Path("runs/demo/samples.png").is_file()
