"""The one checkpoint loader (synergen_lightning/checkpoint.py), in process: every form a run or `synergen export`
writes, with the bookkeeping keys LightningCLI adds to `hyper_parameters`. The same path through the `synergen`
command, for one process, DDP and FSDP2, is tests/test_user_paths.py."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from synergen_lightning.checkpoint import constructor_kwargs, read_checkpoint_meta
from synergen_lightning.export import export
from synergen_lightning.system import SynerGenVL, load_synergen
from tests.test_system_helpers import make_batch, tiny_model

# what LightningCLI (`synergen fit`) puts into every checkpoint's hyper_parameters besides the model's arguments
CLI_KEYS = {"_class_path": "synergen_lightning.system.SynerGenVL",
            "_instantiator": "lightning.pytorch.cli.instantiate_module", "_future_bookkeeping": 1}


def _cli_like_checkpoint(tmp_path, model: SynerGenVL, **extra_hp):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"].update(CLI_KEYS, **extra_hp)
    torch.save(ckpt, path)
    return path


def _logits(model: SynerGenVL) -> torch.Tensor:
    with torch.no_grad():
        return model.llm.model.forward_ids(make_batch(["text", "text"], seed=5)["input_ids"])


def test_constructor_kwargs_keep_only_the_constructors_arguments():
    hp = {"llm": {}, "image_size": 16, "_class_path": "x", "_instantiator": "y", "_anything": 1, "no_such_arg": 2}
    assert constructor_kwargs(SynerGenVL, hp) == {"llm": {}, "image_size": 16}


def test_every_form_loads_the_same_model_through_every_entry_point(tmp_path):
    """A CLI-written .ckpt (with `_class_path`, `_instantiator`, `_...` and a key this version does not know), its
    export, and both through `load_synergen` and `SynerGenVL.load_from_checkpoint`: the same logits, eval mode,
    the stage history restored."""
    model = tiny_model(stage="stage1")
    model.stage_history = [(0, "stage1"), (3, "stage2")]
    ckpt = _cli_like_checkpoint(tmp_path, model, key_of_another_version=7)
    expected = _logits(model)
    export(ckpt, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert not [k for k in config if k.startswith("_")] and "key_of_another_version" not in config
    for source in (ckpt, tmp_path / "export"):
        for loaded in (load_synergen(source), SynerGenVL.load_from_checkpoint(source)):
            assert not loaded.training
            assert loaded.stage_history == [(0, "stage1"), (3, "stage2")]
            torch.testing.assert_close(_logits(loaded), expected, atol=0, rtol=0, msg=str(source))
    assert read_checkpoint_meta(tmp_path / "export")["global_step"] == 0


def test_overrides_replace_constructor_arguments_and_unknown_ones_are_refused(tmp_path):
    ckpt = _cli_like_checkpoint(tmp_path, tiny_model(stage="stage1"))
    assert load_synergen(ckpt, text_tokenizer="elsewhere/tok").hparams.text_tokenizer == "elsewhere/tok"
    # the commands pass their unset tokenizer options as None (or ""): the checkpoint's paths stay
    kept = load_synergen(_cli_like_checkpoint(tmp_path, tiny_model(stage="stage1", text_tokenizer="saved/tok")),
                         text_tokenizer=None, image_tokenizer="")
    assert kept.hparams.text_tokenizer == "saved/tok" and kept.hparams.image_tokenizer is None
    with pytest.raises(ValueError, match=r"\['no_such_arg'\] are not SynerGenVL arguments"):
        load_synergen(ckpt, no_such_arg=1)


def test_bf16_inference_casts_the_parameters_only_and_decodes(tmp_path, monkeypatch):
    """`dtype="bf16"` (what `--dtype auto` picks on a GPU with bf16): bf16 parameters, fp32 buffers (RoPE's
    frequencies lose their precision in bf16), the fp32 model's logits within bf16's rounding, and decoding runs."""
    from synergen_lightning.checkpoint import inference_dtype
    from tests.test_generation import CharTokenizer, GridTokenizer

    model = tiny_model(stage="full")
    ckpt = _cli_like_checkpoint(tmp_path, model)
    half = load_synergen(ckpt, dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in half.buffers() if b.is_floating_point()} == {torch.float32}
    expected = _logits(model)
    torch.testing.assert_close(_logits(half).float(), expected, atol=0.05 * float(expected.abs().max()), rtol=0)
    half.set_text_tokenizer(CharTokenizer())
    half.set_image_tokenizer(GridTokenizer())
    images = half.generate_images(["a red circle"], num=2, cfg_scale=2.0, temperature=1.0, seed=0, output="tensor")
    assert images.shape[0] == 2 and images.dtype == torch.float32 and bool(torch.isfinite(images).all())

    assert inference_dtype("auto", "cpu") == torch.float32 and inference_dtype("fp32", "cuda") == torch.float32
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert inference_dtype("auto", "cuda:0") == dtype
    with pytest.raises(ValueError, match="dtype 'fp16' is not one of auto, bf16, fp32"):
        load_synergen(ckpt, dtype="fp16")


def test_an_export_replaces_its_directory_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while the weights are written leaves the previous export as it was (not new weights beside its old
    config); a directory holding other files is refused, not emptied."""
    import safetensors.torch

    first = _cli_like_checkpoint(tmp_path / "a", tiny_model(stage="stage1"))
    export(first, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}

    def dies(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        export(_cli_like_checkpoint(tmp_path / "b", tiny_model(stage="full")), tmp_path / "export")
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds other files than an export \\(notes.txt\\): pick a new directory"):
        export(first, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nope' does not exist: pass a run's last.ckpt"):
        load_synergen(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a .ckpt file, a sharded checkpoint directory"):
        load_synergen(tmp_path)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="'.*junk.ckpt' is not a readable PyTorch checkpoint"):
        load_synergen(tmp_path / "junk.ckpt")
    torch.save({"hyper_parameters": {"config": {}}, "state_dict": {}}, tmp_path / "llm.ckpt")
    with pytest.raises(ValueError, match="has no SynerGenVL hyper_parameters"):
        load_synergen(tmp_path / "llm.ckpt")


def test_state_keys_map_the_flat_layout_both_ways():
    from synergen_lightning.state_keys import current_key, current_keys, flat_key, is_flat

    keys = list(tiny_model().state_dict())
    flat = [flat_key(k) for k in keys]
    assert "llm.layers.0.attn.q_proj.weight" in flat and "head.classifier.weight" in flat
    others = [k for k in keys if not k.startswith(("llm.", "head."))]
    assert "special_embed.weight" in others and [k for k in flat if not k.startswith(("llm.", "head."))] == others
    assert [current_key(k) for k in flat] == keys and not is_flat(keys) and is_flat(flat)
    assert list(current_keys(dict.fromkeys(flat))) == keys


def test_a_flat_layout_checkpoint_loads_exports_starts_a_stage_and_resumes(tmp_path):
    """A checkpoint whose trunk and head keys lack the `.model` level (state_keys.py) loads through every reader:
    `load_synergen`, `export`, a next stage's `init_from`, and Lightning's resume (`on_load_checkpoint`)."""
    from synergen_lightning.state_keys import flat_key

    model = tiny_model(stage="stage1")
    ckpt = _cli_like_checkpoint(tmp_path, model)
    raw = torch.load(ckpt, weights_only=False)
    raw["state_dict"] = {flat_key(k): v for k, v in raw["state_dict"].items()}
    assert "llm.norm.weight" in raw["state_dict"]
    flat = tmp_path / "flat.ckpt"
    torch.save(raw, flat)
    expected = _logits(model)
    torch.testing.assert_close(_logits(load_synergen(flat)), expected, atol=0, rtol=0)
    export(flat, tmp_path / "export")
    torch.testing.assert_close(_logits(load_synergen(tmp_path / "export")), expected, atol=0, rtol=0)
    nxt = tiny_model(stage="stage2", init_from=str(flat))
    nxt._init_weights_for_fit("stage2")
    torch.testing.assert_close(_logits(nxt), expected, atol=0, rtol=0)
    resumed = tiny_model(stage="stage1")
    checkpoint = {"state_dict": dict(raw["state_dict"])}
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(_logits(resumed.eval()), expected, atol=0, rtol=0)


def test_a_flat_layout_sharded_checkpoint_loads_whole_and_in_place(tmp_path, sharded_checkpoint):
    """A sharded (DCP) checkpoint of the flat key layout: read whole (`load_synergen`) and loaded in place by key
    (`load_sharded_into`, what a sharded `init_from` runs after sharding), both equal to the component-layout one."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from synergen_lightning.distributed import load_sharded_into, load_sharded_state_dict
    from synergen_lightning.state_keys import flat_key

    flat = tmp_path / "flat.ckpt"
    state = {flat_key(k): v for k, v in load_sharded_state_dict(sharded_checkpoint).items()}
    assert "llm.norm.weight" in state
    dcp.save({"state_dict": state}, checkpoint_id=str(flat))  # one process, no process group
    shutil.copy(sharded_checkpoint / "meta.pt", flat / "meta.pt")
    expected = _logits(load_synergen(sharded_checkpoint))
    torch.testing.assert_close(_logits(load_synergen(flat)), expected, atol=0, rtol=0)
    model = tiny_model(stage="stage1")
    assert not torch.equal(_logits(model), expected)
    load_sharded_into(model, flat)
    torch.testing.assert_close(_logits(model.eval()), expected, atol=0, rtol=0)
