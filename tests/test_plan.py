"""`synergen plan` against measured peaks of the same step on the CPU (bench/memory_check.py), and its CLI."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from synergen_lightning.cli import main as synergen

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _tiny(layers: int, stage: str = "stage1") -> dict:
    from memory_check import TINY

    spec = json.loads(json.dumps(TINY))
    spec["llm"]["num_layers"], spec["stage"] = layers, stage
    return spec


MEASURED_PEAK = [  # layers, shape, checkpointing, compute
    (2, {"gen_rows": 1, "und_rows": 1, "seq_len": 1024}, True, "fp32"),
    (4, {"gen_rows": 2, "und_rows": 1, "seq_len": 300}, False, "fp32"),
    # FSDP2 (one gloo rank) with bf16 params under bf16 autocast, as the 2b recipes run
    (4, {"gen_rows": 1, "und_rows": 1, "seq_len": 300}, True, "bf16"),
]
AT_SCALE = [  # world, shard_size, stage, shape, checkpointing, compute
    # FSDP2 in fp32 gathers fp32 units
    (8, None, "stage1", {"gen_rows": 2, "und_rows": 1, "seq_len": 1024}, True, "fp32"),
    # every parameter trains: the gradients grow through the backward as the activations go
    (8, None, "sft", {"gen_rows": 1, "und_rows": 1, "seq_len": 300}, True, "bf16"),
    # HSDP: sharded within groups of 8, replicated across 8 groups
    (64, 8, "stage2", {"gen_rows": 1, "und_rows": 1, "seq_len": 300}, False, "bf16"),
    (64, None, "stage1", {"gen_rows": 2, "und_rows": 1, "seq_len": 1024}, True, "bf16"),
]
# kept out of `make test` (in `make test-all`): each measurement is a process of ~10 s on one core
SLOW_AT_SCALE = {1, 3}


def _key(*case) -> str:
    return json.dumps(case)


@pytest.fixture(scope="module")
def comparisons(request) -> dict:
    """The selected configurations of this file planned and measured, two probes at a time: each probe is a process
    of its own on one core, most of it start-up, and neither measurement depends on what else runs."""
    from memory_check import compare

    selected = {json.dumps(list(item.callspec.params.values())) for item in request.session.items
                if item.module is request.module and getattr(item, "callspec", None)}
    jobs = {_key(*c): partial(compare, _tiny(c[0]), *c[1:]) for c in MEASURED_PEAK}
    jobs |= {_key(*c): partial(compare, _tiny(4, c[2]), c[3], c[4], c[5], world=c[0], shard_size=c[1])
             for c in AT_SCALE}
    jobs = {k: job for k, job in jobs.items() if k in selected}
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(job) for k, job in jobs.items()}
        return {k: f.exception() or f.result() for k, f in futures.items()}


def _comparison(comparisons: dict, *case) -> dict:
    r = comparisons[_key(*case)]
    if isinstance(r, BaseException):
        raise r
    return r


@pytest.mark.parametrize("layers, shape, checkpointing, compute", MEASURED_PEAK)
def test_plan_within_15_percent_of_measured_peak(comparisons, layers, shape, checkpointing, compute):
    r = _comparison(comparisons, layers, shape, checkpointing, compute)
    assert 0.85 <= r["ratio"] <= 1.15, (r["planned_bytes"], r["measured_bytes"], r["plan"], r["measured"])


@pytest.mark.parametrize("world, shard_size, stage, shape, checkpointing, compute",
                         [pytest.param(*c, marks=[pytest.mark.slow] if i in SLOW_AT_SCALE else [])
                          for i, c in enumerate(AT_SCALE)])
def test_plan_within_15_percent_of_fsdp_mem_tracker_at_scale(comparisons, world, shard_size, stage, shape,
                                                             checkpointing, compute):
    """One rank of a world the CPU cannot launch: a fake process group in one process, the model sharded by
    `distributed.parallelize`, its live tensors counted by torch's FSDPMemTracker (bench/memory_check.py --world)."""
    r = _comparison(comparisons, world, shard_size, stage, shape, checkpointing, compute)
    assert r["method"] == "fsdp_mem_tracker" and r["world"] == world
    assert r["plan"]["state_bytes"]["params_fp32"] == 4 * r["plan"]["parameters"] / (shard_size or world)
    assert 0.85 <= r["ratio"] <= 1.15, (r["planned_bytes"], r["measured_bytes"], r["plan"], r["measured"])


