"""Checkpoints are read as plain data: a crafted checkpoint whose pickle would run code (here: `touch` a marker file)
is refused by every command that reads one, with one line naming the fix, and runs nothing; `--trust-checkpoint`
loads it anyway. That holds for every pickle of a sharded (DCP) directory too: its `meta.pt`, its `.metadata` (which
torch itself unpickles with plain pickle) and its non-tensor entries (which DCP loads with `weights_only=False`). The
checkpoints the project writes, a sharded one included, load as plain data."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from synergen_lightning.cli import main as synergen
from synergen_lightning.safe_load import TRUST_ENV, UntrustedCheckpointError, read_sharded_metadata, torch_load
from synthetic_shards import write_shards


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls os.system(...)
        return os.system, (f"touch {self.marker}",)


def craft(path, marker, sharded: bool = False):
    """A checkpoint-shaped pickle that runs code when loaded: a .ckpt file, or a sharded directory's meta.pt."""
    payload = {"state_dict": {"llm.model.x": torch.zeros(1)}, "hyper_parameters": {"llm": {}, "hook": _RunsCode(marker)},
               "global_step": 1}
    if sharded:
        path.mkdir()
        (path / ".metadata").write_bytes(b"")
        torch.save(payload, path / "meta.pt")
    else:
        torch.save(payload, path)
    return path


@pytest.fixture
def evil(tmp_path, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, "0")  # restored after the test (the trust flag sets it in this process)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"
    write_shards(tmp_path / "shards", n_shards=1, per_shard=2, seed=0)
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval_prompts.jsonl").write_text('{"prompt": "a red circle", "include": []}\n')
    return {"ckpt": str(craft(tmp_path / "evil.ckpt", marker)),
            "dir": str(craft(tmp_path / "evil_dir", marker, sharded=True)),
            "marker": marker, "shards": str(tmp_path / "shards" / "shard-000000.tar"), "img": str(tmp_path / "img.png")}


def commands(e: dict) -> list[list[str]]:
    c, s = e["ckpt"], e["shards"]
    return [["export", "--ckpt", c, "--out", "x"], ["export", "--ckpt", e["dir"], "--out", "x"],
            ["generate", "--ckpt", c, "--prompt", "a red circle", "--out", "g", "--device", "cpu"],
            ["answer", "--ckpt", c, "--image", e["img"], "--question", "what?", "--device", "cpu"],
            ["answer", "--ckpt", e["dir"], "--image", e["img"], "--question", "what?", "--device", "cpu"],
            ["eval", "report", "--ckpt", c, "--suite", "text", "--out", "r", "--device", "cpu", "--no-progress"],
            ["eval", "cosine", "--ckpt", c, "--val-shards", s, "--out", "r", "--device", "cpu"],
            ["eval", "grounding", "--ckpt", c, "--val-shards", s, "--device", "cpu"],
            ["eval", "tokenizer", "--tokenizer", c, "--shards", s],
            ["data", "pretokenize", "--tokenizer", c, "--in", s, "--out", "p"],
            ["demo", "report", "--ckpt", c, "--base-llm", c, "--data", "data", "--out", "d", "--device", "cpu"],
            ["ablations", "eval", "--ckpt", c, "--out", "a.json"]]


def test_every_command_refuses_a_checkpoint_that_would_run_code(evil, capsys):
    for argv in commands(evil):
        try:
            code = synergen(argv)
        except SystemExit as exc:  # argparse's p.error
            code = exc.code
        err = capsys.readouterr().err
        assert not evil["marker"].exists(), f"{argv}: the checkpoint ran code"
        assert code == 2, f"{argv} exited {code}: {err}"
        lines = [ln for ln in err.splitlines() if "refused" in ln]
        assert len(lines) == 1 and "--trust-checkpoint" in lines[0] and "posix.system" in lines[0], (argv, err)


def test_the_python_entry_points_refuse_it_too(evil):
    from synergen_lightning.image_tokenizer import load_image_tokenizer
    from synergen_lightning.model_parts import load_base_llm
    from synergen_lightning.system import SynerGenVL

    for load in (SynerGenVL.load_from_checkpoint, load_image_tokenizer, load_base_llm, torch_load):
        with pytest.raises(UntrustedCheckpointError, match="refused: loading it would run code"):
            load(evil["ckpt"])
    assert not evil["marker"].exists()


def test_trust_checkpoint_loads_it_anyway(evil, capsys):
    """The explicit opt-in: the code runs (the user trusted the file); the file is no model, so the command fails."""
    code = synergen(["--trust-checkpoint", "export", "--ckpt", evil["ckpt"], "--out", "x"])
    assert evil["marker"].exists()
    assert code == 2 and "SynerGenVL needs `llm`" in capsys.readouterr().err


def test_no_unconditional_unsafe_load_in_the_product():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["grep", "-rn", "weights_only=False", "synergen_lightning", "datamodules", "callbacks"],
                         cwd=root, capture_output=True, text=True).stdout.splitlines()
    assert [ln.split(":")[0] for ln in out] == ["synergen_lightning/safe_load.py"]  # the trusted path only


