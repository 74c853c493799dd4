"""The paper's ablations in miniature on the shape world: `synergen ablations run` (make ablations).

- **folding** (paper Table 6, on the `read` level): no folding (one 64-px view of the 128-px canvas, 8x8 = 64 LLM
  tokens) against 2x4 folding with InternVL-1.5 dynamic tiles (2x2 native-resolution 64-px tiles + thumbnail, 5 x 8
  = 40 LLM tokens), both trained from the base LLM on understanding data only (every parameter, the SFT settings),
  scored on val Q/A per kind; `text` (the level's fine print, legible in native tiles and not after the 2x
  downsample, docs/levels.md) and questions about small objects are the reading columns.
- **progressive** (paper Table 7, no folding, no dynamic tiles): stage 1 then stage 2 with the MMoE progressive
  parameter sets, against full-parameter tuning in both stages, plus the "S.2 only" row; understanding,
  generation (shape-world GenEval, standing in for MSCOCO FID) and the base LLM's held-out text skill.
- **head** (Table 6b, beyond the paper, which never gives the unfolding head's width): the tiny stage 1 and 2 recipes
  as they are (4x4 folding, pretokenized codes when `SYNERGEN_TINY_SHARDS` names them) with the head at the LLM's
  width, half of it (the tiny default) and a quarter, and the half-width head 4 layers deep instead of 2; GenEval
  on the level's 600 eval prompts, the image loss given the caption, and
  the training step time of each arm (the head is most of a folded step's FLOPs: RESULTS.md, head width).

Every arm is a list of `synergen fit` runs, each the tiny stage recipe + the ablation overrides in
`recipes/ablations/` + a per-run YAML this driver writes (seed, output folders, steps): improvements to the
tiny recipes reach the ablations. Outputs: `runs/ablations/<arm>/seed<k>/<stage>/` (checkpoint, TensorBoard,
`train.json`, `eval.json`), `runs/ablations/results.json` and `runs/ablations/ablations.md`. Finished stages and
evaluations are skipped on a rerun (resumable); an interrupted stage is retrained from its start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

RECIPES = Path("recipes/ablations")
STUDIES = ("folding", "progressive", "head")


@dataclass(frozen=True)
class StageRun:
    """One `synergen fit` of an arm, and how its checkpoint is evaluated."""

    name: str  # folder under runs/ablations/<arm>/seed<k>/
    recipe: str  # the tiny recipe it layers on
    overrides: tuple[str, ...]  # files in recipes/ablations/, applied in order
    stage: str  # the StageCallback stage (what trains)
    steps: int | None  # max_steps of the full run (--quick: QUICK_STEPS); None: the recipe's own
    init_from: str | None = None  # name of an earlier StageRun of the same arm
    suites: tuple[str, ...] = ("und",)
    max_tiles: int = 1  # understanding views at evaluation: as the stage trained
    thumbnail: bool = False
    image_tokens: int = 64  # LLM tokens per understanding image (reported in the table)

    def configs(self) -> list[str]:
        return [self.recipe] + [str(RECIPES / o) for o in self.overrides]

    def full_steps(self) -> int:
        """max_steps of the full run: `steps`, or the recipe's own `trainer.max_steps`."""
        return self.steps if self.steps is not None else int(recipe_value(self.recipe, "trainer.max_steps"))


def recipe_value(recipe: str | Path, key: str):
    """A literal of a recipe (dotted `key`, e.g. "trainer.max_steps"), read where `synergen fit` reads it: relative to
    the working directory (the checkout's root, where make runs). A KeyError names the recipe and key."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.load(recipe), key, default=None)
    if value is None:
        raise KeyError(f"{recipe} sets no {key}")
    return value


@dataclass(frozen=True)
class Arm:
    name: str
    study: str
    description: str
    stages: tuple[StageRun, ...]
    eval_overrides: tuple[tuple[str, object], ...] = ()  # EvalSettings fields this arm's evaluation changes


# Steps of the full run, so that each study (3 seeds of its arms, 2 at a time) fits in about half an hour on a quiet
# 2-core machine; the written table states them. The folding arms train every parameter (the SFT settings,
# folding_train.yaml): with stage 2's parameter set neither arm answered above the question-type prior in 400 steps.
# They first read alone (folding_read.yaml) and then train on the mix: mixed from the first step, neither arm read
# the fine print in 1,000 steps; 300 reading steps started reading on two seeds of three, 500 on all three (the
# folded arm's shape answers then stay at their prior in the shorter mix) (RESULTS.md, Table 6 on the reading level).
READ_STEPS = 500
FOLD_STEPS = 500
S1_STEPS = 300
S2_STEPS = 300
QUICK_STEPS = 3

_FOLD = dict(recipe="recipes/tiny/stage2.yaml", stage="sft", suites=("und",))
_NOFOLD_SUITES = ("und", "geneval", "text")


def _fold_arm(name: str, arm_yaml: str, description: str, **views) -> Arm:
    """A Table 6 arm: the reading question alone from the base LLM (`read`), then the arms' data (`und`)."""
    base = ("from_base.yaml", "folding_train.yaml", arm_yaml)
    return Arm(name, "folding", description,
               (StageRun("read", overrides=base + ("folding_read.yaml",), steps=READ_STEPS, **views, **_FOLD),
                StageRun("und", overrides=base, steps=FOLD_STEPS, init_from="read", **views, **_FOLD)))


