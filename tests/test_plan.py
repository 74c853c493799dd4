"""`synergen plan` against measured peaks of the same step on the CPU (bench/memory_check.py), and its CLI."""

import json
import sys
from pathlib import Path

import pytest

from synergen_lightning.cli import main as synergen

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.parametrize("layers, shape, checkpointing, compute", [
    (2, {"gen_rows": 1, "und_rows": 1, "seq_len": 1024}, True, "fp32"),
    (4, {"gen_rows": 2, "und_rows": 1, "seq_len": 300}, False, "fp32"),
    # FSDP2 (one gloo rank) with bf16 params under bf16 autocast, as the 2b recipes run
    (4, {"gen_rows": 1, "und_rows": 1, "seq_len": 300}, True, "bf16"),
])
def test_plan_within_15_percent_of_measured_peak(layers, shape, checkpointing, compute):
    from memory_check import TINY, compare

    spec = json.loads(json.dumps(TINY))
    spec["llm"]["num_layers"] = layers
    r = compare(spec, shape, checkpointing, compute)
    assert 0.85 <= r["ratio"] <= 1.15, (r["planned_bytes"], r["measured_bytes"], r["plan"], r["measured"])


def test_plan_2b_stage1_fits_80gb_and_warns_without_checkpointing(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "8",
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "WARNING" not in text and "activation checkpointing on" in text
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


def test_plan_bad_input_names_the_fix(capsys):
    assert synergen(["plan", "--config", "recipes/nope.yaml", "--devices", "8"]) == 2
    assert "recipes/nope.yaml" in capsys.readouterr().err
    assert synergen(["plan", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--devices", "0"]) == 2
    assert "--devices 0" in capsys.readouterr().err
