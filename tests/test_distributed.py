"""FSDP2 on CPU (gloo): 2 spawned processes vs 1 process on the same global batch.

The 2-process runs use Lightning's Trainer under `FSDP2Strategy` in each worker (tests/distributed_worker.py);
the 1-process reference is a plain single-device Trainer (no FSDP), so parity checks the whole sharded path
(sharding, reduce-scatter averaging, clipping over sharded gradients, step-scheduled stage switch).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback

from callbacks.stages import StageCallback
from synergen_lightning.distributed import (
    DDPStrategy,
    FSDP2Strategy,
    check_compatible,
    derive_per_rank_batch,
    load_sharded_state_dict,
    parallelize,
    per_rank_batch_size,
)
from tests.distributed_worker import (
    GLOBAL_TASKS,
    LOGIT_IDS,
    ParityData,
    optimizer_state_by_name,
    sample_codes,
    spawn,
    split_batch,
)
from tests.test_system_helpers import make_batch, tiny_model

STAGE_SWITCH = {"max_steps": 4, "switch_at": {2: "stage2"}, "gradient_clip_val": 0.05}


def reference_fit(scenario: dict) -> dict:
    """The same run as a worker's, in this process, single device, no FSDP, on the global batches (resumable:
    `save` writes a single-file checkpoint at the end, `resume` continues one; `record_optimizer_at` keeps the
    optimizer state by name at the start of that step)."""
    pl.seed_everything(0, verbose=False)
    rec = {"loss": [], "grad_norm": []}

    class Rec(Callback):
        def on_train_start(self, trainer, pl_module):
            rec["start_step"] = trainer.global_step
            if scenario.get("record_optimizer_at") == trainer.global_step:  # a resumed run: what was restored
                rec["opt_at"] = optimizer_state_by_name(pl_module, trainer.optimizers[0])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if scenario.get("record_optimizer_at") == trainer.global_step and "opt_at" not in rec:
                rec["opt_at"] = optimizer_state_by_name(pl_module, trainer.optimizers[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec["loss"].append(float(outputs["loss"]))
            rec.setdefault("samples_generation", []).append(float(trainer.callback_metrics["train/samples_generation"]))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            rec["grad_norm"].append(float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in pl_module.parameters()
                                                         if p.grad is not None))))

    model = tiny_model(stage="stage1", lr=3e-3, schedule="constant")  # as the workers
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=scenario["max_steps"], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, gradient_clip_val=scenario.get("gradient_clip_val"),
                         callbacks=[StageCallback("stage1", switch_at=scenario.get("switch_at")), Rec()])
    trainer.fit(model, datamodule=ParityData(scenario["max_steps"]), ckpt_path=scenario.get("resume"))
    if scenario.get("save"):
        trainer.save_checkpoint(scenario["save"])
    rec["global_step"] = trainer.global_step
    rec["state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return rec


def assert_same_optimizer_state(got: dict, ref: dict) -> None:
    """Adam moments, step counts, lr, weight decay and group of every parameter, by name."""
    assert set(got) == set(ref), (set(got) ^ set(ref))
    for name, r in ref.items():
        g = got[name]
        assert (g["group"], g["lr"], g["weight_decay"]) == (r["group"], r["lr"], r["weight_decay"]), name
        assert set(g) == set(r), name
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(g[k], r[k], atol=1e-7, rtol=1e-5, msg=lambda m, n=name, k=k: f"{n}.{k}: {m}")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    scenario = dict(STAGE_SWITCH, save=str(out / "ckpt"), generate=True, decode_at=1)
    return spawn(2, scenario, out / "results", timeout=240), out / "ckpt"


@pytest.mark.distributed
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
    moved = [n for n in full if n.startswith("llm.model.layers.0.attn.") and not torch.equal(full[n], start[n])]
    assert moved, "attention weights did not change after the stage switch under FSDP2"
    assert ranks[0]["frozen_checked"] == ranks[1]["frozen_checked"] > 0


DDP_RUN = {"max_steps": 4, "gradient_clip_val": 0.05, "ddp": {}}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_two_processes_match_one_process(tmp_path):
    """`DDPStrategy` (how `make demo` trains the tiny stages on 2 cores): 2 processes on half the global batch
    each train as 1 process on all of it: per-step loss = mean of the ranks', the pre-clip gradient norm and the
    final weights equal the 1-process run's, both replicas are identical, frozen weights never move."""
    ranks = spawn(2, DDP_RUN, tmp_path, timeout=240)
    ref = reference_fit(DDP_RUN)
    two = [(a + b) / 2 for a, b in zip(ranks[0]["loss"], ranks[1]["loss"])]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(ref["loss"]), atol=1e-5, rtol=0)
    assert abs(ranks[0]["loss"][0] - ranks[1]["loss"][0]) > 1e-3  # the ranks really saw different rows
    for r in ranks:  # the logged counts are the step's over both ranks, as the one process's
        assert r["samples_generation"] == ref["samples_generation"] == [2.0] * len(ref["loss"])
    for r in ranks:  # after DDP's all-reduce each rank holds the global gradient
        torch.testing.assert_close(torch.tensor(r["grad_norm"]), torch.tensor(ref["grad_norm"]), rtol=1e-4, atol=1e-6)
    assert min(ref["grad_norm"]) > DDP_RUN["gradient_clip_val"]  # clipping was active
    for name, ref_w in ref["state_dict"].items():
        assert torch.equal(ranks[0]["state_dict"][name], ranks[1]["state_dict"][name]), name
        torch.testing.assert_close(ranks[0]["state_dict"][name], ref_w, atol=2e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    pl.seed_everything(0, verbose=False)
    start = tiny_model(stage="stage1").state_dict()
    frozen = [n for n, rg in ranks[0]["requires_grad"].items() if not rg]
    assert frozen and all(torch.equal(ranks[0]["state_dict"][n], start[n]) for n in frozen)
    assert ranks[0]["frozen_checked"] > 0


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_ranks_agree_to_skip_a_step_that_one_rank_saw_go_non_finite(tmp_path, strategy):
    """Rank 1's gradient turns inf at step 1 (after DDP's all-reduce / in its own FSDP2 shard): both ranks skip that
    update (one all-reduced flag), count it, and go on in step; the replicas stay identical."""
    run = dict(DDP_RUN if strategy == "ddp" else {"max_steps": 4}, inf_grad_at={"rank": 1, "step": 1})
    ranks = spawn(2, run, tmp_path, timeout=240)
    assert [r["skipped_nonfinite"] for r in ranks] == [1, 1] and [r["global_step"] for r in ranks] == [4, 4]
    if strategy == "ddp":  # only rank 1 saw the inf: the skip was agreed, not seen
        assert ranks[0]["grad_norm"][1] < float("inf") == ranks[1]["grad_norm"][1]
        for name, w in ranks[0]["state_dict"].items():
            assert torch.equal(w, ranks[1]["state_dict"][name]), name


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_refuses_to_change_the_trainable_set_inside_a_run(tmp_path):
    """DDP syncs only what was trainable when it wrapped the model: a scheduled stage switch is refused at the
    start, and a parameter unfrozen behind the strategy's back stops the run at that step, both naming the fix."""
    with pytest.raises(RuntimeError, match=r"DDPStrategy cannot switch stage inside a run \(switch_at steps \[2\]\).*"
                                           r"FSDP2Strategy"):
        spawn(1, dict(DDP_RUN, switch_at={2: "stage2"}), tmp_path / "switch", timeout=240)
    with pytest.raises(RuntimeError, match=r"trainable set changed after DDP wrapped the model \(1 parameters, "
                                           r"e.g. \['llm.model.layers.0.attn.q_proj.weight'\]\)"):
        spawn(1, dict(DDP_RUN, unfreeze_at=1), tmp_path / "unfreeze", timeout=240)


@pytest.mark.slow  # `make test-all`
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_frozen_shard_changed_on_one_rank_stops_every_rank_with_the_guards_error(tmp_path):
    """Under FSDP2 each rank checks its own shards of the frozen weights: rank 1's changes, and rank 0 stops with
    the guard's error too (it would otherwise wait in the next collective for the rank that stopped)."""
    with pytest.raises(RuntimeError, match=r"rank 0 of 2 failed: .*frozen parameter\(s\) changed during training "
                                           r"\(in another rank's shards\)"):
        spawn(2, {"max_steps": 3, "vandal_at": {"rank": 1, "step": 1}}, tmp_path, timeout=240)


@pytest.mark.distributed
def test_sampling_runs_on_the_sharded_model(two_rank_run):
    """Generation on the 2-process sharded model (every rank, as the sample-grid / evaluation callbacks do):
    the same codes as the 1-process model with the trained weights (head.generate and folder.fold_patch read
    parameters outside a forward: they are registered as FSDP forward methods, the LLM trunk is a unit)."""
    ranks, _ = two_rank_run
    model = tiny_model(stage="stage1")
    model.load_state_dict(ranks[0]["state_dict"])
    ref = sample_codes(model)
    assert ref.shape == (2, 4, 4)
    assert torch.equal(ranks[0]["generated"], ref) and torch.equal(ranks[1]["generated"], ref)


@pytest.mark.distributed
def test_decoding_in_eval_mode_gathers_each_unit_once_and_training_goes_on(two_rank_run):
    """`eval_mode` (sample grids, the end-of-stage evaluation) on the sharded model mid-run, after step 1: the same
    codes as decoding that gathers at every step, at most one all-gather per FSDP unit instead of one per unit and
    step, every parameter a shard again after; the run's later losses still equal the 1-process run's
    (test_two_processes_match_one_process_through_a_stage_switch)."""
    ranks, _ = two_rank_run
    for r in ranks:
        d = r["decoded_mid_run"]
        assert torch.equal(d["codes_gathered"], d["codes_per_step"])
        assert d["training_after"] and d["sharded_after"]
        units = r["fsdp_units"]
        # the per-step path gathers the trunk's units at each LLM step and the head's at each code
        assert 0 < d["gathers_gathered"] <= units and d["gathers_per_step"] > 3 * units, (
            d["gathers_gathered"], units, d["gathers_per_step"])


@pytest.mark.distributed
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
        la = model.llm.model.forward_ids(ids)
        lb = ref.llm.model.forward_ids(ids)
    torch.testing.assert_close(la, lb, atol=0, rtol=0)


@pytest.mark.distributed
def test_incompatible_sharded_checkpoint_is_refused(two_rank_run):
    _, ckpt = two_rank_run
    state = load_sharded_state_dict(ckpt)
    bigger = tiny_model(**BIGGER)
    with pytest.raises(ValueError, match=r"56 shape mismatches .*checkpoint \(32,\) vs model \(48,\)"):
        check_compatible(state, bigger, str(ckpt))


BIGGER = dict(llm=dict(vocab_size=64, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=128),
              head=dict(num_layers=2, hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=64))


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_resuming_a_sharded_checkpoint_of_another_model_is_refused(two_rank_run):
    """`fit(ckpt_path=...)` under FSDP2Strategy with a model of other sizes: one error naming the shapes, raised
    before DCP touches the shards (not DCP's size-mismatch traceback deep inside the load)."""
    _, ckpt = two_rank_run
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StageCallback("stage1")])
    try:
        with pytest.raises(ValueError, match=r"does not fit this model: 0 missing keys \[\], 0 unexpected \[\], "
                                             r"56 shape mismatches .*checkpoint \(32,\) vs model \(48,\)"):
            trainer.fit(tiny_model(stage="stage1", **BIGGER), datamodule=ParityData(6), ckpt_path=str(ckpt))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_world_size_must_divide_the_global_batch():
    assert per_rank_batch_size(64, 8) == 8
    with pytest.raises(ValueError, match="global batch 30 is not divisible by the world size 4.*28 or 32"):
        per_rank_batch_size(30, 4)


