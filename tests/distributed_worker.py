"""Multi-process runs for tests/test_distributed*.py: CPU (gloo) workers started by `start_ranks`, each a Lightning
Trainer under `FSDP2Strategy` (`DDPStrategy` when the scenario has "ddp"), the rendezvous on a free localhost port.
Every worker writes what it saw to `out/rank{r}.pt`; the parent compares ranks and world sizes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch

from tests.test_system_helpers import make_batch, tiny_model

# the global batch of every parity run: 4 rows, equal supervised-token counts per half (so the mean of
# the per-rank token-mean losses equals the global token-mean loss)
GLOBAL_TASKS = ["generation", "understanding", "generation", "understanding"]


def split_batch(batch: dict, rank: int, world: int) -> dict:
    """Rows [rank*B/world, (rank+1)*B/world) of a batch with one view per image row."""
    b = batch["input_ids"].shape[0]
    lo, hi = rank * b // world, (rank + 1) * b // world
    has_view = [t in ("generation", "understanding") for t in batch["task"]]
    v_lo, v_hi = sum(has_view[:lo]), sum(has_view[:hi])
    out = {k: (v[lo:hi] if k not in ("image_codes", "image_loss_mask") else v[v_lo:v_hi]) for k, v in batch.items()}
    return out


def global_batches(n: int, tasks=GLOBAL_TASKS) -> list[dict]:
    return [make_batch(list(tasks), seed=100 + i) for i in range(n)]


class _Positioned(torch.utils.data.IterableDataset):
    """This rank's slices of the global batches, from the DataModule's position at iteration time (after a
    checkpoint restore), each tagged with its index so the DataModule commits what the model consumed."""

    def __init__(self, datamodule: "ParityData"):
        self.dm = datamodule

    def __iter__(self):
        for i in range(self.dm.position, len(self.dm.batches)):
            yield dict(self.dm.batches[i], _index=i)


class _PositionedLoader(torch.utils.data.DataLoader):
    # the position lives in the DataModule's state_dict; these tell Lightning the loader is resumable
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class ParityData(pl.LightningDataModule):
    """The parity runs' data as a resumable stream, the way `datamodules.mixed.MixedDataModule` resumes: the
    position (global batches the model consumed) is committed in `on_before_batch_transfer` (after Lightning's
    prefetch) and rides in the checkpoint through `state_dict`; a resumed run, at any world size, continues at
    the next global batch. (A plain list loader restarted by hand skips the wrong number of batches: Lightning's
    restored epoch bookkeeping repeats a batch, which was the post-resume loss mismatch.)"""

    def __init__(self, max_steps: int, rank: int = 0, world: int = 1, batches: list[dict] | None = None):
        super().__init__()
        self.batches = batches if batches is not None else [split_batch(b, rank, world) for b in global_batches(max_steps)]
        self.position = 0

    def train_dataloader(self):
        return _PositionedLoader(_Positioned(self), batch_size=None, collate_fn=_as_is)

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        self.position = batch.pop("_index") + 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict) -> None:
        self.position = int(state_dict["position"])


def _as_is(batch):
    return batch


def start_ranks(fn, args: tuple, nprocs: int, join: bool = True):
    """`torch.multiprocessing.start_processes`, each rank forked from a fork server that imported torch, Lightning
    and the toolkit once (the server starts clean: no threads, no process group), where a spawned rank re-imports
    them (5-10 s a process on 2 cores). Ranks get their rendezvous through `args`, not the parent's environment."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(["tests.distributed_worker"])
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="forkserver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, scenario: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "GROUP_RANK": "0"})
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[k]  # Lightning would pick the SLURM environment
    torch.set_num_threads(1)
    try:
        result = run_fit(rank, world, scenario)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if "error" in result:
        raise SystemExit(1)


LOGIT_IDS = torch.tensor([[1, 6, 11, 12, 13, 14, 7, 2], [1, 20, 30, 40, 50, 60, 2, 0]])
GEN_PROMPTS, GEN_UNCOND = [[1, 6, 11, 12, 13, 7, 6, 3], [1, 6, 20, 21, 7, 6, 3]], [1, 6, 5, 7, 6, 3]


def sample_codes(model) -> torch.Tensor:
    """KV-cached CFG sampling of 2 prompts with a fixed seed: code grids (runs the head's `generate` and the
    folder's `fold_patch`, which read their parameters outside a forward)."""
    from synergen_lightning.inference import generate_codes

    model.eval()
    g = torch.Generator().manual_seed(1234)
    return generate_codes(model, GEN_PROMPTS, GEN_UNCOND, cfg_scale=3.0, temperature=1.0, generator=g)