# ---------------------------------------------------------------------------------------- sharded (DCP) directories
def _metadata(path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own checkpoint


def tamper_metadata(genuine, path, marker):
    """A genuine sharded checkpoint whose DCP `.metadata` also holds an object that runs code when unpickled."""
    shutil.copytree(genuine, path)
    md = _metadata(genuine)
    md.planner_data["hook"] = _RunsCode(marker)
    (path / ".metadata").write_bytes(pickle.dumps(md))
    return path


def tamper_entry(genuine, path, marker, key="state_dict.llm.model.norm.weight"):
    """A genuine sharded checkpoint whose model weight `key` became a non-tensor entry (appended to its shard file) whose
    pickle runs code: DCP would load it with `torch.load(weights_only=False)`."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    shutil.copytree(genuine, path)
    md = _metadata(genuine)
    info = next(v for k, v in md.storage_data.items() if k.fqn == key)
    buf = io.BytesIO()
    torch.save(_RunsCode(marker), buf)
    shard = path / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != key}
    md.storage_data[MetadataIndex(key)] = type(info)(info.relative_path, offset, len(buf.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(md))
    return path


@pytest.fixture
def evil_dcp(evil, sharded_checkpoint, tmp_path):
    return {"metadata": str(tamper_metadata(sharded_checkpoint, tmp_path / "evil_metadata", evil["marker"])),
            "entry": str(tamper_entry(sharded_checkpoint, tmp_path / "evil_entry", evil["marker"]))}


def test_a_genuine_sharded_checkpoint_loads(sharded_checkpoint, tmp_path):
    """What FSDP2Strategy writes passes the check (its optimizer param groups are non-tensor entries, checked as plain
    data), exports, and resumes."""
    import lightning.pytorch as pl
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from callbacks.stages import StageCallback
    from synergen_lightning.distributed import FSDP2Strategy, load_sharded_state_dict
    from tests.distributed_worker import ParityData
    from tests.test_system_helpers import tiny_model

    md = read_sharded_metadata(sharded_checkpoint)
    assert any(isinstance(v, BytesStorageMetadata) for v in md.state_dict_metadata.values())
    assert synergen(["export", "--ckpt", str(sharded_checkpoint), "--out", str(tmp_path / "x")]) == 0
    state, exported = load_sharded_state_dict(sharded_checkpoint), load_file(str(tmp_path / "x" / "model.safetensors"))
    assert set(exported) <= set(state) and all(torch.equal(exported[k], state[k]) for k in exported)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StageCallback("stage1")])
    try:
        trainer.fit(tiny_model(stage="stage1"), datamodule=ParityData(3), ckpt_path=str(sharded_checkpoint))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert trainer.global_step == 3


def test_every_command_refuses_a_sharded_checkpoint_whose_dcp_part_would_run_code(evil, evil_dcp, capsys):
    for kind, path in evil_dcp.items():
        for argv in [[path if a == evil["ckpt"] else a for a in argv] for argv in commands(evil)
                     # demo report reads its base LLM (a file) first; ablations eval takes only a file
                     if "--ckpt" in argv and argv[0] not in ("demo", "ablations")]:
            try:
                code = synergen(argv)
            except SystemExit as exc:
                code = exc.code
            err = capsys.readouterr().err
            assert not evil["marker"].exists(), f"{kind} {argv}: the checkpoint ran code"
            assert code == 2, f"{kind} {argv} exited {code}: {err}"
            lines = [ln for ln in err.splitlines() if "refused" in ln]
            assert len(lines) == 1 and "--trust-checkpoint" in lines[0] and "posix.system" in lines[0], (kind, argv, err)


def test_resume_and_init_from_refuse_it_in_python_too(evil, evil_dcp):
    """Without the CLI's preflight: FSDP2Strategy's resume and a model's `init_from` check the directory first."""
    import lightning.pytorch as pl

    from synergen_lightning.distributed import FSDP2Strategy, load_sharded_state_dict
    from tests.distributed_worker import ParityData
    from tests.test_system_helpers import tiny_model

    for path in evil_dcp.values():
        with pytest.raises(UntrustedCheckpointError, match="posix.system"):
            load_sharded_state_dict(path)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), max_steps=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        try:
            with pytest.raises(UntrustedCheckpointError, match="posix.system"):
                trainer.fit(tiny_model(stage="stage1"), datamodule=ParityData(3), ckpt_path=path)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        with pytest.raises(UntrustedCheckpointError, match="posix.system"):
            trainer.fit(tiny_model(stage="stage2", init_from=path), datamodule=ParityData(1))
    assert not evil["marker"].exists()


@pytest.mark.parametrize("kind", ["metadata", "entry"])
def test_the_tampered_directories_do_run_code_through_dcp_when_trusted(evil, evil_dcp, kind):
    """The crafted directories are real attacks on DCP's own reads: trusted, export runs their code."""
    try:
        synergen(["--trust-checkpoint", "export", "--ckpt", evil_dcp[kind], "--out", "x"])
    except Exception:  # noqa: BLE001 - the entry that ran code is no tensor: the export then fails
        pass
    assert evil["marker"].exists()