@pytest.mark.parametrize("strategy_cls", [FSDP2Strategy, DDPStrategy])
def test_strategy_derives_the_per_rank_batch_and_refuses_an_indivisible_one(strategy_cls):
    """`global_batch_size=...` at world size 4, for both strategies: the datamodule's per-task batch becomes
    global / 4; "datamodule" splits the recipe's own batch; a task whose global batch 4 does not divide is refused
    with the task, both numbers and the nearest fits."""
    from types import SimpleNamespace

    class WorldOfFour(strategy_cls):
        world_size = 4

    def derive(global_batch, dm_batch):
        dm = SimpleNamespace(batch_size=dm_batch)
        strategy = WorldOfFour(global_batch_size=global_batch)
        strategy._lightning_module = SimpleNamespace(trainer=SimpleNamespace(datamodule=dm))
        derive_per_rank_batch(strategy, strategy.global_batch_size)
        return dm.batch_size

    assert derive({"generation": 64, "understanding": 32}, {"generation": 1, "understanding": 1, "text": 3}) == \
        {"generation": 16, "understanding": 8, "text": 3}
    assert derive(64, 1) == 16
    assert derive(None, {"generation": 3}) == {"generation": 3}  # unset: the batch is per rank
    assert derive("datamodule", {"generation": 16, "understanding": 48, "text": 8}) == \
        {"generation": 4, "understanding": 12, "text": 2}
    assert derive("datamodule", 32) == 8
    with pytest.raises(ValueError, match=r"global_batch_size\['understanding'\] 30 is not divisible by the world "
                                         r"size 4 .*28 or 32"):
        derive({"generation": 64, "understanding": 30}, {"generation": 1, "understanding": 1})
    with pytest.raises(ValueError, match=r"global_batch_size\['text'\] 6 is not divisible by the world size 4"):
        derive("datamodule", {"generation": 16, "text": 6})
    with pytest.raises(ValueError, match=r"per task \{'generation': 1\}: give global_batch_size per task"):
        derive(64, {"generation": 1})
    with pytest.raises(ValueError, match=r"global_batch_size='recipe'.*'datamodule'"):
        derive("recipe", 32)


