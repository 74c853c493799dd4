"""A step with a NaN/inf loss or gradient norm makes no optimizer update: counted (`train/skipped_nonfinite`),
logged with the step and the batch's sources; `max_nonfinite_steps` in a row stop the run with one line and a
checkpoint of the last good state. (Ranks agreeing to skip: tests/test_distributed.py, DDP over 2 processes.)"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch

from synergen_lightning.nonfinite import STOP_CHECKPOINT, NonFiniteTrainingError
from synergen_lightning.safe_load import torch_load
from tests.test_system_helpers import loader, make_batch, tiny_model


class Inject(pl.Callback):
    """NaN into the loss (`loss_at` steps) or into one gradient (`grad_at` steps); records the weights per step."""

    def __init__(self, loss_at=(), grad_at=()):
        self.loss_at, self.grad_at, self.weights = set(loss_at), set(grad_at), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        if trainer.global_step in self.loss_at:
            forward = type(pl_module).forward

            def poisoned(batch):
                out = forward(pl_module, batch)
                return dict(out, loss=out["loss"] * float("nan"))
            pl_module.forward = poisoned
        else:
            pl_module.__dict__.pop("forward", None)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.grad_at:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("inf")


def fit(tmp_path, steps: int, inject: Inject, **model_kw):
    batches = [dict(make_batch(["generation", "understanding"], seed=i), source=["gen", "qa"]) for i in range(steps)]
    model = tiny_model(stage="stage1", **model_kw)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[inject],
                         enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader(batches))
    return model, trainer


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


def test_a_nan_loss_or_gradient_skips_the_update_and_is_counted_and_logged(tmp_path, caplog):
    inject = Inject(loss_at={1}, grad_at={3})
    with caplog.at_level(logging.WARNING, logger="synergen_lightning.nonfinite"):
        model, trainer = fit(tmp_path, 5, inject)
    w = inject.weights + [{n: p.detach().clone() for n, p in model.named_parameters()}]
    assert [changed(w[i], w[i + 1]) for i in range(5)] == [True, False, True, False, True]
    assert trainer.global_step == 5 and model.nonfinite.skipped == 2
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 2
    opt = trainer.optimizers[0]
    assert {float(st["step"]) for st in opt.state.values()} == {3.0}  # 5 steps, 2 without an update
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("step 1: non-finite") and "loss nan" in lines[0]
    assert "batch sources: gen x1, qa x1" in lines[0] and lines[1].startswith("step 3") and "grad norm inf" in lines[1]


def test_too_many_in_a_row_stop_with_one_line_and_the_last_good_state(tmp_path):
    inject = Inject(loss_at={2, 3, 4, 5})
    with pytest.raises(NonFiniteTrainingError) as exc:
        fit(tmp_path, 8, inject, max_nonfinite_steps=3)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("3 optimizer steps in a row (up to step 4)")
    saved = torch_load(tmp_path / STOP_CHECKPOINT)
    assert saved["global_step"] == 4 and saved["synergen_skipped_nonfinite"] == 3
    good = inject.weights[2]  # the weights after step 1, the last update
    assert all(torch.equal(saved["state_dict"][n], good[n]) for n in good)


def test_max_nonfinite_steps_must_be_positive():
    with pytest.raises(ValueError, match="max_nonfinite_steps 0 must be >= 1"):
        tiny_model(max_nonfinite_steps=0)


def test_under_fp16s_grad_scaler_an_inf_gradient_is_the_scalers_to_skip(monkeypatch):
    """precision 16-mixed: GradScaler's overflow steps (inf gradients, often several in a row while it finds its
    scale) are the scaler's to skip, not non-finite steps that stop the run; without a scaler they are counted."""
    import types

    from synergen_lightning.system import SynerGenVL
    from tests.test_system_helpers import tiny_model

    for scaler, skipped in ((torch.amp.GradScaler("cpu"), 0), (None, 1)):
        model = tiny_model()
        fake = types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=scaler), world_size=1, global_step=3)
        monkeypatch.setattr(SynerGenVL, "trainer", property(lambda self, fake=fake: fake))
        monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.grad = torch.full_like(first, float("inf"))
        model.on_before_optimizer_step(None)
        assert model.nonfinite.skipped == skipped and (first.grad is None) == bool(skipped), scaler
