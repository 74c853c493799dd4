"""FSDP2 across processes, GPUs and nodes, on Lightning's `ModelParallelStrategy` (docs/distributed.md).

Two pieces, in torchtitan's shape:

- `FSDP2Strategy`: Lightning's `ModelParallelStrategy` with a pure data-parallel mesh (every rank
  one FSDP shard: `data_parallel_size = world size`, `tensor_parallel_size = 1`; the parent's
  "auto" would make it tensor-parallel) and the sharding knobs of a recipe (mixed precision,
  activation checkpointing, compile). Only `trainer.devices` / `trainer.num_nodes` choose the
  world size: 1 CPU process, 2 CPU processes (gloo, how CI tests sharding), 8 GPUs (nccl) or N nodes
  (torchrun / SLURM: Lightning's cluster environments) all run the same recipe. With
  `global_batch_size` set, the per-rank batch is derived from it (and a world size that does not
  divide it is refused).
- `parallelize(model, mesh, ...)`: what `SynerGenVL.configure_model` calls: optional activation
  checkpointing and `torch.compile` per block, then `fully_shard` per LLM decoder block, per head
  block, for the embeddings / LM head / folder / special table, and finally for the whole model
  (the root, entered through `SynerGenVL.forward`), with a `MixedPrecisionPolicy`.

- `DDPStrategy`: Lightning's DDP with the same `global_batch_size`, for a model that fits on one device
  (the tiny recipes): one gradient all-reduce per step instead of FSDP's gathers per block, so 2 CPU processes
  train faster than one (RESULTS.md; `make demo` trains its stages this way). The trainable set is fixed when DDP
  wraps the model: a stage switch inside a run is refused (FSDP2Strategy does it).

Checkpoints are Lightning's sharded (DCP) directories; `load_sharded_state_dict` reads the model
weights of one without a process group (export, `init_from`, resuming at another world size is
done by DCP itself); every DCP read of a directory is checked first (`safe_load.read_sharded_metadata`). After
sharding, `load_sharded_into` (a sharded `init_from`) and `load_base_into_sharded` (the base LLM) have each rank
read only the part of the stored weights that its shards hold.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from synergen_lightning.hf_import import RowSource
from synergen_lightning.safe_load import read_sharded_metadata, torch_load
from synergen_lightning.state_keys import current_keys, flat_key, is_flat

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def to_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def per_rank_batch_size(global_batch: int, world_size: int, what: str = "global batch") -> int:
    """global batch / world size; refuses a world size that does not divide it (numbers in the message)."""
    if world_size < 1 or global_batch < 1 or global_batch % world_size:
        lo = global_batch // world_size * world_size if world_size > 0 else 0
        raise ValueError(f"{what} {global_batch} is not divisible by the world size {world_size} "
                         f"(devices x num_nodes): use a global batch of {max(lo, world_size)} or "
                         f"{lo + world_size}, or another number of devices")
    return global_batch // world_size


def micro_batches(per_rank: int | dict[str, int], max_seq_len: int, tokens_per_gpu: int) -> tuple[int | dict[str, int], int]:
    """(micro-batch, accumulate_grad_batches) of a per-rank batch under a per-GPU token budget: the fewest
    micro-batches per optimizer step (a divisor of every task's per-rank rows, so each micro-batch holds the same
    rows of every task) whose worst case, rows x max_seq_len, fits `tokens_per_gpu`."""
    rows = dict(per_rank) if isinstance(per_rank, dict) else {"": int(per_rank)}
    total = sum(rows.values())
    if tokens_per_gpu < len(rows) * max_seq_len:
        raise ValueError(f"tokens_per_gpu {tokens_per_gpu} cannot hold one row of each of the {len(rows)} tasks at "
                         f"max_seq_len {max_seq_len}: raise it to at least {len(rows) * max_seq_len} or shorten max_seq_len")
    common = functools.reduce(math.gcd, rows.values())
    for accumulate in (d for d in range(1, common + 1) if common % d == 0):
        if total // accumulate * max_seq_len <= tokens_per_gpu:
            micro = {k: v // accumulate for k, v in rows.items()}
            return (micro if isinstance(per_rank, dict) else micro[""]), accumulate
    fit = tokens_per_gpu // max_seq_len
    raise ValueError(f"per-rank batch {per_rank} ({total} rows of up to {max_seq_len} tokens) does not split into "
                     f"equal micro-batches of at most {fit} rows (tokens_per_gpu {tokens_per_gpu}): the tasks' rows "
                     f"share only the divisors of {common}; choose global batches whose per-rank rows share a larger "
                     "one, raise tokens_per_gpu or use more ranks")


def worst_case_tokens(micro: int | dict[str, int], max_seq_len: int) -> int:
    """LLM tokens of the longest possible micro-batch: every row at max_seq_len (rows are padded to the longest)."""
    return (sum(micro.values()) if isinstance(micro, dict) else int(micro)) * max_seq_len


def batch_plan(config: dict) -> dict | None:
    """What the strategy will derive for a run config (the `trainer` and `data` sections, as `--print_config` prints
    them): world size, FSDP mesh, per-rank rows, micro-batch, accumulation, worst-case tokens per GPU and clipping.
    None when the strategy sets no global batch."""
    trainer, data = config.get("trainer") or {}, (config.get("data") or {}).get("init_args") or {}
    strategy = trainer.get("strategy")
    args = (strategy.get("init_args") or {}) if isinstance(strategy, dict) else {}
    global_batch = args.get("global_batch_size")
    if global_batch in (None, "datamodule"):
        return None
    world = int(trainer.get("devices") or 1) * int(trainer.get("num_nodes") or 1)
    per = ({k: per_rank_batch_size(int(v), world, f"global_batch_size[{k!r}]") for k, v in global_batch.items()}
           if isinstance(global_batch, dict) else per_rank_batch_size(int(global_batch), world))
    shard = min(int(args.get("shard_size") or world), world)
    if world % int(shard):
        raise ValueError(f"shard_size {shard} does not divide the world size {world}")
    plan = {"world_size": world, "fsdp_mesh": {"replicate": world // int(shard), "shard": int(shard)},
            "global_batch": global_batch, "per_rank": per, "micro_batch": per,
            "accumulate_grad_batches": 1, "gradient_clip_val": trainer.get("gradient_clip_val")}
    max_seq_len, budget = data.get("max_seq_len"), args.get("tokens_per_gpu")
    if budget is not None and max_seq_len is not None:
        plan["micro_batch"], plan["accumulate_grad_batches"] = micro_batches(per, int(max_seq_len), int(budget))
    if max_seq_len is not None:
        plan["worst_case_tokens_per_gpu"] = worst_case_tokens(plan["micro_batch"], int(max_seq_len))
        plan["tokens_per_gpu"] = budget
    return plan


def derive_per_rank_batch(strategy, global_batch_size, tokens_per_gpu: int | None = None) -> None:
    """Set the datamodule's per-rank `batch_size` from a global batch: an int, a per-task dict, or "datamodule"
    (the recipe's `batch_size` IS the global batch, so a recipe tuned on one device keeps its batch at any world
    size). None: leave the datamodule's batch_size per rank. With `tokens_per_gpu`, the per-rank batch is then split
    into micro-batches (`micro_batches`) and the trainer accumulates their gradients."""
    if global_batch_size is None:
        if tokens_per_gpu is not None:
            raise ValueError(f"{type(strategy).__name__}(tokens_per_gpu=...) splits a global batch: set global_batch_size too")
        return
    name = type(strategy).__name__
    world = strategy.world_size
    dm = getattr(getattr(strategy.lightning_module, "trainer", None), "datamodule", None)
    if dm is None or not hasattr(dm, "batch_size"):
        raise ValueError(f"{name}(global_batch_size=...) needs a datamodule with a `batch_size` attribute "
                         "to set; leave global_batch_size unset and give the per-rank batch_size instead")
    if global_batch_size == "datamodule":
        global_batch_size = dict(dm.batch_size) if isinstance(dm.batch_size, dict) else int(dm.batch_size)
    elif isinstance(global_batch_size, str):
        raise ValueError(f"{name}(global_batch_size={global_batch_size!r}): give an int, a per-task dict "
                         "{generation: 64, ...}, or 'datamodule' (the recipe's batch_size is the global batch)")
    if isinstance(global_batch_size, dict):
        per = {k: per_rank_batch_size(int(v), world, f"global_batch_size[{k!r}]") for k, v in global_batch_size.items()}
    else:
        per = per_rank_batch_size(int(global_batch_size), world, "global_batch_size")
    if isinstance(dm.batch_size, dict) and not isinstance(per, dict):
        raise ValueError(f"the datamodule's batch_size is per task {dm.batch_size}: give global_batch_size per task too")
    dm.batch_size = dict(dm.batch_size, **per) if isinstance(per, dict) and isinstance(dm.batch_size, dict) else per
    if tokens_per_gpu is None:
        rank_zero_info(f"{name}: global batch {global_batch_size} over {world} ranks -> {dm.batch_size} per rank")
        return
    max_seq_len = getattr(getattr(dm, "hparams", None), "max_seq_len", None) or getattr(dm, "max_seq_len", None)
    if max_seq_len is None:
        raise ValueError(f"{name}(tokens_per_gpu=...) needs the datamodule's max_seq_len (its longest row)")
    trainer = strategy.lightning_module.trainer
    micro, accumulate = micro_batches(dm.batch_size, int(max_seq_len), int(tokens_per_gpu))
    if trainer.accumulate_grad_batches not in (1, accumulate):
        raise ValueError(f"trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} and {name}(tokens_per_gpu="
                         f"{tokens_per_gpu}) both set the accumulation (derived: {accumulate}): leave the trainer's at 1")
    dm.batch_size, trainer.accumulate_grad_batches = micro, accumulate
    if accumulate > 1 and isinstance(getattr(trainer, "val_check_interval", None), int):
        # Lightning counts an int val_check_interval in batches, a recipe in optimizer steps (as max_steps)
        trainer.val_check_interval *= accumulate
    hp = getattr(dm, "hparams", None)
    epoch = getattr(hp, "steps_per_epoch", None)
    if accumulate > 1 and isinstance(epoch, int) and epoch % accumulate:
        # Lightning steps the optimizer at an epoch's last batch: an epoch ending inside an accumulation would make
        # an optimizer step of fewer rows than the global batch
        hp.steps_per_epoch = max(accumulate, epoch - epoch % accumulate)
        rank_zero_info(f"{name}: the datamodule's steps_per_epoch {epoch} becomes {hp.steps_per_epoch} (batches), "
                       f"a multiple of the {accumulate} micro-batches of an optimizer step")
    rank_zero_info(f"{name}: global batch {global_batch_size} over {world} ranks -> micro-batch {micro} x "
                   f"{accumulate} accumulated per rank (worst case {worst_case_tokens(micro, int(max_seq_len)):,} "
                   f"tokens of {tokens_per_gpu:,} per GPU)")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def resharded(module: nn.Module) -> nn.Module:
    """`module` with every FSDP2 unit holding its sharded parameters again (a no-op for a module that is not sharded):
    with resharding after forward off (`reshard_after_forward: false`, decoding in `gathered_for_decoding`) a no-grad
    forward leaves units whole until their next backward, and `named_parameters()` then yields the gathered
    param_dtype tensors in place of the fp32 shards. Callers that read or re-flag parameters go through it."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