def test_micro_batches_split_the_per_rank_batch_under_the_token_budget():
    from synergen_lightning.distributed import micro_batches

    # the fewest equal micro-batches (a divisor of every task's rows) whose rows x max_seq_len fit the budget
    assert micro_batches({"generation": 27, "understanding": 27}, 4096, 32768) == ({"generation": 3, "understanding": 3}, 9)
    assert micro_batches({"generation": 55, "understanding": 55}, 16384, 32768) == ({"generation": 1, "understanding": 1}, 55)
    assert micro_batches(12, 100, 10**6) == (12, 1)  # fits at once: no accumulation
    assert micro_batches(12, 100, 500) == (4, 3)
    with pytest.raises(ValueError, match="share only the divisors of 1"):
        micro_batches({"generation": 27, "understanding": 20}, 4096, 32768)
    with pytest.raises(ValueError, match="cannot hold one row of each of the 2 tasks"):
        micro_batches({"generation": 2, "understanding": 2}, 4096, 4096)


@pytest.mark.parametrize("strategy_cls", [FSDP2Strategy, DDPStrategy])
def test_strategy_derives_micro_batch_and_accumulation(strategy_cls):
    from types import SimpleNamespace

    class WorldOfFour(strategy_cls):
        world_size = 4

    epochs = []

    def derive(global_batch, tokens, accumulate=1):
        dm = SimpleNamespace(batch_size={"generation": 1, "understanding": 1},
                             hparams=SimpleNamespace(max_seq_len=1024, steps_per_epoch=100))
        trainer = SimpleNamespace(datamodule=dm, accumulate_grad_batches=accumulate)
        strategy = WorldOfFour(global_batch_size=global_batch, tokens_per_gpu=tokens)
        strategy._lightning_module = SimpleNamespace(trainer=trainer)
        derive_per_rank_batch(strategy, strategy.global_batch_size, strategy.tokens_per_gpu)
        epochs.append(dm.hparams.steps_per_epoch)
        return dm.batch_size, trainer.accumulate_grad_batches

    # 96 rows per task over 4 ranks = 24 + 24 rows of up to 1,024 tokens; 8,192 tokens hold 8 rows: 6 micro-batches
    assert derive({"generation": 96, "understanding": 96}, 8192) == ({"generation": 4, "understanding": 4}, 6)
    assert epochs[-1] == 96  # an epoch of whole optimizer steps: no short step where an epoch ends
    assert derive({"generation": 96, "understanding": 96}, None) == ({"generation": 24, "understanding": 24}, 1)
    assert epochs[-1] == 100
    with pytest.raises(ValueError, match="both set the accumulation"):
        derive({"generation": 96, "understanding": 96}, 8192, accumulate=4)
    with pytest.raises(ValueError, match="set global_batch_size too"):
        derive(None, 8192)


