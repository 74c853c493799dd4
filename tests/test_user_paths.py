"""Every user path, as a user walks it: the `synergen` command in subprocesses, for one process, DDP over 2
processes and FSDP2 over 2 processes, on a miniature shape world with the shipped tiny recipes:

    fit stage 1 (stopped after 1 step) -> fit again with --ckpt_path (resumes to step 2) -> fit stage 2 from it (and
    validate) -> export -> generate and answer from the checkpoint and from the export -> eval report --suite text

and the exported model's logits equal the checkpoint's. A one-process or DDP run writes a single-file `last.ckpt`
whose `hyper_parameters` carry LightningCLI's own keys (`_class_path`, `_instantiator`); an FSDP2 run writes a
sharded `last.ckpt/` directory. The DDP path reads its checkpoint through the export (the file is the one a
one-process run writes, which the one-process path's commands read directly). Beside them, in `make test-all`, the paper-scale user's path: the 2b recipes as
shipped, stage 1 -> stage 2 -> SFT under FSDP2 (2 processes, then SFT on one) on stand-ins of their models and data,
then export, generate and answer (`make test` runs that chain in one process through tests/test_gpu_check.py).

Each command is a few steps or items; the start-up of a command (several seconds of imports) is most of the cost.
The chains run side by side, at most `SLOTS` processes at a time, so both cores stay busy while a one-process command
runs or a second rank starts: a few minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tiny_world import make_tiny_world, project_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "synergen"
SYNERGEN = [str(BIN)] if BIN.is_file() else [sys.executable, "-m", "synergen_lightning.cli"]

# as `make stage1 DEVICES=2 STRATEGY=...` runs them: the recipe's batch is the global batch, split over the ranks
MODES = {"one_process": []} | {
    mode: ["--trainer.devices", "2", "--trainer.strategy.class_path", f"synergen_lightning.distributed.{cls}",
           "--trainer.strategy.init_args.global_batch_size", "datamodule"]
    for mode, cls in (("ddp", "DDPStrategy"), ("fsdp2", "FSDP2Strategy"))}
# a few rows per step, no validation, no workers: the recipes' models, stages, callbacks and loggers as shipped
QUICK = ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "16"]
BATCH = {"stage1": '{"generation": 2, "understanding": 2}', "stage2": '{"generation": 2, "understanding": 2, "text": 2}'}
RECIPES_2B_IMAGE_SIZE = 128  # 16x16 codes a view: Emu3's encoder of the recipes' 512-px views is slow on 2 CPUs
RECIPES_2B_RANKS = {"stage1": 2, "stage2": 2, "sft": 1}
# Lightning's lines on every run that a user cannot act on: an advert, a deprecation inside Lightning, a caveat the
# mixed stream's lanes answer, and "directory not empty" for a directory only the run's own logger had written to
LIGHTNING_NOISE = ("💡 Tip", "LeafSpec", "IterableDataset` has `__len__`", "exists and is not empty")
SLOTS = 4  # synergen processes at once (a 2-rank fit takes 2): ~0.5-1 GB each


class _Slots:
    def __init__(self, n: int):
        self.n, self.used, self.cond = n, 0, threading.Condition()

    @contextmanager
    def take(self, k: int):
        with self.cond:
            self.cond.wait_for(lambda: self.used + k <= self.n)
            self.used += k
        try:
            yield
        finally:
            with self.cond:
                self.used -= k
                self.cond.notify_all()


SLOT = _Slots(SLOTS)


# one command that starts a process group at a time: two launched together can be given the same rendezvous port
# (EADDRINUSE), and on 2 cores two multi-process fits side by side take longer than one after the other
RENDEZVOUS = threading.Lock()


# set in this process by earlier in-process distributed tests; a command must pick its own rendezvous
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()  # the recipes' own defaults, and no inherited rendezvous
           if not k.startswith("SYNERGEN_") and k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(extra or {}))
    return env


def synergen(cwd: Path, *args: str, ranks: int = 1, group: bool = False, timeout: float = 300,
             env: dict | None = None) -> str:
    """`synergen ARGS` in `cwd` (with `env` added to the environment; `ranks` processes, or one that starts a process
    group when `group`); its output, or a failure with the command and the tail of its output."""
    shown = f"`synergen {' '.join(args)}` (in {cwd})"
    with SLOT.take(ranks), (RENDEZVOUS if ranks > 1 or group else contextlib.nullcontext()):
        proc = subprocess.Popen([*SYNERGEN, *args], cwd=cwd, env=_env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"{shown} ran past {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{shown} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def user_path(world: Path, run: Path, mode: str) -> dict:
    """The whole path in a fresh project directory; what the checks need."""
    from synergen_lightning.checkpoint import read_checkpoint_meta

    project_dir(world, run)
    flags, ranks = MODES[mode], 2 if MODES[mode] else 1
    s1, s2 = run / "runs/tiny/stage1/last.ckpt", run / "runs/tiny/stage2/last.ckpt"
    steps, fit_outputs = [], []
    # stage 1, stopped after its first step, then resumed from its last.ckpt to step 2
    # the multi-process modes as `make stage1 RECIPE=...` runs them: `--ckpt_path last` (nothing to resume at first)
    last = ["--ckpt_path", "last"] if ranks > 1 else []
    for max_steps, resume in ((1, last), (2, last or ["--ckpt_path", str(s1)])):
        out = synergen(run, "fit", "--config", str(ROOT / "recipes/tiny/stage1.yaml"), *flags, *QUICK,
                       "--trainer.max_steps", str(max_steps), f"--data.init_args.batch_size={BATCH['stage1']}",
                       *resume, ranks=ranks)
        fit_outputs.append(out)
        steps.append(read_checkpoint_meta(s1)["global_step"])
    s1_meta = read_checkpoint_meta(s1)
    # stage 2 from stage 1 (model.init_from: runs/tiny/stage1/last.ckpt in the recipe), validating at its step: every
    # rank runs the same 2 val batches (under FSDP2 each forward is a collective)
    synergen(run, "fit", "--config", str(ROOT / "recipes/tiny/stage2.yaml"), *flags, *QUICK,
             "--trainer.max_steps", "1", f"--data.init_args.batch_size={BATCH['stage2']}",
             "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "1", ranks=ranks)
    stage2_resumed = None
    if mode == "one_process":  # stage 2 resumed to step 2 with stage 1's run moved away: its init_from is not read
        (run / "runs/tiny/stage1").rename(run / "runs/tiny/stage1.moved")
        stage2_resumed = synergen(run, "fit", "--config", str(ROOT / "recipes/tiny/stage2.yaml"), *QUICK,
                                  "--trainer.max_steps", "2", f"--data.init_args.batch_size={BATCH['stage2']}",
                                  "--ckpt_path", "last")
        (run / "runs/tiny/stage1.moved").rename(run / "runs/tiny/stage1")
    # export, beside generate / answer / the text report from the checkpoint; then generate / answer from the export
    # in bf16 (what `--dtype auto` gives on a GPU).
    # A DDP run's checkpoint is the single file a one-process run writes (whose path runs those commands on it): it is
    # read through the export
    ckpt_cmds = [] if mode == "ddp" else [("generate", "--ckpt", str(s2), "--prompt", "a red circle", "--num", "1", "--out", "gen_ckpt",
                  "--device", "cpu"),
                 ("answer", "--ckpt", str(s2), "--image", str(world / "scene.png"), "--question",
                  "How many shapes are there?", "--max-new-tokens", "4", "--device", "cpu"),
                 ("eval", "report", "--ckpt", str(s2), "--suite", "text", "--max-text", "4", "--out", "report",
                  "--device", "cpu", "--no-progress")]
    export_cmds = [("generate", "--ckpt", "exports/stage2", "--prompt", "a red circle", "--num", "1",
                    "--out", "gen_export", "--device", "cpu", "--dtype", "bf16"),
                   ("answer", "--ckpt", "exports/stage2", "--image", str(world / "scene.png"), "--question",
                    "How many shapes are there?", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "bf16")]

    def export_then_use():
        synergen(run, "export", "--ckpt", str(s2), "--out", "exports/stage2")
        with ThreadPoolExecutor(len(export_cmds)) as pool:
            return list(pool.map(lambda a: synergen(run, *a), export_cmds))

    with ThreadPoolExecutor(1 + len(ckpt_cmds)) as pool:
        from_export = pool.submit(export_then_use)
        outs = dict(zip(ckpt_cmds, pool.map(lambda a: synergen(run, *a), ckpt_cmds)))
        outs |= dict(zip(export_cmds, from_export.result()))
    return {"steps": steps, "fit_outputs": fit_outputs, "stage2_resumed": stage2_resumed, "s1": s1,
            "s1_hparams": s1_meta["hyper_parameters"], "s2": s2,
            "answers": [out for cmd, out in outs.items() if cmd[0] == "answer"], "from_checkpoint": bool(ckpt_cmds)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def walked(world, tmp_path_factory, request) -> dict:
    """The selected modes' paths, side by side; a mode's failure is raised by its own test."""
    root = tmp_path_factory.mktemp("paths")
    items = [item for item in request.session.items if item.module is request.module]
    paths = {m: (user_path, world, root / m, m) for m in MODES
             if any(getattr(item, "callspec", None) and item.callspec.params.get("mode") == m for item in items)}
    if any(item.originalname == "test_the_2b_recipes_chain_trains_what_each_stage_says" for item in items):
        paths["recipes_2b"] = (recipes_2b_path, root / "standins_2b", root / "recipes_2b")
    with ThreadPoolExecutor(len(paths)) as pool:  # side by side: a chain's start-ups leave the cores to the others
        futures = {name: pool.submit(*path) for name, path in paths.items()}
        return {name: f.exception() or f.result() for name, f in futures.items()}


def recipes_2b_path(standins: Path, run: Path) -> dict:
    """The 2b recipes as shipped (`recipes/synergen_vl_2b/{stage1,stage2,sft}.yaml`), chained by their
    `model.init_from`, under their FSDP2Strategy (stages 1 and 2 over 2 processes), on stand-ins of InternLM2, its
    tokenizer, Emu3's VQ-VAE and the shards they name (`bench/standins_2b.py`: reduced widths and 128-px views, the
    recipes' vocabulary, codebook and folding); then export, generate and answer from the SFT checkpoint."""
    import standins_2b as s2b

    # Emu3's VQ-VAE is read through transformers; without it, the toolkit's VQTokenizer of Emu3's codebook
    variables = s2b.env(s2b.make_2b_standins(standins, image_tokenizer=s2b.image_tokenizer_kind()))
    run.mkdir(parents=True)
    # stages 1 and 2 on 2 ranks; SFT on one process reads stage 2's 2-rank shards and accumulates 2 micro-batches
    fits = {}
    for stage in s2b.STAGES:
        ranks = RECIPES_2B_RANKS[stage]
        fits[stage] = synergen(run, *s2b.fit_args(stage, "cpu", ranks, image_size=RECIPES_2B_IMAGE_SIZE), ranks=ranks,
                               group=True, env=variables)  # FSDP2 starts a process group on one rank too
    commands = s2b.user_commands(s2b.understanding_image(standins, run / "scene.jpg"), "cpu")

    def export_then_generate():
        synergen(run, *commands["export"], env=variables)
        return synergen(run, *commands["generate"], env=variables)

    with ThreadPoolExecutor(2) as pool:
        generated = pool.submit(export_then_generate)
        synergen(run, *commands["answer"], env=variables)
        generated.result()
    return {"standins": standins, "run": run, "fits": fits}


