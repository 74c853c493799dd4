"""Every shipped SynerGen-VL recipe parses and instantiates (LightningCLI, run=False); the 2b model is built on
the meta device (no allocation) and its parameter counts are checked against the paper's 3.6B / 2.4B."""

from pathlib import Path

import pytest
import torch

from synergen_lightning.cli import lightning_cli
from synergen_lightning.system import SynerGenVL

ROOT = Path(__file__).resolve().parents[1]
TINY = ["stage1", "stage2", "sft"]
SPECIALS = '{"bos": 1, "eos": 2, "pad": 0, "boi": 92544, "eoi": 92545, "uncond": 92546, "im_start": 92543, "im_end": 92542}'


def _cli(recipe, extra=()):
    return lightning_cli(["--config", str(ROOT / recipe), *extra], run=False)


@pytest.mark.parametrize("stage", TINY)
def test_canvas128_overlay_reads_the_128_px_levels(stage, tiny_base, monkeypatch):
    monkeypatch.setenv("SYNERGEN_TINY_BASE_LLM", str(tiny_base / "base.ckpt"))
    monkeypatch.setenv("SYNERGEN_TINY_TEXT_TOKENIZER", str(tiny_base / "tok"))
    cli = _cli(f"recipes/tiny/{stage}.yaml", ["--config", str(ROOT / "recipes/tiny/canvas128.yaml"), "--trainer.logger=false"])
    assert cli.model.grid == (16, 16) and cli.model.tokens_per_view == 16 and cli.model.stage == stage


@pytest.mark.parametrize("stage", TINY)
def test_tiny_recipes_instantiate(stage, tiny_base, monkeypatch):
    monkeypatch.setenv("SYNERGEN_TINY_BASE_LLM", str(tiny_base / "base.ckpt"))
    monkeypatch.setenv("SYNERGEN_TINY_TEXT_TOKENIZER", str(tiny_base / "tok"))
    cli = _cli(f"recipes/tiny/{stage}.yaml", ["--trainer.logger=false"])
    model = cli.model
    assert isinstance(model, SynerGenVL)
    # the demo level's 64-px canvas: 8x8 codes, one 4x4-folded token per 32-px cell; the data follow the model
    assert model.stage == stage and model.grid == (8, 8) and model.fold_size == (4, 4) and model.tokens_per_view == 4
    assert "image_size" not in cli.datamodule.hparams and "tokens_per_view" not in cli.datamodule.hparams
    assert model.hparams.image_loss_weight == 2.0
    if stage != "stage1":
        assert model.hparams.init_from == f"runs/tiny/{'stage1' if stage == 'stage2' else 'stage2'}/last.ckpt"
    stage_cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "StageCallback"]
    assert stage_cb and stage_cb[0].stage["name"] == stage


PAPER_TABLE8 = {  # stage: (lr, schedule, weight_decay, max_seq_len, max_tiles, thumbnail, max_steps, global batch)
    "stage1": (1e-4, "constant", 0.05, 4096, 1, False, 95000, 6988),
    "stage2": (5e-5, "cosine", 0.05, 8192, 6, True, 35000, 5090),
    "sft": (5e-5, "cosine", 0.01, 16384, 12, True, 12000, 1760),
}


@pytest.mark.parametrize("stage", list(PAPER_TABLE8))
def test_2b_recipes_carry_table8_and_build_on_meta(stage):
    extra = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.logger=false",
             "--trainer.precision=32-true", "--model.init_args.text_tokenizer=null",
             f"--model.init_args.special_token_ids={SPECIALS}"]
    with torch.device("meta"):
        cli = _cli(f"recipes/synergen_vl_2b/{stage}.yaml", extra)
    model, data = cli.model, cli.datamodule
    lr, schedule, wd, seq, tiles, thumb, steps, global_batch = PAPER_TABLE8[stage]
    hp = model.hparams
    assert (hp.lr, hp.schedule, hp.weight_decay, tuple(hp.betas), hp.eps, hp.warmup_steps) == (lr, schedule, wd, (0.9, 0.95), 1e-8, 200)
    assert (data.hparams.max_seq_len, data.hparams.max_tiles, data.hparams.thumbnail) == (seq, tiles, thumb)
    assert data.hparams.cfg_dropout == 0.1 and cli.config.trainer.max_steps == steps
    assert model.fold_size == (2, 8) and model.grid == (64, 64) and model.tokens_per_view == 256
    assert model.head.model.config.num_layers == 4 and model.hparams.codebook_size == 32768
    # the recipe's per-rank batch x ranks is within 2% of the paper's per-task global batch
    import yaml

    t = yaml.safe_load((ROOT / f"recipes/synergen_vl_2b/{stage}.yaml").read_text())["trainer"]
    assert t["precision"] == "bf16-mixed"
    recipe_global = t["strategy"]["init_args"]["global_batch_size"]["generation"]
    assert abs(recipe_global - global_batch) / global_batch < 0.02
    assert next(model.parameters()).is_meta
    counts = model.param_counts()
    assert counts["total"] == pytest.approx(3.6e9, rel=0.05), counts
    assert counts["activated"] == pytest.approx(2.4e9, rel=0.05), counts


# LLM tokens one GPU may hold in a micro-batch: the 2b recipes' activations (checkpointed blocks, chunked losses)
# at this many tokens leave room on an 80 GB GPU; rows are padded to the longest, so the worst case is rows x max_seq_len
TOKENS_PER_GPU_CEILING = 65536


@pytest.mark.parametrize("stage", list(PAPER_TABLE8))
@pytest.mark.parametrize("nodes", [None, 1])  # the recipe's cluster, and one node of 8 GPUs
def test_2b_recipes_worst_case_tokens_per_gpu_fit_the_budget(stage, nodes):
    """Every micro-batch of the 2b recipes, at the recipe's world size and at 8 GPUs, holds at most its token budget
    (rows x max_seq_len), the micro-batches times the accumulation times the ranks make the global batch, and the
    data recipe's batch_size is the micro-batch at the recipe's world size."""
    import yaml

    from synergen_lightning.distributed import batch_plan, worst_case_tokens

    config = yaml.safe_load((ROOT / f"recipes/synergen_vl_2b/{stage}.yaml").read_text())
    if nodes is not None:
        config["trainer"]["num_nodes"] = nodes
    plan = batch_plan(config)
    seq = config["data"]["init_args"]["max_seq_len"]
    assert plan["tokens_per_gpu"] <= TOKENS_PER_GPU_CEILING
    assert worst_case_tokens(plan["micro_batch"], seq) == plan["worst_case_tokens_per_gpu"] <= plan["tokens_per_gpu"]
    for task, rows in plan["micro_batch"].items():
        assert rows * plan["accumulate_grad_batches"] * plan["world_size"] == plan["global_batch"][task]
    if nodes is None:
        assert plan["micro_batch"] == config["data"]["init_args"]["batch_size"]
    assert plan["gradient_clip_val"] == 1.0
    # sharded within a node (8 GPUs), replicated across nodes: gathers and reduce-scatters stay on NVLink
    assert plan["fsdp_mesh"] == {"replicate": plan["world_size"] // 8, "shard": 8}


def test_print_config_shows_the_batch_plan(capsys):
    from synergen_lightning.cli import main

    code = main(["fit", "--config", "recipes/synergen_vl_2b/sft.yaml", "--trainer.num_nodes", "1", "--print_config"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#   world_size: 8" in out and "#   accumulate_grad_batches: 220" in out
    assert "#   micro_batch: {'generation': 1, 'understanding': 1}" in out and "#   worst_case_tokens_per_gpu: 32768" in out