def gather_from_ranks(value):
    """Every rank's `value`, in rank order (a collective: every rank calls it); None in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def trunk_of(model: nn.Module) -> nn.Module:
    """The pure MMoE trunk of a SynerGenVL (inside its `llm` component)."""
    return model.llm.model


def head_of(model: nn.Module) -> nn.Module | None:
    """The pure unfolding head of a SynerGenVL (inside its `head` component), if it has one."""
    head = getattr(model, "head", None)
    return None if head is None else head.model


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a SynerGenVL: LLM layers, then the unfolding head's layers."""
    head = head_of(model)
    return list(trunk_of(model).layers) + (list(head.stack.layers) if head is not None else [])


def _checkpoint_block(block: nn.Module) -> None:
    """Activation checkpointing for one block by wrapping its `forward` (non-reentrant), so parameter
    names (state_dict keys, stage groups, checkpoints) stay the same as without it; FSDP's hooks on
    `__call__` stay outside, so the block's weights are gathered before the backward recompute."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # eval / generation: nothing to save
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward
    block._synergen_checkpointed = True


@torch.no_grad()
def weight_fingerprint(module: nn.Module) -> list[tuple[str, float, float]]:
    """(name, sum, L2 norm) of every parameter and buffer, accumulated in float64 where the tensor lies."""
    out = []
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta or not t.is_floating_point():
            continue
        out.append((name, float(t.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(t, dtype=torch.float64))))
    return out


def check_same_weights(module: nn.Module, group=None) -> None:
    """Refuse ranks that built different weights before sharding (FSDP2 keeps each rank's own shard of whatever
    it was given, so ranks seeded differently would start from a mixed model).

    Every rank seeds alike and loads the same files, so there is nothing to broadcast: each rank sends a
    fingerprint (a sum and a norm per tensor, a few KB) in one object all-gather, which runs on whatever
    device the backend serves (NCCL: the current GPU), while the weights themselves may still be on the CPU."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    mine = weight_fingerprint(module)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    bad = []
    for rank, theirs in enumerate(everyone):
        if [n for n, _, _ in theirs] != [n for n, _, _ in mine]:
            raise ValueError(f"rank {rank} built a model with other tensors than this rank's: every rank must build "
                             "the same model from the same recipe")
        for (name, s0, n0), (_, s1, n1) in zip(mine, theirs):
            # float64 sums differ only by rounding when the values are equal; any real difference is O(norm)
            if abs(s0 - s1) > 1e-6 * max(n0, n1) or abs(n0 - n1) > 1e-6 * max(n0, n1):
                bad.append((rank, name))
    if bad:
        raise ValueError(f"ranks start from different weights ({len(bad)} tensors, e.g. rank {bad[0][0]} at "
                         f"{bad[0][1]!r}): seed every rank alike (seed_everything: <int> in the recipe; `true` draws "
                         "a random seed per process under torchrun/SLURM) and load the same checkpoint on every rank")


