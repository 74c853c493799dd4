"""Data parallelism on a multi-core CPU: the tiny stage-1 recipe in 1 process vs 2 processes under `DDPStrategy`
and under `FSDP2Strategy`, the same global batch (the recipe's, split over the processes), side by side.

Each repeat runs every variant once, in turn (`synergen fit` as `make stage1` runs it, in a scratch folder
under --out whose data and base models link to this checkout's), so load from other processes hits them alike. Reported per variant: the
training rate (seconds per optimizer step between --skip and the last logged step, from the run's own
`train/time` curve: start-up and the end-of-stage evaluation excluded) and the whole command's wall time; ratios
are medians over repeats of the 1-process figure divided by the variant's, within one repeat.

Needs the tiny artefacts (`make data tokenizer base-llm` and the pretokenized views, or `make demo`); without
them it says so and is skipped.

    .venv/bin/python bench/bench_data_parallel.py --repeats 2 --steps 80 --out runs/bench_dp/results.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import TooLarge, load_average, machine_info, write_json  # noqa: E402

NEEDS = ("data/tiny/codes128/train", "runs/tiny/base_llm/last.ckpt", "runs/tiny/tokenizer/checkpoints/last.ckpt",
         "runs/tiny/text_tokenizer")
VARIANTS = {
    "one_process": [],
    "ddp_2": ["--trainer.devices", "2", "--trainer.strategy.class_path", "synergen_lightning.distributed.DDPStrategy",
              "--trainer.strategy.init_args.global_batch_size", "datamodule"],
    "fsdp2_2": ["--trainer.devices", "2", "--trainer.strategy.class_path",
                "synergen_lightning.distributed.FSDP2Strategy",
                "--trainer.strategy.init_args.global_batch_size", "datamodule"],
}


def _step_rate(logdir: Path, skip: int) -> tuple[float, int]:
    """Seconds per step from the run's `train/time` scalar (wall seconds since fit start, logged every 20 steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    pts = [(s.step, s.value) for s in ea.Scalars("train/time")]
    pts = [p for p in pts if p[0] >= skip]
    if len(pts) < 2:
        raise RuntimeError(f"{logdir}: fewer than 2 train/time points after step {skip}; raise --steps")
    (s0, t0), (s1, t1) = pts[0], pts[-1]
    return (t1 - t0) / (s1 - s0), s1 - s0


def _scratch(out: Path) -> Path:
    """A working folder whose relative paths are the recipe's (data/tiny, runs/tiny/...) as links to this
    checkout's artefacts, so the runs write their checkpoints and logs there, never over runs/tiny/stage1."""
    work = out / "work"
    (work / "runs" / "tiny").mkdir(parents=True, exist_ok=True)
    links = {"data": ROOT / "data", "recipes": ROOT / "recipes"}
    links.update({f"runs/tiny/{n}": ROOT / "runs/tiny" / n for n in ("base_llm", "tokenizer", "text_tokenizer")})
    for rel, target in links.items():
        if not (work / rel).exists():
            (work / rel).symlink_to(target)
    return work


def run_variant(name: str, steps: int, out: Path, rep: int) -> dict:
    import shutil

    work = _scratch(out)
    shutil.rmtree(work / "runs/tiny/stage1", ignore_errors=True)
    cmd = [sys.executable, "-m", "synergen_lightning.cli", "fit", "--config", "recipes/tiny/stage1.yaml",
           "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
           "--trainer.enable_progress_bar", "false"] + VARIANTS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", SYNERGEN_TINY_SHARDS="data/tiny/codes128",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = out / f"{name}_r{rep}.log"
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"{name} failed (exit {r.returncode}); log: {log}\n{r.stderr[-1500:]}")
    logdir = out / f"{name}_r{rep}_tb"
    shutil.rmtree(logdir, ignore_errors=True)
    shutil.copytree(work / "runs/tiny/stage1", logdir, ignore=shutil.ignore_patterns("*.ckpt"))
    return {"wall_s": wall, "logdir": str(logdir)}


def run(steps: int = 80, repeats: int = 2, skip: int = 19, out: Path = ROOT / "runs/bench_dp") -> dict:
    missing = [n for n in NEEDS if not (ROOT / n).exists()]
    if missing:
        raise TooLarge(f"needs the tiny artefacts ({', '.join(missing)} missing): run `make demo` (or make data "
                       "tokenizer base-llm and the pretokenize step) first")
    if (os.cpu_count() or 1) < 2:
        raise TooLarge(f"needs 2 CPU cores for the 2-process variants; this machine has {os.cpu_count()}")
    out.mkdir(parents=True, exist_ok=True)
    timed: dict[str, list[dict]] = {n: [] for n in VARIANTS}
    for rep in range(repeats):
        for name in VARIANTS:
            res = run_variant(name, steps, out, rep)
            res["s_per_step"], res["steps_timed"] = _step_rate(Path(res["logdir"]), skip)
            timed[name].append(res)
            print(f"repeat {rep} {name:12s} {res['s_per_step']:.3f} s/step, {res['wall_s']:.1f} s wall", flush=True)
    ratios = {}
    for name in VARIANTS:
        if name == "one_process":
            continue
        per_step = [a["s_per_step"] / b["s_per_step"] for a, b in zip(timed["one_process"], timed[name])]
        wall = [a["wall_s"] / b["wall_s"] for a, b in zip(timed["one_process"], timed[name])]
        ratios[name] = {"step_rate_vs_one_process": statistics.median(per_step), "all": per_step,
                        "wall_vs_one_process": statistics.median(wall)}
    return {"recipe": "recipes/tiny/stage1.yaml", "steps": steps, "skip": skip, "repeats": repeats,
            "global_batch": "the recipe's (16 generation + 16 understanding rows), split over the processes",
            "timed": timed, "speedup": ratios}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per run (train/time is logged every 20)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the three variants")
    p.add_argument("--skip", type=int, default=19, help="first logged step of the timed window (excludes warm-up)")
    p.add_argument("--out", default="runs/bench_dp/results.json", help="JSON results; the runs go beside it")
    a = p.parse_args(argv)
    out = Path(a.out)
    before = load_average()
    try:
        res = run(a.steps, a.repeats, a.skip, out.parent)
    except TooLarge as e:
        res = {"skipped": str(e)}
        print(f"skipped: {e}")
    res.update(machine=machine_info("cpu", 1), load_average={"before": before, "after": load_average()})
    write_json(out, res)
    for name, r in (res.get("speedup") or {}).items():
        print(f"{name}: {r['step_rate_vs_one_process']:.2f}x the 1-process step rate "
              f"(repeats {', '.join(f'{x:.2f}' for x in r['all'])}); whole command {r['wall_vs_one_process']:.2f}x")
    return res


if __name__ == "__main__":
    main()
