"""The Makefile's own logic, through `make -n` (prints the commands, runs nothing but recursive makes)."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))


def dry_run(*targets: str, **env: str) -> str:
    """`make -n -B TARGETS` with `env`, on a machine without GPUs unless `GPUS` is given."""
    result = subprocess.run(["make", "-n", "-B", *targets], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "GPUS": "0", **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("omp", ["1", "2"])
def test_core_count_ignores_omp_num_threads(omp):
    """`nproc` obeys OMP_NUM_THREADS, which the Makefile exports as 1: every sub-make (and make >= 4.4) counted one
    core, so `make demo` pretokenized with one worker where the README promised one per core."""
    out = dry_run("data/tiny/codes/.done", OMP_NUM_THREADS=omp)
    workers = re.findall(r"--in data/tiny/train .*--workers (\d+)", out)
    assert workers == [str(CORES)]


def test_demo_pretokenizes_beside_the_base_llm_and_trains_stages_on_every_core():
    out = dry_run("demo", OMP_NUM_THREADS="1")
    # the base LLM and the tokenizer -> pretokenize chain are one `make -j2` (one core each: pretokenize gets 1 worker)
    start = out.index("make --no-print-directory -j2 data/tiny/codes/.done runs/tiny/base_llm/.done")
    end = out.index("make --no-print-directory runs/demo/report.json")
    side_by_side = out[start:end]
    assert re.findall(r"--in data/tiny/train .*--workers (\d+)", side_by_side) == ["1"]
    base_llm = next(line for line in side_by_side.splitlines() if "fit --config recipes/tiny/base_llm.yaml" in line)
    # once the codes are written the base LLM takes the freed core (callbacks/threads.py)
    assert (f"--trainer.callbacks+=callbacks.threads.ThreadsWhenFree --trainer.callbacks.free_after data/tiny/codes/.done"
            f" --trainer.callbacks.threads {min(CORES, 2)}") in " ".join(base_llm.split())
    assert "fit --config recipes/tiny/tokenizer.yaml" in side_by_side
    assert f"DEVICES={min(CORES, 2)} STRATEGY=ddp" in out[end:].splitlines()[0]


def test_on_a_gpu_machine_the_demo_trains_on_one_gpu_and_pretokenizes_a_few_workers_per_gpu():
    """The tiny recipes' `accelerator: auto` takes the GPU where there is one: the demo's 2 data-parallel CPU
    processes would each ask for a GPU (Lightning refuses 2 devices on a 1-GPU machine), so it trains on one; the
    pretokenize workers, which `data pretokenize` spreads over the GPUs, are at most 4 per GPU."""
    out = dry_run("demo", OMP_NUM_THREADS="1", GPUS="1")
    assert "DEVICES=1 STRATEGY=ddp" in out[out.index("make --no-print-directory runs/demo/report.json"):].splitlines()[0]
    out = dry_run("data/tiny/codes/.done", GPUS="1")
    assert re.findall(r"--in data/tiny/train .*--workers (\d+)", out) == [str(min(CORES, 4))]
    out = dry_run("data/tiny/codes/.done", GPUS="0")
    assert re.findall(r"--in data/tiny/train .*--workers (\d+)", out) == [str(CORES)]


def _fake_checkout(tmp_path: Path) -> Path:
    """Just the files the Makefile's rules name as prerequisites, for `make -f ROOT/Makefile -n` in tmp_path."""
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "constraints.txt").touch()
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


def test_a_finished_stage_says_so_and_force_trains_it_again(tmp_path):
    """After make demo, `make stage1 DEVICES=2` used to say nothing was to be done: the user asking for a sharded run
    got none, silently. Now make names the finished run and the way to train it again."""
    import time

    cwd = _fake_checkout(tmp_path)
    for d in (".venv", "data/tiny", "data/tiny/codes", "runs/tiny/tokenizer/checkpoints", "runs/tiny/base_llm", "runs/tiny/stage1"):
        (cwd / d).mkdir(parents=True, exist_ok=True)
    time.sleep(1.1)  # every product newer than the recipes
    for f in (".venv/.installed", "data/tiny/.done-demo", "runs/tiny/.seed-0", "runs/tiny/tokenizer/checkpoints/last.ckpt",
              "data/tiny/codes/.done", "runs/tiny/base_llm/.done", "runs/tiny/stage1/last.ckpt", "runs/tiny/stage1/.done"):
        (cwd / f).touch()
        time.sleep(0.01)

    def run(*args):
        r = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-n", "stage1", *args], cwd=cwd, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = run("DEVICES=2")
    assert "fit --config" not in out
    assert "runs/tiny/stage1 is finished" in out and "FORCE=1 trains it again with DEVICES=2 STRATEGY=fsdp2" in out
    out = run("DEVICES=2", "FORCE=1")
    fit = next(line for line in out.splitlines() if "fit --config recipes/tiny/stage1.yaml" in line)
    assert "--trainer.devices 2" in fit and "FSDP2Strategy" in fit and "--ckpt_path" not in fit
    assert not (cwd / "runs/tiny/stage1/.done").exists() and not (cwd / "runs/tiny/stage1/last.ckpt").exists()


