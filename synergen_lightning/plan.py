"""`synergen plan`: the per-GPU memory of a recipe's training step under FSDP2, before any GPU is asked for.

What is counted, per GPU, at the recipe's world size (`--devices` x `--nodes`) and micro-batch (the strategy's
`batch_plan`: per-rank rows split under `tokens_per_gpu`, every row at `max_seq_len`, the worst case):

- **model state**, exact from the model built on the meta device (no memory allocated) with the recipe's stage
  applied: fp32 master weights (4 B per parameter), fp32 gradients of the trainable ones (4 B) and AdamW's two
  fp32 moments (8 B), each divided by the FSDP shard group (`shard_size`: HSDP shards within a group and replicates
  across groups; unset: every rank). FSDP2's `param_dtype` is only the dtype of the gathered copies.
- **gathered units**: FSDP2 all-gathers one unit (a decoder block, the embedding, the LM head, ...) at a time and
  prefetches the next, in `param_dtype` (fp32 when none is set); in the backward also the unsharded gradient of a unit
  in `param_dtype` and its `reduce_dtype` copy. Across ranks the next unit's flat all-gather output lives beside the
  current unit's parameters (one block more), and the previous block's reduce-scatter input is still in flight during
  a block's backward. Counted at each peak for the units that run then: the classifier's unit
  and a block at the loss, two blocks (three across ranks) and a block's gradients in the backward. A recipe whose
  strategy does not shard (`auto`, DDP) holds the whole model on every GPU and gathers nothing.
- **activations**, derived from measurement, not from a formula: `probe_activations` runs a forward of the same
  model at two tiny widths (the recipe's heads, head_dim 4 and 8, every other width scaled alike; the recipe's
  fold, grid, stage and dtype) on the CPU and counts, with `torch.autograd.graph.saved_tensors_hooks`, the bytes
  autograd saves for the backward (each storage once, parameters excluded), attributed to the module that saved
  them: per LLM token and LLM layer, per head position (one code of a supervised view) and head layer, per head
  position outside the head's layers (inputs, the chunked classifier's loss), per view (the folder), per supervised
  text token (the chunked LM-head loss) and per LLM token elsewhere (embeddings, final norm). Each figure is linear
  in the width, so the two probes give it at the recipe's width. "bf16" probes run with bf16 parameters under
  bf16 autocast (what FSDP2's `param_dtype: bfloat16` with `precision: bf16-mixed` computes in).
  With activation checkpointing a block keeps only its input (the residual stream, width x the measured dtype) and
  the backward recomputes one block at a time.
- **the peak**, the largest of three moments: the loss (every activation alive plus one chunk of the chunked
  cross-entropy, `models/chunked_ce.py`: at most 2^26 logits at `CE_BYTES_PER_LOGIT` each; few gradients exist yet),
  the start of the backward (every activation, the head's and the LM head's gradients, the largest block recomputed
  with checkpointing) and its end (the trunk's first block: every gradient, the activations outside the blocks and
  that block's). Without checkpointing the gradients of a block's activations take the place of the activations
  they free.
- **the image tokenizer** the recipe names (`model.init_args.image_tokenizer`), built on the meta device from its
  configuration alone (a checkpoint's hyperparameters, a directory's config.json): its fp32 weights sit on every GPU
  once the model is set up, and encoding a micro-batch's views online (shards that hold pixels, not codes) is a
  fourth moment: `SynerGenVL.ENCODE_VIEWS` views through the tokenizer's own `encode` (an adapter splits them into
  its calls), counted by `LiveBytes` (the bytes of live tensor storages, as `torch.cuda.max_memory_allocated` counts),
  beside the model state and the gradients of earlier micro-batches (gradient accumulation). A path that does not
  exist here is reported as not counted.
- **checkpoint on disk** (a DCP directory): fp32 weights of every parameter + AdamW's moments of the trainable ones.

The sum is checked against measured peaks on the CPU (`tests/test_plan.py`; method in `bench/memory_check.py`): the
resident set of one process, and torch's `FSDPMemTracker` for one rank of 8 or 64 over a fake process group.
The CUDA caching allocator adds fragmentation on top: `--margin` (default 20%) is the headroom asked for.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from synergen_lightning.models.chunked_ce import CHUNK_LOGITS
from synergen_lightning.models.config import LLMConfig

GiB = 2**30
# bytes in flight per logit of one chunk of the chunked cross-entropy's backward (its largest moment): two fp32
# tensors of the chunk's shape alive at once (the logits minus the log-sum-exp, then their exp);
# tests/test_chunked_ce.py holds the code to it
CE_BYTES_PER_LOGIT = 8
REGIONS = ("llm_layer", "head_layer", "head", "folder", "text_loss", "other")
# what each measured figure is per
UNITS = {"llm_layer_text": "LLM text token x LLM layer", "llm_layer_image": "LLM image token x LLM layer",
         "head_layer": "head position x head layer", "head": "head position", "folder": "view",
         "text_loss": "supervised text token", "other_text": "LLM text token", "other_image": "LLM image token"}
PROBE_HEAD_DIMS = (4, 8)


# ------------------------------------------------------------------------------------------------ recipe
def load_recipe(paths: list[str]) -> dict:
    """The recipe(s) as one dict (later files override earlier ones, as `synergen fit --config A --config B`),
    with `${oc.env:...}` interpolations resolved."""
    from omegaconf import OmegaConf

    from synergen_lightning.io import check_yaml

    merged = OmegaConf.create({})
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"--config {p!r} does not exist: give a recipe file, e.g. recipes/synergen_vl_2b/stage1.yaml")
        check_yaml(p)
        merged = OmegaConf.merge(merged, OmegaConf.load(p))
    return OmegaConf.to_container(merged, resolve=True)


def _model_args(config: dict) -> dict:
    model = config.get("model") or {}
    return dict(model.get("init_args") or {})


def llm_config_of(args: dict) -> LLMConfig:
    """The trunk's LLMConfig: the recipe's `llm`, else read from its `base_llm` (which must then exist)."""
    if args.get("llm"):
        cfg = LLMConfig(**args["llm"])
    else:
        base = args.get("base_llm")
        if not base or not Path(str(base)).exists():
            raise ValueError(f"the recipe gives no model.init_args.llm and its base_llm {base!r} does not exist: build "
                             "it first (`make base-llm` for the tiny recipes) or write the llm sizes into the recipe")
        from synergen_lightning.model_parts import read_base_llm_config

        cfg = read_base_llm_config(base)
    return cfg


@dataclass
class ModelSpec:
    """What shapes a SynerGenVL: enough to build it on the meta device or at probe width."""

    llm: dict
    head: dict
    codebook_size: int
    image_size: int
    downsample: int
    fold: tuple[int, int]
    code_dim: int
    stage: str
    fold_output_rms: float | None = None

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def tokens_per_view(self) -> int:
        return self.grid ** 2 // (self.fold[0] * self.fold[1])

    @property
    def codes_per_view(self) -> int:
        return self.grid ** 2


def model_spec(args: dict, num_layers: int | None = None, head_layers: int | None = None,
               extra_vocab: int = 3) -> ModelSpec:
    """The recipe's model. The text tokenizer may add rows to the base vocabulary (<boi> <eoi> <UNCOND>):
    `extra_vocab` of them are counted when the recipe's own `llm` sizes are used."""
    cfg = llm_config_of(args)
    llm = asdict(cfg)
    if args.get("llm"):
        llm["vocab_size"] += extra_vocab
    if num_layers is not None:
        llm["num_layers"] = int(num_layers)
    head = {"num_layers": 4, "hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size}
    head.update(args.get("head") or {})
    if head_layers is not None:
        head["num_layers"] = int(head_layers)
    codebook = args.get("codebook_size")
    if codebook is None:
        raise ValueError("the recipe gives no model.init_args.codebook_size: write it into the recipe (it is read "
                         "from the image tokenizer otherwise, which the plan does not load)")
    return ModelSpec(llm=llm, head=head, codebook_size=int(codebook), image_size=int(args.get("image_size", 512)),
                     downsample=int(args.get("downsample", 8)), fold=tuple(args.get("fold", (2, 8))),
                     code_dim=int(args.get("code_dim", 256)), stage=str(args.get("stage", "stage1")),
                     fold_output_rms=args.get("fold_output_rms"))


def build_model(spec: ModelSpec, device: str | torch.device = "meta"):
    """The SynerGenVL of `spec` (meta device: shapes only, nothing allocated), its stage applied."""
    from synergen_lightning.stages import apply_stage
    from synergen_lightning.system import SynerGenVL

    v = spec.llm["vocab_size"]
    special = {"pad": 0, "bos": 1, "eos": 2, "im_start": 3, "im_end": 4, "boi": v - 3, "eoi": v - 2, "uncond": v - 1}
    with torch.device(device):
        model = SynerGenVL(llm=dict(spec.llm), special_token_ids=special, codebook_size=spec.codebook_size,
                           image_size=spec.image_size, downsample=spec.downsample, fold=spec.fold,
                           code_dim=spec.code_dim, head=dict(spec.head), stage=spec.stage,
                           fold_output_rms=spec.fold_output_rms)
    apply_stage(model, spec.stage)
    return model


@dataclass
class StepShape:
    """One micro-batch as the model sees it (worst case: every row at its longest)."""

    gen_rows: int
    und_rows: int
    seq_len: int
    views_per_row: int = 1
    text_rows: int = 0

    def counts(self, spec: ModelSpec) -> dict[str, int]:
        rows = self.gen_rows + self.und_rows + self.text_rows
        views = (self.gen_rows + self.und_rows) * self.views_per_row
        llm_tokens = rows * self.seq_len
        return {"llm_tokens": llm_tokens, "views": views, "llm_image": views * spec.tokens_per_view,
                "llm_text": llm_tokens - views * spec.tokens_per_view,
                "head_positions": self.gen_rows * self.views_per_row * spec.codes_per_view,
                # every token that is not an image slot may be a supervised text target (worst case)
                "text_tokens": llm_tokens - views * spec.tokens_per_view}


def recipe_shape(config: dict, devices: int, nodes: int, tokens_per_gpu: int | None = None,
                 max_seq_len: int | None = None) -> tuple[StepShape, dict]:
    """The micro-batch the strategy derives at `devices` x `nodes` (`distributed.batch_plan`)."""
    from synergen_lightning.distributed import batch_plan

    config = json.loads(json.dumps(config))
    trainer = config.setdefault("trainer", {})
    trainer["devices"], trainer["num_nodes"] = devices, nodes
    data = (config.setdefault("data", {})).setdefault("init_args", {})
    if max_seq_len is not None:
        data["max_seq_len"] = max_seq_len
    strategy = trainer.get("strategy")
    if tokens_per_gpu is not None:
        if not isinstance(strategy, dict):
            raise ValueError("--tokens-per-gpu needs a recipe whose trainer.strategy is FSDP2Strategy with init_args")
        strategy.setdefault("init_args", {})["tokens_per_gpu"] = tokens_per_gpu
    plan = batch_plan(config)
    if plan is None:  # no global batch: the datamodule's batch_size is per rank
        micro = data.get("batch_size") or 1
        plan = {"world_size": devices * nodes, "micro_batch": micro, "accumulate_grad_batches":
                trainer.get("accumulate_grad_batches", 1)}
    micro = plan["micro_batch"]
    micro = micro if isinstance(micro, dict) else {"generation": int(micro)}
    seq = data.get("max_seq_len")
    if seq is None:
        raise ValueError("the recipe's data.init_args has no max_seq_len: give --max-seq-len (the longest row)")
    views = int(data.get("max_tiles") or 1) + (1 if data.get("thumbnail") and int(data.get("max_tiles") or 1) > 1 else 0)
    shape = StepShape(gen_rows=int(micro.get("generation", 0)), und_rows=int(micro.get("understanding", 0)),
                      text_rows=int(micro.get("text", 0)), seq_len=int(seq), views_per_row=views)
    return shape, plan


def fsdp_shard(world: int, shard_size: int | None) -> int:
    """The ranks a parameter is sharded over: HSDP's `shard_size`, or every rank when unset or larger
    (`distributed.hsdp_mesh`)."""
    return min(int(shard_size or world), world)


def strategy_settings(config: dict) -> dict:
    trainer = config.get("trainer") or {}
    strategy = trainer.get("strategy")
    args = (strategy.get("init_args") or {}) if isinstance(strategy, dict) else {}
    precision = str(trainer.get("precision", "32-true"))
    param_dtype = args.get("param_dtype")
    bf16 = precision.startswith("bf16") or param_dtype in ("bfloat16", "bf16")
    # FSDP2Strategy or Lightning's ModelParallelStrategy shard; any other strategy (auto, ddp) keeps the whole model
    fsdp = isinstance(strategy, dict) and str(strategy.get("class_path", "")).rsplit(".", 1)[-1] in (
        "FSDP2Strategy", "ModelParallelStrategy")
    return {"strategy": strategy if isinstance(strategy, str) or strategy is None else strategy.get("class_path"),
            "fsdp": fsdp, "param_dtype": param_dtype, "reduce_dtype": args.get("reduce_dtype", "float32"),
            "activation_checkpointing": bool(args.get("activation_checkpointing", False)),
            "shard_size": args.get("shard_size"), "reshard_after_forward": args.get("reshard_after_forward", True),
            "precision": precision, "compute": "bf16" if bf16 else "fp32"}


# ------------------------------------------------------------------------------------------------ probes
def probe_batch(spec: ModelSpec, shape: StepShape, generator: torch.Generator | None = None) -> dict:
    """A training batch of `shape` (docs/architecture.md's contract): generation rows (prompt, <boi>, the view's
    slots, <eoi>; image codes supervised), understanding rows (<boi>, slots, <eoi>, supervised text) and text
    rows, every row `seq_len` long and every non-slot token supervised (the worst case)."""
    from synergen_lightning.data.batch import add_indices

    g = generator or torch.Generator().manual_seed(0)
    v, p = spec.llm["vocab_size"], spec.tokens_per_view
    boi, eoi = v - 3, v - 2
    tasks = ["generation"] * shape.gen_rows + ["understanding"] * shape.und_rows + ["text"] * shape.text_rows
    b, t = len(tasks), shape.seq_len
    need = shape.views_per_row * (p + 2) + 1
    if tasks[:shape.gen_rows + shape.und_rows] and t < need:
        raise ValueError(f"seq_len {t} cannot hold {shape.views_per_row} view(s) of {p} tokens: use at least {need}")
    ids = torch.randint(5, max(6, v - 3), (b, t), generator=g)
    image_mask = torch.zeros(b, t, dtype=torch.bool)
    for r, task in enumerate(tasks):
        if task == "text":
            continue
        start = 1 if task == "understanding" else t - shape.views_per_row * (p + 2)
        for k in range(shape.views_per_row):
            s = start + k * (p + 2)
            ids[r, s], ids[r, s + p + 1] = boi, eoi
            image_mask[r, s + 1:s + 1 + p] = True
    labels = ids.masked_fill(image_mask, -100)
    n_views = (shape.gen_rows + shape.und_rows) * shape.views_per_row
    codes = torch.randint(0, spec.codebook_size, (n_views, spec.grid, spec.grid), generator=g)
    loss = torch.tensor([task == "generation" for task in tasks if task != "text" for _ in range(shape.views_per_row)])
    batch = {"input_ids": ids, "image_mask": image_mask, "attention_mask": torch.ones(b, t, dtype=torch.bool),
             "position_ids": torch.arange(t).expand(b, t).clone(), "labels": labels, "task": tasks,
             "image_codes": codes, "image_loss_mask": loss}
    return add_indices(batch)


def scaled_spec(spec: ModelSpec, head_dim: int) -> ModelSpec:
    """`spec` at a tiny width: the same heads, `head_dim` per head, every other width scaled by the same factor."""
    s = head_dim / (spec.llm["hidden_size"] / spec.llm["num_heads"])
    llm = dict(spec.llm, hidden_size=spec.llm["num_heads"] * head_dim, head_dim=None,
               intermediate_size=max(2, round(spec.llm["intermediate_size"] * s)),
               vocab_size=min(spec.llm["vocab_size"], 512))
    hh = spec.head.get("hidden_size", spec.llm["hidden_size"])
    h_heads = spec.head.get("num_heads", spec.llm["num_heads"])
    h_dim = max(2, 2 * round(hh / h_heads * s / 2))
    head = dict(spec.head, hidden_size=h_heads * h_dim,
                intermediate_size=max(2, round(spec.head.get("intermediate_size", spec.llm["intermediate_size"]) * s)))
    return ModelSpec(llm=llm, head=head, codebook_size=min(spec.codebook_size, 256), image_size=spec.image_size,
                     downsample=spec.downsample, fold=spec.fold, code_dim=max(2, round(spec.code_dim * s)),
                     stage=spec.stage, fold_output_rms=spec.fold_output_rms)


def saved_bytes(model, batch: dict, compute: str = "fp32") -> dict:
    """Bytes autograd saves for the backward in one forward of `model` on `batch`, by region (REGIONS), each
    storage counted once and parameters not at all; and the element size of the residual stream."""
    trunk, head = model.llm.model, model.head.model
    region_of: dict[int, str] = {id(b): "llm_layer" for b in trunk.layers}
    region_of.update({id(b): "head_layer" for b in head.stack.layers})
    region_of.update({id(head): "head", id(model.folder): "folder", id(trunk.lm_head): "text_loss"})
    stack: list[str] = ["other"]
    stream: dict[str, int] = {}

    def enter(name):
        def hook(module, args):
            stack.append(name)
            stream.setdefault("bytes", args[0].element_size()) if name == "llm_layer" else None
        return hook

    def leave(module, args, out):
        stack.pop()

    handles = []
    for m in model.modules():
        if id(m) in region_of:
            handles.append(m.register_forward_pre_hook(enter(region_of[id(m)])))
            handles.append(m.register_forward_hook(leave))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in params and st.nbytes():
                if ptr not in seen or seen[ptr][1] < st.nbytes():
                    seen[ptr] = (seen.get(ptr, (stack[-1], 0))[0], st.nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
            loss = model.forward_losses(batch)["loss"]
    finally:
        for h in handles:
            h.remove()
    out = dict.fromkeys(REGIONS, 0)
    for region, n in seen.values():
        out[region] += n
    del loss
    return {"regions": out, "stream_bytes": stream.get("bytes", 4)}


def probe_activations(spec: ModelSpec, compute: str = "fp32") -> dict:
    """`measure_activations`, measured once per model and compute dtype in a process (the probes are deterministic;
    callers get their own copy)."""
    key = (json.dumps(asdict(spec), sort_keys=True), compute)
    if key not in _PROBES:
        _PROBES[key] = measure_activations(spec, compute)
    return copy.deepcopy(_PROBES[key])


_PROBES: dict[tuple[str, str], dict] = {}


def measure_activations(spec: ModelSpec, compute: str = "fp32") -> dict:
    """Saved bytes per unit (`UNITS`), measured at two tiny widths and extrapolated linearly to `spec`'s width.
    At each width two batches of one generation and one understanding row, one with 224 more text tokens per row,
    split the LLM's bytes per token into text and image tokens (in stage 1 only the image tokens' FFN trains, so
    only they keep their FFN inputs for a weight gradient)."""
    width = spec.llm["hidden_size"]
    points = []
    for hd in PROBE_HEAD_DIMS:
        small = scaled_spec(spec, hd)
        torch.manual_seed(0)
        model = build_model(small, "cpu")
        if compute == "bf16":
            model = model.to(torch.bfloat16)
        model.train()
        got = []
        for extra in (0, 224):
            shape = StepShape(gen_rows=1, und_rows=1, seq_len=small.tokens_per_view + 2 + 32 + extra)
            r = saved_bytes(model, probe_batch(small, shape), compute)
            got.append((shape.counts(small), r["regions"], r["stream_bytes"]))
        (ca, ra, sb), (cb, rb, _) = got
        per = {}
        for region, layers in (("llm_layer", small.llm["num_layers"]), ("other", 1)):
            text = (rb[region] - ra[region]) / layers / (cb["llm_text"] - ca["llm_text"])
            per[f"{region}_text"] = text
            per[f"{region}_image"] = (ra[region] / layers - text * ca["llm_image"]) / max(ca["llm_image"], 1)
        per["head_layer"] = ra["head_layer"] / max(ca["head_positions"] * small.head["num_layers"], 1)
        per["head"] = ra["head"] / max(ca["head_positions"], 1)
        per["folder"] = ra["folder"] / max(ca["views"], 1)
        per["text_loss"] = rb["text_loss"] / max(cb["text_tokens"], 1)
        points.append((small.llm["hidden_size"], per, sb))
    (w0, a, sb), (w1, b, _) = points
    per_unit = {k: a[k] + (b[k] - a[k]) * (width - w0) / (w1 - w0) for k in UNITS}
    return {"bytes_per_unit": per_unit, "stream_bytes": sb, "probe_widths": [w0, w1],
            "probe_bytes_per_unit": [a, b], "compute": compute, "units": UNITS}


# ------------------------------------------------------------------------------------------------ image tokenizer
class LiveBytes(TorchDispatchMode):
    """Counts the storages the ops under it create (each once, until its last tensor is freed): `live` bytes now,
    `peak` the most at once. On the meta device nothing is allocated or computed, and the sizes are the real ones."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):  # made before the count began (weights, inputs): a view of one is free
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                self.seen[t.untyped_storage()] = 0
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                storage = t.untyped_storage()
                self.seen[storage] = nbytes = storage.nbytes()
                self.live += nbytes
                weakref.finalize(storage, self._freed, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def activation_peak(call: Callable[[], object]) -> int:
    """Peak bytes of the tensors `call` creates (activations, temporaries and its outputs; not the weights it reads),
    on whatever device they live (meta included)."""
    with torch.no_grad(), LiveBytes() as counter:
        call()
    return counter.peak


def tokenizer_memory(path: str | None, image_size: int) -> dict:
    """The recipe's image tokenizer on one GPU: its weights, and one online encoding of a micro-batch's views
    (`SynerGenVL.ENCODE_VIEWS` at a time, through the tokenizer's own `encode`), built and run on the meta device."""
    from synergen_lightning.image_tokenizer.loading import build_image_tokenizer
    from synergen_lightning.system import SynerGenVL

    if not path:
        return {"path": None, "counted": False, "why": "the recipe names no image tokenizer (pretokenized shards)"}
    if not Path(path).exists():
        return {"path": str(path), "counted": False,
                "why": f"{path} does not exist here: point model.init_args.image_tokenizer at a local copy (only its "
                       "config.json or checkpoint hyperparameters are read) to count it"}
    tok = build_image_tokenizer(path)
    weights = sum(t.numel() * t.element_size() for t in (*tok.parameters(), *tok.buffers()))
    views = SynerGenVL.ENCODE_VIEWS
    images = torch.zeros(views, 3, image_size, image_size, device="meta")
    return {"path": str(path), "counted": True, "weights_bytes": weights, "views": views,
            "encode_bytes": activation_peak(lambda: tok.encode(images))}


# ------------------------------------------------------------------------------------------------ estimate
def fsdp_units(model) -> list[tuple[str, int, int]]:
    """(unit, parameters, trainable parameters) of `distributed.parallelize`'s units."""
    taken: set[int] = set()
    units = []

    def unit(name, modules):
        ps = [p for m in modules for p in m.parameters() if id(p) not in taken]
        taken.update(id(p) for p in ps)
        units.append((name, sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)))

    trunk, head = model.llm.model, model.head.model
    for i, b in enumerate(trunk.layers):
        unit(f"llm.model.layers.{i}", [b])
    for i, b in enumerate(head.stack.layers):
        unit(f"head.model.stack.layers.{i}", [b])
    unit("llm.model.embed_tokens", [trunk.embed_tokens])
    unit("llm.model.lm_head", [trunk.lm_head])
    unit("folder", [model.folder])
    unit("special_embed", [model.special_embed])
    unit("head.model", [head])
    unit("llm.model", [trunk])
    unit("root", [model])
    return units


def estimate(spec: ModelSpec, shape: StepShape, *, shard: int = 1, param_dtype: str | None = None,
             reduce_dtype: str | None = "float32", compute: str = "fp32", activation_checkpointing: bool = False,
             probe: dict | None = None, fsdp: bool = True, tokenizer: dict | None = None) -> dict:
    """Per-GPU bytes of one training step of `spec` on a micro-batch of `shape` (module docstring: the method).
    `fsdp=False`: the model is not sharded (one device, or DDP replicas), so no unit is gathered. `tokenizer`:
    `tokenizer_memory`'s count of the image tokenizer, when it is counted."""
    from synergen_lightning.distributed import to_dtype

    model = build_model(spec, "meta")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    units = fsdp_units(model)
    probe = probe or probe_activations(spec, compute)
    per = probe["bytes_per_unit"]
    c = shape.counts(spec)
    llm_layers, head_layers = spec.llm["num_layers"], spec.head["num_layers"]
    pdt = to_dtype(param_dtype)
    # FSDP2 gathers a unit in param_dtype, or in the parameters' own fp32 when none is set (at world size 1 too)
    gather_b = (pdt.itemsize if pdt is not None else 4) if fsdp else 0
    rdt = to_dtype(reduce_dtype) or torch.float32
    # one block's saved activations (the largest of an LLM block and a head block at this micro-batch)
    llm_block = per["llm_layer_text"] * c["llm_text"] + per["llm_layer_image"] * c["llm_image"]
    head_block = per["head_layer"] * c["head_positions"]
    block = max(llm_block, head_block)
    stream = probe["stream_bytes"]
    if activation_checkpointing:
        blocks = stream * (spec.llm["hidden_size"] * c["llm_tokens"] * llm_layers
                           + spec.head.get("hidden_size", spec.llm["hidden_size"]) * c["head_positions"] * head_layers)
    else:
        blocks = llm_block * llm_layers + head_block * head_layers
    # with checkpointing the backward recomputes one block at a time: its activations come back for the block's backward
    working = block if activation_checkpointing else 0
    acts = {"blocks": blocks,
            "head_io": per["head"] * c["head_positions"], "folder": per["folder"] * c["views"],
            "text_loss": per["text_loss"] * c["text_tokens"], "embeddings_norms": per["other_text"] * c["llm_text"] + per["other_image"] * c["llm_image"]}
    ce_rows = {"image": (c["head_positions"], spec.codebook_size), "text": (c["text_tokens"], spec.llm["vocab_size"])}
    ce = max(min(rows, max(1, CHUNK_LOGITS // vocab)) * vocab for rows, vocab in ce_rows.values())
    ce_bytes = ce * CE_BYTES_PER_LOGIT
    largest = max(units, key=lambda u: u[1])
    state = {"params_fp32": 4 * n_params / shard, "grads_fp32": 4 * n_train / shard,
             "adamw_fp32": 8 * n_train / shard}
    # FSDP2 holds the unit that runs gathered in param_dtype and prefetches the next one; in the backward also the
    # unit's unsharded gradient in param_dtype and its reduce_dtype copy. At the loss that is the unit of the classifier
    # computing it (the head's or the LM head's) and the next block; in the backward a block and the one before it.
    by_name = {name: n for name, n, _ in units}
    blocks_nt = [(n, t) for name, n, t in units if ".layers." in name]
    llm_nt = [(n, t) for name, n, t in units if name.startswith("llm.model.layers.")]

    # across ranks a unit arrives as one flat all-gather output, copied into its parameters: the next unit's output
    # is alive beside them (one block more than on one rank, where nothing is all-gathered); and the previous block's
    # reduce-scatter input (its gradients in reduce_dtype) is still in flight during a block's backward
    copies, in_flight = (3, 1) if shard > 1 else (2, 0)

    def backward_gathered(block_units):
        return max(copies * n * gather_b + t * (gather_b + (1 + in_flight) * rdt.itemsize)
                   for n, t in block_units) if gather_b else 0

    gathered = {"loss": (max(by_name["head.model"], by_name["llm.model.lm_head"])
                         + (copies - 1) * max(n for n, _ in blocks_nt)) * gather_b,
                "backward": backward_gathered(blocks_nt), "end of the backward": backward_gathered(llm_nt)}
    # three candidate peaks, each with the units gathered then. The loss: every activation alive, one cross-entropy
    # chunk in flight. In the backward the gradients grow as the activations go: at its start the head's and the LM
    # head's gradients beside every activation and the largest block recomputed; at its end (the trunk's first block)
    # every gradient beside the activations outside the blocks and that block's.
    a = sum(acts.values())
    early = sum(t for name, _, t in units
                if name in ("head.model", "llm.model.lm_head") or name.startswith("head.model.stack."))
    first_block = (stream * spec.llm["hidden_size"] * c["llm_tokens"]) if activation_checkpointing else llm_block
    recomputed = {"loss": 0, "backward": working, "end of the backward": llm_block if activation_checkpointing else 0}
    peaks = {"loss": a + ce_bytes,
             "backward": a + 4 * early / shard,
             "end of the backward": a - blocks + first_block + state["grads_fp32"]}
    peaks = {k: v + recomputed[k] + gathered[k] for k, v in peaks.items()}
    encoding = 0
    if tokenizer and tokenizer.get("counted"):
        # fp32 weights on every GPU (not a submodule: never sharded); encoding comes before the forward, beside the
        # gradients that earlier micro-batches of an accumulation left
        state["image_tokenizer"] = tokenizer["weights_bytes"]
        encoding = tokenizer["encode_bytes"]
        peaks["online tokenization"] = encoding + state["grads_fp32"]
    peak_at = max(peaks, key=peaks.get)
    transient = {"recomputed_block": recomputed.get(peak_at, 0), "chunked_ce": ce_bytes if peak_at == "loss" else 0,
                 "fsdp_gathered": gathered.get(peak_at, 0),
                 "tokenizer_encode": encoding if peak_at == "online tokenization" else 0}
    total = state["params_fp32"] + state["adamw_fp32"] + state.get("image_tokenizer", 0) + peaks[peak_at]
    return {"parameters": n_params, "trainable": n_train, "shard": shard, "counts": c,
            "state_bytes": state, "activation_bytes": acts, "transient_bytes": transient,
            "activation_checkpointing": activation_checkpointing, "compute": compute, "fsdp": fsdp, "peak_at": peak_at,
            "largest_unit": {"name": largest[0], "parameters": largest[1]},
            "total_bytes": total, "checkpoint_bytes": 4 * n_params + 8 * n_train, "probe": probe}


def plan_recipe(configs: list[str], devices: int, nodes: int = 1, *, num_layers: int | None = None,
                head_layers: int | None = None, tokens_per_gpu: int | None = None, max_seq_len: int | None = None,
                activation_checkpointing: bool | None = None, micro_batch: dict | None = None) -> dict:
    """Everything `synergen plan` prints, as a dict."""
    config = load_recipe(configs)
    cls = str((config.get("model") or {}).get("class_path", ""))
    if not cls.endswith("SynerGenVL"):
        raise ValueError(f"{' + '.join(map(str, configs))} trains {cls or 'no model'!r}: `synergen plan` sizes "
                         "SynerGenVL recipes (recipes/*/stage1.yaml, stage2.yaml, sft.yaml)")
    args = _model_args(config)
    spec = model_spec(args, num_layers, head_layers)
    settings = strategy_settings(config)
    if activation_checkpointing is not None:
        settings["activation_checkpointing"] = activation_checkpointing
    shape, batch = recipe_shape(config, devices, nodes, tokens_per_gpu, max_seq_len)
    if micro_batch:
        shape = StepShape(gen_rows=int(micro_batch.get("generation", 0)), und_rows=int(micro_batch.get("understanding", 0)),
                          text_rows=int(micro_batch.get("text", 0)), seq_len=shape.seq_len, views_per_row=shape.views_per_row)
    world = devices * nodes
    shard = fsdp_shard(world, settings["shard_size"]) if settings["fsdp"] else 1
    probe = probe_activations(spec, settings["compute"])
    tokenizer = tokenizer_memory(args.get("image_tokenizer"), spec.image_size)
    out = {}
    for ac in (False, True):
        out["with_ac" if ac else "without_ac"] = estimate(
            spec, shape, shard=shard, param_dtype=settings["param_dtype"], reduce_dtype=settings["reduce_dtype"],
            compute=settings["compute"], activation_checkpointing=ac, probe=probe, fsdp=settings["fsdp"],
            tokenizer=tokenizer)
    chosen = out["with_ac" if settings["activation_checkpointing"] else "without_ac"]
    return {"recipe": configs, "world_size": world, "fsdp_shard": shard, "batch_plan": batch,
            "micro_batch": asdict(shape), "model": asdict(spec), "settings": settings, "image_tokenizer": tokenizer,
            "estimates": out, "recipe_estimate": chosen}


# ------------------------------------------------------------------------------------------------ CLI
def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def report(plan: dict, gpu_gb: float, margin: float) -> tuple[str, bool]:
    """The printed plan and whether the recipe's setting fits `gpu_gb` with `margin` to spare."""
    s, est = plan["settings"], plan["recipe_estimate"]
    m = plan["micro_batch"]
    c = est["counts"]
    sharding = (f"FSDP2 shard group {plan['fsdp_shard']}; params {s['param_dtype'] or 'fp32'}, reduce {s['reduce_dtype']}"
                if s["fsdp"] else f"not sharded: trainer.strategy {s['strategy'] or 'auto'} keeps the whole model on "
                "every GPU")
    lines = [f"synergen plan: {' + '.join(plan['recipe'])} at {plan['world_size']} GPU(s) "
             f"({sharding}; {s['precision']}; stage {plan['model']['stage']})",
             f"  model: {est['parameters']:,} parameters, {est['trainable']:,} trainable; LLM {plan['model']['llm']['num_layers']} "
             f"layers x {plan['model']['llm']['hidden_size']}, head {plan['model']['head']['num_layers']} layers",
             f"  micro-batch: {m['gen_rows']} generation + {m['und_rows']} understanding + {m['text_rows']} text rows x "
             f"{m['seq_len']} tokens = {c['llm_tokens']:,} LLM tokens, {c['head_positions']:,} head positions; "
             f"accumulate {plan['batch_plan'].get('accumulate_grad_batches')}",
             "  per GPU:"]
    for k, v in est["state_bytes"].items():
        lines.append(f"    {k:<24}{_gb(v):>14}")
    for label, key in (("activations, no checkpointing", "without_ac"), ("activations, checkpointing", "with_ac")):
        e = plan["estimates"][key]
        lines.append(f"    {label:<32}{_gb(sum(e['activation_bytes'].values())):>12}   "
                     f"(peak at the {e['peak_at']}: total {_gb(e['total_bytes'])})")
    tok = plan["image_tokenizer"]
    if tok["counted"]:
        lines.append(f"    {'online tokenization':<32}{_gb(tok['encode_bytes']):>12}   ({tok['views']} views of "
                     f"{plan['model']['image_size']} px through the image tokenizer's encode, before the forward)")
    else:
        lines.append(f"  not counted: the image tokenizer ({tok['why']})")
    lines.append(f"  checkpoint on disk (weights + AdamW moments): {_gb(est['checkpoint_bytes'])}")
    if not s["fsdp"] and plan["world_size"] > 1:
        lines.append("  not counted: DDP's gradient buckets at more than one GPU (about the gradients' size again)")
    budget = gpu_gb * 1e9
    fits = est["total_bytes"] * (1 + margin) <= budget
    ac = "on" if s["activation_checkpointing"] else "off"
    lines.append(f"  estimate at the recipe's setting (activation checkpointing {ac}): {_gb(est['total_bytes'])} "
                 f"per GPU; with a {margin:.0%} margin {_gb(est['total_bytes'] * (1 + margin))} of {gpu_gb:g} GB")
    if not fits:
        over = est["total_bytes"] * (1 + margin) - budget
        hint = ("shard with FSDP2 and checkpoint activations (trainer.strategy as in recipes/synergen_vl_2b/stage1.yaml)"
                if not s["fsdp"] else
                "turn activation checkpointing on (trainer.strategy.init_args.activation_checkpointing: true)"
                if not s["activation_checkpointing"] else "lower trainer.strategy.init_args.tokens_per_gpu")
        more = ", or shard over more GPUs (shard_size)" if s["fsdp"] else ""
        lines.append(f"WARNING: over {gpu_gb:g} GB with the {margin:.0%} margin by {_gb(over)}: {hint}{more}")
    return "\n".join(lines), fits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="synergen plan",
        description="Per-GPU memory of a recipe's training step under FSDP2 (parameters, gradients, AdamW states, "
                    "activations with and without activation checkpointing, transients) and its checkpoint size, "
                    "from the model built on the meta device and activations measured at tiny width on the CPU "
                    "(method: synergen_lightning/plan.py). Warns when the estimate plus the margin passes the GPU memory.")
    p.add_argument("--config", action="append", required=True,
                   help="recipe YAML (repeat to merge, as `synergen fit`), e.g. recipes/synergen_vl_2b/stage1.yaml")
    p.add_argument("--devices", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (world size = devices x nodes; default 1)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    p.add_argument("--margin", type=float, default=0.2, help="headroom asked for on top of the estimate (default 0.2)")
    p.add_argument("--num-layers", type=int, default=None, help="LLM depth instead of the recipe's (a reduced-depth probe)")
    p.add_argument("--head-layers", type=int, default=None, help="unfolding-head depth instead of the recipe's")
    p.add_argument("--tokens-per-gpu", type=int, default=None, help="the strategy's tokens_per_gpu instead of the recipe's")
    p.add_argument("--max-seq-len", type=int, default=None, help="the data's max_seq_len instead of the recipe's")
    p.add_argument("--activation-checkpointing", choices=["on", "off"], default=None,
                   help="override the recipe's strategy setting (both are printed either way)")
    p.add_argument("--json", default=None, help="also write the whole plan as JSON to this file")
    a = p.parse_args(argv)
    for name in ("devices", "nodes"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} {getattr(a, name)}: give a positive count")
    if a.margin < 0:
        raise ValueError(f"--margin {a.margin}: give the headroom as a fraction >= 0 (0.2: 20%)")
    ac = None if a.activation_checkpointing is None else a.activation_checkpointing == "on"
    plan = plan_recipe(a.config, a.devices, a.nodes, num_layers=a.num_layers, head_layers=a.head_layers,
                       tokens_per_gpu=a.tokens_per_gpu, max_seq_len=a.max_seq_len, activation_checkpointing=ac)
    text, fits = report(plan, a.gpu_memory_gb, a.margin)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(plan, fits=fits, gpu_memory_gb=a.gpu_memory_gb, margin=a.margin),
                                           indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
