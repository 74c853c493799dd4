"""`make gpu-check`'s script on the CPU: every section runs at tiny sizes, records its figures and says the GPU ones
are not measured (on CUDA the same script measures them)."""

import json
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
    result = gpu_check.main(["--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert gpu_check.NOT_MEASURED in printed and "DCP save/load" in printed
    saved = json.loads(out.read_text())
    assert saved["gpu_measured"] is False and saved["note"] == gpu_check.NOT_MEASURED
    for name in gpu_check.SECTIONS:
        assert "error" not in result[name], (name, result[name])
    assert result["tiny_stage1"]["eager"]["steps"] == 3 and "skipped" in result["tiny_stage1"]["compiled"]
    assert result["reduced_2b_step"]["plan_bytes"] > 0 and result["reduced_2b_step"]["mfu"] > 0
    assert set(result["generation"]) >= {"images_1", "images_16"}
    assert result["dcp_roundtrip"]["identical"]


def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path, monkeypatch):
    import gpu_check

    def boom(device):
        raise RuntimeError("CUDA path broke")

    monkeypatch.setattr(gpu_check, "section_generation", boom)
    result = gpu_check.run("cpu", tmp_path / "r.json", only=["generation", "dcp_roundtrip"])
    assert result["generation"]["error"] == "RuntimeError: CUDA path broke"
    assert result["dcp_roundtrip"]["identical"]
    assert "error" in gpu_check.summary(result) and json.loads((tmp_path / "r.json").read_text())["generation"]["error"]