@pytest.mark.slow
def test_tracker_and_resident_set_agree_at_world_size_one():
    """The two measurements the plan is checked against count the same step alike: torch's FSDPMemTracker (live
    tensors, over a one-rank fake process group) and the resident set of a fresh process (gloo, one rank)."""
    from memory_check import measure

    spec, shape = _tiny(4), {"gen_rows": 1, "und_rows": 1, "seq_len": 1024}
    with ThreadPoolExecutor(2) as pool:  # two probe processes side by side
        tracked = pool.submit(measure, spec, shape, True, "bf16", world=1)
        resident = pool.submit(measure, spec, shape, True, "bf16")
        tracked, resident = tracked.result()["measured_peak_bytes"], resident.result()["measured_peak_bytes"]
    assert abs(tracked / resident - 1) < 0.06, (tracked, resident)


def test_plan_2b_stage1_fits_80gb_and_warns_without_checkpointing(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "8",
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "WARNING" not in text and "activation checkpointing on" in text
    assert "not counted: the image tokenizer (/models/Emu3-VisionTokenizer does not exist here" in text
    plan = json.loads(out.read_text())
    est = plan["recipe_estimate"]
    assert plan["fits"] and plan["fsdp_shard"] == 8 and est["activation_checkpointing"]
    assert est["total_bytes"] * 1.2 < 80e9
    assert est["parameters"] > 3.5e9 and est["checkpoint_bytes"] == 4 * est["parameters"] + 8 * est["trainable"]
    assert plan["micro_batch"]["seq_len"] == 4096
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "8",
                     "--activation-checkpointing", "off"]) == 0
    text = capsys.readouterr().out
    assert "WARNING: over 80 GB" in text and "activation_checkpointing: true" in text
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "8",
                     "--nodes", "32"]) == 0
    text = capsys.readouterr().out  # 27 rows per task and rank: micro-batches of 3 + 3 rows
    assert "256 GPU(s)" in text and "3 generation + 3 understanding" in text and "WARNING" not in text


def test_plan_of_an_unsharded_recipe_keeps_the_whole_model_per_gpu(capsys, tmp_path):
    """The tiny recipes train without FSDP (`strategy: auto`): at 2 GPUs each holds the whole model (DDP), and the
    plan says so instead of dividing by a shard group that does not exist; the same recipe under FSDP2Strategy shards."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes/tiny/stage1.yaml").read_text())
    recipe["model"]["init_args"]["llm"] = {"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                                           "num_kv_heads": 2, "intermediate_size": 352}
    plans = {}
    for name, strategy in (("auto", "auto"), ("fsdp2", {"class_path": "synergen_lightning.distributed.FSDP2Strategy"})):
        recipe["trainer"]["strategy"] = strategy
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert synergen(["plan", "--config", str(path), "--devices", "2", "--json", str(tmp_path / f"{name}.json")]) == 0
        plans[name] = (json.loads((tmp_path / f"{name}.json").read_text()), capsys.readouterr().out)
    (auto, auto_text), (fsdp, fsdp_text) = plans["auto"], plans["fsdp2"]
    assert auto["fsdp_shard"] == 1 and not auto["recipe_estimate"]["fsdp"]
    assert "not sharded: trainer.strategy auto" in auto_text and "DDP's gradient buckets" in auto_text
    assert fsdp["fsdp_shard"] == 2 and "FSDP2 shard group 2" in fsdp_text
    est_a, est_f = auto["recipe_estimate"], fsdp["recipe_estimate"]
    assert est_a["state_bytes"]["params_fp32"] == 2 * est_f["state_bytes"]["params_fp32"] == 4 * est_a["parameters"]
    assert est_a["transient_bytes"]["fsdp_gathered"] == 0 < est_f["transient_bytes"]["fsdp_gathered"]


def test_plan_bad_input_names_the_fix(capsys):
    assert synergen(["plan", "--config", "recipes/nope.yaml", "--devices", "8"]) == 2
    assert "recipes/nope.yaml" in capsys.readouterr().err
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "0"]) == 2
    assert "--devices 0" in capsys.readouterr().err
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "8",
                     "--margin", "-1"]) == 2
    assert "--margin -1.0: give the headroom as a fraction >= 0" in capsys.readouterr().err
    assert synergen(["plan", "--config", str(ROOT / "recipes/tiny/tokenizer.yaml"), "--devices", "1"]) == 2
    assert "trains 'synergen_lightning.image_tokenizer.VQTokenizer': `synergen plan` sizes SynerGenVL " \
           "recipes" in capsys.readouterr().err


def test_plan_refuses_a_recipe_fit_would_refuse(tmp_path, capsys):
    """A misspelt key is not planned around: plan reads the recipe with fit's parser first."""
    typo = tmp_path / "typo.yaml"
    typo.write_text((ROOT / "recipes/tiny/stage1.yaml").read_text().replace("  max_steps:", "  max_stepz:", 1))
    assert synergen(["plan", "--config", str(typo), "--devices", "1"]) == 2
    assert capsys.readouterr().err == (f"synergen plan: error: {typo} is not a recipe synergen fit accepts: Group "
                                       "'trainer' does not accept option 'max_stepz'\n")