ARMS: tuple[Arm, ...] = (
    _fold_arm("fold_off", "folding_off.yaml", "no folding: one 64-px view (canvas downsampled 2x), 8x8 codes -> 64 LLM tokens",
              image_tokens=64),
    _fold_arm("fold_on", "folding_on.yaml", "2x4 folding + dynamic tiles: 2x2 native 64-px tiles + thumbnail, 5 x 8 = 40 LLM tokens",
              max_tiles=4, thumbnail=True, image_tokens=40),
    Arm("progressive", "progressive", "stage 1 (image-specific params) then stage 2 (+ self-attention); no folding",
        (StageRun("s1", "recipes/tiny/stage1.yaml", ("stage1_data.yaml", "nofold.yaml"), "stage1", S1_STEPS, suites=_NOFOLD_SUITES),
         StageRun("s2", "recipes/tiny/stage2.yaml", ("stage2_data.yaml", "nofold.yaml"), "stage2", S2_STEPS, init_from="s1", suites=_NOFOLD_SUITES))),
    Arm("full", "progressive", "every parameter trains in stage 1 and stage 2 (same data, lr, steps); no folding",
        (StageRun("s1", "recipes/tiny/stage1.yaml", ("stage1_data.yaml", "nofold.yaml", "full.yaml"), "full", S1_STEPS, suites=_NOFOLD_SUITES),
         StageRun("s2", "recipes/tiny/stage2.yaml", ("stage2_data.yaml", "nofold.yaml", "full.yaml"), "full", S2_STEPS, init_from="s1", suites=_NOFOLD_SUITES))),
    Arm("s2_only", "progressive", "stage 2 straight from the base LLM (no stage 1); no folding",
        (StageRun("s2", "recipes/tiny/stage2.yaml", ("stage2_data.yaml", "nofold.yaml", "from_base.yaml"), "stage2", S2_STEPS, suites=_NOFOLD_SUITES),)),
)

# Table 6b: the tiny recipes' stage 1 and 2 as they are (their own steps and canvas), the head's width or depth the
# only change
HEAD_RECIPES = ("recipes/tiny/stage1.yaml", "recipes/tiny/stage2.yaml")


def head_canvas() -> int:
    """The canvas the head study's recipes train on (the tiny recipes' image size: the demo level's)."""
    return int(recipe_value(HEAD_RECIPES[0], "model.init_args.image_size"))


_HEAD_SUITES = ("geneval", "grounding")
# every eval prompt (width arms differ by a few points at most), at make demo's CFG (Makefile DEMO_CFG): at 7.5 the
# tiny model's images degrade
_HEAD_EVAL = (("num_geneval", 600), ("cfg", 1.5))


def _head_arm(name: str, override: tuple[str, ...], description: str) -> Arm:
    return Arm(name, "head", description,
               (StageRun("s1", HEAD_RECIPES[0], override, "stage1", None, suites=_HEAD_SUITES),
                StageRun("s2", HEAD_RECIPES[1], override, "stage2", None, init_from="s1",
                         suites=_HEAD_SUITES)), eval_overrides=_HEAD_EVAL)


HEAD_ARMS = (
    _head_arm("head_x1", ("head_full.yaml",), "the unfolding head at the LLM's width"),
    _head_arm("head_x1_2", (), "the head at half the LLM's width (the tiny recipes' head)"),
    _head_arm("head_x1_4", ("head_quarter.yaml",), "the head at a quarter of the LLM's width"),
    _head_arm("head_x1_2_d4", ("head_deep.yaml",), "the tiny recipes' head with 4 layers instead of 2"),
)
ARMS = ARMS + HEAD_ARMS
ARM_BY_NAME = {a.name: a for a in ARMS}

# The rows of the paper's tables: (study, row label, arm, stage run, paper figures)
PAPER_T6_COLS = ("TextVQA", "GQA", "DocVQA", "AI2D", "ChartQA", "InfoVQA")
PAPER_T7_COLS = ("TextVQA", "GQA", "AI2D", "MMLU", "CMMLU", "MSCOCO FID")
ROWS: tuple[tuple[str, str, str, str, dict], ...] = (
    ("folding", "w/o token folding", "fold_off", "und",
     dict(zip(PAPER_T6_COLS, (18.7, 45.3, 14.7, 42.0, 20.9, 18.7)))),
    ("folding", "w/ token folding (2x4 + dynamic res.)", "fold_on", "und",
     dict(zip(PAPER_T6_COLS, (35.0, 45.1, 36.7, 42.1, 49.7, 21.1)))),
    ("folding", "w/o token folding, after the reading stage alone", "fold_off", "read", {}),
    ("folding", "w/ token folding, after the reading stage alone", "fold_on", "read", {}),
    ("progressive", "Baseline (base LLM)", "", "", dict(MMLU=42.3, CMMLU=51.4)),
    ("progressive", "S.1 + S.2, Full", "full", "s2",
     dict(zip(PAPER_T7_COLS, (14.3, 42.9, 24.7, 23.1, 23.0, 30.7)))),
    ("progressive", "S.1 only, Full (not in the paper)", "full", "s1", {}),
    ("progressive", "S.1 only, Progressive", "progressive", "s1",
     dict(zip(PAPER_T7_COLS, (0.1, 13.0, 0.3, 42.3, 51.4, 28.3)))),
    ("progressive", "S.2 only, Progressive", "s2_only", "s2",
     dict(zip(PAPER_T7_COLS, (8.7, 36.9, 40.9, 37.6, 45.3, 34.9)))),
    ("progressive", "S.1 + S.2, Progressive", "progressive", "s2",
     dict(zip(PAPER_T7_COLS, (13.2, 41.2, 41.9, 39.3, 48.2, 20.2)))),
)


@dataclass
class EvalSettings:
    """One evaluator setting for every arm (the table compares like with like)."""

    data: str = "data/tiny"
    und_per_kind: int = 150  # val Q/A items per kind (balanced; the first ones in shard order)
    num_geneval: int = 48
    max_text: int = 200
    cfg: float = 7.5
    seed: int = 0
    num_grounding: int = 128  # val scenes for the image loss given the caption (suite "grounding")


