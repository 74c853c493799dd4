"""docs/plugging_data.md's worked example, run for real: `datamodules.csv_captions.CsvCaptionDataModule`
(a folder of images + captions.csv) plugged into `synergen fit` with the tiny stage-1 recipe, bad rows
skipped AND counted."""

import csv
import inspect
import logging
import math
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.csv_captions import CsvCaptionDataModule
from synergen_lightning.cli import main as synergen
from tiny_world import make_tiny_world, project_dir

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a yellow square on the left", "one small red square"]


def _write_folder(root: Path) -> dict:
    """5 good images (png and jpg, odd sizes), 1 corrupt jpg, 1 row with no file, 1 row with no caption."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        name = f"img{i}.png" if i % 2 else f"sub/img{i}.jpg"  # subfolders are allowed
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 70, 3), dtype=np.uint8)).save(root / name)
        rows.append({"file": name, "caption": caption})
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    rows.append({"file": "corrupt.jpg", "caption": "a broken picture"})
    rows.append({"file": "gone.png", "caption": "a file that does not exist"})
    rows.append({"file": "img1.png", "caption": "  "})
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["file", "caption"])
        w.writeheader()
        w.writerows(rows)
    return {"good": len(CAPTIONS), "corrupt": 1, "missing_file": 1, "empty_caption": 1}


def _tiny_tokenizer(out: Path):
    from synergen_lightning.text_tokenizer import train_bpe

    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / "corpus.jsonl"
    import json

    corpus.write_text("".join(json.dumps({"text": f"{c}. Generate an image of: {c}"}) + "\n" for c in CAPTIONS * 20))
    return train_bpe([str(corpus)], 320, out)


def test_datamodule_batches_follow_contract_and_count_skips(tmp_path, caplog):
    truth = _write_folder(tmp_path / "imgs")
    tok = _tiny_tokenizer(tmp_path / "tok")
    dm = CsvCaptionDataModule(root=str(tmp_path / "imgs"), tokenizer=str(tmp_path / "tok"), tokens_per_view=16,
                              image_size=64, batch_size=4, num_workers=0, cfg_dropout=0.0)
    with caplog.at_level(logging.WARNING, logger="datamodules.csv_captions"):
        dm.setup("fit")
        assert dict(dm.skipped) == {"missing_image": truth["missing_file"], "missing_caption": truth["empty_caption"]}
        assert len(dm.train_set) == truth["good"] + truth["corrupt"]  # decoding happens at load time
        batches = [dm.on_before_batch_transfer(b) for b in dm.train_dataloader()]
        # a second epoch counts the corrupt file again (it is met again), and logs nothing new
        n_logs = len(caplog.records)
        for b in dm.train_dataloader():
            dm.on_before_batch_transfer(b)
        assert len(caplog.records) == n_logs
    assert dm.skipped["undecodable_image"] == 2 * truth["corrupt"]
    assert dm.skipped_total == 2 * truth["corrupt"] + truth["missing_file"] + truth["empty_caption"]
    logged = [r.getMessage() for r in caplog.records]
    assert sum("undecodable_image" in m for m in logged) == 1 and any("corrupt.jpg" in m for m in logged)
    # the corrupt row is replaced by its neighbour: every batch keeps its size, no row is a skip marker
    assert [len(b["task"]) for b in batches] == [4, 2]
    keys = [k for b in batches for k in b["keys"]]
    assert "corrupt" not in keys and {f"img{i}" for i in range(5)} <= set(keys)
    for b in batches:  # docs/architecture.md "A training batch"
        B, T = b["input_ids"].shape
        assert "_skipped" not in b and b["task"] == ["generation"] * B
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape == (B, 3, 64, 64)
        assert b["image_mask"].sum(1).tolist() == [16] * B and b["image_loss_mask"].all()
        assert b["attention_mask"].dtype == torch.bool and b["labels"].shape == (B, T)
        assert (b["labels"][b["image_mask"]] == -100).all()
        # each prompt decodes back to its caption (independent check of the row <-> caption pairing)
        for row, key in zip(b["input_ids"], b["keys"]):
            caption = CAPTIONS[int(key[-1])]
            text = tok.decode([i for i in row.tolist() if i >= 8])
            assert "Generate an image of: " + caption in text, (key, text)


def test_bad_settings_fail_with_the_value(tmp_path):
    _tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        CsvCaptionDataModule(root=str(tmp_path), tokenizer=str(tmp_path / "tok"), tokens_per_view=16, image_size=64).setup()
    (tmp_path / "captions.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match=r"lacks \['caption', 'file'\]"):
        CsvCaptionDataModule(root=str(tmp_path), tokenizer=str(tmp_path / "tok"), tokens_per_view=16, image_size=64).setup()
    (tmp_path / "captions.csv").write_text("file,caption\nnope.png,x\n")
    with pytest.raises(ValueError, match="no usable row.*missing_image"):
        CsvCaptionDataModule(root=str(tmp_path), tokenizer=str(tmp_path / "tok"), tokens_per_view=16, image_size=64).setup()
    with pytest.raises(ValueError, match="batch_size=0"):
        CsvCaptionDataModule(root=str(tmp_path), tokenizer="x", tokens_per_view=16, image_size=64, batch_size=0)


def test_docs_point_to_the_shipped_module_and_its_recipe_keys_exist():
    doc = (ROOT / "docs/plugging_data.md").read_text()
    assert "datamodules/csv_captions.py" in doc and "class CsvCaptionDataModule" not in doc  # no drifting copy
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "csv_captions" in b)
    data = yaml.safe_load(block)["data"]
    assert data["class_path"] == "datamodules.csv_captions.CsvCaptionDataModule"
    params = inspect.signature(CsvCaptionDataModule).parameters
    assert set(data["init_args"]) <= set(params)
    # the abridged excerpt's lines are the module's own
    source = (ROOT / "datamodules/csv_captions.py").read_text()
    excerpt = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "__getitem__" in b)
    for line in excerpt.splitlines():
        code = line.split("#")[0].strip()
        if code and not code.startswith("raise RuntimeError(...)"):
            assert code in source, code


def test_synergen_fit_stage1_on_a_csv_folder(tmp_path, monkeypatch):
    """`synergen fit` with recipes/tiny/stage1.yaml and only `data` swapped for the CSV folder: 2 steps train,
    the checkpoint carries the skip counts, the loss is logged and finite."""
    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
    from synergen_lightning.llm import MMoELLM

    monkeypatch.chdir(tmp_path)
    for var in ("SYNERGEN_TINY_BASE_LLM", "SYNERGEN_TINY_IMAGE_TOKENIZER", "SYNERGEN_TINY_TEXT_TOKENIZER"):
        monkeypatch.delenv(var, raising=False)
    truth = _write_folder(tmp_path / "my_images")
    _tiny_tokenizer(tmp_path / "runs/tiny/text_tokenizer")
    os.makedirs("runs/tiny/base_llm")
    MMoELLM.from_paths(config=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
                       tokenizer_dir="runs/tiny/text_tokenizer").save_checkpoint_file("runs/tiny/base_llm/last.ckpt")
    vq = VQTokenizer(**yaml.safe_load((ROOT / "recipes/tiny/tokenizer.yaml").read_text())["model"]["init_args"])
    vq.save_checkpoint_file("runs/tiny/tokenizer/checkpoints/last.ckpt")
    # the user's recipe, as in the docs; batch_size = every row, so each step (= one epoch) meets the corrupt file
    Path("my_data.yaml").write_text(yaml.safe_dump({"data": {
        "class_path": "datamodules.csv_captions.CsvCaptionDataModule",
        "init_args": {"root": "my_images", "tokenizer": "runs/tiny/text_tokenizer", "batch_size": 6,
                      "num_workers": 0}}}))  # image_size, tokens_per_view: the model's
    # the tiny recipe's evaluator / sample-grid callbacks read the shape world (data/tiny); keep the rest
    Path("quick.yaml").write_text(yaml.safe_dump({"trainer": {
        "max_steps": 2, "log_every_n_steps": 1, "enable_progress_bar": False, "limit_val_batches": 0,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs", "name": "csv", "version": ""}},
        "callbacks": [
            {"class_path": "callbacks.stages.StageCallback", "init_args": {"stage": "stage1"}},
            {"class_path": "callbacks.stages.FrozenParameterGuard", "init_args": {"every_n_steps": 1}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": "runs/tiny/stage1", "save_last": True, "every_n_train_steps": 200,
                           "save_on_train_epoch_end": True, "enable_version_counter": False}}]}}))
    assert synergen(["fit", "--config", str(ROOT / "recipes/tiny/stage1.yaml"), "--config", "my_data.yaml",
                     "--config", "quick.yaml"]) == 0
    ckpt = torch.load("runs/tiny/stage1/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["CsvCaptionDataModule"]["skipped"] == {"undecodable_image": 2 * truth["corrupt"],
                                                        "missing_image": truth["missing_file"],
                                                        "missing_caption": truth["empty_caption"]}
    with open("logs/csv/metrics.csv") as f:
        losses = [float(r["train/loss_image"]) for r in csv.DictReader(f) if r.get("train/loss_image")]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)


# ---------------------------------------------------------------------------------------------- the doc, as written
def _documented_example() -> tuple[dict, list[str]]:
    """docs/plugging_data.md's `recipes/my_data.yaml` and its `synergen fit` line."""
    doc = (ROOT / "docs/plugging_data.md").read_text()
    recipe = yaml.safe_load(next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "csv_captions" in b))
    command = next(line for b in re.findall(r"```bash\n(.*?)```", doc, re.S) for line in b.splitlines()
                   if line.startswith("synergen fit") and "my_data.yaml" in line)
    return recipe, shlex.split(command)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_tiny_world(tmp_path_factory.mktemp("world"), num_samples=40)


