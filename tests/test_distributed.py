"""FSDP2 on CPU (gloo): 2 spawned processes vs 1 process on the same global batch.

The 2-process runs use Lightning's Trainer under `FSDP2Strategy` in each worker (tests/distributed_worker.py);
the 1-process reference is a plain single-device Trainer (no FSDP), so parity checks the whole sharded path
(sharding, reduce-scatter averaging, clipping over sharded gradients, step-scheduled stage switch).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback

from callbacks.stages import FrozenParameterGuard, StageCallback
from synergen_lightning.distributed import (
    FSDP2Strategy,
    check_compatible,
    load_sharded_state_dict,
    parallelize,
    per_rank_batch_size,
)
from tests.distributed_worker import GLOBAL_TASKS, global_batches, spawn, split_batch
from tests.test_system_helpers import loader, make_batch, tiny_model

STAGE_SWITCH = {"max_steps": 4, "switch_at": {2: "stage2"}, "gradient_clip_val": 0.05}


def reference_fit(scenario: dict) -> dict:
    """The same run as a worker's, in this process, single device, no FSDP, on the global batches."""
    pl.seed_everything(0, verbose=False)
    rec = {"loss": [], "grad_norm": []}

    class Rec(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec["loss"].append(float(outputs["loss"]))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            rec["grad_norm"].append(float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in pl_module.parameters()
                                                         if p.grad is not None))))

    model = tiny_model(stage="stage1", lr=3e-3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=scenario["max_steps"], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, gradient_clip_val=scenario.get("gradient_clip_val"),
                         callbacks=[StageCallback("stage1", switch_at=scenario.get("switch_at")), Rec()])
    trainer.fit(model, loader(global_batches(scenario["max_steps"])))
    rec["state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return rec


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    scenario = dict(STAGE_SWITCH, save=str(out / "ckpt"))
    return spawn(2, scenario, out / "results", timeout=240), out / "ckpt"


@pytest.mark.timeout(300)
def test_two_processes_match_one_process_through_a_stage_switch(two_rank_run):
    """stage1 for 2 steps, switch to stage2 at step 2 (attention joins the optimizer after fully_shard),
    clipping active: per-step loss = mean of the 2 ranks' losses, within 1e-5 of the 1-process run."""
    ranks, _ = two_rank_run
    ref = reference_fit(STAGE_SWITCH)
    two = [(a + b) / 2 for a, b in zip(ranks[0]["loss"], ranks[1]["loss"])]
    assert len(two) == len(ref["loss"]) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(ref["loss"]), atol=1e-5, rtol=0)
    # ranks saw different halves of the batch: their losses differ, so the agreement above is not trivial
    assert abs(ranks[0]["loss"][0] - ranks[1]["loss"][0]) > 1e-3
    # the pre-clip gradient norm over sharded gradients equals the 1-process one (and clipping was active)
    torch.testing.assert_close(torch.tensor(ranks[0]["grad_norm"]), torch.tensor(ref["grad_norm"]), rtol=1e-4, atol=1e-6)
    assert min(ref["grad_norm"]) > STAGE_SWITCH["gradient_clip_val"]
    # the stage switch reached the sharded optimizer: 8 more tensors (attention q,k,v,o x 2 layers) from step 2
    assert ranks[0]["n_opt_params"][:2] == ranks[1]["n_opt_params"][:2]
    assert ranks[0]["n_opt_params"][2] - ranks[0]["n_opt_params"][1] == 8
    # final weights: every trained weight matches the 1-process run; frozen weights are bit-identical to init
    full = ranks[0]["state_dict"]
    for name, ref_w in ref["state_dict"].items():
        torch.testing.assert_close(full[name], ref_w, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    pl.seed_everything(0, verbose=False)
    start = tiny_model(stage="stage1").state_dict()
    frozen = [n for n, rg in ranks[0]["requires_grad"].items() if not rg]
    assert frozen and all(".attn." not in n for n in frozen)
    for n in frozen:
        assert torch.equal(full[n], start[n]), n
    moved = [n for n in full if n.startswith("llm.layers.0.attn.") and not torch.equal(full[n], start[n])]
    assert moved, "attention weights did not change after the stage switch under FSDP2"
    assert ranks[0]["frozen_checked"] == ranks[1]["frozen_checked"] > 0


@pytest.mark.timeout(120)
def test_sharded_checkpoint_reloads_at_world_size_one(two_rank_run):
    ranks, ckpt = two_rank_run
    assert (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    state = load_sharded_state_dict(ckpt)
    model = tiny_model(stage="stage1")
    check_compatible(state, model, str(ckpt))
    model.load_state_dict(state)
    ref = tiny_model(stage="stage1")
    ref.load_state_dict(ranks[0]["state_dict"])
    batch = make_batch(GLOBAL_TASKS, seed=7)
    with torch.no_grad():
        a, b = model(batch), ref(batch)
    torch.testing.assert_close(a["loss"], b["loss"], atol=0, rtol=0)
    # logits themselves
    ids = batch["input_ids"][:, :6]
    with torch.no_grad():
        la = model.llm.forward_ids(ids)
        lb = ref.llm.forward_ids(ids)
    torch.testing.assert_close(la, lb, atol=0, rtol=0)


def test_incompatible_sharded_checkpoint_is_refused(two_rank_run):
    _, ckpt = two_rank_run
    state = load_sharded_state_dict(ckpt)
    bigger = tiny_model(llm=dict(vocab_size=64, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, max_position_embeddings=128),
                        head=dict(num_layers=2, hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"56 shape mismatches .*checkpoint \(32,\) vs model \(48,\)"):
        check_compatible(state, bigger, str(ckpt))


def test_world_size_must_divide_the_global_batch():
    assert per_rank_batch_size(64, 8) == 8
    with pytest.raises(ValueError, match="global batch 30 is not divisible by the world size 4.*28 or 32"):
        per_rank_batch_size(30, 4)


def test_fsdp_requested_with_an_unconfigured_model_is_refused(tmp_path):
    """A LightningModule whose configure_model does not shard: refused with the module/parameter counts."""

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def configure_model(self):
            pass

        def training_step(self, batch, batch_idx):
            return self.lin(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match=r"sharded 0 of its 2 modules \(8 parameters\)"):
        trainer.fit(Plain(), torch.utils.data.DataLoader(torch.randn(4, 3), batch_size=2))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_split_batch_partitions_rows_and_views():
    batch = make_batch(GLOBAL_TASKS, seed=1)
    halves = [split_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), batch["input_ids"])
    assert torch.equal(torch.cat([h["image_codes"] for h in halves]), batch["image_codes"])
    assert [h["task"] for h in halves] == [GLOBAL_TASKS[:2], GLOBAL_TASKS[2:]]


def test_parallelize_refuses_a_model_twice_and_a_non_synergen_model():
    with pytest.raises(TypeError, match="SynerGenVL-like"):
        parallelize(torch.nn.Linear(2, 2))
