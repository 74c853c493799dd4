import pytest
import subprocess
import sys

from synergen_lightning import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in cli.COMMANDS:
        assert " ".join(words) in out


def test_unknown_command_names_the_choices(capsys):
    assert cli.main(["data", "synthh"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'data synthh'" in err and "data synth" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "synergen_lightning.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: synergen" in out.stdout


def test_fit_from_a_sharded_checkpoint_without_fsdp2_names_the_strategy(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.mkdir()  # a sharded checkpoint is a directory
    (ckpt / ".metadata").write_bytes(b"")
    args = ["fit", "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
            "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
            "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt)]
    from synergen_lightning.cli import lightning_cli

    with pytest.raises(SystemExit, match="FSDP2Strategy"):
        lightning_cli(args)