def hsdp_mesh(device_type: str, world_size: int, shard_size: int | None, timeout=None):
    """The mesh `parallelize` shards over: None or at least the world size = one FSDP group of every rank; a divisor of
    the world size (e.g. the GPUs of one node) = HSDP, a (replicate, shard) mesh: parameters are sharded within
    each group of `shard_size` ranks and replicated across groups, so the per-block gathers and reduce-scatters
    stay inside a group (a node's NVLink) and only the all-reduce of each unit's gradient shard (1/shard_size of
    it) crosses the groups. `timeout` (a timedelta): the collective timeout of both dimensions' groups, which torch
    creates with the backend's default (NCCL: 10 minutes) whatever the world group was given."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size is None or shard_size >= world_size:  # fewer ranks than a group (e.g. one GPU): plain FSDP
        return None
    if shard_size < 1 or world_size % shard_size:
        raise ValueError(f"shard_size {shard_size} does not divide the world size {world_size} (devices x num_nodes): "
                         "use the GPUs per node (e.g. 8), another divisor, or leave it unset to shard over every rank")
    mesh = init_device_mesh(device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    if timeout is not None:
        # `set_timeout` in newer torch, `_set_pg_timeout` in older ones
        set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
        for dim in range(mesh.ndim):
            set_timeout(timeout, mesh.get_group(dim))
    return mesh


# models sharded by `parallelize` whose units free their gathered weights after each forward (ZeRO-3), and those
# of them inside `gathered_for_decoding` now (an inner block leaves the gathering to the outer one)
_RESHARDS_AFTER_FORWARD: weakref.WeakSet = weakref.WeakSet()
_GATHERED: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def gathered_for_decoding(model: nn.Module):
    """Decoding on a model sharded by `parallelize` (sample grids, the end-of-stage evaluation): each unit's weights
    are all-gathered at its first use and kept until the block ends, instead of gathered and freed again at every
    decoding step (a collective per unit and step, thousands of steps per image); FSDP2's own switch for evaluation,
    `set_reshard_after_forward`. Every rank enters it (the gathers are collectives); while it lasts a rank holds the
    units it used whole, in param_dtype. On exit every unit is resharded and resharding after forward is back on.
    Any other model passes through unchanged."""
    if model not in _RESHARDS_AFTER_FORWARD or model in _GATHERED:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    # not the root: decoding enters the units directly, never the root's forward
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    _GATHERED.add(model)
    try:
        yield
    finally:
        _GATHERED.discard(model)
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def parallelize(
    model: nn.Module,
    mesh=None,
    param_dtype: str | torch.dtype | None = None,
    reduce_dtype: str | torch.dtype | None = "float32",
    activation_checkpointing: bool = False,
    compile: bool | str = False,
    reshard_after_forward: bool = True,
    check_states: bool = True,
) -> int:
    """Shard a SynerGenVL with FSDP2 in place; returns the number of FSDP units.

    Units: every LLM decoder block and every head block (one all-gather each, freed after use),
    the text embedding (with the LM head when tied), the LM head, the folder, the special-token
    table, the pure head (`head.model`: its embeddings and classifier), the pure trunk (`llm.model`: its final norm)
    and the model root (the rest). `UnfoldingHead.generate` and `folder.fold_patch` gather like forwards, so
    sampling runs on a sharded model (every rank calls it: the gathers are collectives). Frozen parameters may sit inside
    any unit (FSDP2 shards them and never reduces a gradient for them). Call after `requires_grad`
    is set for the stage and the weights are loaded (Lightning: `setup` before `configure_model`).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if is_sharded(model):
        raise RuntimeError(f"{type(model).__name__} is already sharded: parallelize() runs once per model")
    if not hasattr(getattr(getattr(model, "llm", None), "model", None), "layers"):
        raise TypeError(f"parallelize() expects a SynerGenVL-like model (llm.model.layers, head.model.stack.layers), "
                        f"got {type(model).__name__}")
    group = mesh.get_group() if mesh is not None and mesh.ndim == 1 else None  # HSDP (2-D): every rank
    if check_states:
        check_same_weights(model, group)
    mp = MixedPrecisionPolicy(param_dtype=to_dtype(param_dtype), reduce_dtype=to_dtype(reduce_dtype))
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mp)
    blocks = decoder_blocks(model)
    for block in blocks:
        if activation_checkpointing:
            _checkpoint_block(block)
        if compile:
            # nn.Module.compile keeps the parameter names (no `_orig_mod.` prefix in checkpoints)
            block.compile(backend=compile if isinstance(compile, str) else "inductor", dynamic=True)
    units = 0
    for block in blocks:
        shard(block, reshard_after_forward=reshard_after_forward)
        units += 1
    llm, head = trunk_of(model), head_of(model)
    if llm.config.tie_word_embeddings:  # one weight, one unit
        shard([llm.embed_tokens, llm.lm_head], reshard_after_forward=reshard_after_forward)
        units += 1
    else:
        for m in (llm.embed_tokens, llm.lm_head):
            shard(m, reshard_after_forward=reshard_after_forward)
            units += 1
    for name in ("folder", "special_embed"):
        if getattr(model, name, None) is not None:
            shard(getattr(model, name), reshard_after_forward=reshard_after_forward)
            units += 1
    if head is not None:
        shard(head, reshard_after_forward=reshard_after_forward)
        units += 1
    # the LLM trunk as a unit of its own (its final norm): generation and answering call `model.llm.model(...)`
    # without entering the root, so nothing they use may be left to the root
    shard(llm, reshard_after_forward=reshard_after_forward)
    units += 1
    shard(model)  # root: whatever is left; entered through model.__call__ (training / validation steps)
    units += 1
    if reshard_after_forward:
        _RESHARDS_AFTER_FORWARD.add(model)
    # methods other than forward that read a unit's own parameters directly (pos_embed, code_embed, mlp,
    # cond_proj, classifier): FSDP gathers around them as around a forward (sample grids, evaluation, generation)
    for module, method in ((head, "generate"), (getattr(model, "folder", None), "fold_patch")):
        if module is not None and hasattr(module, method):
            register_fsdp_forward_method(module, method)
    n_params = sum(p.numel() for p in model.parameters())
    rank_zero_info(f"FSDP2: {units} units over {mesh.size() if mesh is not None else 1} rank(s), "
                   f"{len(blocks)} blocks, params {param_dtype or 'as stored'} / reduce {reduce_dtype}, "
                   f"activation checkpointing {'on' if activation_checkpointing else 'off'}, "
                   f"compile {compile or 'off'}; {n_params:,} parameters")
    return units


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(
        self,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        activation_checkpointing: bool = False,
        compile: bool | str = False,
        reshard_after_forward: bool = True,
        global_batch_size: int | dict[str, int] | str | None = None,
        tokens_per_gpu: int | None = None,
        shard_size: int | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout_minutes: float = 30.0,
    ):
        """
        Args:
            param_dtype: FSDP2 compute/all-gather dtype of parameters (bfloat16 on GPUs; unset = fp32 as stored).
                The fp32 master weights and the optimizer stay fp32. Use with `trainer.precision: 32-true`.
            reduce_dtype: dtype of the gradient reduce-scatter (fp32, as the paper's bf16 recipes do).
            activation_checkpointing: recompute each decoder block's activations in the backward.
            compile: torch.compile each block (true = inductor, or a backend name such as "aot_eager").
            reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3);
                false keeps them until the backward (ZeRO-2: more memory, fewer all-gathers).
            global_batch_size: rows per optimizer step over all ranks (an int, or per task
                {generation: 64, ...}); the datamodule's per-rank `batch_size` becomes global / world size.
                "datamodule": the datamodule's batch_size is the global batch (split over the ranks).
                Unset: the datamodule's batch_size is per rank (global = batch_size x world size).
            tokens_per_gpu: LLM tokens one GPU holds in a forward/backward: the per-rank batch is split into equal
                micro-batches whose worst case (rows x the datamodule's max_seq_len) fits, and
                `trainer.accumulate_grad_batches` becomes their number (and a datamodule's `steps_per_epoch`, in
                batches, is rounded down to a multiple of it). Unset: one micro-batch per step.
            shard_size: ranks per FSDP shard group (HSDP: sharded within a group, replicated across groups; e.g.
                the GPUs of one node, when the model's sharded state fits them). Unset: one group of every rank.
            save_distributed_checkpoint: each rank writes its shard (a DCP directory); false gathers one file on rank 0.
            process_group_backend: unset = nccl on GPUs, gloo on CPU.
            timeout_minutes: collective timeout (a hang becomes an error after this).
        """
        from datetime import timedelta

        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timedelta(minutes=timeout_minutes))
        self.parallelize_kwargs = {"param_dtype": param_dtype, "reduce_dtype": reduce_dtype,
                                   "activation_checkpointing": activation_checkpointing, "compile": compile,
                                   "reshard_after_forward": reshard_after_forward}
        to_dtype(param_dtype), to_dtype(reduce_dtype)  # fail at construction on a typo
        self.global_batch_size, self.tokens_per_gpu, self.shard_size = global_batch_size, tokens_per_gpu, shard_size

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A sharded checkpoint is written beside its path (`PATH.partial`) and moved into place by rank 0 once every
        rank's shard is on disk: a save cut short (preemption, the stall watchdog, an OOM) leaves the previous
        checkpoint whole. Written in place, each rank overwrites its own shard file and a resume would read a mix
        of two steps without a word. (Between the two renames, microseconds, the checkpoint is at `PATH.old`.)"""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
        if self.global_rank == 0:
            _remove(partial)  # what a save cut short left
        self.barrier("synergen_checkpoint_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("synergen_checkpoint_written")
        if self.global_rank == 0:
            _remove(old)
            if path.exists():
                path.rename(old)
            partial.rename(path)
            _remove(old)
        self.barrier("synergen_checkpoint_in_place")

    def shard_mesh(self, mesh):
        """The mesh `SynerGenVL.configure_model` shards over: the data-parallel mesh, or the HSDP mesh of `shard_size`."""
        return hsdp_mesh(mesh.device_type, mesh.size(), self.shard_size, timeout=self._timeout) or mesh

    def setup_environment(self) -> None:
        # pure FSDP: one data-parallel dimension over all ranks (the parent's "auto" is nodes x 1 and
        # "tensor_parallel_size=1" would then not multiply to the world size)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        derive_per_rank_batch(self, self.global_batch_size, self.tokens_per_gpu)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None):
        """Before DCP loads the shards: refuse a checkpoint of another model (with the shapes), and restore the
        run's stage history so the optimizer has the saved run's param groups. (This strategy restores after
        `setup`, so the optimizer was already built for the recipe's first stage; a requires_grad change after
        fully_shard takes effect, tests/test_distributed.py proves it, so the optimizer is simply rebuilt.)"""
        from lightning.pytorch.trainer.states import TrainerFn

        from synergen_lightning.stages import apply_stage

        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if is_sharded_checkpoint(path):
            meta = torch_load(path / "meta.pt")
            # checks .metadata and every non-tensor entry (the optimizer's param groups) as plain data before
            # Lightning's DCP load reads them with plain pickle
            shapes = sharded_checkpoint_shapes(path)
            if is_flat(shapes):
                raise ValueError(f"{str(path)!r} keeps the trunk and head weights in the flat key layout "
                                 "(synergen_lightning/state_keys.py), which an FSDP2 resume cannot read with its "
                                 f"optimizer state: start a new run from its weights with model.init_from: {path}")
            check_compatible(shapes, module, str(path))
            history = meta.get("synergen_stage_history")
            if history and hasattr(module, "stage_history") and [list(x) for x in module.stage_history] != history:
                module.stage_history = [(int(s), str(n)) for s, n in history]
                apply_stage(module, module.stage_history[-1][1])
                trainer = module.trainer
                if trainer.state.fn == TrainerFn.FITTING:
                    self.setup_optimizers(trainer)
                rank_zero_info(f"FSDP2Strategy: resumed stage history {history} from {path}; optimizer rebuilt to match")
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        module = self.lightning_module
        if is_sharded(module) and hasattr(module, "_get_fsdp_state"):
            # settle FSDP's root now (weights materialized): callbacks and evaluation may call a submodule
            # (the trunk's forward_ids, sampling) before any step enters the root, and FSDP2 would make the first
            # unit called a root and then refuse the real one ("requires running forward through the root
            # module first"). FSDP2 has no public call for this (torch 2.14): its lazy init is idempotent.
            module._get_fsdp_state()._lazy_init()
        if not is_sharded(self.lightning_module):
            raise RuntimeError(
                f"FSDP2Strategy: {type(self.lightning_module).__name__}.configure_model() sharded 0 of its "
                f"{sum(1 for _ in self.lightning_module.modules())} modules ({sum(p.numel() for p in self.lightning_module.parameters()):,} "
                "parameters): call synergen_lightning.distributed.parallelize(self, self.device_mesh) there, "
                "or use strategy: auto for a model that is not built for FSDP")


class DDPStrategy(LightningDDPStrategy):
    def __init__(self, global_batch_size: int | dict[str, int] | str | None = None, tokens_per_gpu: int | None = None,
                 process_group_backend: str | None = None, timeout_minutes: float = 30.0, **ddp_kwargs):
        """Plain data parallelism (every rank a full copy; one bucketed gradient all-reduce per step) for a model
        that fits on one device: on 2 CPU cores the tiny stages run faster than in one process, where FSDP2's
        per-block gathers over gloo cost more than they save (docs/distributed.md).

        Args:
            global_batch_size: as `FSDP2Strategy`'s: an int, a per-task dict, or "datamodule" (the recipe's
                batch_size is the global batch); unset = the datamodule's batch_size is per rank.
            tokens_per_gpu: as `FSDP2Strategy`'s: micro-batches and gradient accumulation under a per-GPU token budget.
            process_group_backend: unset = nccl on GPUs, gloo on CPU.
            timeout_minutes: collective timeout (a hang becomes an error after this).
            ddp_kwargs: passed to `torch.nn.parallel.DistributedDataParallel` (e.g. find_unused_parameters).
                `broadcast_buffers` defaults to false: the model's buffers (rotary tables) are the same on every
                rank, and a broadcast in every forward would make validation a collective, so ranks with
                different numbers of val batches would wait on each other.
        """
        from datetime import timedelta

        ddp_kwargs.setdefault("broadcast_buffers", False)
        super().__init__(process_group_backend=process_group_backend, timeout=timedelta(minutes=timeout_minutes),
                         **ddp_kwargs)
        self.global_batch_size, self.tokens_per_gpu = global_batch_size, tokens_per_gpu
        self._wrapped_trainable: set[str] | None = None

    def setup_environment(self) -> None:
        super().setup_environment()
        derive_per_rank_batch(self, self.global_batch_size, self.tokens_per_gpu)

    def setup(self, trainer) -> None:
        # DDP registers its gradient hooks for the parameters trainable when it wraps the model: a parameter
        # unfrozen later would train on each rank's own gradients and the ranks would drift apart silently
        switches = {s for cb in trainer.callbacks for s in (getattr(cb, "switch_at", None) or {})}
        if switches:
            raise ValueError(f"DDPStrategy cannot switch stage inside a run (switch_at steps {sorted(switches)}): "
                             "DDP syncs only the parameters trainable when it wraps the model. Use "
                             "synergen_lightning.distributed.FSDP2Strategy, one device, or one run per stage")
        super().setup(trainer)
        self._wrapped_trainable = self._trainable()

    def _trainable(self) -> set[str]:
        return {n for n, p in self.lightning_module.named_parameters() if p.requires_grad}

    def training_step(self, *args, **kwargs):
        if self._wrapped_trainable is not None and self._trainable() != self._wrapped_trainable:
            now = self._trainable()
            changed = sorted(now ^ self._wrapped_trainable)
            raise RuntimeError(f"DDPStrategy: the trainable set changed after DDP wrapped the model ({len(changed)} "
                               f"parameters, e.g. {changed[:3]}); DDP would not sync them. Use FSDP2Strategy or one "
                               "run per stage")
        return super().training_step(*args, **kwargs)


# ---------------------------------------------------------------------------- sharded checkpoints
def is_sharded_checkpoint(path: str | Path) -> bool:
    """A Lightning DCP checkpoint: a directory with `.metadata` (DCP) and `meta.pt` (the rest)."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