def test_trainer_accumulates_the_derived_micro_batches():
    """In a real fit: 12 rows per step under a budget of 16 tokens at max_seq_len 4 -> micro-batches of 4 rows, 3 of
    them per optimizer step; validation every 2 optimizer steps stays every 2 optimizer steps (6 micro-batches)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Data(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.batch_size, self.max_seq_len = 1, 4

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(64, 32), batch_size=self.batch_size)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(2, 32), batch_size=2)

    class Model(BoringModel):
        def __init__(self):
            super().__init__()
            self.rows, self.steps, self.validated_at = [], 0, []

        def on_validation_start(self):
            self.validated_at.append(self.steps)

        def training_step(self, batch, batch_idx):
            self.rows.append(batch.shape[0])
            return super().training_step(batch, batch_idx)

        def on_before_optimizer_step(self, optimizer):
            self.steps += 1

    model = Model()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(global_batch_size=12, tokens_per_gpu=16),
                         max_steps=4, val_check_interval=2, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(model, datamodule=Data())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert (trainer.accumulate_grad_batches, model.rows, model.steps) == (3, [4] * 12, 4)
    assert model.validated_at == [2, 4] and trainer.val_check_interval == 6


def test_a_sharded_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Each rank writes its shard beside the checkpoint and rank 0 moves the whole into place: a save that stops
    half-way (preemption) leaves the previous step's checkpoint as it was, not its shards mixed with the new ones."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from synergen_lightning.distributed import FSDP2Strategy

    def dcp_save(self, checkpoint, filepath, storage_options=None):  # as Lightning's: shards, then meta.pt
        path = Path(filepath)
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_text(str(checkpoint["step"]))
        if checkpoint.get("preempted"):
            raise KeyboardInterrupt
        (path / "meta.pt").write_text(str(checkpoint["step"]))

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", dcp_save)
    strategy, last = FSDP2Strategy(), tmp_path / "last.ckpt"
    strategy.save_checkpoint({"step": 2}, last)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"step": 4, "preempted": True}, last)
    assert (last / "__0_0.distcp").read_text() == (last / "meta.pt").read_text() == "2"
    strategy.save_checkpoint({"step": 6}, last)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and (last / "meta.pt").read_text() == "6"


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


@pytest.mark.distributed
def test_export_writes_one_consolidated_safetensors(two_rank_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from synergen_lightning.cli import main as synergen
    from synergen_lightning.system import load_synergen

    ranks, ckpt = two_rank_run
    assert synergen(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert files == ["config.json", "export.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(tensors) == set(ranks[0]["state_dict"])
    for k, v in ranks[0]["state_dict"].items():
        assert torch.equal(tensors[k], v), k
    model = load_synergen(tmp_path / "export")
    ref = tiny_model(stage="stage1")
    ref.load_state_dict(ranks[0]["state_dict"])
    batch = make_batch(GLOBAL_TASKS, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["loss"], ref(batch)["loss"], atol=0, rtol=0)
    capsys.readouterr()
    assert synergen(["export", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "synergen export: error:" in (err := capsys.readouterr().err) and "does not exist" in err


@pytest.mark.distributed
def test_load_synergen_reads_a_sharded_directory_an_export_and_a_file(two_rank_run, tmp_path):
    """`system.load_synergen`: the same weights (same logits) from the 2-process sharded directory, its export, and a
    single-file .ckpt of the 1-process reference model."""
    from synergen_lightning.export import export
    from synergen_lightning.system import load_synergen

    ranks, ckpt = two_rank_run
    ref = tiny_model(stage="stage1")
    ref.load_state_dict(ranks[0]["state_dict"])
    export(ckpt, tmp_path / "export")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(ref)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    with torch.no_grad():
        expected = ref.llm.model.forward_ids(LOGIT_IDS)
        for source in (ckpt, tmp_path / "export", tmp_path / "one.ckpt"):
            model = load_synergen(source)
            assert not model.training
            torch.testing.assert_close(model.llm.model.forward_ids(LOGIT_IDS), expected, atol=0, rtol=0, msg=str(source))
    with pytest.raises(FileNotFoundError, match="neither a .ckpt file, a sharded checkpoint directory"):
        load_synergen(tmp_path)


# ---------------------------------------------------------------------------------------------- slow
RESUMED = dict(STAGE_SWITCH, max_steps=6)


@pytest.fixture(scope="module")
def uninterrupted():
    """The 1-process reference of 6 steps (switch to stage 2 at step 2), with its optimizer state at step 4."""
    return reference_fit(dict(RESUMED, record_optimizer_at=4))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_a_two_process_checkpoint_at_world_size(world, two_rank_run, uninterrupted, tmp_path):
    """The 2-process checkpoint (step 4, after the switch to stage 2) resumes at world size 1 and 2 and goes on
    exactly as an uninterrupted 1-process run of 6 steps: the restored optimizer state (Adam moments and steps,
    lr, groups) equals the uninterrupted run's at step 4, and both resumed steps' losses match (the second one
    checks the first resumed optimizer step). The data position comes back from the checkpoint too."""
    ref = uninterrupted
    saved, ckpt = two_rank_run
    ranks = spawn(world, dict(RESUMED, resume=str(ckpt), record_optimizer=True, record_logits=True), tmp_path / "res",
                  timeout=300)
    assert ranks[0]["global_step"] == 6
    # the restored (re-sharded) model: the same logits as the saved 2-process model's weights, on every rank
    model = tiny_model(stage="stage1")
    model.load_state_dict(saved[0]["state_dict"])
    with torch.no_grad():
        expected = model.llm.model.forward_ids(LOGIT_IDS)
    for r in ranks:
        torch.testing.assert_close(r["start_logits"], expected, atol=1e-6, rtol=0)
    assert [b[2] for b in ranks[0]["batches"]] == [int(split_batch(b, 0, world)["input_ids"].sum())
                                                   for b in ParityData(6).batches[4:]], "resumed on the wrong batches"
    resumed = [sum(r["loss"][i] for r in ranks) / world for i in range(2)]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(ref["loss"][4:6]), atol=1e-5, rtol=0)
    # optimizer state came back into the right groups (Adam steps 2 for stage-2 params, 4 for stage-1 params)
    assert ranks[0]["start_opt"]["steps"] == [2.0, 4.0]
    assert [g[0] for g in ranks[0]["start_opt"]["groups"]] == ["stage1/decay", "stage1/no_decay", "stage2/decay"]
    assert_same_optimizer_state(ranks[0]["start_opt"]["by_name"], ref["opt_at"])
    assert all(not rg for n, rg in ranks[0]["requires_grad"].items() if n.startswith("llm.model.embed_tokens"))
    assert all(rg for n, rg in ranks[0]["requires_grad"].items() if ".attn." in n)
    for name, ref_w in ref["state_dict"].items():
        torch.testing.assert_close(ranks[0]["state_dict"][name], ref_w, atol=2e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_process_resume_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    """The same without FSDP: a 1-process run saved at step 4 (a single-file .ckpt) resumes to step 6 as if
    never interrupted (stage history, optimizer groups and state, LR schedule, data position)."""
    ckpt = tmp_path / "four.ckpt"
    first = reference_fit(dict(STAGE_SWITCH, save=str(ckpt)))
    assert first["loss"] == uninterrupted["loss"][:4]
    resumed = reference_fit(dict(RESUMED, resume=str(ckpt), record_optimizer_at=4))
    assert resumed["start_step"] == 4 and resumed["global_step"] == 6
    assert_same_optimizer_state(resumed["opt_at"], uninterrupted["opt_at"])
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(uninterrupted["loss"][4:6]), atol=1e-6, rtol=0)
    for name, ref_w in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], ref_w, atol=1e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _uneven(tasks_per_rank: list[list[str]], steps: int = 2) -> list[list[dict]]:
    return [[make_batch(t, seed=10 * r + s) for s in range(steps)] for r, t in enumerate(tasks_per_rank)]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tasks", [
    [["text", "text"], ["generation", "understanding"]],  # rank 0: no image token at all
    [["generation", "generation"], ["understanding", "text"]],  # rank 0: no text to supervise
], ids=["rank0-text-only", "rank0-no-text-labels"])
def test_uneven_batches_do_not_hang(tasks, tmp_path):
    ranks = spawn(2, {"max_steps": 2, "batches": _uneven(tasks), "switch_at": {1: "stage2"}}, tmp_path, timeout=240)
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert all(len(r["loss"]) == 2 for r in ranks)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bf16_params_and_activation_checkpointing_on_two_cpu_processes(tmp_path):
    """bf16 MixedPrecisionPolicy (fp32 reduce) on gloo, with activation checkpointing per block: runs, the loss
    stays within bf16 error of the fp32 run, and frozen parameters stay unchanged (fp32 master weights)."""
    fp32 = spawn(2, {"max_steps": 2}, tmp_path / "fp32", timeout=240)
    bf16 = spawn(2, {"max_steps": 2, "strategy": {"param_dtype": "bfloat16", "activation_checkpointing": True}},
                 tmp_path / "bf16", timeout=240)
    for a, b in zip(fp32, bf16):
        torch.testing.assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), atol=5e-2, rtol=1e-2)
        assert b["loss"] != a["loss"]  # bf16 compute really happened
    assert all(v.dtype == torch.float32 for v in bf16[0]["state_dict"].values())
    assert bf16[0]["frozen_checked"] > 0


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_activation_checkpointing_is_exact_in_fp32(tmp_path):
    base = spawn(2, {"max_steps": 2}, tmp_path / "a", timeout=240)
    ac = spawn(2, {"max_steps": 2, "strategy": {"activation_checkpointing": True}}, tmp_path / "b", timeout=240)
    for a, b in zip(base, ac):
        torch.testing.assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compile_per_block_matches_eager(tmp_path):
    """`FSDP2Strategy(compile=...)`: every decoder block compiled (nn.Module.compile: parameter names unchanged)
    under FSDP2 at world size 1 gives the eager losses. aot_eager (dynamo + AOT autograd, no codegen) keeps it at
    ~1-2 min on 2 loaded cores; inductor measured in docs/distributed.md (164 s first step on this CPU)."""
    eager = spawn(1, {"max_steps": 3}, tmp_path / "eager", timeout=240)
    compiled = spawn(1, {"max_steps": 3, "strategy": {"compile": "aot_eager"}}, tmp_path / "compiled", timeout=540)
    torch.testing.assert_close(torch.tensor(compiled[0]["loss"]), torch.tensor(eager[0]["loss"]), atol=1e-5, rtol=0)
    assert compiled[0]["step_s"][0] > 5 * compiled[0]["step_s"][-1]  # the first step really compiled
    assert set(compiled[0]["state_dict"]) == set(eager[0]["state_dict"])  # no `_orig_mod.` in checkpoint keys


@pytest.fixture
def one_rank_group():
    """A world-size-1 gloo process group in this process (an in-process store: no port), for FSDP2 on one rank."""
    import torch._dynamo
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()  # no compiled block outlives the test


@pytest.mark.parametrize("checkpointing, bf16", [(True, False), (False, False), (True, True)])
def test_compiled_blocks_trace_whole_without_graph_breaks(one_rank_group, checkpointing, bf16):
    """Every block `parallelize` compiles under FSDP2 (dynamic in the sequence length, checkpointed or not) traces as
    whole graphs through training steps of generation, understanding and text rows at two lengths (in fp32, and as
    the 2b recipes run: bf16 parameters under bf16 autocast). A graph break still trains, so no loss comparison sees
    it, but runs the block eagerly in part or in whole: under FSDP2 a block's int attributes are symbols, and a
    symbolic bool handed to SDPA's `enable_gqa` makes Dynamo give up the whole block. Dynamo's eager backend: the
    tracing alone, in seconds."""
    from gpu_check import dynamo_counts, fresh_dynamo  # make gpu-check counts its compiled sections the same way
    from synergen_lightning.data.batch import add_indices

    fresh_dynamo()
    torch.manual_seed(0)
    model = tiny_model()
    assert model.hparams.llm["num_heads"] != model.hparams.llm["num_kv_heads"]  # grouped KV heads, as in the 2b
    parallelize(model, None, param_dtype="bfloat16" if bf16 else None, activation_checkpointing=checkpointing,
                compile="eager", check_states=False)
    for tasks in (["generation", "understanding", "text"], ["understanding", "generation"]):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(add_indices(make_batch(tasks, seed=len(tasks))))["loss"]
        loss.backward()
    counts = dynamo_counts()
    assert counts["graphs"] > 0  # the blocks were compiled
    assert counts["graph_breaks"] == 0, counts["break_reasons"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_make_stage_flags_parse_for_both_strategies(strategy, capsys):
    """The exact `synergen fit` line `make stage1 DEVICES=2 STRATEGY=...` runs parses (`global_batch_size:
    datamodule` was refused by FSDP2Strategy's int/dict type), with the strategy and its global batch in place."""
    import shlex
    import subprocess
    from pathlib import Path

    import yaml

    from synergen_lightning.cli import lightning_cli

    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-B", "stage1", "DEVICES=2", f"STRATEGY={strategy}"], cwd=root,
                         capture_output=True, text=True).stdout
    line = next(ln for ln in dry.splitlines() if "fit --config recipes/tiny/stage1.yaml" in ln)
    args = shlex.split(line)
    args = args[args.index("fit"):]
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(args + ["--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    cls = {"ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}[strategy]
    assert str(printed["devices"]) == "2" and printed["strategy"]["class_path"] == f"synergen_lightning.distributed.{cls}"
    assert printed["strategy"]["init_args"]["global_batch_size"] == "datamodule"


# how the 2b recipes run: bf16 autocast (precision bf16-mixed), bf16 FSDP2 parameters with fp32 reduce and fp32
# master weights, activation checkpointing per block, and gradient clipping (here below the gradient norm, so it acts)
RECIPE_PRECISION = {"max_steps": 3, "precision": "bf16-mixed", "gradient_clip_val": 0.05,
                    "strategy": {"param_dtype": "bfloat16", "reduce_dtype": "float32", "activation_checkpointing": True}}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_recipe_precision_and_clipping_on_two_cpu_processes(tmp_path):
    """The recipes' precision stack together on 2 processes: losses, pre-clip gradient norms and final weights
    follow the fp32 one-process run within bf16 error, clipping acts, and the weights stay fp32."""
    ranks = spawn(2, RECIPE_PRECISION, tmp_path, timeout=240)
    ref = reference_fit({k: v for k, v in RECIPE_PRECISION.items() if k in ("max_steps", "gradient_clip_val")})
    two = [(a + b) / 2 for a, b in zip(ranks[0]["loss"], ranks[1]["loss"])]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(ref["loss"]), atol=3e-2, rtol=1e-2)
    assert two != ref["loss"]  # bf16 compute really happened
    torch.testing.assert_close(torch.tensor(ranks[0]["grad_norm"]), torch.tensor(ref["grad_norm"]), rtol=5e-2, atol=1e-3)
    assert min(ref["grad_norm"]) > RECIPE_PRECISION["gradient_clip_val"]
    full = ranks[0]["state_dict"]
    assert all(v.dtype == torch.float32 for v in full.values())
    # the update of every trained tensor follows the fp32 run's (Adam turns bf16 rounding of tiny gradients into
    # whole-lr steps of either sign for a few elements, so compare the updates as a whole, not element by element)
    pl.seed_everything(0, verbose=False)
    start = tiny_model(stage="stage1").state_dict()
    trained = [n for n in start if not torch.equal(ref["state_dict"][n], start[n])]
    assert trained
    for n in trained:
        ours, theirs = full[n] - start[n], ref["state_dict"][n] - start[n]
        assert (ours - theirs).norm() < 0.25 * theirs.norm(), n
        assert not torch.equal(ours, theirs)  # the bf16 run is not a copy of the fp32 one


