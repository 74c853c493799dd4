"""Stages as data, applied by callbacks.

- `StageCallback(stage="stage1", switch_at={500: "stage2"})`: sets `requires_grad` from the stage
  table at `setup` (before `configure_optimizers`, so frozen parameters never enter the optimizer),
  prints and logs trainable / frozen counts per parameter group, and at a scheduled global step
  switches stage inside the run: newly trainable parameters join the optimizer as new param groups
  with that stage's learning rate, and the LR scheduler gets a matching schedule for them.
  (Lightning's `BaseFinetuning` acts only at epoch starts and runs before `configure_model`, so
  it cannot do step-scheduled stages.)
- `FrozenParameterGuard(every_n_steps=0)`: checksums every frozen parameter when training starts
  and verifies them at the end (and every N steps); any change fails the run loudly.

The LightningModule must provide `parameter_groups() -> dict[str, list[(name, param)]]`; it may
provide `stage_settings(spec) -> dict(lr, weight_decay, schedule, warmup_steps)` (recipe overrides
of the stage table) and a `stage` attribute that the callback sets.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from synergen_lightning.distributed import resharded
from synergen_lightning.stages import StageSchedule, apply_stage, get_stage, optimizer_param_groups


def format_counts(stage: str, counts: dict[str, tuple[int, int]]) -> str:
    """A rich table as text (rich is a dependency; plain text is the fallback)."""
    rows = [(g, t, f) for g, (t, f) in counts.items()]
    total_t, total_f = sum(r[1] for r in rows), sum(r[2] for r in rows)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"parameter groups, stage {stage!r}")
        for col in ("group", "trainable", "frozen"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for g, t, f in rows + [("total", total_t, total_f)]:
            table.add_row(g, f"{t:,}", f"{f:,}")
        console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(table)
        return console.export_text()
    except Exception:  # pragma: no cover - formatting must never stop training
        lines = [f"parameter groups, stage {stage!r}"] + [f"  {g:<26} {t:>14,} {f:>14,}" for g, t, f in rows]
        return "\n".join(lines)


class StageCallback(Callback):
    def __init__(self, stage: str | dict = "stage1", switch_at: dict[int, str] | None = None):
        """
        Args:
            stage: stage name from `synergen_lightning.stages.STAGES` (stage1, stage2, sft, full) or an
                inline dict {"name": ..., "trainable": [groups], "lr": ..., "schedule": ...}.
            switch_at: {global_step: stage}: switch stage inside the run at that optimizer step.
        """
        self.stage = get_stage(stage)
        self.switch_at = {int(k): get_stage(v) for k, v in (switch_at or {}).items()}
        self._done: set[int] = set()

    # setup runs before configure_model / configure_optimizers: frozen parameters never reach the optimizer.
    # Resuming (--ckpt_path) after a switch: the module's `on_load_checkpoint` restores its stage history and
    # re-applies the stage before the optimizer is built, so the saved optimizer state matches its groups.
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._apply(trainer, pl_module, self.stage)
        if hasattr(pl_module, "stage_history"):
            pl_module.stage_history = [(0, self.stage["name"])]

    def _apply(self, trainer: Trainer, pl_module: LightningModule, spec: dict) -> None:
        counts = apply_stage(pl_module, spec)
        rank_zero_info(format_counts(spec["name"], counts))
        metrics = {}
        for g, (t, f) in counts.items():
            metrics[f"params/{g}/trainable"] = float(t)
            metrics[f"params/{g}/frozen"] = float(f)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        pl_module._stage_applied = True
        pl_module._stage_param_counts = counts

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        history = getattr(pl_module, "stage_history", None) or []
        if step not in self.switch_at or step in self._done or any(s >= step for s, _ in history[1:]):
            return
        self._done.add(step)
        spec = self.switch_at[step]
        if hasattr(pl_module, "stage_history"):
            pl_module.stage_history.append((step, spec["name"]))
        # the sharded parameters (those the optimizer holds) are the ones re-flagged and added, not units a
        # validation left whole
        before = {id(p) for p in resharded(pl_module).parameters() if p.requires_grad}
        self._apply(trainer, pl_module, spec)
        new = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in before]
        if not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        new = [(n, p) for n, p in new if id(p) not in in_opt]
        if not new:
            return
        settings = _stage_settings(pl_module, spec)
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        # the same groups, order and tags as SynerGenVL.configure_optimizers builds for this stage on resume
        for factor, part in _split_by_lr_scale(pl_module, new):
            lr = settings["lr"] * factor
            tag = spec["name"] if factor == 1.0 else f"{spec['name']}/x{factor:g}"
            for g in optimizer_param_groups(part, lr, settings["weight_decay"], tag=tag):
                g.setdefault("initial_lr", lr)
                optimizer.add_param_group(g)
                for sched in schedulers:
                    # LambdaLR keeps one multiplier and one base lr per group: extend both
                    if hasattr(sched, "lr_lambdas"):
                        sched.lr_lambdas.append(StageSchedule(
                            settings["schedule"], settings["warmup_steps"], trainer.max_steps, start_step=step,
                            min_lr_ratio=getattr(pl_module.hparams, "min_lr_ratio", 0.0) or 0.0))
                        sched.base_lrs.append(lr)
                        g["lr"] = lr * sched.lr_lambdas[-1](sched.last_epoch)
                    elif hasattr(sched, "base_lrs"):
                        sched.base_lrs.append(lr)
        rank_zero_info(f"stage switch at step {step} -> {spec['name']!r}: {sum(p.numel() for _, p in new):,} "
                       f"parameters joined the optimizer at lr {settings['lr']:g} ({settings['schedule']})")


def _split_by_lr_scale(pl_module: LightningModule, named: list) -> list[tuple[float, list]]:
    """`named` split by the model's `lr_scale` {parameter group: factor}, largest factor first (one part, factor 1,
    for a model without it)."""
    scale = dict(getattr(pl_module, "hparams", {}).get("lr_scale") or {})
    if not scale or not hasattr(pl_module, "parameter_groups"):
        return [(1.0, named)]
    group_of = {n: g for g, members in pl_module.parameter_groups().items() for n, _ in members}
    factor_of = {n: float(scale.get(group_of.get(n), 1.0)) for n, _ in named}
    return [(f, [(n, p) for n, p in named if factor_of[n] == f]) for f in sorted(set(factor_of.values()), reverse=True)]


def _stage_settings(pl_module: LightningModule, spec: dict) -> dict:
    if hasattr(pl_module, "stage_settings"):
        return pl_module.stage_settings(spec)
    return {"lr": spec["lr"], "weight_decay": spec.get("weight_decay", 0.0),
            "schedule": spec.get("schedule", "constant"), "warmup_steps": spec.get("warmup_steps", 0)}


def _checksum(t: torch.Tensor) -> int:
    """Exact integer checksum of a tensor's bytes (position-weighted, so swaps are caught too)."""
    if hasattr(t, "to_local"):  # DTensor under FSDP2: each rank checks its own shard
        t = t.to_local()
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    total, chunk = 0, 1 << 24
    for start in range(0, raw.numel(), chunk):
        part = raw[start:start + chunk].long()
        weights = (torch.arange(start, start + part.numel(), device=part.device) % 65521) + 1
        total += int((part * weights).sum())
    return total