QUICK_EVAL = EvalSettings(und_per_kind=2, num_geneval=2, max_text=4, num_grounding=4)
SUITES = ("und", "geneval", "text", "grounding")
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the table is rewritten -->", "<!-- end notes -->"


# ------------------------------------------------------------------------------------------- evaluation
def small_object_question(question: str, meta: dict) -> bool:
    """True when every object the question names (shape word, plus colour word when given) is small.

    The shape world's small objects are 20 px on the 128 canvas (10 px after the 2x downsample of the no-folding
    view); questions about them are the "small objects" part of the full-resolution tasks."""
    q = question.lower()
    named = []
    for obj in meta.get("objects", []):
        shape, colour = obj["shape"], obj["color"]
        if re.search(rf"\b{shape}(e?s)?\b", q) and (colour in q or not any(o["color"] in q for o in meta["objects"])):
            named.append(obj)
    return bool(named) and all(o["size"] == "small" for o in named)


def load_eval_items(shards: str, per_kind: int) -> list[dict]:
    """Val Q/A items {image, question, answer, kind, small} balanced per kind (the first `per_kind` of each)."""
    import io

    from PIL import Image

    from synergen_lightning.data.sources import SkipCounter, expand_urls, finite_samples, load_json

    try:
        urls = expand_urls(shards, "ablations val shards")
    except ValueError as exc:
        raise FileNotFoundError(f"ablations: {exc}; run `make data` first") from None
    items, counts = [], {}
    for sample in finite_samples(urls, SkipCounter()):
        if "json" not in sample or "jpg" not in sample:
            continue
        meta = load_json(sample["json"], sample["__key__"])
        image = None
        for qa in meta.get("qa") or []:
            kind = qa.get("kind", "qa")
            if counts.get(kind, 0) >= per_kind:
                continue
            if image is None:
                image = Image.open(io.BytesIO(sample["jpg"]))
                image.load()
            counts[kind] = counts.get(kind, 0) + 1
            items.append({"image": image, "question": qa["question"], "answer": str(qa["answer"]), "kind": kind,
                          "small": small_object_question(qa["question"], meta), "key": sample["__key__"]})
    return items


def evaluate_checkpoint(ckpt: str | Path, suites: tuple[str, ...], settings: EvalSettings, max_tiles: int = 1,
                        thumbnail: bool = False, base_accuracy: float | None = None) -> dict:
    """The shared evaluator (`synergen_lightning.eval.suites`) on one checkpoint -> flat metrics dict."""
    import torch

    from synergen_lightning.eval.suites import geneval_suite, text_suite, understanding_suite
    from synergen_lightning.system import load_synergen

    torch.manual_seed(settings.seed)
    model = load_synergen(ckpt)
    data = Path(settings.data)
    head = model.head.model
    out: dict = {"head_width": head.config.hidden_size, "head_depth": head.config.num_layers,
                 "head_params": sum(p.numel() for p in head.parameters())}
    if "und" in suites:
        items = load_eval_items(str(data / "val" / "shard-*.tar"), settings.und_per_kind)
        res = understanding_suite(model, items, max_tiles=max_tiles, thumbnail=thumbnail, batch_size=32)
        out["und"] = res["accuracy"]
        out.update({f"und_{k}": v for k, v in res["per_kind"].items()})
        # the question-type prior of the same items (a constant answer per kind): an arm reads images only above it
        out["prior_und"] = res["prior_accuracy"]
        out.update({f"prior_und_{k}": v for k, v in res["prior_per_kind"].items()})
        # what the arm answers most per kind, and how often: one answer whatever the image reads 1.0
        out["und_top_answer"] = res["top_answer"]
        out["und_top_answer_share"] = res["top_answer_share"]
        # small-object questions: the same answers, re-scored on the subset (understanding_suite keeps no list)
        small = [it for it in items if it["small"]]
        if small:
            sres = understanding_suite(model, small, max_tiles=max_tiles, thumbnail=thumbnail, batch_size=32)
            out["und_small"] = sres["accuracy"]
            out["prior_und_small"] = sres["prior_accuracy"]
            out["num_small"] = len(small)
        out["num_und"] = res["num_items"]
    if "geneval" in suites:
        prompts = [json.loads(x) for x in (data / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
        res = geneval_suite(model, prompts[: settings.num_geneval], seed=settings.seed, cfg_scale=settings.cfg)
        out["geneval"] = res["overall"]
    if "grounding" in suites:
        from synergen_lightning.eval.grounding import grounding_suite

        shards = data / "codes" / "val" if (data / "codes" / "val").is_dir() else data / "val"
        res = grounding_suite(model, shards=str(shards / "shard-*.tar"), max_items=settings.num_grounding,
                              max_tiles=max_tiles, thumbnail=thumbnail)
        out["image_loss"] = res["caption"]["true"]  # nats per code, teacher-forced after the true caption
        out["caption_gain"] = res["caption_gain"]
    if "text" in suites:
        # the base LLM every arm starts from, scored on the same lines (Table 7's Baseline row)
        res = text_suite(model, data / "text" / "skill_val.jsonl", base_llm=model.hparams.base_llm,
                         base_accuracy=base_accuracy, max_examples=settings.max_text)
        out["text"] = res["accuracy"]
        out["text_base"] = res.get("base_accuracy")
        out.update({f"drift_{k}": v for k, v in weight_drift(ckpt).items()})
        if res.get("retention") is not None:
            out["text_retention"] = res["retention"]
    return out


def weight_drift(ckpt: str | Path) -> dict[str, float]:
    """Relative change ||W - W_base|| / ||W_base|| of the trunk's self-attention and text backbone against the base
    LLM the checkpoint started from (the evidence for why a text skill survived or not)."""
    import torch

    from synergen_lightning.model_parts import load_base_llm
    from synergen_lightning.system import load_synergen

    model = load_synergen(ckpt)
    base = dict(load_base_llm(model.hparams.base_llm).named_parameters())
    groups = model.parameter_groups()
    out = {}
    for g in ("self_attention", "text_backbone"):
        num = den = 0.0
        for name, p in groups[g]:
            ref = base.get(name.removeprefix("llm.model."))
            if ref is None or ref.shape != p.shape:
                continue
            num += float(torch.sum((p.detach() - ref.detach()) ** 2))
            den += float(torch.sum(ref.detach() ** 2))
        out[g] = (num / den) ** 0.5 if den else float("nan")
    return out


# ------------------------------------------------------------------------------------------- training
def run_overrides(run_dir: Path, stage: StageRun, seed: int, steps: int, init_from: Path | None) -> dict:
    """The per-run YAML layered last: seed, output folders, steps; evaluation happens after the fit, so the
    tiny recipes' periodic evaluator and sample grids are dropped (their callback list is replaced)."""
    out = run_dir / stage.name
    cfg = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": steps,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": stage.name, "version": ""}},
            "callbacks": [
                {"class_path": "callbacks.stages.StageCallback", "init_args": {"stage": stage.stage}},
                {"class_path": "callbacks.stages.FrozenParameterGuard", "init_args": {"every_n_steps": max(1, steps)}},
                {"class_path": "callbacks.checkpoint.FinalCheckpoint",
                 "init_args": {"dirpath": str(out), "save_last": True, "save_top_k": 0, "enable_version_counter": False}},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
            ],
        },
        "data": {"init_args": {"seed": seed}},
    }
    if init_from is not None:
        cfg["model"] = {"init_args": {"init_from": str(init_from)}}
    return cfg