def test_an_explicit_recipe_goes_on_from_its_last_checkpoint_unless_forced(tmp_path):
    """`make stage1 RECIPE=...` again after a preemption resumes the run (`--ckpt_path last`: its own last
    checkpoint, or a fresh start when there is none) instead of training from step 0 over it; FORCE=1 starts over."""
    cwd, recipe = _fake_checkout(tmp_path), "recipes/synergen_vl_2b/stage1.yaml"
    (cwd / ".venv").mkdir()
    (cwd / ".venv/.installed").touch()

    def fit_line(*args):  # in a scratch checkout: FORCE=1 removes runs/tiny/stage1's checkpoints even under -n
        r = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-n", "stage1", f"RECIPE={recipe}", *args], cwd=cwd,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "GPUS": "0"})
        assert r.returncode == 0, r.stderr
        return next(ln for ln in r.stdout.splitlines() if "fit --config" in ln)

    assert f"fit --config {recipe} --ckpt_path last --trainer.devices 8" in fit_line("DEVICES=8")
    assert "--ckpt_path" not in fit_line("FORCE=1")


def test_level_and_seed_reach_every_step():
    out = dry_run("demo", "runs/tiny/sft/.done", "data/tiny/codes/.done", LEVEL="full", SEED="1")
    assert "data synth --level full --out data/tiny" in out
    assert set(re.findall(r"pretokenize .*--image-size (\d+)", out)) == {"128"}
    fits = [line for line in out.splitlines() if "synergen fit --config" in line]
    assert fits and all("--seed_everything 1" in line for line in fits)
    stage_fits = [line for line in fits if "recipes/tiny/s" in line]
    assert {re.search(r"recipes/tiny/(\w+)\.yaml", line)[1] for line in stage_fits} == {"stage1", "stage2", "sft"}
    assert all("--config recipes/tiny/canvas128.yaml" in line for line in stage_fits)
    demo = dry_run("runs/tiny/sft/.done", "data/tiny/codes/.done")
    assert "data synth --level demo" in demo and "canvas128" not in demo
    assert set(re.findall(r"pretokenize .*--image-size (\d+)", demo)) == {"64"}


def test_a_new_tokenizer_pretokenizes_from_scratch():
    """Pretokenize resumes by skipping shards that exist; after the tokenizer is trained again (another SEED, a new
    recipe) the old codes would survive beside the new tokenizer. The rule clears them first."""
    lines = dry_run("data/tiny/codes/.done").splitlines()
    clear = lines.index("rm -rf data/tiny/codes")
    assert clear < next(i for i, line in enumerate(lines) if "data pretokenize" in line)


def test_eval_prints_the_paper_benchmarks_for_the_checkpoint_it_scored(tmp_path):
    """`make eval` scores the latest tiny run, then prints the paper-scale commands for that checkpoint; every
    `synergen` command among them parses, with each of its options in its --help."""
    from tests.test_docs import _help

    cwd = _fake_checkout(tmp_path)
    (cwd / "runs" / "tiny" / "stage2").mkdir(parents=True)
    (cwd / "runs" / "tiny" / "stage2" / "last.ckpt").touch()
    result = subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-o", ".venv/.installed", "eval",
                             "SYN=echo"],
                            cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("eval report --ckpt runs/tiny/stage2/last.ckpt")
    assert "--cfg 1.5" in out.splitlines()[0]  # the tiny models' CFG, as make demo scores them
    for needle in ("synergen eval geneval-official --ckpt runs/tiny/stage2/last.ckpt", "evaluation/evaluate_images.py",
                   "synergen eval mjhq-fid", "synergen eval coco-fid",
                   "lmms-eval --model synergen --model_args pretrained=runs/tiny/stage2/last.ckpt",
                   "synergen eval lm-eval run --model synergen", "--external lmms_results/*/*_results.json"):
        assert needle in out, needle
    assert "$ckpt" not in out
    commands = re.findall(r"synergen (eval [a-z-]+)(.*)", out)
    assert len(commands) == 5
    for command, rest in commands:
        if command == "eval lm-eval":  # lm-eval's own command line and options
            continue
        text = _help(tuple(command.split()))
        assert text is not None, command
        missing = [o for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest) if o not in text]
        assert not missing, (command, missing)


def test_install_pins_every_package_at_the_constraints_versions():
    """A fresh `make install` resolves to constraints.txt: torch at the Makefile's build, and every dependency of the
    toolkit and of its installed extras pinned, so two installs train on the same package set."""
    import tomllib

    from check_extras import canonical, requirement_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH\s*:=\s*(.+)$", makefile, re.M).group(1).split()
    for spec in torch_spec:
        name, version = spec.split("==")
        assert pins[name] == version, f"constraints.txt has {name}=={pins[name]}, the Makefile installs {spec}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"],
              *project["optional-dependencies"]["lm-eval"]]
    for req in wanted:
        assert requirement_name(req) in pins, f"{req} is not pinned in constraints.txt: run `make constraints`"
    pip_installs = [line for line in dry_run(".venv/.installed").splitlines() if " install " in line and "pip" in line
                    and "--upgrade pip" not in line]
    assert pip_installs and all("-c constraints.txt" in line for line in pip_installs), pip_installs