@contextlib.contextmanager
def counted_all_gathers():
    """[n]: the all-gathers FSDP2 issues inside the block (torch 2.14 calls `all_gather_single`, 2.11
    `all_gather_into_tensor`)."""
    import torch.distributed as dist

    n, saved = [0], {}
    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            saved[name] = fn = getattr(dist, name)

            def counting(*args, _fn=fn, **kwargs):
                n[0] += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, counting)
    try:
        yield n
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def decode_both_ways(model) -> dict:
    """`sample_codes` on a sharded model outside `eval_mode` (a gather per unit and decoding step) and inside it (each
    unit gathered once for the block), with the all-gathers each took, and whether every parameter is a shard after."""
    from torch.distributed.tensor import DTensor

    from synergen_lightning.eval.suites import eval_mode

    was_training = model.training
    with counted_all_gathers() as per_step:
        codes_per_step = sample_codes(model)
    model.train(was_training)
    with counted_all_gathers() as gathered, eval_mode(model):
        codes_gathered = sample_codes(model)
    return {"codes_per_step": codes_per_step, "codes_gathered": codes_gathered, "gathers_per_step": per_step[0],
            "gathers_gathered": gathered[0], "training_after": model.training,
            "sharded_after": all(isinstance(p, DTensor) for p in model.parameters())}


