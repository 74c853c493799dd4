"""`synergen fit` preflight: each missing input, unwritable output, short disk and unsafe checkpoint stops the command
in one line naming the recipe key, the path or the figure, and the fix, before any model is built (within 5 s of the
command's start, measured in process: the interpreter's own start-up is not the command's)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from synergen_lightning import preflight
from synergen_lightning.cli import main as synergen
from tests.test_safe_load import craft, tamper_entry, tamper_metadata
from tiny_world import ROOT, make_tiny_world, project_dir

RECIPE = str(ROOT / "recipes/tiny/stage1.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import lightning.pytorch.cli  # noqa: F401 - imported once, not timed as part of a command

    return make_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def project(world, tmp_path, monkeypatch):
    for k in ("SYNERGEN_TINY_BASE_LLM", "SYNERGEN_TINY_TEXT_TOKENIZER", "SYNERGEN_TINY_IMAGE_TOKENIZER",
              "SYNERGEN_TINY_SHARDS", "SYNERGEN_TRUST_CHECKPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(project_dir(world, tmp_path / "p"))
    return tmp_path / "p"


def fit(capsys, *args) -> list[str]:
    start = time.perf_counter()
    code = synergen(["fit", "--config", RECIPE, "--trainer.max_steps", "1", *args])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert seconds < 5, f"preflight took {seconds:.1f} s"
    lines = err.split("synergen fit: error: ", 1)[1].splitlines()
    return [ln for ln in lines if not ln.startswith("(SYNERGEN_TRACEBACK")]


def test_missing_inputs_are_one_line_each(project, capsys, monkeypatch):
    monkeypatch.setenv("SYNERGEN_TINY_SHARDS", "nowhere")
    lines = fit(capsys, "--model.init_args.base_llm", "missing/base.ckpt", "--data.init_args.tokenizer", "no_tok")
    assert lines[0] == ("model.init_args.base_llm: base LLM 'missing/base.ckpt' does not exist: run `make base-llm` "
                        "(tiny) or point it at an MMoELLM .ckpt or a local HF model directory")
    assert any(ln.startswith("data.init_args.tokenizer: text tokenizer 'no_tok' does not exist") for ln in lines)
    shards = [ln for ln in lines if "nowhere/train/shard-*.tar" in ln]
    assert len(shards) == 2 and "data.init_args.sources[0]: source 'shapes_gen': urls" in shards[0]
    assert any(ln.startswith("data.init_args.val_sources[1]: source 'shapes_qa_val'") for ln in lines)


def test_a_missing_eval_file_is_named(project, capsys):
    data = project / "data"
    shared = data.resolve()
    data.unlink()  # a copy of the shared data, without the eval prompts
    shutil.copytree(shared, data)
    (data / "tiny/eval_prompts.jsonl").unlink()
    lines = fit(capsys)
    assert lines == [next(ln for ln in lines if "eval_prompts" in ln)]
    assert lines[0].startswith("trainer.callbacks[6].init_args.eval_prompts: eval prompts "
                               "'data/tiny/eval_prompts.jsonl' does not exist: run `make data`")


def test_codes_pretokenized_by_another_image_tokenizer_are_refused(project, capsys):
    """A source directory's pretokenize stamp names the tokenizer that made its codes: another one (or this one
    trained again since) stops the run with the directory, both tokenizers and the fix; a copy elsewhere passes."""
    import json
    import os

    from synergen_lightning.image_tokenizer.pretokenize import PRETOKENIZE_STAMP
    from synergen_lightning.io import path_identity

    data = project / "data"
    shared = data.resolve()
    data.unlink()
    shutil.copytree(shared, data)
    tokenizer = Path("runs/tiny/tokenizer/checkpoints/last.ckpt")
    copy = project / "elsewhere.ckpt"
    shutil.copy2(tokenizer, copy)
    config = {"model": {"init_args": {"image_tokenizer": str(tokenizer)}},
              "data": {"init_args": {"sources": [{"name": "gen", "urls": "data/tiny/train/shard-*.tar"}]}}}
    stamp = data / "tiny/train" / PRETOKENIZE_STAMP

    def made_by(path):
        stamp.write_text(json.dumps({"tokenizer": path_identity(path), "views": {}}))

    for same in (tokenizer, copy):
        made_by(same)
        assert preflight.check_image_codes(config) == []
    made_by(project / "data/tiny/eval_prompts.jsonl")  # any other file: another size
    lines = fit(capsys)
    assert lines == [f"data.init_args.sources[0]: the codes in 'data/tiny/train' were made by image tokenizer "
                     f"{str((project / 'data/tiny/eval_prompts.jsonl').resolve())!r}, not by "
                     f"model.init_args.image_tokenizer '{tokenizer}' ({stamp.relative_to(project)}): pretokenize them "
                     "again with it (`synergen data pretokenize`; make does so when the tokenizer changes) or point "
                     "image_tokenizer at the one that made them"]
    stamp.write_text("{not json")
    assert preflight.check_image_codes(config) == [
        f"data.init_args.sources[0]: {str(stamp.relative_to(project))!r} is not the JSON `synergen data pretokenize` "
        "writes (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)): pretokenize the "
        "directory again, or delete the file"]
    # codes of the model's tokenizer at another view size: their grid fits no image slot of the run
    stamp.write_text(json.dumps({"tokenizer": path_identity(tokenizer), "views": {"image_size": 128}}))
    lines = fit(capsys)
    assert lines == [f"data.init_args.sources[0]: the codes in 'data/tiny/train' are of 128-px views "
                     f"({stamp.relative_to(project)}), the run reads 64-px views: pretokenize them again with "
                     "`--image-size 64`, or set image_size to 128"]
    config["model"]["init_args"]["image_size"] = 64
    assert len(preflight.check_image_codes(config)) == 1
    config["data"]["init_args"]["image_size"] = 128  # the data's own view size, where it sets one
    assert preflight.check_image_codes(config) == []
    del config["data"]["init_args"]["image_size"]
    config["model"]["init_args"]["image_tokenizer"] = str(copy)
    made_by(copy)
    os.utime(copy, ns=(0, 0))  # trained again after the codes were made
    assert [ln.split(" were made by ")[1].split(" (")[0] for ln in preflight.check_image_codes(config)] == [
        f"model.init_args.image_tokenizer {str(copy)!r} before it last changed"]
    # a tokenizer directory (Hugging Face's layout) is known by its files: new weights under the same names differ
    folder = project / "emu3_like"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 64)
    config["model"]["init_args"]["image_tokenizer"] = str(folder)
    made_by(folder)
    assert preflight.check_image_codes(config) == []
    (folder / "model.safetensors").write_bytes(b"1" * 96)
    assert [ln.split(" were made by ")[1].split(" (")[0] for ln in preflight.check_image_codes(config)] == [
        f"model.init_args.image_tokenizer {str(folder)!r} before it last changed"]


def test_an_output_directory_that_is_not_writable(project, capsys):
    (project / "taken").write_text("a file")
    lines = fit(capsys, "--trainer.default_root_dir", "taken/run")
    assert lines == ["trainer.default_root_dir 'taken/run' is not writable (its nearest existing parent "
                     f"'{project / 'taken'}' is not): choose a writable directory or fix its permissions"]


def test_too_little_disk_for_two_checkpoints(project, capsys, monkeypatch):
    from synergen_lightning.cli import lightning_cli

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    (line,) = fit(capsys)
    assert line.startswith("trainer.callbacks[2].init_args.dirpath 'runs/tiny/stage1': 0.00 GiB free, below two "
                           "checkpoints of this model")
    assert line.endswith("trainer.default_root_dir)")
    # the figure is the recipe's model, counted without building it
    built = lightning_cli(["--config", RECIPE], run=False).model
    assert f"{sum(p.numel() for p in built.parameters()):,} parameters x 12 bytes" in line


def test_resuming_another_stages_checkpoint_is_refused(project, capsys):
    """--ckpt_path resumes with the checkpoint's hyper-parameters: a stage-2 checkpoint under the stage-1 recipe would
    train stage 2 on in stage 1's directory. Refused in one line pointing at init_from."""
    import torch

    torch.save({"hyper_parameters": {"_class_path": "synergen_lightning.system.SynerGenVL", "stage": "stage2"},
                "state_dict": {}}, "s2.ckpt")
    assert fit(capsys, "--ckpt_path", "s2.ckpt") == [
        "--ckpt_path 's2.ckpt' is a checkpoint of a 'stage2' run and the recipe trains 'stage1': resuming would train "
        "'stage2' on. To start 'stage1' from its weights, pass it as --model.init_args.init_from s2.ckpt (and leave "
        "--ckpt_path out); to resume that run, use its 'stage2' recipe"]


def test_checkpoints_that_would_run_code_are_refused_before_the_model(project, capsys, sharded_checkpoint):
    marker = project / "code-ran"
    craft(project / "evil.ckpt", marker)
    craft(project / "evil_dir", marker, sharded=True)
    tamper_metadata(sharded_checkpoint, project / "evil_metadata", marker)  # DCP's own pickles of a sharded directory
    tamper_entry(sharded_checkpoint, project / "evil_entry", marker)
    dcp = [[flag, d] for d in ("evil_metadata", "evil_entry") for flag in ("--ckpt_path", "--model.init_args.init_from")]
    for args in (["--ckpt_path", "evil.ckpt"], ["--ckpt_path", "evil_dir"], ["--model.init_args.init_from", "evil.ckpt"],
                 ["--model.init_args.base_llm", "evil.ckpt"], *dcp):
        (line,) = fit(capsys, *args)
        assert "is refused: loading it would run code (it calls posix.system)" in line and "--trust-checkpoint" in line
    assert not marker.exists()
    (line,) = fit(capsys, "--ckpt_path", "no/such.ckpt")
    assert line.startswith("--ckpt_path 'no/such.ckpt' does not exist")
