"""`make gpu-check`'s script on the CPU: every section runs at tiny sizes, records its figures and says the GPU ones
are not measured (on CUDA the same script measures them)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA `make gpu-check` measures; this is its CPU smoke run")
def test_gpu_check_runs_every_section_on_cpu(tmp_path, capsys):
    import gpu_check

    out = tmp_path / "results.json"
    result = gpu_check.main(["--device", "cpu", "--out", str(out), "--budget-s", "0"])
    printed = capsys.readouterr().out
    assert gpu_check.NOT_MEASURED in printed and "DCP save/load" in printed
    saved = json.loads(out.read_text())
    assert saved["gpu_measured"] is False and saved["note"] == gpu_check.NOT_MEASURED
    for name in gpu_check.SECTIONS:
        assert "error" not in result[name], (name, result[name])
    assert result["tiny_stage1"]["eager"]["steps"] == 3 and "skipped" in result["tiny_stage1"]["compiled"]
    assert result["reduced_2b_step"]["plan_bytes"] > 0 and result["reduced_2b_step"]["mfu"] > 0
    assert set(result["generation"]) >= {"images_1", "images_16"}
    row = result["generation"]["images_1"]  # compiled decoding runs on the CPU too, and draws the eager codes here
    assert row["folded_compiled_s"] > 0 and "folded_compiled_error" not in row, row
    assert row["folded_compiled_first_differing_code"] is None, row
    decoding = result["generation"]["compiled_decoding"]  # the head's patch and the LLM's step, each whole
    assert decoding["graphs"] >= 2 and decoding["graph_breaks"] == 0, decoding
    assert "0 graph breaks, 0 CUDA graphs declined" in gpu_check.summary(result)  # the compiled decoding's row
    assert result["dcp_roundtrip"]["identical"]
    assert result["flash_attention"]["flash_accepted"] == gpu_check.FLASH_NOT_MEASURED
    recipes = result["recipes_2b"]  # the 2b recipes chained on stand-ins, then the user's commands on the device
    for stage in ("stage1", "stage2", "sft"):
        assert recipes[stage]["global_step"] == 2 and recipes[stage]["sharded"], (stage, recipes[stage])
        assert recipes[stage]["losses"] and all(math.isfinite(v) for v in recipes[stage]["losses"]), recipes[stage]
    assert recipes["stages_train_as_the_paper"], recipes["trained_parts"]
    assert recipes["sft"]["accumulate_grad_batches"] == 2  # SFT's 16,384-token rows: 2 micro-batches in 32,768 tokens
    assert (recipes["export_exit"], recipes["generate_exit"], recipes["answer_exit"]) == (0, 0, 0), recipes
    assert len(recipes["generated"]) == 2 and isinstance(recipes["answer"], str)  # an untrained model may say nothing
    assert "2b recipes: export, generate, answer" in gpu_check.summary(result)


def test_flash_attention_section_on_cpu_says_not_measured_and_records_the_calls(tmp_path):
    """The right-padded GQA forward runs on the CPU with every SDPA call mask-free and causal (what FlashAttention
    needs on CUDA); whether the kernel accepts it is not measured there."""
    import gpu_check

    result = gpu_check.run("cpu", tmp_path / "r.json", only=["flash_attention"])["flash_attention"]
    assert "error" not in result, result
    assert result["flash_accepted"] == gpu_check.FLASH_NOT_MEASURED
    assert len(set(result["row_tokens"])) > 1 and result["padded_to"] == max(result["row_tokens"])  # really padded
    calls = result["cpu_forward"]
    assert calls["accepted"] and calls["sdpa_calls"] > 0
    assert calls["calls_with_mask"] == 0 and calls["causal_calls"] == calls["gqa_calls"] == calls["sdpa_calls"]
    assert "FlashAttention, padded" in gpu_check.summary({"device": "cpu", "flash_attention": result})


def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path, monkeypatch):
    import gpu_check

    def boom(device, out=None):
        raise RuntimeError("CUDA path broke")

    monkeypatch.setattr(gpu_check, "section_generation", boom)
    result = gpu_check.run("cpu", tmp_path / "r.json", only=["generation", "dcp_roundtrip"])
    assert result["generation"]["error"] == "RuntimeError: CUDA path broke"
    assert result["dcp_roundtrip"]["identical"]
    assert "error" in gpu_check.summary(result) and json.loads((tmp_path / "r.json").read_text())["generation"]["error"]


def test_gpu_check_writes_after_every_section_and_skips_what_its_budget_cannot_begin(tmp_path, monkeypatch):
    """A run cut off from outside keeps the sections it finished; past `budget_s` no section begins. The clock is
    the test's: the second section takes 10 s of it."""
    import types

    import gpu_check

    out = tmp_path / "r.json"
    seen, clock = {}, [0.0]

    def second(device):
        seen.update(json.loads(out.read_text()))  # the first section is on disk before the second begins
        clock[0] += 10.0
        return {"figure": 2}

    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(gpu_check, "section_dcp", lambda device, work: {"figure": 1})
    monkeypatch.setattr(gpu_check, "section_flash_attention", second)
    monkeypatch.setattr(gpu_check, "section_generation", lambda device, out: pytest.fail("began after the budget"))
    result = gpu_check.run("cpu", out, only=["dcp_roundtrip", "flash_attention", "generation"], budget_s=5.0)
    assert seen["dcp_roundtrip"]["figure"] == 1 and "flash_attention" not in seen
    assert result["flash_attention"]["figure"] == 2 and result["flash_attention"]["section_s"] == 10.0
    assert "budget" in result["generation"]["skipped"]
    assert json.loads(out.read_text())["generation"] == result["generation"]
    printed = gpu_check.summary(result)
    assert "skipped" in printed and "reduced 2b" not in printed  # sections not asked for print nothing
    with pytest.raises(SystemExit, match="--budget-s -1.0: must be >= 0"):
        gpu_check.main(["--device", "cpu", "--budget-s", "-1", "--out", str(out)])


def test_gpu_check_stops_the_section_running_when_the_budget_is_spent_keeping_its_figures(tmp_path, monkeypatch):
    """A section that would run past the GPU slot is stopped when `budget_s` is spent, with the figures it had recorded
    as it went; the sections after it are skipped and the JSON is written."""
    import time

    import gpu_check

    def endless(device, work, out):
        out["stage1"] = {"losses": [1.0]}  # a figure measured before the budget ran out
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(gpu_check, "section_recipes_2b", endless)
    monkeypatch.setattr(gpu_check, "section_generation", lambda device, out: pytest.fail("began after the budget"))
    t0 = time.perf_counter()
    result = gpu_check.run("cpu", tmp_path / "r.json", only=["recipes_2b", "generation"], budget_s=0.5)
    assert time.perf_counter() - t0 < 10
    stopped = result["recipes_2b"]
    assert stopped["stage1"] == {"losses": [1.0]} and stopped["error"].startswith("BudgetSpent: stopped when the budget")
    assert "budget" in result["generation"]["skipped"]
    assert json.loads((tmp_path / "r.json").read_text())["recipes_2b"]["stage1"] == {"losses": [1.0]}