def optimizer_state_by_name(model, optimizer) -> dict[str, dict]:
    """{parameter name: {exp_avg, exp_avg_sq, step (full tensors), lr, weight_decay, group}} of an optimizer,
    sharded (DTensor) or not, so runs at different world sizes compare by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            st = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().float()
                  for k, v in optimizer.state.get(p, {}).items()}
            out[names[id(p)]] = dict(st, lr=float(g["lr"]), weight_decay=float(g["weight_decay"]), group=g.get("name"))
    return out


def run_fit(rank: int, world: int, scenario: dict) -> dict:
    from lightning.pytorch import Callback
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from callbacks.stages import FrozenParameterGuard, StageCallback
    from synergen_lightning.distributed import DDPStrategy, FSDP2Strategy

    pl.seed_everything(scenario.get("seed", 0) + (rank if scenario.get("seed_per_rank") else 0), verbose=False)
    record: dict = {"loss": [], "requires_grad": {}, "grad_norm": []}

    class Rec(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == scenario.get("decode_at"):  # mid-run, as a sample grid: training goes on after
                record["decoded_mid_run"] = decode_both_ways(pl_module)
            record.setdefault("step_s", []).append(time.perf_counter() - self._t0)  # the first one includes compile
            record["loss"].append(float(outputs["loss"]))
            logged = float(trainer.callback_metrics["train/samples_generation"])
            record.setdefault("samples_generation", []).append(logged)
            # which batch each step trained on (a resumed run must continue the data, not repeat it)
            record.setdefault("batches", []).append((trainer.current_epoch, batch_idx, int(batch["input_ids"].sum())))

        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            record["start_opt"] = {"groups": [(g.get("name"), len(g["params"]), g["lr"]) for g in opt.param_groups],
                                   "states": len(opt.state),
                                   "steps": sorted({float(st["step"]) for st in opt.state.values() if "step" in st})}
            if scenario.get("record_logits"):  # the restored model's text logits, before any resumed step
                with torch.no_grad():
                    record["start_logits"] = pl_module.llm.model.forward_ids(LOGIT_IDS).detach().clone()
            if scenario.get("record_optimizer"):  # full (unsharded) Adam state and lr per parameter name
                record["start_opt"]["by_name"] = optimizer_state_by_name(pl_module, opt)
                record["start_opt"]["scheduler"] = trainer.lr_scheduler_configs[0].scheduler.state_dict()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            sq = torch.zeros(())
            for p in pl_module.parameters():
                if p.grad is not None:
                    g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    sq += g.float().pow(2).sum()
            if "ddp" not in scenario:  # FSDP: each rank holds a shard of the gradient; DDP: the whole, averaged
                torch.distributed.all_reduce(sq)
            if scenario.get("strategy", {}).get("shard_size"):  # HSDP: replicas hold the same shards
                from synergen_lightning.distributed import total_grad_norm

                sq = total_grad_norm(pl_module.parameters()) ** 2
                record.setdefault("mesh", [tuple(p.device_mesh.shape) for p in pl_module.parameters()][0])
            record["grad_norm"].append(float(sq.sqrt()))
            record.setdefault("n_opt_params", []).append(sum(len(g["params"]) for g in optimizer.param_groups))

    class InfGradient(Callback):  # one rank's gradient turns inf after the backward: every rank must skip the step
        def on_after_backward(self, trainer, pl_module):
            at = scenario.get("inf_grad_at") or {}
            if at and rank == at["rank"] and trainer.global_step == at["step"]:
                g = next(p for p in pl_module.parameters() if p.grad is not None).grad
                (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = float("inf")

    class FrozenShardVandal(Callback):  # one rank's shard of a frozen weight changes: every rank must stop
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            at = scenario.get("vandal_at") or {}
            if at and rank == at["rank"] and trainer.global_step == at["step"]:
                w = pl_module.llm.model.layers[0].attn.q_proj.weight
                with torch.no_grad():
                    (w.to_local() if hasattr(w, "to_local") else w).view(-1)[0] += 1.0

    class UnfreezeBehindTheStrategy(Callback):  # what a hand-written callback might do mid-run
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == scenario.get("unfreeze_at"):
                pl_module.llm.model.layers[0].attn.q_proj.weight.requires_grad_(True)

    # constant LR: a cosine schedule depends on max_steps, which a resumed run changes
    model = tiny_model(stage=scenario.get("stage", "stage1"), lr=scenario.get("lr", 3e-3), schedule="constant",
                       init_from=scenario.get("init_from"))
    guard = FrozenParameterGuard(every_n_steps=1)
    callbacks = [StageCallback(scenario.get("stage", "stage1"), switch_at=scenario.get("switch_at")), guard, Rec(),
                 UnfreezeBehindTheStrategy(), InfGradient(), FrozenShardVandal()]
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, num_nodes=1, callbacks=callbacks,
        strategy=DDPStrategy(**scenario["ddp"]) if "ddp" in scenario else FSDP2Strategy(**scenario.get("strategy", {})),
        max_steps=scenario["max_steps"], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        gradient_clip_val=scenario.get("gradient_clip_val"), deterministic=False,
        precision=scenario.get("precision", "32-true"),
    )
    # uneven per-rank batches given explicitly, or this rank's rows of the global batches
    data = ParityData(scenario["max_steps"], rank, world, scenario["batches"][rank] if "batches" in scenario else None)
    t0 = time.time()
    trainer.fit(model, datamodule=data, ckpt_path=scenario.get("resume"))
    record["fit_s"] = time.time() - t0
    record["frozen_checked"] = len(guard._sums)
    record["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    record["global_step"] = trainer.global_step
    from torch.distributed.fsdp import FSDPModule

    record["fsdp_units"] = sum(isinstance(m, FSDPModule) for m in model.modules())
    record["skipped_nonfinite"] = model.nonfinite.skipped
    if scenario.get("save"):
        trainer.save_checkpoint(scenario["save"])
    if scenario.get("generate"):  # sampling on the sharded model, every rank (as SampleGridLogger does)
        record["generated"] = sample_codes(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if "ddp" in scenario:  # every rank's replica, to show they agree (full + cpu_offload fills rank 0's only)
        record["state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    elif rank == 0:
        record["state_dict"] = {k: v.clone() for k, v in full.items()}
    return record


def spawn(world: int, scenario: dict, out: Path, timeout: float = 120.0) -> list[dict]:
    """Run `world` workers; kill them and fail after `timeout` seconds (a hang is a failure, not a stuck CI)."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    ctx = start_ranks(_worker, (world, free_port(), str(out), scenario), world, join=False)
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.time()))):
            if time.time() > deadline:
                raise TimeoutError(f"{world}-process FSDP run did not finish in {timeout:.0f} s (a collective hang?)")
    except mp.ProcessRaisedException:
        pass
    except mp.ProcessExitedException:
        pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(world):
        f = out / f"rank{r}.pt"
        if not f.exists():
            raise RuntimeError(f"rank {r} of {world} wrote no result (crashed before reporting)")
        res = torch.load(f, weights_only=False)
        if "error" in res:
            raise RuntimeError(f"rank {r} of {world} failed: {res['error']}\n{res['traceback']}")
        results.append(res)
    return results