def fit_command(stage: StageRun, overrides_yaml: Path) -> list[str]:
    cmd = [sys.executable, "-m", "synergen_lightning.cli", "fit"]
    for c in stage.configs() + [str(overrides_yaml)]:
        cmd += ["--config", c]
    return cmd


_LOG_LOCK = threading.Lock()  # the runs' threads print whole lines


def _log(msg: str) -> None:
    with _LOG_LOCK:
        print(f"[ablations {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], log_path: Path, usage: dict | None = None) -> float:
    """Run `cmd` (output appended to log_path); wall seconds. `usage` receives the CPU seconds of the run and its
    waited-for children (user + sys): on a loaded machine that, not the wall time, is what a quiet run costs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one core per run: two runs share 2 cores
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if usage is not None:
        usage["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 1)
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd)}\n--- last lines of {log_path} ---\n{tail}")
    return time.time() - t0


def run_arm_seed(arm: Arm, seed: int, out: Path, quick: bool, settings: EvalSettings, steps_scale: float = 1.0) -> dict:
    """Train (skipping finished stages) and evaluate (skipping finished evaluations) one arm at one seed."""
    run_dir = out / arm.name / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.txt"
    result = {}
    if arm.eval_overrides and not quick:
        settings = replace(settings, **dict(arm.eval_overrides))
    for stage in arm.stages:
        sdir = run_dir / stage.name
        train_json, ckpt = sdir / "train.json", sdir / "last.ckpt"
        steps = QUICK_STEPS if quick else max(1, round(stage.full_steps() * steps_scale))
        if not (train_json.is_file() and ckpt.is_file()):
            if sdir.exists():  # an interrupted fit: start the stage again from its beginning
                _log(f"{arm.name}/seed{seed}/{stage.name}: unfinished earlier run, retraining from the start")
                shutil.rmtree(sdir)
            sdir.mkdir(parents=True)
            init = run_dir / stage.init_from / "last.ckpt" if stage.init_from else None
            yaml_path = sdir / "run.yaml"
            yaml_path.write_text(json.dumps(run_overrides(run_dir, stage, seed, steps, init), indent=1))  # JSON is YAML
            cmd = fit_command(stage, yaml_path)
            _log(f"{arm.name}/seed{seed}/{stage.name}: training {steps} steps ({stage.stage})")
            load0, usage = os.getloadavg()[0], {}
            wall = _run(cmd, log_path, usage)
            train_json.write_text(json.dumps({"steps": steps, "wall_s": round(wall, 1), "s_per_step": round(wall / steps, 3),
                                              "cpu_s": usage.get("cpu_s"),
                                              "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                                              "command": " ".join(cmd[2:]).replace("synergen_lightning.cli ", "synergen ")},
                                             indent=1))
        eval_json = sdir / "eval.json"
        if not eval_json.is_file():
            _log(f"{arm.name}/seed{seed}/{stage.name}: evaluating {','.join(stage.suites)}")
            cmd = [sys.executable, "-m", "synergen_lightning.cli", "ablations", "eval", "--ckpt", str(ckpt),
                   "--suites", ",".join(stage.suites), "--max-tiles", str(stage.max_tiles), "--out", str(eval_json),
                   "--settings", json.dumps(asdict(settings))] + (["--thumbnail"] if stage.thumbnail else [])
            usage = {}
            wall = _run(cmd, log_path, usage)
            (sdir / "eval_cost.json").write_text(json.dumps({"wall_s": round(wall, 1), "cpu_s": usage.get("cpu_s")}))
        result[stage.name] = {"train": json.loads(train_json.read_text()), "eval": json.loads(eval_json.read_text())}
    _log(f"{arm.name}/seed{seed}: done")
    return result


# ------------------------------------------------------------------------------------------- results
def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def collect(out: Path, seeds: list[int], arms: list[Arm]) -> dict:
    """Every finished (arm, seed, stage) under `out` -> {arm: {stage: {seed: {...}}}} (also earlier seeds)."""
    runs: dict = {}
    for arm in arms:
        for seed_dir in sorted((out / arm.name).glob("seed*")):
            seed = int(seed_dir.name[4:])
            for stage in arm.stages:
                t, e = seed_dir / stage.name / "train.json", seed_dir / stage.name / "eval.json"
                if t.is_file() and e.is_file():
                    c = seed_dir / stage.name / "eval_cost.json"
                    runs.setdefault(arm.name, {}).setdefault(stage.name, {})[str(seed)] = {
                        "train": json.loads(t.read_text()), "eval": json.loads(e.read_text()),
                        "eval_cost": json.loads(c.read_text()) if c.is_file() else None}
    return runs


def _prior_row(runs: dict, metrics: tuple[str, ...], lead: int, trail: int) -> list[str]:
    """A table row with the question-type prior of `metrics` (the score of a constant answer per kind; the same val
    items for every arm, so it is read from the first run that recorded it), or nothing when no run has it."""
    for stages in runs.values():
        for seeds in stages.values():
            for r in seeds.values():
                ev = r.get("eval", {})
                if ev.get("prior_und") is not None:
                    vals = [ev.get(f"prior_{m}") for m in metrics]
                    return ["| question-type prior (a constant answer per kind, no image) | " + " | ".join(
                        ["–"] * lead + ["–" if v is None else f"{100 * v:.1f}" for v in vals] + ["–"] * trail) + " |"]
    return []


def summarize(runs: dict, metric: str, arm: str, stage: str) -> dict | None:
    per_seed = {s: r["eval"][metric] for s, r in runs.get(arm, {}).get(stage, {}).items()
                if r["eval"].get(metric) is not None}
    if not per_seed:
        return None
    mean, sd = _mean_sd(list(per_seed.values()))
    return {"mean": mean, "sd": sd, "min": min(per_seed.values()), "max": max(per_seed.values()), "n": len(per_seed),
            "per_seed": per_seed}


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "recipes", "synergen_lightning", "datamodules",
                                "callbacks"], capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes in recipes/ or code)" if dirty else "")
    except OSError:
        return "unknown"


def _fmt(s: dict | None, pct: bool = True, digits: int = 1) -> str:
    if s is None:
        return "–"
    k = 100 if pct else 1
    txt = f"{k * s['mean']:.{digits}f}"
    if s["n"] > 1:
        txt += f" ± {k * s['sd']:.{digits}f} [{k * s['min']:.{digits}f}–{k * s['max']:.{digits}f}]"
    return txt


def _paper(row: dict, col: str) -> str:
    return f"{row[col]:.1f}" if col in row else "–"


def quiet_estimate(train: dict, cores: int = 2) -> float:
    """Seconds a 1-thread run would take on a quiet machine: its CPU seconds when measured (a 1-thread run on a
    free core takes about its CPU time); else under a load average L on `cores` cores a 1-thread process gets
    about min(1, cores / L) of a core (a rough model; the doc says which)."""
    if train.get("cpu_s"):
        return float(train["cpu_s"])
    load = max(1.0, (train["loadavg_start"] + train["loadavg_end"]) / 2)
    return train["wall_s"] * min(1.0, cores / load)


def verdicts(runs: dict) -> list[str]:
    """Plain statements of whether the miniature shows the paper's effects (differences of seed means)."""
    lines = []
    for metric, what in (("und_text", "tiny characters (`text`)"), ("und_small", "small objects"), ("und", "all Q/A")):
        on, off = summarize(runs, metric, "fold_on", "und"), summarize(runs, metric, "fold_off", "und")
        if on and off:
            d = 100 * (on["mean"] - off["mean"])
            pairs = [100 * (on["per_seed"][s] - off["per_seed"][s]) for s in on["per_seed"] if s in off["per_seed"]]
            lines.append(f"- Folding, {what}: {'+' if d >= 0 else ''}{d:.1f} points with folding "
                         f"(per seed: {', '.join(f'{p:+.1f}' for p in pairs)}).")
    full, prog = summarize(runs, "text_retention", "full", "s2"), summarize(runs, "text_retention", "progressive", "s2")
    if full and prog:
        lines.append(f"- Text skill kept after S.1 + S.2: full tuning {100 * full['mean']:.0f}% of the base LLM's, "
                     f"progressive {100 * prog['mean']:.0f}% (paper, MMLU: 55% vs 93%).")
    s1 = summarize(runs, "text_retention", "progressive", "s1")
    if s1:
        lines.append(f"- Progressive S.1 only keeps {100 * s1['mean']:.0f}% of the text skill (paper: 100%, the LLM is frozen).")
    ref = summarize(runs, "geneval", "head_x1", "s2")
    for arm in HEAD_ARMS[1:]:
        got = summarize(runs, "geneval", arm.name, "s2")
        if ref and got:
            lines.append(f"- Head {arm.name}: GenEval after S.2 {got['mean'] - ref['mean']:+.3f} against the head at "
                         "the LLM's width.")
    return lines


def _steps(runs: dict, arm: str, stage: str) -> str:
    """Steps the finished runs of an arm's stage took (the stage's full steps when none has finished)."""
    got = sorted({r["train"]["steps"] for r in runs.get(arm, {}).get(stage, {}).values()})
    if got:
        return "/".join(map(str, got))
    return str(next(st for st in ARM_BY_NAME[arm].stages if st.name == stage).full_steps())


def render_markdown(results: dict) -> str:
    runs, meta = results["runs"], results["meta"]
    L = ["# The paper's ablations in miniature (Tables 6 and 7)", "",
         f"Written by `synergen ablations run` (`make ablations`) from `{meta.get('results_json', 'runs/ablations/results.json')}`; do not edit the",
         f"tables by hand (the notes section below is kept). Commit {meta['git_commit']}, {meta['date']}.",
         f"Mode: {'QUICK (a few steps per arm: a pipeline check, not a result)' if meta['quick'] else 'full'};"
         f" seeds {meta['seeds_found']}; machine: {meta['cpus']} CPUs, load average {meta['loadavg']}"
         f" ({'LOADED: other jobs shared the cores, times are inflated' if meta['loaded'] else 'quiet'}).", "",
         "Figures are % exact match (understanding, text skill) or GenEval overall x 100, as mean ± sample sd"
         " [min–max] over seeds; one number = one seed. Paper figures are the paper's benchmarks (different tasks,"
         " Qwen2-0.5B scale): compare the direction and size of each effect, not the values. Attention change ="
         " ||W - W_base|| / ||W_base|| over the self-attention weights, in %.", "",
         "## Table 6: token folding at equal context", "",
         "Both arms: from the base LLM (no stage 1), every parameter trains with the tiny SFT settings (question"
         " first, code embedding from the codebook, `recipes/ablations/folding_train.yaml`), batch 32, on"
         f" understanding data only: {_steps(runs, 'fold_off', 'read')} steps of the reading question alone"
         f" (`folding_read.yaml`), then {_steps(runs, 'fold_off', 'und')} steps of captions + Q/A with half the rows"
         " the reading question (the paper: a subset of the S.2 understanding data); zero-shot val Q/A.", "",
         "| model | LLM tokens / image | Q/A all | tiny characters | small objects | count | colour | shape |"
         " paper TextVQA | paper DocVQA | paper ChartQA | paper GQA |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for study, label, arm, stage, paper in ROWS:
        if study != "folding":
            continue
        st = next(s for s in ARM_BY_NAME[arm].stages if s.name == stage)
        asked = ("und_text",) if stage == "read" else None  # the reading stage asks nothing else: no other column
        L.append(f"| {label} | {st.image_tokens} | " + " | ".join(
                 _fmt(summarize(runs, m, arm, stage)) if asked is None or m in asked else "–" for m in
                 ("und", "und_text", "und_small", "und_count", "und_color", "und_shape"))
                 + " | " + " | ".join(_paper(paper, c) for c in ("TextVQA", "DocVQA", "ChartQA", "GQA")) + " |")
    L += _prior_row(runs, ("und", "und_text", "und_small", "und_count", "und_color", "und_shape"), 1, 4)
    L += ["", "## Table 7: progressive alignment against full tuning", "",
          f"No folding, one 64-px view (64 LLM tokens) in both stages. S.1 = the tiny stage-1 recipe ({_steps(runs, 'progressive', 's1')} steps),"
          f" S.2 = the tiny stage-2 recipe ({_steps(runs, 'progressive', 's2')} steps), same data / lr / schedule in both strategies; only the"
          " trainable set differs (Full: every parameter; Progressive: image-specific, then + self-attention).", "",
          "| stage | strategy | Q/A all | tiny characters | GenEval | text skill | text kept | attention change |"
          " paper GQA | paper TextVQA | paper AI2D | paper MMLU | paper CMMLU | paper MSCOCO FID ↓ |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for study, label, arm, stage, paper in ROWS:
        if study != "progressive":
            continue
        stage_lbl, _, strat = label.partition(", ")
        if not arm:
            base = summarize({"b": {"b": {s: {"eval": {"text": v}} for s, v in meta.get("text_base", {}).items()}}},
                             "text", "b", "b")
            ours = ["–", "–", "–", _fmt(base), "100", "0"]
        else:
            ours = [_fmt(summarize(runs, m, arm, stage)) for m in
                    ("und", "und_text", "geneval", "text", "text_retention", "drift_self_attention")]
        L.append(f"| {stage_lbl} | {strat or '–'} | " + " | ".join(ours) + " | "
                 + " | ".join(_paper(paper, c) for c in ("GQA", "TextVQA", "AI2D", "MMLU", "CMMLU", "MSCOCO FID")) + " |")
    L += _prior_row(runs, ("und", "und_text"), 1, 10)
    L += ["", "## Table 6b: the unfolding head's width and depth (beyond the paper)", "",
          f"The tiny stage 1 ({_steps(runs, 'head_x1', 's1')} steps) and stage 2"
          f" ({_steps(runs, 'head_x1', 's2')} steps) recipes as they are, on the level in"
          " `data/tiny`; only the head's width or depth changes (its condition stays). GenEval on every eval prompt"
          " at CFG 1.5 (`make demo`'s);"
          " image loss = nats per code after the true caption on val scenes; step time of stage 1, whose"
          " trainable part is mostly the head, with the arms side by side in one run.", "",
          "| head | width | depth | parameters | GenEval S.1 | GenEval S.2 | image loss S.2 | S.1 s / step | S.1 speed vs x1 |",
          "|---|---|---|---|---|---|---|---|---|"]
    def s1_step(arm_name: str) -> float | None:  # stage 1's mean s/step over the finished seeds
        s1 = runs.get(arm_name, {}).get("s1", {})
        return statistics.fmean(r["train"]["s_per_step"] for r in s1.values()) if s1 else None

    ref_step = s1_step("head_x1")
    for arm in HEAD_ARMS:
        step = s1_step(arm.name)
        if step is None:
            continue
        first = next(iter(runs[arm.name]["s1"].values()))["eval"]
        speed = f"{ref_step / step:.2f}x" if ref_step else "–"
        loss = summarize(runs, "image_loss", arm.name, "s2")
        L.append(f"| {arm.name} | {first.get('head_width', '–')} | {first.get('head_depth', '–')} | "
                 f"{first.get('head_params', 0) / 1e6:.2f} M | "
                 f"{_fmt(summarize(runs, 'geneval', arm.name, 's1'))} | {_fmt(summarize(runs, 'geneval', arm.name, 's2'))} | "
                 f"{_fmt(loss, pct=False, digits=3)} | {step:.2f} | {speed} |")
    L += ["", "## What the miniature shows", ""] + (verdicts(runs) or ["- (no finished arm yet)"])
    L += ["", "## Arms, commands and run time", "",
          "| arm | stage | what trains | steps | seeds | fit wall s (measured) | s / step | fit quiet estimate s |"
          " eval wall s | eval quiet estimate s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    total, complete = 0.0, True
    for arm in ARMS:
        for st in arm.stages:
            got = runs.get(arm.name, {}).get(st.name, {})
            if not got:
                complete = False
                continue
            trains = [r["train"] for r in got.values()]
            costs = [r["eval_cost"] for r in got.values() if r.get("eval_cost")]
            wall = statistics.fmean(t["wall_s"] for t in trains)
            q_fit = statistics.fmean(quiet_estimate(t, meta["cpus"]) for t in trains)
            ev_wall = statistics.fmean(c["wall_s"] for c in costs) if costs else None
            q_ev = statistics.fmean(c["cpu_s"] or c["wall_s"] for c in costs) if costs else None
            # make ablations: the recipe's steps (the fit cost scales with steps), 3 seeds
            total += 3 * (q_fit * st.full_steps() / trains[0]["steps"] + (q_ev or 0.0))
            L.append(f"| {arm.name} | {st.name} | {st.stage} | {trains[0]['steps']} | {len(trains)} | {wall:.0f} | "
                     f"{statistics.fmean(t['s_per_step'] for t in trains):.2f} | {q_fit:.0f} | "
                     f"{'–' if ev_wall is None else f'{ev_wall:.0f}'} | {'–' if q_ev is None else f'{q_ev:.0f}'} |")
    L += ["", "Quiet estimates: a run's CPU seconds (user + sys, the fit and its data worker) where recorded, else its"
              " wall time x min(1, cores / load average) (a rough model); '–' = not recorded (not in the total)"
          + f". Estimated `make ablations` on a quiet 2-core machine (3 seeds, every stage at its recipe steps,"
          f" 2 runs at a time): {total / 2 / 60:.0f} min" + ("" if complete else " (from the arms finished so far)") + "."]
    L += ["", "Arms: " + "; ".join(f"`{a.name}`: {a.description}" for a in ARMS) + ".", "",
          "Every fit is `synergen fit --config <tiny recipe> --config recipes/ablations/<override>.yaml ..."
          " --config runs/ablations/<arm>/seed<k>/<stage>/run.yaml` (the last file: seed, output folders, steps);"
          " one example per arm and stage:", "", "```bash"]
    for arm in ARMS:
        for st in arm.stages:
            got = runs.get(arm.name, {}).get(st.name, {})
            if got:
                L.append(next(iter(got.values()))["train"]["command"])
    L += ["```", "", f"Last driver invocation: `{meta['command']}` (wall time {meta['wall_s']:.0f} s; finished runs were skipped)"
          f" ({meta['jobs']} runs at a time, one torch thread each). Evaluation (same for every arm):"
          f" `{json.dumps(meta['eval_settings'])}`; understanding views as each arm trained.", ""]
    return "\n".join(L)


def write_doc(path: Path, results: dict) -> None:
    """Rewrite the generated part of `path`, keeping a hand-written notes section between the markers."""
    notes = f"{NOTES_BEGIN}\n## Notes\n\n(none yet)\n{NOTES_END}"
    if path.is_file():
        old = path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN): old.index(NOTES_END) + len(NOTES_END)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(results) + "\n" + notes + "\n")


# ------------------------------------------------------------------------------------------- CLI
FOLDING_CANVAS = 128  # the folding arms' views: 2x2 native 64-px tiles, or the canvas downsampled to 64 px


def _data_canvas(data: Path) -> int | None:
    """The canvas of the shape world in `data` (its world.json), or None when it records none."""
    from synergen_lightning.world.shards import read_world_info

    info = read_world_info(data)
    return None if info is None else int(info["canvas"])


def run(seeds: list[int], only: str | None, quick: bool, out: Path, doc: Path, jobs: int, command: str,
        steps_scale: float = 1.0) -> dict:
    for need in ("data/tiny/val", "data/tiny/eval_prompts.jsonl"):
        if not Path(need).exists():
            raise FileNotFoundError(f"ablations: {need} is missing; run `make data` first (the shape world)")
    arms = [a for a in ARMS if only in (None, a.study)]
    canvas = _data_canvas(Path("data/tiny"))
    # a study that needs another canvas than data/tiny's: an error when it was asked for alone, else left out
    for study, want, what, fix in (
            ("head", head_canvas, "runs the tiny recipes as they are, on {}-px scenes (the demo level)",
             "`make data LEVEL=demo` first"),
            ("folding", lambda: FOLDING_CANVAS,
             "compares 2x2 native 64-px tiles with the canvas downsampled to 64 px, on {}-px scenes",
             "`make ablations LEVEL=read` (Table 6's reading level)")):
        if not any(a.study == study for a in arms) or canvas in (None, want()):
            continue
        msg = f"the {study} study {what.format(want())}; data/tiny holds {canvas}-px scenes: {fix}"
        if only == study:
            raise ValueError(f"ablations: {msg}")
        _log(f"skipping the {study} study: {msg}")
        arms = [a for a in arms if a.study != study]
    settings = QUICK_EVAL if quick else EvalSettings()
    t0, load0 = time.time(), os.getloadavg()
    # longest arms first, so two workers finish together
    work = sorted(((a, s) for s in seeds for a in arms), key=lambda x: -sum(st.full_steps() for st in x[0].stages))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_arm_seed, a, s, out, quick, settings, steps_scale) for a, s in work]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return write_results(out, doc, quick=quick, jobs=jobs, command=command, wall_s=time.time() - t0,
                         loadavg=[round(x, 2) for x in (load0[0], os.getloadavg()[0])], settings=settings)


