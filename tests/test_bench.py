"""The benchmark suite (bench/): quick mode runs on tiny sizes, writes the documented JSON schema and
markdown table, skips configurations too large for the machine with a message, and its FLOP count
agrees with torch's FlopCounterMode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_folding  # noqa: E402
import bench_mfu  # noqa: E402
import run_all  # noqa: E402
from common import TooLarge, check_fits, counted_flops, interleaved, ratio, train_flops  # noqa: E402
from synergen_lightning.llm import lm_loss  # noqa: E402
from synergen_lightning.models.config import LLMConfig  # noqa: E402
from synergen_lightning.models.mmoe import MMoETransformer  # noqa: E402

HUGE = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_heads": 512, "num_kv_heads": 512}


def test_suite_quick_writes_schema_and_table(tmp_path):
    out = tmp_path / "results.json"
    assert run_all.main(["--quick", "--only", "mfu,gpu_mfu,mmoe", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("schema_version", "quick", "threads", "command", "machine", "load_average", "seconds", "errors",
                "skipped", "table", "mfu", "gpu_mfu", "mmoe"):
        assert key in res, key
    assert res["quick"] is True and res["errors"] == {}
    assert res["machine"]["fingerprint"] and len(res["load_average"]["before"]) == 3
    cpu = res["mfu"]["cpu"]
    assert cpu["mfu"] > 0 and cpu["timed"]["train_step"]["repeats"] == 2 and cpu["peak_gflops_per_s"] > 0
    # matmul FLOPs: analytic == counted by torch (the CPU flash-attention kernel has no FLOP formula)
    assert cpu["flops"]["flop_counter"] == pytest.approx(cpu["flops"]["analytic_matmuls_only"], rel=1e-9)
    if not torch.cuda.is_available():  # GPU MFU: skipped with a message, the 2B model still built (meta device)
        assert "no CUDA" in res["gpu_mfu"]["gpu"]["skipped"] and res["gpu_mfu"]["gpu"]["parameters"] > 1e9
        assert any("gpu_mfu" in s for s in res["skipped"])
    assert {"routing_overhead_50_vs_0", "ours_vs_transformers_text"} <= set(res["mmoe"]["ratios"])
    measures = {r["measure"] for r in res["table"]}
    assert any(m.startswith("CPU MFU") for m in measures) and any("transformers" in m for m in measures)
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Benchmark results (quick sizes)") and "| benchmark | measure |" in md


def test_folding_quick_train_and_generate():
    res = bench_folding.run(quick=True, repeats=1, warmup=0, parts=("train", "generate"))
    tr, gen = res["train"], res["generate"]
    assert tr["llm_tokens_per_image"] == {"folded": 16, "unfolded": 256}  # 16x16 codes, 2x8 folding
    assert tr["timed"]["folded"]["image_codes_per_s"] > 0 and tr["speedup"]["median"] > 0
    assert set(gen["timed"]) == {"folded", "folded_cfg", "unfolded", "folded_head_w2", "folded_batch2", "unfolded_batch2"}
    assert gen["cfg_cost"]["median"] > 0 and gen["batched"]["images"] == 2 and gen["batched"]["images_per_s"] > 0
    # folded vs unfolded at batch 1 and 2, each against the FLOP bound: fraction = speed-up / FLOP ratio = FLOP/s ratio
    for n, b in gen["bound"].items():
        rate = b["gflops_per_s"]
        assert b["images"] == int(n) and b["fraction"] == pytest.approx(b["speedup"]["median"] / b["flops_ratio"])
        assert b["fraction"] == pytest.approx(rate["folded"] / rate["unfolded"])
    assert set(gen["bound"]) == {"1", "2"} and gen["met"]["bound_fraction"] in (True, False)
    assert "memory" not in res and res["machine"]["torch_threads"] == 1
    # the narrower head (width 64 / 2) runs beside the same-width one; a narrower head costs fewer FLOPs per image
    w2 = tr["narrow_head"]["w2"]
    assert w2["head"]["hidden_size"] == 32 and w2["head_params"] < tr["head_params"] and w2["speedup"]["median"] > 0
    assert w2["flops_ratio"] > tr["flops_per_image"]["ratio"] and gen["narrow_head"]["w2"]["flops_ratio"] > 1


def test_narrow_head_flops_count_the_built_head():
    """The FLOP model of a width / 2 head == torch's FLOP counter on the real narrow head built by the bench
    (matmuls: the CPU flash-attention kernel has no FLOP formula, so attention is left out of both)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = dict(bench_folding.QUICK)
    model = bench_folding.build_folded(c, divisor=2)
    assert model.head.model.config.hidden_size == 32 and model.head.model.config.head_dim == 32
    h, codes = torch.randn(16, 64), torch.randint(0, c["codebook_size"], (16, 16))
    with FlopCounterMode(display=False) as fc:
        model.head(h, codes)
    cfg = bench_folding.llm_config(c)
    head = LLMConfig(**{**vars(cfg), **bench_folding.head_config(c, 2), "vocab_size": c["codebook_size"], "head_dim": None})
    # forward = a third of train_flops' 6x (matmul part), + cond_proj (64 -> 32)
    expected = train_flops(head, 16, 16, vocab_out=c["codebook_size"], attention=False) / 3 + 2 * 64 * 32 * 16
    assert fc.get_total_flops() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="divisor 3"):
        bench_folding.head_config(c, 3)