class FrozenParameterGuard(Callback):
    def __init__(self, every_n_steps: int = 0):
        """
        Args:
            every_n_steps: also verify every N optimizer steps (0 = only at the end of training).
        """
        self.every_n_steps = every_n_steps
        self._sums: dict[str, int] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the sharded parameters, each rank its shard (not units a sanity check or validation left whole)
        self._sums = {n: _checksum(p) for n, p in resharded(pl_module).named_parameters() if not p.requires_grad}
        rank_zero_info(f"FrozenParameterGuard: watching {len(self._sums)} frozen tensors "
                       f"({sum(p.numel() for n, p in pl_module.named_parameters() if n in self._sums):,} values)")

    def verify(self, pl_module: LightningModule) -> int:
        changed = [n for n, p in resharded(pl_module).named_parameters()
                   if n in self._sums and not p.requires_grad and _checksum(p) != self._sums[n]]
        # under FSDP each rank checks its own shards: every rank learns of a change on any (one all-reduce) and
        # stops, rather than the others waiting in the next collective for the rank that raised
        anywhere = len(changed)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([anywhere], dtype=torch.long, device=pl_module.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            anywhere = int(count.item())
        if anywhere:
            here = f"e.g. {changed[:5]}" if changed else "in another rank's shards"
            raise RuntimeError(f"FrozenParameterGuard: frozen parameter(s) changed during training ({here}): "
                               "something updates parameters outside the stage's trainable groups")
        return len(self._sums)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.verify(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.verify(pl_module)
