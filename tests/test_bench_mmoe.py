"""bench/bench_mmoe.py: its quick run reports the idle-expert ratio beside the targeted ones (which alone feed
make bench's table) and an op-by-op profile of ours vs transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_mmoe  # noqa: E402


def test_quick_run_reports_untargeted_ratios_and_profile(tmp_path, capsys):
    out = tmp_path / "mmoe.json"
    res = bench_mmoe.main(["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0",
                           "--profile", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["ratios"]) == {"routing_overhead_50_vs_0", "ours_vs_transformers_text"}  # make bench's rows
    assert set(saved["untargeted_ratios"]) == {"idle_vision_experts_text"}
    med = saved["median_s"]
    assert saved["untargeted_ratios"]["idle_vision_experts_text"]["median"] == med["mmoe_0"] / med["dense_0"]
    assert {"mmoe_50", "mmoe_0", "dense_0", "hf_qwen2"} <= set(saved["median_s"])
    ops = {row["op"] for row in res["profile"]}
    assert "aten::mm" in ops or "aten::addmm" in ops
    assert "largest differences first" in capsys.readouterr().out
