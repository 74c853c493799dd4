"""FinalCheckpoint: a run that ends off its save schedule still saves its final step."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.checkpoint import FinalCheckpoint

ROOT = Path(__file__).resolve().parents[1]


def _recipe_checkpoint_args(recipe: str = "recipes/tiny/stage1.yaml") -> dict:
    callbacks = yaml.safe_load((ROOT / recipe).read_text())["trainer"]["callbacks"]
    return next(c["init_args"] for c in callbacks if c["class_path"] == "callbacks.checkpoint.FinalCheckpoint")


def _fit(tmp_path, max_steps: int, every: int, model=None, ckpt_path=None) -> Path:
    """A run with the tiny stage 1 recipe's checkpointing, saving every `every` steps into `tmp_path`."""
    ck = FinalCheckpoint(**dict(_recipe_checkpoint_args(), dirpath=tmp_path, every_n_train_steps=every))
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ck], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(model or BoringModel(), ckpt_path=ckpt_path)
    return tmp_path


@pytest.mark.parametrize("max_steps, every", [(5, 3), (6, 3), (2, 200)])
def test_last_checkpoint_is_the_final_step(tmp_path, max_steps, every):
    """A run of 300 steps saved every 200 (the tiny stage 2 and SFT) ends with last.ckpt at step 300, not 200."""
    model = BoringModel()
    out = _fit(tmp_path, max_steps, every, model)
    last = torch.load(out / "last.ckpt", weights_only=False)
    assert last["global_step"] == max_steps
    # it holds the final weights, not those of the last scheduled save
    for name, value in model.state_dict().items():
        torch.testing.assert_close(last["state_dict"][name], value, rtol=0, atol=0)
    assert [p.name for p in out.iterdir()] == ["last.ckpt"]  # the recipes keep it alone


def test_the_recipes_write_each_checkpoint_once(tmp_path, monkeypatch):
    """A save writes last.ckpt and nothing else: no step file holding the same weights a second time."""
    written = []
    save = L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint", lambda self, path, *a, **k: (written.append(Path(path).name),
                                                                                    save(self, path, *a, **k)))
    _fit(tmp_path, 7, 3)
    assert written == ["last.ckpt"] * 3  # steps 3, 6 and the final 7


def test_an_interrupted_run_saves_no_final_step(tmp_path):
    """Ctrl-C / a crash is not the end of the run: last.ckpt stays at the last scheduled save (resume from it)."""

    class Crashes(BoringModel):
        def training_step(self, batch, batch_idx):
            if self.global_step == 4:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, 10, 3, Crashes())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3


@pytest.mark.parametrize("world_size", [1, 2])
def test_save_on_exception_saves_in_one_process_only(tmp_path, monkeypatch, world_size):
    """Over several ranks the rank that raised would wait alone in the save's collectives: it saves nothing and
    says so; one process saves as Lightning does."""
    from types import SimpleNamespace

    saved = []
    cb = FinalCheckpoint(dirpath=tmp_path, filename="last", save_on_exception=True)
    monkeypatch.setattr(cb, "_monitor_candidates", lambda trainer: {})
    monkeypatch.setattr(cb, "_save_checkpoint", lambda trainer, path: saved.append(path))
    monkeypatch.setattr(cb, "_save_last_checkpoint", lambda trainer, candidates: None)
    trainer = SimpleNamespace(world_size=world_size, fast_dev_run=False, sanity_checking=False, global_step=4)
    if world_size > 1:
        with pytest.warns(UserWarning, match="no checkpoint on RuntimeError over 2 ranks"):
            cb.on_exception(trainer, None, RuntimeError("boom"))
    else:
        cb.on_exception(trainer, None, RuntimeError("boom"))
    assert len(saved) == (world_size == 1)


def test_every_shipped_recipe_keeps_its_final_step():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    checkpointing = 0
    for recipe in recipes:
        callbacks = (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("callbacks") or []
        paths = [c.get("class_path", "") for c in callbacks if isinstance(c, dict)]
        assert "lightning.pytorch.callbacks.ModelCheckpoint" not in paths, f"{recipe}: use callbacks.checkpoint.FinalCheckpoint"
        checkpointing += "callbacks.checkpoint.FinalCheckpoint" in paths
    assert checkpointing >= 8  # tiny tokenizer, base LLM, 3 stages; 2b's 3 stages


def test_only_a_new_run_over_old_checkpoints_is_warned(tmp_path, recwarn):
    """The recipes log into their checkpoint directory: its config and event files are no reason to warn, a second
    run over the first one's checkpoints is, and a resumed run is not."""
    def warnings_about_the_directory():
        found = [str(w.message) for w in recwarn if str(tmp_path) in str(w.message)]
        recwarn.clear()
        return found

    (tmp_path / "config.yaml").write_text("seed_everything: 0\n")
    (tmp_path / "events.out.tfevents.0").write_bytes(b"")
    _fit(tmp_path, 2, 200)
    assert warnings_about_the_directory() == []
    _fit(tmp_path, 2, 200)
    assert warnings_about_the_directory() == [
        f"{tmp_path} already holds checkpoints (last.ckpt): this run overwrites those of the same "
        f"name. To go on from one, pass --ckpt_path {tmp_path / 'last.ckpt'}; to keep them, move them"]
    _fit(tmp_path, 3, 200, ckpt_path=tmp_path / "last.ckpt")
    assert warnings_about_the_directory() == []
