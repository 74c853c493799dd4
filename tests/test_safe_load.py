"""Checkpoints are read as plain data: a crafted checkpoint whose pickle would run code (here: `touch` a marker file)
is refused by every command that reads one, with one line naming the fix, and runs nothing; `--trust-checkpoint`
loads it anyway. The checkpoints the project writes load as plain data (every other test reads them)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from PIL import Image

from synergen_lightning.cli import main as synergen
from synergen_lightning.safe_load import TRUST_ENV, UntrustedCheckpointError, torch_load
from synthetic_shards import write_shards


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls os.system(...)
        return os.system, (f"touch {self.marker}",)


def craft(path, marker, sharded: bool = False):
    """A checkpoint-shaped pickle that runs code when loaded: a .ckpt file, or a sharded directory's meta.pt."""
    payload = {"state_dict": {"llm.x": torch.zeros(1)}, "hyper_parameters": {"llm": {}, "hook": _RunsCode(marker)},
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
    from synergen_lightning.system import SynerGenVL, load_base_llm

    for load in (SynerGenVL.load_from_checkpoint, load_image_tokenizer, load_base_llm, torch_load):
        with pytest.raises(UntrustedCheckpointError, match="refused: loading it would run code"):
            load(evil["ckpt"])
    assert not evil["marker"].exists()


def test_trust_checkpoint_loads_it_anyway(evil, capsys):
    """The explicit opt-in: the code runs (the user trusted the file); the file is no model, so the command fails."""
    with pytest.raises(TypeError):
        synergen(["--trust-checkpoint", "export", "--ckpt", evil["ckpt"], "--out", "x"])
    assert evil["marker"].exists()


def test_no_unconditional_unsafe_load_in_the_product():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["grep", "-rn", "weights_only=False", "synergen_lightning", "datamodules", "callbacks"],
                         cwd=root, capture_output=True, text=True).stdout.splitlines()
    assert [ln.split(":")[0] for ln in out] == ["synergen_lightning/safe_load.py"]  # the trusted path only
