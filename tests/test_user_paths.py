"""Every user path, as a user walks it: the `synergen` command in subprocesses, for one process, DDP over 2
processes and FSDP2 over 2 processes, on a miniature shape world with the shipped tiny recipes:

    fit stage 1 (stopped after 1 step) -> fit again with --ckpt_path (resumes to step 2) -> fit stage 2 from it
    -> export -> generate and answer from the checkpoint and from the export -> eval report --suite text

and the exported model's logits equal the checkpoint's. A one-process or DDP run writes a single-file `last.ckpt`
whose `hyper_parameters` carry LightningCLI's own keys (`_class_path`, `_instantiator`); an FSDP2 run writes a
sharded `last.ckpt/` directory. Each command is a few steps or items: the whole file runs in about two minutes on
2 cores (the commands' start-up, ~5 s each, is most of it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_world import make_tiny_world, project_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "synergen"
SYNERGEN = [str(BIN)] if BIN.is_file() else [sys.executable, "-m", "synergen_lightning.cli"]

MODES = {
    "one_process": [],
    "ddp": ["--trainer.devices", "2", "--trainer.strategy.class_path", "synergen_lightning.distributed.DDPStrategy",
            "--trainer.strategy.init_args.global_batch_size", "datamodule"],
    "fsdp2": ["--trainer.devices", "2", "--trainer.strategy.class_path", "synergen_lightning.distributed.FSDP2Strategy",
              "--trainer.strategy.init_args.global_batch_size", "datamodule"],
}
# a few rows per step, no validation, no workers: the recipes' models, stages, callbacks and loggers as shipped
QUICK = ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "16"]
BATCH = {"stage1": '{"generation": 2, "understanding": 2}', "stage2": '{"generation": 2, "understanding": 2, "text": 2}'}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNERGEN_")}  # the recipes' own defaults
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*SYNERGEN, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"`synergen {' '.join(proc.args[len(SYNERGEN):])}` ran past {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"`synergen {' '.join(proc.args[len(SYNERGEN):])}` exited {proc.returncode}:\n{out[-4000:]}"
    return out


def synergen(cwd: Path, *args: str) -> str:
    return _finish(_start(cwd, *args))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_tiny_world(tmp_path_factory.mktemp("world"))


def _raw_state(ckpt: Path) -> dict:
    """The weights as the run saved them, read without the loader under test."""
    from synergen_lightning.distributed import load_sharded_state_dict

    return load_sharded_state_dict(ckpt) if ckpt.is_dir() else torch.load(ckpt, weights_only=False)["state_dict"]


def _logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    """LM logits over a sequence with text and one image, and the unfolding head's logits of that image's codes."""
    from synergen_lightning.models.folding import fold_codes

    g = torch.Generator().manual_seed(0)
    n_img, vocab = model.tokens_per_view, model.llm.config.vocab_size
    ids = torch.randint(10, vocab, (1, 6 + n_img + 4), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 6:6 + n_img] = True
    codes = torch.randint(0, model.folder.codebook_size, (1, *model.grid), generator=g)
    with torch.no_grad():
        hidden = model.llm(model.embed_inputs(ids, mask, codes), image_mask=mask)
        cond = model.patch_conditions(hidden, mask, 1)
        head = model.head(cond.flatten(0, 1), fold_codes(codes, model.fold_size).flatten(0, 1))
        return model.llm.logits(hidden), head


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", list(MODES))
def test_fit_resume_export_generate_answer_eval(mode, world, tmp_path):
    from safetensors.torch import load_file

    from synergen_lightning.checkpoint import load_synergen, read_checkpoint_meta

    run = project_dir(world, tmp_path / mode)
    flags = MODES[mode]
    s1, s2 = run / "runs/tiny/stage1/last.ckpt", run / "runs/tiny/stage2/last.ckpt"

    # stage 1, stopped after its first step, then resumed from its last.ckpt to step 2
    for steps, resume in ((1, []), (2, ["--ckpt_path", str(s1)])):
        synergen(run, "fit", "--config", str(ROOT / "recipes/tiny/stage1.yaml"), *flags, *QUICK,
                 "--trainer.max_steps", str(steps), f"--data.init_args.batch_size={BATCH['stage1']}", *resume)
        assert read_checkpoint_meta(s1)["global_step"] == steps
    assert s1.is_dir() == (mode == "fsdp2")  # FSDP2 writes a sharded directory, the others one file
    hp = read_checkpoint_meta(s1)["hyper_parameters"]
    assert "_class_path" in hp  # what made every loader that rebuilt SynerGenVL(**hparams) fail

    # stage 2 from stage 1 (model.init_from: runs/tiny/stage1/last.ckpt in the recipe), then its export
    synergen(run, "fit", "--config", str(ROOT / "recipes/tiny/stage2.yaml"), *flags, *QUICK,
             "--trainer.max_steps", "1", f"--data.init_args.batch_size={BATCH['stage2']}")
    synergen(run, "export", "--ckpt", str(s2), "--out", "exports/stage2")

    # generate and answer from the checkpoint and from the export, and the text report: side by side
    procs = []
    for name, source in (("ckpt", str(s2)), ("export", "exports/stage2")):
        procs.append(_start(run, "generate", "--ckpt", source, "--prompt", "a red circle", "--num", "1",
                            "--out", f"gen_{name}", "--device", "cpu"))
        procs.append(_start(run, "answer", "--ckpt", source, "--image", str(world / "scene.png"), "--question",
                            "How many shapes are there?", "--max-new-tokens", "4", "--device", "cpu"))
    procs.append(_start(run, "eval", "report", "--ckpt", str(s2), "--suite", "text", "--max-text", "4",
                        "--out", "report", "--device", "cpu", "--no-progress"))
    outs = [_finish(p) for p in procs]
    for name in ("ckpt", "export"):
        assert sorted(p.name for p in (run / f"gen_{name}").iterdir()) == ["000_00.png"]
    assert all(out.strip() for out in outs[1:4:2])  # answers printed
    assert (run / "report/report.json").is_file()

    # the export holds the run's weights and its model computes the checkpoint model's logits
    exported = load_file(str(run / "exports/stage2/model.safetensors"))
    for k, v in _raw_state(s2).items():
        if k in exported:
            assert torch.equal(exported[k], v), k
    text_ckpt, head_ckpt = _logits(load_synergen(s2))
    text_exp, head_exp = _logits(load_synergen(run / "exports/stage2"))
    torch.testing.assert_close(text_exp, text_ckpt, atol=1e-6, rtol=0)
    torch.testing.assert_close(head_exp, head_ckpt, atol=1e-6, rtol=0)