def write_results(out: Path, doc: Path, quick: bool, jobs: int, command: str, wall_s: float, loadavg: list,
                  settings: EvalSettings) -> dict:
    runs = collect(out, [], list(ARMS))
    seeds_found = sorted({int(s) for a in runs.values() for st in a.values() for s in st})
    text_base = {s: r["eval"]["text_base"] for a in runs.values() for st in a.values() for s, r in st.items()
                 if r["eval"].get("text_base") is not None}
    cpus = os.cpu_count() or 1
    meta = {"git_commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": quick,
            "seeds_found": seeds_found, "cpus": cpus, "loadavg": loadavg, "loaded": max(loadavg) > jobs + 0.5,
            "jobs": jobs, "command": command, "wall_s": wall_s, "eval_settings": asdict(settings), "text_base": text_base,
            "results_json": str(out / "results.json")}
    results = {"meta": meta, "runs": runs,
               "summary": {f"{arm}/{stage}": {m: summarize(runs, m, arm, stage) for m in
                                              ("und", "und_text", "und_small", "geneval", "text", "text_retention",
                                                    "drift_self_attention")}
                           for _, _, arm, stage, _ in ROWS if arm}}
    results["summary"].update({f"{a.name}/{st.name}": {m: summarize(runs, m, a.name, st.name)
                                                       for m in ("geneval", "image_loss")}
                               for a in HEAD_ARMS for st in a.stages})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_doc(doc, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synergen ablations", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="train and evaluate the arms (finished ones are skipped), write results + doc")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every arm (default: 0 1 2)")
    p.add_argument("--only", choices=STUDIES,
                   help="one study: folding (Table 6), progressive (Table 7) or head (Table 6b, the head's width and depth)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_STEPS} steps per stage and a tiny evaluation: checks the pipeline end to end")
    p.add_argument("--out", type=Path, default=None, help="runs folder (default: runs/ablations; --quick: runs/ablations_quick)")
    p.add_argument("--doc", type=Path, default=None, help="markdown table (default: OUT/ablations.md, beside results.json)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each (default 2: one per core)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every stage's steps (e.g. 0.5 on a loaded machine); the table reports the steps run")
    e = sub.add_parser("eval", help="evaluate one checkpoint with the ablation settings -> a JSON file")
    e.add_argument("--ckpt", required=True, help="the arm's checkpoint (any form synergen fit or export writes)")
    e.add_argument("--suites", default="und,geneval,text", help=f"comma-separated: {', '.join(SUITES)}")
    e.add_argument("--max-tiles", type=int, default=1, help="dynamic tiles per understanding image (default: 1)")
    e.add_argument("--thumbnail", action="store_true", help="append a whole-image thumbnail view when > 1 tile")
    e.add_argument("--out", type=Path, required=True, help="the scores' JSON file")
    known = ", ".join(f"{f.name} ({f.default!r})" for f in fields(EvalSettings))
    e.add_argument("--settings", default="{}", help=f"EvalSettings fields as a JSON object; fields (default): {known}")
    t = sub.add_parser("table", help="rewrite results.json and the doc from the finished runs (no training)")
    t.add_argument("--out", type=Path, default=Path("runs/ablations"))
    t.add_argument("--doc", type=Path, default=None, help="markdown table (default: OUT/ablations.md)")
    a = parser.parse_args(argv)
    if a.cmd == "eval":
        import torch

        torch.set_num_threads(1)
        suites = tuple(s for s in a.suites.split(",") if s)
        bad = [s for s in suites if s not in SUITES]
        if bad:
            parser.error(f"--suites {a.suites!r}: unknown {bad}; use {', '.join(SUITES)}")
        if not Path(a.ckpt).is_file():
            parser.error(f"--ckpt {a.ckpt!r} does not exist")
        try:
            settings = EvalSettings(**json.loads(a.settings))
        except (ValueError, TypeError) as exc:  # not JSON, not an object, or an unknown field
            parser.error(f"--settings {a.settings!r}: {exc}; give a JSON object of EvalSettings fields "
                         f"({', '.join(f.name for f in fields(EvalSettings))})")
        res = evaluate_checkpoint(a.ckpt, suites, settings, a.max_tiles, a.thumbnail)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(a.out)  # atomic: a half-written eval never counts as finished
        print(json.dumps(res))
        return 0
    if a.cmd == "table":
        a.doc = a.doc or a.out / "ablations.md"
        old = json.loads((a.out / "results.json").read_text())["meta"] if (a.out / "results.json").is_file() else {}
        write_results(a.out, a.doc, quick=old.get("quick", False), jobs=old.get("jobs", 2), command=old.get("command", "?"),
                      wall_s=old.get("wall_s", 0.0), loadavg=old.get("loadavg", [0.0]),
                      settings=EvalSettings(**old["eval_settings"]) if "eval_settings" in old else EvalSettings())
        print(f"wrote {a.out / 'results.json'} and {a.doc}")
        return 0
    if any(s < 0 for s in a.seeds):
        parser.error(f"--seeds {a.seeds}: seeds must be >= 0")
    out = a.out or Path("runs/ablations_quick" if a.quick else "runs/ablations")
    doc = a.doc or out / "ablations.md"  # under runs/: a run's tables, not a tracked file
    command = "synergen ablations " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.steps_scale <= 0:
        parser.error(f"--steps-scale {a.steps_scale}: must be > 0")
    res = run(a.seeds, a.only, a.quick, out, doc, a.jobs, command, a.steps_scale)
    print("\n".join(verdicts(res["runs"])))
    print(f"wrote {out / 'results.json'} and {doc}")
    return 0