def test_too_large_configs_are_skipped_with_a_message(capsys):
    res = bench_folding.run(quick=True, config=HUGE, parts=("train", "generate", "memory"))
    for part in ("train", "generate", "memory"):
        assert "GiB" in res[part]["skipped"] and "skipped" in res[part]["skipped"], res[part]
    cpu = bench_mfu.run(quick=True, config=HUGE)["cpu"]
    assert "needs about" in cpu["skipped"]
    assert "[skipped]" in capsys.readouterr().out
    rows = run_all.table_rows({"folding": res, "mfu": {"cpu": cpu}})
    assert rows == []  # nothing measured, nothing in the table
    assert len(run_all._skips({"folding": res})) == 3
    with pytest.raises(TooLarge, match="needs about"):
        check_fits(1e18, "a petabyte model")


def test_train_flops_match_flop_counter_on_the_real_model():
    cfg = LLMConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
    model = MMoETransformer(cfg)
    ids = torch.randint(0, 97, (3, 10))
    counted = counted_flops(lambda: lm_loss(model.logits(model(model.embed(ids))), ids).backward())
    assert counted == train_flops(cfg, 3, 10, attention=False)
    # attention term: causal counts half of QK^T + AV, fwd + 2x bwd
    assert train_flops(cfg, 3, 10, causal=False) - train_flops(cfg, 3, 10, attention=False) == 12 * 3 * 10 * 10 * 8 * 4 * 2
    assert train_flops(cfg, 3, 10) - train_flops(cfg, 3, 10, attention=False) == 6 * 3 * 10 * 10 * 8 * 4 * 2


def test_interleaved_runs_round_robin_and_ratio():
    calls = []
    timed = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert timed["a"]["repeats"] == 3 and len(timed["a"]["times_s"]) == 3
    fake = {"slow": {"median_s": 4.0, "min_s": 3.0}, "fast": {"median_s": 2.0, "min_s": 1.0}}
    assert ratio(fake, "slow", "fast") == {"median": 2.0, "of_min": 3.0}


def test_unknown_benchmark_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "folding,nope"])
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.slow
def test_whole_quick_suite_with_memory_and_data(tmp_path):
    out = tmp_path / "results.json"
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    mem = res["folding"]["memory"]
    assert set(mem["step_peak_mib"]) == {"folded", "folded_checkpointed", "unfolded", "unfolded_checkpointed"}
    assert res["data"]["throughput"]["pretokenized_64x64"]["samples_per_s_per_worker"] > 0


def test_ab_decode_vs_unfolded_runs_both_revisions_side_by_side(tmp_path):
    """bench/ab_decode.py --vs-unfolded at an 8x8 grid: HEAD (exported beside the working tree) and the working tree
    sample the same codes, and each revision gets its folded vs unfolded speed-up and fraction of the FLOP bound."""
    import ab_decode

    out = ab_decode.main(["--rev", "HEAD", "--grid", "8", "--vs-unfolded", "--batches", "1,2", "--rounds", "1",
                          "--out", str(tmp_path / "ab.json")])
    assert set(out["batches"]) == {"1", "2"} and out["flops_ratio"] > 1
    for row in out["batches"].values():
        for side in ("before", "after"):
            r = row[side]
            assert r["fraction_of_bound"] == pytest.approx(r["speedup"] / out["flops_ratio"])
    assert json.loads((tmp_path / "ab.json").read_text())["grid"] == 8
