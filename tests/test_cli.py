import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

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
    assert cli.main(["genrate", "--ckpt", "x.ckpt"]) == 2  # a command of one word is quoted without its options
    assert "unknown command 'genrate'." in capsys.readouterr().err


@pytest.mark.parametrize("word, instead", [("test", "synergen validate"), ("predict", "synergen generate")])
def test_lightnings_test_and_predict_point_to_the_commands_that_do_their_job(capsys, word, instead):
    """No module has a test split or a predict step: LightningCLI would build the model, then fail in the trainer."""
    assert cli.main([word, "--config", "recipes/tiny/stage1.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"synergen {word}: not a synergen command") and instead in err
    assert word not in cli._usage().split("Other commands")[0]
    with pytest.raises(SystemExit):  # nor does the Lightning parser's usage offer it
        cli.lightning_cli(["--help"])
    assert "{fit,validate}" in capsys.readouterr().out


@pytest.mark.parametrize("ask", [["--help"], ["-h"], []])
def test_a_command_group_lists_its_commands(capsys, ask):
    assert cli.main(["eval", *ask]) == (0 if ask else 2)
    captured = capsys.readouterr()
    text = captured.out if ask else captured.err
    group = [" ".join(w) for w in cli.COMMANDS if w[0] == "eval"]
    assert len(group) > 5 and all(name in text for name in group)
    assert "data synth" not in text and "unknown command" not in text


def test_an_unreadable_image_to_answer_is_one_line(tmp_path, capsys):
    bad = tmp_path / "scene.png"
    bad.write_bytes(b"not a png")
    assert cli.main(["answer", "--ckpt", str(tmp_path / "last.ckpt"), "--image", str(bad), "--question", "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"synergen answer: error: --image {str(bad)!r} cannot be read") and "Traceback" not in err


@pytest.mark.parametrize(("command", "not_loaded"), [
    (["generate"], {"torch", "lightning"}), (["answer"], {"torch", "lightning"}), (["export"], {"torch", "lightning"}),
    (["eval", "report"], {"lightning"}), (["eval", "grounding"], {"lightning"}), (["eval", "mjhq-fid"], {"lightning"}),
    (["data", "pretokenize"], {"lightning"}), (["eval", "tokenizer"], {"lightning"}),
    (["demo", "report"], {"lightning"}), (["import-hf"], {"lightning"})])
def test_help_answers_before_the_model_loads(command, not_loaded):
    """`--help` prints at once: Lightning (seconds of imports), and for generate/answer/export torch too, load after
    parsing."""
    code = ("import sys\nfrom synergen_lightning import cli\ntry:\n    cli.main(%r)\nexcept SystemExit:\n"
            "    pass\nprint(sorted(%r & set(sys.modules)))" % ([*command, "--help"], not_loaded))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    option = {"pretokenize": "--tokenizer", "tokenizer": "--tokenizer", "import-hf": "--hf-dir"}.get(command[-1], "--ckpt")
    assert out.returncode == 0 and option in out.stdout and out.stdout.strip().endswith("[]"), out


def test_device_auto_is_cuda_when_available_else_cpu(capsys):
    from synergen_lightning.cli_args import device_arg

    assert device_arg("auto") == ("cuda" if torch.cuda.is_available() else "cpu") and device_arg("cpu") == "cpu"
    # a name torch does not know, and a GPU that is not there: the option's one-line error, before any model loads
    for device, said in (("gpu", "'gpu' is not a torch device: give auto, cpu, cuda or cuda:N"),
                         ("cuda:99", f"'cuda:99': {torch.cuda.device_count()} CUDA GPU(s) visible here; give cpu")):
        with pytest.raises(SystemExit) as e:
            cli.main(["answer", "--ckpt", "missing.ckpt", "--image", "x.png", "--question", "?", "--device", device])
        assert e.value.code == 2 and f"argument --device: {said}" in capsys.readouterr().err
    # the tokenizer's commands take the same option
    for argv in (["eval", "tokenizer", "--tokenizer", "t.ckpt"], ["data", "pretokenize", "--tokenizer", "t.ckpt",
                                                                  "--in", "raw", "--out", "codes"]):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--device", "gpu"])
        assert e.value.code == 2 and "argument --device: 'gpu' is not a torch device" in capsys.readouterr().err


def test_generation_values_no_draw_can_use_stop_before_the_checkpoint_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "a", "--out", str(tmp_path),
                  "--temperature", "-1", "--top-p", "1.5", "--cfg", "-3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--temperature -1.0 must be >= 0" in err and "--top-p 1.5 must be in (0, 1]" in err
    assert "--cfg -3.0 must be >= 0 (1: off)" in err
    assert "missing.ckpt" not in err


def test_generate_writes_and_describes_each_batch_as_it_is_drawn(tmp_path, monkeypatch, capsys):
    """A run stopped in its second batch leaves the first batch's images, each with its metadata line; `--compile`
    reaches the decoder (whose compiled codes tests/test_generation_decode.py holds to the eager ones)."""
    import synergen_lightning.inference as inference
    import synergen_lightning.system as system
    from tests.test_generation import _model

    monkeypatch.setattr(system, "load_synergen", lambda *a, **k: _model())
    draw, calls = inference.generate_codes, []

    def stops_in_batch_two(*args):
        calls.append(args[-1])  # generate_codes' `compile`
        if len(calls) == 2:
            raise KeyboardInterrupt
        return draw(*args[:-1], False)

    monkeypatch.setattr(inference, "generate_codes", stops_in_batch_two)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["generate", "--ckpt", "any.ckpt", "--prompt", "a red circle", "--prompt", "a square", "--num", "2",
                  "--batch-size", "2", "--out", str(tmp_path), "--no-progress", "--device", "cpu", "--compile"])
    assert calls == [True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_00.png", "000_01.png", "metadata.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [(m["file"], m["prompt"], m["sample"]) for m in lines] == [("000_00.png", "a red circle", 0),
                                                                     ("000_01.png", "a red circle", 1)]

    # the same --out again: the earlier images would stay beside (and among) the new ones, so it is refused; with
    # --overwrite they are replaced
    again = ["generate", "--ckpt", "any.ckpt", "--prompt", "a square", "--out", str(tmp_path), "--no-progress",
             "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        cli.main(again)
    assert e.value.code == 2 and f"--out {tmp_path} holds an earlier run's images (3 files, e.g. 000_00.png): add " \
                                 "--overwrite" in capsys.readouterr().err
    assert cli.main(again + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_00.png", "metadata.jsonl"]
    assert [json.loads(line)["prompt"] for line in (tmp_path / "metadata.jsonl").read_text().splitlines()] == [
        "a square"]


def test_generate_reads_captions_from_a_file_after_the_prompts(tmp_path, monkeypatch, capsys):
    """`--prompts FILE`: one caption per line (blank lines skipped), drawn after any --prompt, each named in
    metadata.jsonl; a missing or empty file, or no caption at all, is refused before the model loads."""
    import synergen_lightning.system as system
    from tests.test_generation import _model

    loads = []
    monkeypatch.setattr(system, "load_synergen", lambda *a, **k: loads.append(1) or _model())
    captions = tmp_path / "captions.txt"
    captions.write_text("two blue squares\n\n  a green triangle  \n")
    out = tmp_path / "out"
    base = ["generate", "--ckpt", "any.ckpt", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert cli.main([*base, "--prompt", "a red circle", "--prompts", str(captions)]) == 0
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(m["file"], m["prompt"]) for m in lines] == [
        ("000_00.png", "a red circle"), ("001_00.png", "two blue squares"), ("002_00.png", "a green triangle")]
    assert sorted(f.name for f in out.glob("*.png")) == ["000_00.png", "001_00.png", "002_00.png"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    for extra, said in (([], "nothing to draw: give --prompt TEXT (repeatable) or --prompts FILE"),
                        (["--prompts", str(tmp_path / "missing.txt")], "is not a file: give a text file of captions"),
                        (["--prompts", str(empty)], f"--prompts {empty} holds no caption: write one per line")):
        with pytest.raises(SystemExit) as e:
            cli.main([*base, "--overwrite", *extra])
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert len(loads) == 1


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "synergen_lightning.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: synergen" in out.stdout
    version = subprocess.run([sys.executable, "-m", "synergen_lightning.cli", "--version"], capture_output=True,
                             text=True)
    from importlib.metadata import version as installed

    assert version.returncode == 0 and version.stdout == f"synergen {installed('synergen-lightning')}\n"


def test_fit_from_a_sharded_checkpoint_without_fsdp2_names_the_strategy(tmp_path, sharded_checkpoint):
    ckpt = sharded_checkpoint  # a sharded checkpoint is a directory (it passes preflight's checks)
    args = ["fit", "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
            "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
            "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt)]
    from synergen_lightning.cli import lightning_cli

    with pytest.raises(SystemExit, match="FSDP2Strategy"):
        lightning_cli(args)


def _raise_wrapped_like_jsonargparse():
    """Our own input check raises; a library catches it and raises its own error over it (as jsonargparse does)."""
    try:
        from synergen_lightning.models.folding import check_fold

        check_fold((16, 16), (3, 3))
    except ValueError:
        # implicit chaining (__context__), as jsonargparse raises it
        raise ValueError("Does not validate against any of the Union subtypes")  # noqa: B904


def test_user_error_finds_our_message_under_a_library_wrapper():
    with pytest.raises(ValueError) as caught:
        _raise_wrapped_like_jsonargparse()
    cause = cli.user_error(caught.value)
    assert cause is not None and "3x3 does not divide the code grid 16x16" in str(cause)


def test_a_file_in_the_way_of_an_output_is_one_line(tmp_path, capsys):
    """The file system's own refusal (here: `--out` under a file) names the path: one line, no traceback."""
    (tmp_path / "taken").write_text("a file")
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a red circle"}\n')
    code = cli.main(["data", "train-bpe", "--text", str(text), "--vocab-size", "300", "--out",
                     str(tmp_path / "taken/tok")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("synergen data train-bpe: error: [Errno 20] Not a directory: ") and \
        "taken/tok" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["fit"], ["plan", "--devices", "1"]])
def test_a_recipe_that_is_not_yaml_is_named_with_its_line(tmp_path, capsys, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: x\n   init_args: [\n")
    assert cli.main([command[0], "--config", str(bad), *command[1:]]) == 2
    assert capsys.readouterr().err.startswith(
        f"synergen {command[0]}: error: --config '{bad}' is not valid YAML (mapping values are not allowed here at "
        "line 3, column 13): fix that line")


def test_user_error_leaves_library_and_runtime_errors_alone():
    import json

    import torch

    with pytest.raises(ValueError) as from_a_library:
        json.loads("{")  # JSONDecodeError is a ValueError, raised inside the json module: keep its traceback
    assert cli.user_error(from_a_library.value) is None
    with pytest.raises(RuntimeError) as bug:
        torch.zeros(2).view(3)
    assert cli.user_error(bug.value) is None


def test_a_bad_recipe_input_is_one_line_not_a_traceback(tmp_path):
    """`synergen fit` on a recipe whose base LLM does not exist (a fresh directory): the message with its fix, exit 2,
    no traceback; SYNERGEN_TRACEBACK=1 brings the traceback back."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "stage1.yaml"
    cmd = [sys.executable, "-m", "synergen_lightning.cli", "fit", "--config", str(recipe), "--trainer.max_steps", "1"]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SYNERGEN_")}
    with ThreadPoolExecutor(2) as pool:  # the two commands side by side: each is mostly its start-up
        short, full = pool.map(lambda e: subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=e,
                                                        timeout=120), [env, {**env, "SYNERGEN_TRACEBACK": "1"}])
    assert short.returncode == 2, short.stderr[-2000:]
    assert "synergen fit: error: model.init_args.base_llm: base LLM 'runs/tiny/base_llm/last.ckpt' does not exist" in short.stderr
    assert "Traceback" not in short.stderr
    assert full.returncode != 0 and "Traceback" in full.stderr and "PreflightError: model.init_args.base_llm: base LLM" in full.stderr


def test_lm_eval_help_says_how_to_name_the_model_before_lm_evals_own_help(capsys):
    """lm-eval's help knows no `synergen` model: ours says the model name and its --model_args first."""
    import importlib.util

    try:
        code = cli.main(["eval", "lm-eval", "--help"])
    except SystemExit as exc:  # lm-eval's parser exits after its help
        code = exc.code
    out = capsys.readouterr()
    assert "run --model synergen --model_args pretrained=" in out.out and "max_gen_toks" in out.out
    if importlib.util.find_spec("lm_eval") is not None:
        assert code == 0 and out.out.index("--model synergen") < out.out.index("usage: lm-eval")
    else:
        assert code == 2 and "lm-eval is not installed" in out.err