def _tiny_recipe(tmp_path: Path, image_tokenizer: str) -> Path:
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes/tiny/stage1.yaml").read_text())
    recipe["model"]["init_args"]["llm"] = {"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                                           "num_kv_heads": 2, "intermediate_size": 352}
    recipe["model"]["init_args"]["image_tokenizer"] = image_tokenizer
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_plan_counts_the_recipes_image_tokenizer_as_measured(capsys, tmp_path):
    """The tokenizer the recipe names, built on the meta device from its checkpoint's hyperparameters: the weights
    of the tokenizer as loaded, and the peak torch's MemTracker measures while it encodes a micro-batch's views on
    real tensors; both are on every GPU's bill."""
    import torch

    from memory_check import mem_tracker_peak
    from synergen_lightning.image_tokenizer.loading import load_image_tokenizer
    from synergen_lightning.system import SynerGenVL
    from tiny_world import write_untrained_vq

    ckpt = write_untrained_vq(tmp_path / "vq.ckpt")
    out = tmp_path / "plan.json"
    assert synergen(["plan", "--config", str(_tiny_recipe(tmp_path, str(ckpt))), "--devices", "1", "--json",
                     str(out)]) == 0
    text = capsys.readouterr().out
    plan = json.loads(out.read_text())
    counted, est = plan["image_tokenizer"], plan["recipe_estimate"]
    tok = load_image_tokenizer(ckpt)
    weights = sum(t.numel() * t.element_size() for t in (*tok.parameters(), *tok.buffers()))
    assert counted["weights_bytes"] == est["state_bytes"]["image_tokenizer"] == weights
    size = plan["model"]["image_size"]
    images = torch.rand(SynerGenVL.ENCODE_VIEWS, 3, size, size)
    measured = mem_tracker_peak(lambda: tok.encode(images), tok)
    assert counted["views"] == SynerGenVL.ENCODE_VIEWS and counted["encode_bytes"] == pytest.approx(measured, rel=0.05)
    assert "image_tokenizer" in text and "online tokenization" in text


def test_plan_counts_emu3_at_its_published_shape_from_its_config_alone(capsys, tmp_path, monkeypatch):
    """The 2b recipes' Emu3 directory needs only its config.json (BAAI/Emu3-VisionTokenizer's keys): its fp32
    weights (about 1 GiB) join every GPU's total, and the online encoding of a micro-batch (the adapter's calls of
    one 512-px view) holds what MemTracker counts for one call of transformers' Emu3VQVAE on the meta device."""
    import torch

    from memory_check import mem_tracker_peak

    transformers = pytest.importorskip("transformers")
    c = transformers.Emu3VQVAEConfig()
    emu3 = tmp_path / "emu3"
    emu3.mkdir()
    (emu3 / "config.json").write_text(json.dumps({
        "model_type": "Emu3VisionVQ", "ch": c.base_channels, "ch_mult": list(c.channel_multiplier),
        "codebook_size": c.codebook_size, "double_z": c.double_latent, "embed_dim": c.embed_dim,
        "in_channels": c.in_channels, "out_channels": c.out_channels, "num_res_blocks": c.num_res_blocks,
        "attn_resolutions": list(c.attn_resolutions), "temporal_downsample_factor": c.temporal_downsample_factor,
        "z_channels": c.latent_channels}))
    monkeypatch.setenv("SYNERGEN_EMU3_TOKENIZER", str(emu3))
    out = tmp_path / "plan.json"
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "8",
                     "--json", str(out)]) == 0
    assert "online tokenization" in capsys.readouterr().out
    plan = json.loads(out.read_text())
    counted, est = plan["image_tokenizer"], plan["recipe_estimate"]
    with torch.device("meta"):
        model = transformers.Emu3VQVAE(c)
    # the model's parameters and buffers, and the adapter's mean and std (3 + 3 fp32 floats)
    assert counted["weights_bytes"] == sum(t.nbytes for t in (*model.parameters(), *model.buffers())) + 24
    assert 1.0 * 2**30 < counted["weights_bytes"] < 1.1 * 2**30
    one_view = mem_tracker_peak(lambda: model.encode(torch.zeros(1, 3, 512, 512, device="meta"),
                                                      image_sizes=torch.tensor([[512, 512]])), model)
    # the adapter's calls hold one view's activations; the micro-batch's views in the model's range and codes besides
    assert one_view < counted["encode_bytes"] < 1.03 * one_view
    assert est["state_bytes"]["image_tokenizer"] == counted["weights_bytes"] and est["peak_at"] == "backward"