def test_2b_recipes_clip_gradients():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    for stage in ("stage1", "stage2", "sft"):
        trainer = yaml.safe_load((root / f"recipes/synergen_vl_2b/{stage}.yaml").read_text())["trainer"]
        assert trainer["gradient_clip_val"] == 1.0 and trainer["precision"] == "bf16-mixed", stage


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_init_from_a_sharded_checkpoint_loads_after_sharding(two_rank_run, tmp_path, monkeypatch):
    """stage2 from the 2-process run's sharded checkpoint under FSDP2Strategy: the model starts with its weights
    (text logits before the first step equal the checkpoint model's), read shard by shard after `parallelize`."""
    _, ckpt = two_rank_run
    ranks = spawn(2, {"max_steps": 1, "stage": "stage2", "init_from": str(ckpt), "record_logits": True}, tmp_path,
                  timeout=240)
    model = tiny_model(stage="stage2")
    model.load_state_dict(load_sharded_state_dict(ckpt))
    with torch.no_grad():
        want = model.llm.model.forward_ids(LOGIT_IDS)
    for r in ranks:
        torch.testing.assert_close(r["start_logits"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_hsdp_two_replicas_match_one_process(tmp_path):
    """HSDP over 2 processes with shard_size 1 (2 replicas of 1 shard each: the layout of 2 nodes, with the
    gradient all-reduce across replicas instead of a reduce-scatter): the 1-process losses and gradient norms,
    with clipping."""
    scenario = {"max_steps": 3, "gradient_clip_val": 0.05, "strategy": {"shard_size": 1}, "save": str(tmp_path / "ckpt")}
    ranks = spawn(2, scenario, tmp_path / "results", timeout=240)
    ref = reference_fit({"max_steps": 3, "gradient_clip_val": 0.05})
    assert ranks[0]["mesh"] == (2, 1)
    two = [(a + b) / 2 for a, b in zip(ranks[0]["loss"], ranks[1]["loss"])]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(ref["loss"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(ranks[0]["grad_norm"]), torch.tensor(ref["grad_norm"]), rtol=1e-4, atol=1e-6)
    for name, ref_w in ref["state_dict"].items():
        torch.testing.assert_close(ranks[0]["state_dict"][name], ref_w, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    saved = load_sharded_state_dict(tmp_path / "ckpt")  # the HSDP checkpoint reads back as the trained model
    assert all(torch.equal(saved[n], v) for n, v in ranks[0]["state_dict"].items())


def test_hsdp_mesh_needs_a_divisor_of_the_world_size():
    from synergen_lightning.distributed import hsdp_mesh

    assert hsdp_mesh("cpu", 8, None) is None and hsdp_mesh("cpu", 8, 8) is None  # one group of every rank
    assert hsdp_mesh("cpu", 1, 8) is None  # a one-GPU try of a recipe that shards by node
    with pytest.raises(ValueError, match="shard_size 3 does not divide the world size 8"):
        hsdp_mesh("cpu", 8, 3)


def test_callbacks_read_the_shards_after_a_no_grad_forward_left_units_whole(one_rank_group):
    """With resharding after forward off (`reshard_after_forward: false`, or decoding in `gathered_for_decoding`), a
    no-grad forward such as a validation leaves FSDP2 units whole: `named_parameters()` then yields the gathered bf16
    copies. The frozen-parameter guard checksums the fp32 shards all the same (it saw a change that was none, and a
    stage switch re-flagged and added to the optimizer the transient copies): `distributed.resharded` first."""
    from torch.distributed.tensor import DTensor

    from callbacks.stages import FrozenParameterGuard
    from synergen_lightning.data.batch import add_indices
    from synergen_lightning.stages import apply_stage

    torch.manual_seed(0)
    model = tiny_model()
    apply_stage(model, "stage1")
    parallelize(model, None, param_dtype="bfloat16", reshard_after_forward=False, check_states=False)
    guard = FrozenParameterGuard()
    guard.on_train_start(None, model)
    assert guard._sums and all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(add_indices(make_batch(["generation", "understanding"], seed=1)))
    assert not all(isinstance(p, DTensor) for p in model.parameters())  # units left whole, in bf16
    assert guard.verify(model) == len(guard._sums)  # nothing changed, and nothing is reported
    assert all(isinstance(p, DTensor) for p in model.parameters())


def test_hsdp_groups_take_the_strategys_collective_timeout(monkeypatch):
    """torch creates a device mesh's groups with the backend's default timeout (NCCL: 10 minutes), whatever the world
    group was given: both HSDP dimensions get the strategy's `timeout_minutes`, so a rank slower than 10 minutes
    (a slow shard, a resume re-reading shard prefixes) does not abort the job. One rank of 8 over a fake group."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from synergen_lightning.distributed import FSDP2Strategy

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    set_to = []
    monkeypatch.setattr(dist, "set_timeout", lambda timeout, group: set_to.append((timeout, group.size())),
                        raising=False)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        mesh = FSDP2Strategy(shard_size=4, timeout_minutes=45).shard_mesh(init_device_mesh("cpu", (8,)))
        assert mesh.shape == (2, 4) and mesh.mesh_dim_names == ("replicate", "shard")
        assert set_to == [(timedelta(minutes=45), 2), (timedelta(minutes=45), 4)]
    finally:
        dist.destroy_process_group()
