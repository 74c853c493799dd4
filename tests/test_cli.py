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