def _raw_state(ckpt: Path) -> dict:
    """The weights as the run saved them, read without the loader under test."""
    from synergen_lightning.distributed import load_sharded_state_dict

    return load_sharded_state_dict(ckpt) if ckpt.is_dir() else torch.load(ckpt, weights_only=False)["state_dict"]


def _logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    """LM logits over a sequence with text and one image, and the unfolding head's logits of that image's codes."""
    from synergen_lightning.models.folding import fold_codes

    g = torch.Generator().manual_seed(0)
    n_img, vocab = model.tokens_per_view, model.llm.model.config.vocab_size
    ids = torch.randint(10, vocab, (1, 6 + n_img + 4), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 6:6 + n_img] = True
    codes = torch.randint(0, model.folder.codebook_size, (1, *model.grid), generator=g)
    with torch.no_grad():
        hidden = model.llm.model(model.embed_inputs(ids, mask, codes), image_mask=mask)
        cond = model.patch_conditions(hidden, mask, 1)
        head = model.head(cond.flatten(0, 1), fold_codes(codes, model.fold_size).flatten(0, 1))
        return model.llm.model.logits(hidden), head


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", list(MODES))
def test_fit_resume_export_generate_answer_eval(mode, walked):
    from safetensors.torch import load_file

    from synergen_lightning.checkpoint import read_checkpoint_meta
    from synergen_lightning.system import load_synergen

    result = walked[mode]
    if isinstance(result, BaseException):
        raise result
    run = result["s2"].parents[3]
    assert result["steps"] == [1, 2]  # the resumed run went on from step 1
    if mode == "one_process":  # stage 2 went on to step 2 from its own checkpoint, its stage-1 init_from moved away
        assert "stage2: resuming: the weights come from the checkpoint" in result["stage2_resumed"]
        assert read_checkpoint_meta(result["s2"])["global_step"] == 2
    for out in result["fit_outputs"]:  # none of Lightning's lines a user cannot act on (cli.quiet_lightning_notices)
        assert not [line for line in out.splitlines() if any(n in line for n in LIGHTNING_NOISE)], out[-3000:]
    assert result["s1"].is_dir() == (mode == "fsdp2")  # FSDP2 writes a sharded directory, the others one file
    assert "_class_path" in result["s1_hparams"]  # what made loaders that rebuilt SynerGenVL(**hparams) fail
    for name in ("ckpt", "export") if result["from_checkpoint"] else ("export",):
        assert sorted(p.name for p in (run / f"gen_{name}").iterdir()) == ["000_00.png", "metadata.jsonl"]
    assert len(result["answers"]) == (2 if result["from_checkpoint"] else 1)
    assert all(out.strip() for out in result["answers"])
    assert (run / "report/report.json").is_file() == result["from_checkpoint"]
    events = b"".join(p.read_bytes() for p in (run / "runs/tiny/stage2").glob("events.out.tfevents.*"))
    assert b"val/loss" in events  # stage 2 validated, on every rank

    # the export holds the run's weights, and its model computes the checkpoint model's logits
    exported = load_file(str(run / "exports/stage2/model.safetensors"))
    raw = _raw_state(result["s2"])
    assert set(exported) <= set(raw) and len(exported) >= len(raw) - 1  # a tied LM head is kept once
    for k, v in exported.items():
        assert torch.equal(v, raw[k]), k
    text_ckpt, head_ckpt = _logits(load_synergen(result["s2"]))
    text_exp, head_exp = _logits(load_synergen(run / "exports/stage2"))
    torch.testing.assert_close(text_exp, text_ckpt, atol=1e-6, rtol=0)
    torch.testing.assert_close(head_exp, head_ckpt, atol=1e-6, rtol=0)


