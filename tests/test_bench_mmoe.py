"""bench/bench_mmoe.py: its before/after variant is the previous attention, numerically, and its quick run
reports the idle-expert and q/k/v ratios beside the targeted ones, with an op-by-op profile."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_mmoe  # noqa: E402

from synergen_lightning.models.mmoe import LLMConfig, MMoETransformer  # noqa: E402


def test_three_gemm_variant_matches_the_one_gemm_attention():
    cfg = LLMConfig(vocab_size=50, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=64,
                    qkv_bias=True)
    torch.manual_seed(0)
    ours = MMoETransformer(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    old = bench_mmoe.with_three_qkv_gemms(copy.deepcopy(ours))
    assert ours.layers[0].attn.forward.__func__ is not old.layers[0].attn.forward.__func__
    ids = torch.randint(0, 50, (2, 11))
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[:, 3:7] = True
    torch.testing.assert_close(ours.forward_ids(ids, image_mask=mask), old.forward_ids(ids, image_mask=mask),
                               rtol=1e-5, atol=1e-5)


def test_quick_run_reports_untargeted_ratios_and_profile(tmp_path, capsys):
    out = tmp_path / "mmoe.json"
    res = bench_mmoe.main(["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0", "--compare-qkv",
                           "--profile", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["ratios"]) == {"routing_overhead_50_vs_0", "ours_vs_transformers_text"}  # make bench's rows
    assert set(saved["untargeted_ratios"]) == {"idle_vision_experts_text", "fused_qkv_vs_3gemm"}
    assert {"dense_0", "mmoe_0_3gemm", "hf_qwen2"} <= set(saved["median_s"])
    ops = {row["op"] for row in res["profile"]}
    assert "aten::mm" in ops or "aten::addmm" in ops
    assert "largest differences first" in capsys.readouterr().out
