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
    start = out.index("make --no-print-directory -j2 data/tiny/codes128/.done runs/tiny/base_llm/last.ckpt")
    end = out.index("make --no-print-directory runs/demo/report.json")
    side_by_side = out[start:end]
    assert re.findall(r"--in data/tiny/train .*--workers (\d+)", side_by_side) == ["1"]
    assert "fit --config recipes/tiny/base_llm.yaml" in side_by_side
    assert "fit --config recipes/tiny/tokenizer.yaml" in side_by_side
    assert f"DEVICES={min(CORES, 2)} STRATEGY=ddp" in out[end:].splitlines()[0]
