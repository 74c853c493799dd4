"""End to end on a miniature shape world: stage1 -> stage2 -> sft through the shipped tiny recipes (a few
steps each, chained checkpoints), then `synergen generate`, `synergen answer` and `synergen demo report`."""

import json
import os
from pathlib import Path

import pytest
import torch

from synergen_lightning.cli import main as synergen

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_stage_chain_generate_answer_report(tmp_path, monkeypatch):
    import yaml

    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
    from synergen_lightning.llm import MMoELLM
    from synergen_lightning.text_tokenizer import train_bpe

    monkeypatch.chdir(tmp_path)
    assert synergen(["data", "synth", "--out", "data/tiny", "--num-samples", "240", "--shard-size", "120",
                     "--num-eval-prompts", "12", "--workers", "1", "--no-progress"]) == 0
    train_bpe(["data/tiny/text/train.jsonl"], 512, "runs/tiny/text_tokenizer")
    os.makedirs("runs/tiny/base_llm")
    MMoELLM(config=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
            tokenizer_dir="runs/tiny/text_tokenizer").save_checkpoint_file("runs/tiny/base_llm/last.ckpt")
    vq = VQTokenizer(**yaml.safe_load((ROOT / "recipes/tiny/tokenizer.yaml").read_text())["model"]["init_args"])
    os.makedirs("runs/tiny/tokenizer/checkpoints")
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()},
               "runs/tiny/tokenizer/checkpoints/last.ckpt")
    quick = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
             "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "16",
             "--data.init_args.batch_size", '{"generation": 2, "understanding": 2, "text": 2}']
    for stage in ("stage1", "stage2", "sft"):
        extra = [] if stage != "stage1" else ['--data.init_args.batch_size={"generation": 2, "understanding": 2}']  # stage 2 and SFT also train on text
        synergen(["fit", "--config", str(ROOT / f"recipes/tiny/{stage}.yaml"), *quick, *extra])
        assert Path(f"runs/tiny/{stage}/last.ckpt").is_file()
    s1 = torch.load("runs/tiny/stage1/last.ckpt", weights_only=False)["state_dict"]
    base = torch.load("runs/tiny/base_llm/last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(s1["llm.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen in stage 1
    assert synergen(["generate", "--ckpt", "runs/tiny/sft/last.ckpt", "--prompt", "a red circle", "--num", "2",
                     "--out", "gen", "--device", "cpu"]) == 0
    assert sorted(p.name for p in Path("gen").iterdir()) == ["000_00.png", "000_01.png"]
    assert synergen(["answer", "--ckpt", "runs/tiny/sft/last.ckpt", "--image", "gen/000_00.png", "--question",
                     "How many shapes are there?", "--device", "cpu"]) == 0
    assert synergen(["demo", "report", "--ckpt", "runs/tiny/sft/last.ckpt", "--base-llm", "runs/tiny/base_llm/last.ckpt",
                     "--out", "runs/demo", "--und-questions", "8", "--text-examples", "8", "--device", "cpu"]) == 0
    report = json.loads(Path("runs/demo/report.json").read_text())
    assert set(report["geneval"]) >= {"overall", "single_object", "two_objects", "counting", "colors", "position",
                                      "color_attr"}
    assert {"accuracy", "prior_accuracy", "top_answer_share"} <= set(report["und"]) and {"accuracy_base", "accuracy_final"} <= set(report["text"])
    assert {"objects_per_image", "rejected_per_image"} <= set(report["geneval"])
    g = report["grounding"]  # caption / image gain: finite numbers from the same losses as training
    assert {"caption_gain_nats", "image_gain_nats"} <= set(g)
    assert all(abs(g[k]) < 10 for k in ("caption_gain_nats", "image_gain_nats"))
    assert Path("runs/demo/samples.png").is_file()