def _project(world: Path, path: Path, monkeypatch, **data_args) -> list[str]:
    """A project as the doc sets it up: the tiny runs, `data/tiny`, an image folder, the doc's recipe at the path its
    command names (its `root` pointed at the folder, plus `data_args`); returns the doc's argv, 2 steps instead of 100."""
    project_dir(world, path)
    (path / "recipes").mkdir()
    (path / "recipes/tiny").symlink_to(ROOT / "recipes/tiny")
    monkeypatch.chdir(path)
    for var in [v for v in os.environ if v.startswith("SYNERGEN_")]:
        monkeypatch.delenv(var)
    _write_folder(path / "my_images")
    recipe, argv = _documented_example()
    recipe["data"]["init_args"].update(root=str(path / "my_images"), **data_args)
    user_recipe = next(a for a in argv if a.endswith("my_data.yaml"))
    Path(user_recipe).write_text(yaml.safe_dump(recipe))
    assert argv[:2] == ["synergen", "fit"] and "--trainer.max_steps" in argv
    argv[argv.index("--trainer.max_steps") + 1] = "2"
    return argv[1:]


def test_the_documented_example_runs_as_written(world, tmp_path, monkeypatch):
    """docs/plugging_data.md's recipe and command, word for word but for the image folder and 2 steps, with the
    recipe's logger, checkpoints and callbacks: the CSV folder trains the tiny stage-1 model at the model's views."""
    args = _project(world, tmp_path / "project", monkeypatch)
    assert synergen(args) == 0
    ckpt = torch.load("runs/tiny/stage1/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["CsvCaptionDataModule"]["skipped"]["missing_image"] == 1
    logged = yaml.safe_load(Path("runs/tiny/stage1/hparams.yaml").read_text())  # the logger merged both hparams
    assert logged["image_size"] == ckpt["hyper_parameters"]["image_size"] and logged["root"].endswith("my_images")
    assert list(Path("runs/tiny/stage1").glob("events.out.tfevents.*"))


def test_data_that_disagrees_with_the_model_stops_before_training(world, tmp_path, monkeypatch, capsys):
    """The doc's recipe with an image_size of its own: one line naming both values and the fix, exit 2, no step."""
    args = _project(world, tmp_path / "project", monkeypatch, image_size=48)
    assert synergen(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"synergen fit: error: data.init_args.image_size 48 does not match the model's image_size "
                        r"\d+ \(the model reads \d+-px views\): remove image_size from the data recipe \(the data "
                        r"then follows the model\) or set it to \d+", err[0]), err
    assert not Path("runs/tiny/stage1/last.ckpt").exists()


def test_view_geometry_needs_a_model_or_the_recipes_values(tmp_path):
    _write_folder(tmp_path / "imgs")
    _tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"CsvCaptionDataModule: image_size and tokens_per_view unset and no model "
                                         r"to take them from: set data.init_args.image_size"):
        CsvCaptionDataModule(root=str(tmp_path / "imgs"), tokenizer=str(tmp_path / "tok")).setup()
    dm = CsvCaptionDataModule(root=str(tmp_path / "imgs"), tokenizer=str(tmp_path / "tok"), image_size=32,
                              tokens_per_view=4, num_workers=0)
    dm.setup()
    assert (dm.image_size, dm.tokens_per_view) == (32, 4)


def test_tokens_per_view_that_disagrees_with_the_model_is_named_with_its_formula():
    from types import SimpleNamespace

    from tests.test_system_helpers import tiny_model

    model = tiny_model(image_size=16, downsample=4, fold=(2, 2))
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"image_size": 16, "tokens_per_view": 16}))
    with pytest.raises(ValueError, match=r"data.init_args.tokens_per_view 16 does not match the model's tokens_per_view "
                                         r"4 \(the model folds each view into 4 tokens \(\(image_size 16 / downsample 4\)"
                                         r"\^2 / fold 2x2\)\): remove tokens_per_view from the data recipe"):
        model.setup("fit")