@pytest.mark.slow  # `make test-all`: a minute more than CI's budget allows beside the tiny chains
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_the_2b_recipes_chain_trains_what_each_stage_says(walked):
    """Each stage of the 2b chain ends at its last step in a sharded checkpoint written by all its ranks, starts from
    the previous stage's, and trains what progressive alignment says: stage 1 the image parts only (the trunk's
    attention and text FFN keep the base LLM's weights), stage 2 the attention too, SFT everything."""
    from PIL import Image

    from standins_2b import STAGES, trained_parts
    from synergen_lightning.checkpoint import read_checkpoint_meta

    result = walked["recipes_2b"]
    if isinstance(result, BaseException):
        raise result
    run = result["run"]
    for stage in STAGES:
        ckpt = run / f"runs/synergen_vl_2b/{stage}/last.ckpt"
        assert ckpt.is_dir() and read_checkpoint_meta(ckpt)["global_step"] == 2, stage
        shards = {f"__{rank}_0.distcp" for rank in range(RECIPES_2B_RANKS[stage])}  # every rank's
        assert {p.name for p in ckpt.iterdir() if p.suffix == ".distcp"} == shards, stage
    assert "stage2: initialised from runs/synergen_vl_2b/stage1/last.ckpt" in result["fits"]["stage2"]
    assert "sft: initialised from runs/synergen_vl_2b/stage2/last.ckpt" in result["fits"]["sft"]
    assert trained_parts(result["standins"], run) == {
        "stage1": {"attention": False, "text_ffn": False, "vision_ffn": True},
        "stage2": {"attention": True, "text_ffn": False, "vision_ffn": True},
        "sft": {"attention": True, "text_ffn": True, "vision_ffn": True}}
    pngs = sorted((run / "generated").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (RECIPES_2B_IMAGE_SIZE,) * 2 for p in pngs)