def checked_reader(path: str | Path):
    """A DCP `FileSystemReader` of a sharded checkpoint directory that hands DCP the checked metadata
    (`read_sharded_metadata`) instead of unpickling `.metadata` itself."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_sharded_metadata(path)
    reader = FileSystemReader(str(path))

    def read_metadata(*args, **kwargs):  # what FileSystemReader.read_metadata does after its pickle.load
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = reader.load_id
        return metadata

    reader.read_metadata = read_metadata
    return reader


def load_sharded_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state_dict of a sharded DCP checkpoint, on CPU, without a process group."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    p = Path(path)
    if not is_sharded_checkpoint(p):
        raise FileNotFoundError(f"{str(p)!r} is not a sharded checkpoint directory (no .metadata inside): "
                                "pass the directory Lightning wrote with FSDP2Strategy (e.g. runs/.../last.ckpt)")
    reader = checked_reader(p)
    keys = [k for k in reader.read_metadata().state_dict_metadata if k.startswith("state_dict.")]
    out = _load_state_dict_from_keys(keys=set(keys), storage_reader=reader)
    sd = out["state_dict"] if "state_dict" in out else {k[len("state_dict."):]: v for k, v in out.items()}
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}


def load_sharded_into(model: nn.Module, path: str | Path, collective: bool = True) -> None:
    """Load the model weights of a sharded (DCP) checkpoint into a model already sharded with `parallelize`: each
    rank reads only the byte ranges of its own shards (the whole checkpoint once over all ranks, not once per rank).
    Every rank calls it (DCP plans the reads with collectives). `collective=False`: this process alone reads the
    whole checkpoint into an unsharded model, in place (whatever process group exists)."""
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()  # the sharded parameters (DTensors) and buffers themselves: loaded in place
    reader = checked_reader(path)
    shapes = _shapes(reader.read_metadata())
    check_compatible(current_keys(shapes), model, str(path))
    if is_flat(shapes):  # DCP reads by key: ask for the keys the checkpoint was saved under
        state = {flat_key(k): v for k, v in state.items()}
    dcp.load({"state_dict": state}, storage_reader=reader, no_dist=not collective)


def shard_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part of a parameter, the first row of the full tensor it holds). FSDP2 shards dim 0, so a rank's
    part is one row range (under HSDP the same range on every replica); a parameter that is not sharded is all rows."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape) != tuple(local.shape) or any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise RuntimeError(f"a shard of shape {tuple(local.shape)} at offset {tuple(offset)} of {tuple(param.shape)} "
                           "is not a row range: shard_rows reads FSDP2's dim-0 shards only")
    return local, int(offset[0]) if len(offset) else 0


@torch.no_grad()
def load_base_into_sharded(model: nn.Module, sources: dict[str, RowSource]) -> None:
    """A base LLM's weights into a SynerGenVL already sharded with `parallelize`, as `SynerGenVL.load_base_weights`
    puts them into an unsharded one, while each rank reads only the rows its shards hold (`sources`: the base trunk's
    tensors by key, `hf_import.hf_row_sources` or a memory-mapped .ckpt). The vision FFNs copy the text FFNs' shards;
    embedding and LM-head rows past the base vocabulary start at the mean of the base rows (one object all-gather of
    each rank's partial sums); the special-token table copies its rows of the embedding. Every rank calls it."""
    llm = trunk_of(model)
    vocab, base_vocab = llm.config.vocab_size, sources["embed_tokens.weight"].shape[0]
    if base_vocab > vocab:
        raise ValueError(f"base LLM vocab {base_vocab} != the model's {vocab}: "
                         "build the model from the base LLM's config (leave model.llm unset)")
    mine = {k: tuple(v.shape) for k, v in llm.state_dict().items() if ".vision_ffn." not in k}
    theirs = {k: (vocab, *v.shape[1:]) if k in ("embed_tokens.weight", "lm_head.weight") else v.shape
              for k, v in sources.items() if ".vision_ffn." not in k}
    tied = llm.config.tie_word_embeddings
    missing = [k for k in mine if k not in theirs and not (tied and k == "lm_head.weight")]
    bad = [k for k in theirs if k not in mine or theirs[k] != mine[k]]
    if missing or bad:
        raise ValueError(f"base LLM shapes differ from model.llm at {(bad + missing)[:3]}: make model.llm match the "
                         "base LLM's config.json (or leave it unset to read it from there)")
    resized: dict[str, tuple[int, torch.Tensor]] = {}  # key -> (first row, sum of its base rows) of this rank
    for key, param in llm.named_parameters():
        if ".vision_ffn." in key:
            continue
        local, start = shard_rows(param)
        stop = start + local.shape[0]
        source = sources[key]
        if key in ("embed_tokens.weight", "lm_head.weight") and vocab > base_vocab:
            rows = source.read(start, min(stop, base_vocab)).to(torch.float64)
            local[: rows.shape[0]].copy_(rows)
            resized[key] = (start, rows.sum(0))
        elif stop > start:
            local.copy_(source.read(start, stop))
    means = {}
    if resized:
        everyone = gather_from_ranks(resized) or [resized]
        for key in resized:
            parts = dict(sorted({r[key][0]: r[key][1] for r in everyone}.items()))  # replicas hold the same rows
            means[key] = (sum(parts.values()) / base_vocab).float()
            local, start = shard_rows(dict(llm.named_parameters())[key])
            first_new = max(0, base_vocab - start)
            local[first_new:].copy_(means[key].expand_as(local[first_new:]))
    for layer in llm.layers:
        if getattr(layer, "vision_ffn", None) is not None:
            text = dict(layer.text_ffn.named_parameters())
            for name, param in layer.vision_ffn.named_parameters():
                shard_rows(param)[0].copy_(shard_rows(text[name])[0])
    special = getattr(model, "special_embed", None)
    if special is not None:
        embed = sources["embed_tokens.weight"]
        full = torch.stack([embed.read(i, i + 1)[0].float() if i < base_vocab else means["embed_tokens.weight"]
                            for i in model.special_ids.tolist()])
        local, start = shard_rows(special.weight)
        local.copy_(full[start:start + local.shape[0]])


def sharded_checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{parameter name: full shape} of a sharded checkpoint's model, from the checked DCP metadata (reads no tensor)."""
    return _shapes(read_sharded_metadata(path))


def _shapes(metadata) -> dict[str, tuple[int, ...]]:
    md = metadata.state_dict_metadata
    return {k[len("state_dict."):]: tuple(v.size) for k, v in md.items() if k.startswith("state_dict.") and hasattr(v, "size")}


def check_compatible(state: dict, model: nn.Module, source: str) -> None:
    """Refuse a checkpoint (state dict, or {name: shape}) whose keys or shapes differ from the model's, naming the numbers."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # DTensor .shape is the full shape
    theirs = {k: tuple(v) if isinstance(v, tuple) else tuple(v.shape) for k, v in state.items()}
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    shapes = [f"{k}: checkpoint {theirs[k]} vs model {mine[k]}" for k in mine if k in theirs and theirs[k] != mine[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {source!r} does not fit this model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}; "
                         "build the model with the recipe sizes the checkpoint was trained with")


def total_grad_norm(params) -> torch.Tensor | None:
    """L2 norm of all gradients, sharded (DTensor) or not, on the gradients' device: each rank sums the squares of its
    own shards, one all-reduce adds them up (Lightning's `grad_norm` stacks DTensors and fails under FSDP2, and
    returns a CPU tensor, one host read per parameter, that NCCL cannot all-reduce)."""
    from torch.distributed.tensor import DTensor

    local_sq, sharded_sq, group, seen = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), None, False
    for p in params:
        g = p.grad
        if g is None:
            continue
        seen = True
        if isinstance(g, DTensor):
            # the squares of a rank's shard add up over the mesh dimensions that shard (not those that replicate)
            group = [g.device_mesh.get_group(d) for d, pl in enumerate(g.placements) if pl.is_shard()]
            sharded_sq = sharded_sq.to(g.device) + g.to_local().detach().double().pow(2).sum()
        else:
            local_sq = local_sq.to(g.device) + g.detach().double().pow(2).sum()
    if not seen:
        return None
    if group is None:  # nothing sharded (one device, DDP): the norm stays on the gradients' device
        return local_sq.sqrt().float()
    for pg in group:
        dist.all_reduce(sharded_sq, group=pg)
    return (local_sq.to(sharded_sq.device) + sharded_sq).sqrt().float()
