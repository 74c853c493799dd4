"""The Makefile's own logic, through `make -n` (prints the commands, runs nothing but recursive makes)."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))


def dry_run(*targets: str, **env: str) -> str:
    result = subprocess.run(["make", "-n", "-B", *targets], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("omp", ["1", "2"])
def test_core_count_ignores_omp_num_threads(omp):
    """`nproc` obeys OMP_NUM_THREADS, which the Makefile exports as 1: every sub-make (and make >= 4.4) counted one
    core, so `make demo` pretokenized with one worker where the README promised one per core."""
    out = dry_run("data/tiny/codes128/.done", OMP_NUM_THREADS=omp)
    workers = re.findall(r"--in data/tiny/train .*--workers (\d+)", out)
    assert workers == [str(CORES)]


def test_demo_pretokenizes_beside_the_base_llm_and_trains_stages_on_every_core():
    out = dry_run("demo", OMP_NUM_THREADS="1")
    # the base LLM and the tokenizer -> pretokenize chain are one `make -j2` (one core each: pretokenize gets 1 worker)
    start = out.index("make --no-print-directory -j2 data/tiny/codes128/.done runs/tiny/base_llm/.done")
    end = out.index("make --no-print-directory runs/demo/report.json")
    side_by_side = out[start:end]
    assert re.findall(r"--in data/tiny/train .*--workers (\d+)", side_by_side) == ["1"]
    assert "fit --config recipes/tiny/base_llm.yaml" in side_by_side
    assert "fit --config recipes/tiny/tokenizer.yaml" in side_by_side
    assert f"DEVICES={min(CORES, 2)} STRATEGY=ddp" in out[end:].splitlines()[0]


def _fake_checkout(tmp_path: Path) -> Path:
    """Just the files the Makefile's rules name as prerequisites, for `make -f ROOT/Makefile -n` in tmp_path."""
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "recipes" / "tiny").mkdir(parents=True)
    for name in ("tokenizer", "base_llm", "stage1", "stage2", "sft"):
        (tmp_path / "recipes" / "tiny" / f"{name}.yaml").touch()
    return tmp_path


def _stage1_dry_run(cwd: Path) -> list[str]:
    result = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-n", "stage1"], cwd=cwd, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_an_interrupted_stage_resumes_and_a_finished_one_starts_over(tmp_path):
    """A stage killed half-way leaves runs/tiny/stage1/last.ckpt (its mid-run save) and no .done: make resumes it
    (it used to take that half-trained last.ckpt for a finished stage 1). A finished stage whose recipe changed starts
    over (its old checkpoints cleared first, so nothing resumes from them)."""
    import time

    cwd = _fake_checkout(tmp_path)
    stage1 = cwd / "runs" / "tiny" / "stage1"
    fit = lambda lines: next(line for line in lines if "fit --config recipes/tiny/stage1.yaml" in line)  # noqa: E731

    assert "--ckpt_path" not in fit(_stage1_dry_run(cwd))  # nothing there yet: from scratch
    stage1.mkdir(parents=True)
    (stage1 / "last.ckpt").touch()
    assert fit(_stage1_dry_run(cwd)).endswith("--ckpt_path runs/tiny/stage1/last.ckpt")
    (stage1 / ".done").touch()
    time.sleep(1.1)
    (cwd / "recipes" / "tiny" / "stage1.yaml").touch()  # the recipe changed since the finished run
    lines = _stage1_dry_run(cwd)
    assert "--ckpt_path" not in fit(lines)
    clear = next(i for i, line in enumerate(lines) if "rm -f runs/tiny/stage1/.done runs/tiny/stage1/*.ckpt" in line)
    assert clear < lines.index(fit(lines))
    assert "touch runs/tiny/stage1/.done" in lines[lines.index(fit(lines)) + 1]