@pytest.mark.slow  # `make test-all`
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_the_tokenizer_trains_over_two_ranks_on_shards_of_unequal_length_then_is_evaluated(tmp_path):
    """`synergen fit` of the tiny tokenizer recipe under DDP on 2 processes, one rank's shard holding 1 image and the
    other's 12, validating at every epoch end: the ranks' epochs end at the same step (a rank that ran out of
    shards first would enter validation's collectives while the other still trains), then `synergen eval tokenizer`
    measures the checkpoint it wrote."""
    import json

    from tests.toy_shards import write_toy_shards

    write_toy_shards(tmp_path / "train", 13, per_shard=12, seed=1)
    write_toy_shards(tmp_path / "val", 4, per_shard=2, seed=2)
    out = synergen(tmp_path, "fit", "--config", str(ROOT / "recipes/tiny/tokenizer.yaml"), "--trainer.devices", "2",
                   "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.max_steps", "6",
                   "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1",
                   "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", "runs",
                   "--data.init_args.train_shards", "train", "--data.init_args.val_shards", "val",
                   "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4", ranks=2)
    assert "`max_steps=6` reached" in out
    ckpt = tmp_path / "runs/tokenizer/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 6
    synergen(tmp_path, "eval", "tokenizer", "--tokenizer", str(ckpt), "--shards", "val", "--image-size", "64",
             "--json", "tok.json")
    figures = json.loads((tmp_path / "tok.json").read_text())
    assert figures["views"] == 4 * 5 and 0 < figures["codebook_usage"] <= 1
