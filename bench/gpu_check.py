"""`make gpu-check`: the GPU figures of the toolkit in one run (< 8 minutes on one GPU) -> runs/gpu_check/results.json.

Sections, in the order they run (cheap ones and the targets' figures first), each recording its own error (one
failing path does not hide the others):

- `reduced_2b_step`: the 2b SynerGenVL (InternLM2-1.8B widths, `bench_mfu.build_2b`) at reduced depth, sharded with
  `distributed.parallelize` (bf16 params, activation checkpointing, `torch.compile` per block), one AdamW step on
  generation rows: MFU against a bf16 GEMM timed in the same run (model FLOPs, `bench_mfu.system_flops`: the
  recomputation of activation checkpointing is not counted, as MFU is defined), peak memory
  (`torch.cuda.max_memory_allocated`) beside `synergen plan`'s estimate of the same shape (`plan.estimate`).
- `dcp_roundtrip`: a sharded (DCP) save of an FSDP2 model and its load, into a fresh sharded model
  (`distributed.load_sharded_into`) and without a process group (`load_sharded_state_dict`): every tensor equal.
- `flash_attention`: a training forward and backward of the 2b SynerGenVL at reduced depth (16 query heads over 8 KV
  heads: SDPA's `enable_gqa`) on a right-padded batch of rows of different lengths in bf16, with SDPA restricted to
  FlashAttention (`torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)`): whether the kernel accepts every
  attention call (else SDPA's refusal and its reasons), under FSDP2's bf16 parameters and under autocast over fp32
  parameters, and how the calls were made (mask, causal, GQA). The CPU has no FlashAttention: the same forward at
  tiny sizes records its calls and "not measured".
- `tiny_stage1`: the tiny chain's stage 1 (`recipes/tiny/stage1.yaml` through the CLI's `lightning_cli`) on a tiny
  synthetic world written here (`synergen data synth`, an untrained base LLM and VQ tokenizer: nothing of the demo
  is needed), under FSDP2Strategy on one device, without and with `torch.compile` per block: loss curves (they
  must agree within `LOSS_TOL`) and step times. CUDA: 100 steps in bf16 (bf16-mixed, bf16 params).
- `recipes_2b`: the three 2b recipes as shipped (`recipes/synergen_vl_2b/*.yaml` through the CLI's `lightning_cli`),
  chained by `model.init_from`, on stand-ins of their models and data (`standins_2b`: reduced widths, the recipes'
  vocabulary, codebook, folding, strategy and data module), 2 steps each on one device, then `synergen export`,
  `generate` and `answer` from the SFT checkpoint on the device. CUDA: bf16 and the recipes' 512-px views (Emu3's
  VQ-VAE through transformers where it is installed, else the toolkit's VQTokenizer of the same codebook).
- `generation`: KV-cached generation of one image and of 16 images, folded (`inference.generate_codes`) vs an
  unfolded model reading and writing every code (`bench_folding.unfolded_generate`), eager and compiled
  (`generate_codes(compile=True)`: the head's patch and the LLM's step as graphs; a CUDA graph for the head on a GPU),
  with where the compiled codes first part from the eager ones.

Without CUDA the same script runs at tiny sizes on the CPU (a few steps, fp32; compile is off unless `--compile on`:
it takes minutes there) and says that the GPU figures are not measured: that run is its test (tests/test_gpu_check.py).
The JSON is rewritten after every section; when `--budget-s` is spent, the section running is stopped (keeping what it
had measured: a section records its figures as it goes) and the rest are skipped, so a run with a fixed GPU slot, or
one that meets a slow compiler, still leaves the figures it measured.

    .venv/bin/python bench/gpu_check.py [--out runs/gpu_check/results.json] [--device cpu] [--compile on]

On a GPU node without internet whose Python already holds torch and lightning: docs/distributed.md, "Offline GPU
nodes".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import in_project  # noqa: E402  (bench/ on the path above)

LOSS_TOL = 0.05  # |compiled - eager| / eager loss, per step (bf16 rounding differs between the two)
NOT_MEASURED = "no CUDA device: the GPU figures are not measured (tiny sizes on the CPU, a smoke test of every path)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ensure_process_group(device: str) -> None:
    """A world-size-1 process group for `parallelize` (FSDP2 needs one even on one device)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        # one rank: an in-process store, no TCP port another process could take first
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


# ------------------------------------------------------------------------------------------------ tiny stage 1
class LossRecorder:
    """A Lightning callback: the loss and wall time of every training batch (micro-batch)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Recorder(Callback):
            def __init__(self):
                self.losses, self.times, self._t = [], [], None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _sync(pl_module.device.type)
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync(pl_module.device.type)
                self.times.append(time.perf_counter() - self._t)
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                # one entry per micro-batch, at its full scale (Lightning hands on the loss divided by the accumulation)
                self.losses.append(float(loss) * trainer.accumulate_grad_batches)

        return _Recorder()


def fresh_dynamo() -> None:
    """Compile caches and counters emptied, so that `dynamo_counts` counts one section."""
    torch._dynamo.reset()
    counters.clear()


def dynamo_counts() -> dict:
    """Since `fresh_dynamo`: the graphs compiled, the graph breaks met (a break leaves part of a block, or all of it,
    eager) and the CUDA graphs inductor declined (`mode="reduce-overhead"` then runs the kernels one by one)."""
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "break_reasons": sorted(k.splitlines()[0][:160] for k in counters["graph_break"])[:4],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def recorded_fit(args: list[str]):
    """`synergen fit ARGS` (ARGS without "fit") built as the CLI builds it, fitted with a `LossRecorder`:
    (trainer, recorder, seconds of the fit)."""
    from synergen_lightning.cli import lightning_cli

    cli = lightning_cli(args, run=False)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.trainer, recorder, time.perf_counter() - t0


def tiny_stage1(work: Path, device: str, steps: int, compile: bool) -> dict:
    bf16 = device == "cuda"
    args = ["fit", "--config", str(ROOT / "recipes/tiny/stage1.yaml"), "--seed_everything", "0",
            "--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", json.dumps([{"class_path": "callbacks.stages.StageCallback",
                                                 "init_args": {"stage": "stage1"}}]),
            "--trainer.precision", "bf16-mixed" if bf16 else "32-true",
            "--trainer.strategy.class_path", "synergen_lightning.distributed.FSDP2Strategy",
            "--trainer.strategy.init_args.compile", "true" if compile else "false",
            "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "16"]
    if bf16:
        args += ["--trainer.strategy.init_args.param_dtype", "bfloat16"]
    else:
        args += ["--data.init_args.batch_size", json.dumps({"generation": 4, "understanding": 4})]
    with in_project(work):  # the recipe reads data/tiny and runs/tiny/... relative to the project
        fresh_dynamo()
        _, recorder, wall = recorded_fit(args[1:])
    times = recorder.times
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None
    return {"steps": len(recorder.losses), "losses": recorder.losses, "first_step_s": times[0] if times else None,
            "median_step_s": steady, "fit_wall_s": wall, "precision": "bf16-mixed" if bf16 else "32-true",
            "compile": compile, **(dynamo_counts() if compile else {})}


def section_tiny_stage1(device: str, work: Path, compile: bool, out: dict | None = None) -> dict:
    from tiny_world import make_tiny_world

    out = {} if out is None else out  # filled as it goes: a section stopped at the budget keeps what it measured

    make_tiny_world(work, num_samples=120)
    steps = 100 if device == "cuda" else 3
    out["eager"] = tiny_stage1(work, device, steps, compile=False)
    if compile:
        try:
            out["compiled"] = tiny_stage1(work, device, steps, compile=True)
        except BudgetSpent:
            raise
        except Exception as exc:  # noqa: BLE001 -- a compile failure is recorded, the eager figures kept
            out["compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            return out
        a, b = out["eager"]["losses"], out["compiled"]["losses"]
        worst = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(a, b)) if a and len(a) == len(b) else None
        out["max_rel_loss_diff"] = worst
        out["losses_match"] = worst is not None and worst <= LOSS_TOL
        eager_s, compiled_s = out["eager"]["median_step_s"], out["compiled"]["median_step_s"]
        out["compile_speedup"] = eager_s / compiled_s if eager_s and compiled_s else None
    else:
        out["compiled"] = {"skipped": "torch.compile per block takes minutes on a CPU (RESULTS.md): --compile on"}
    return out


# ------------------------------------------------------------------------------------------------ the 2b recipes
def section_recipes_2b(device: str, work: Path, out: dict | None = None) -> dict:
    """The three 2b recipes as shipped, chained (`model.init_from`), on stand-ins of their models and data
    (`standins_2b`: reduced widths, the recipes' vocabulary, codebook, folding, strategy and data module), 2 steps
    each on one device, then export, generate and answer from the SFT checkpoint. CUDA: bf16 as the recipes, the
    recipes' 512-px views; CPU: fp32, 128-px views."""
    import io

    import standins_2b as s2b
    from synergen_lightning.checkpoint import read_checkpoint_meta
    from synergen_lightning.cli import main as synergen

    kind = s2b.image_tokenizer_kind()
    cuda = device == "cuda"
    image_size = 512 if cuda else 128
    root = s2b.make_2b_standins(work / "standins_2b", image_tokenizer=kind)
    project = work / "project_2b"
    project.mkdir()
    out = {} if out is None else out  # filled as it goes: a section stopped at the budget keeps what it measured
    out.update(image_tokenizer=kind, image_size=image_size, widths=s2b.WIDTHS)
    with in_project(project, s2b.env(root)):  # the recipes write and read runs/synergen_vl_2b/... relative to it
        for stage in s2b.STAGES:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            trainer, recorder, _ = recorded_fit(s2b.fit_args(stage, "gpu" if cuda else "cpu", 1,
                                                             image_size=image_size)[1:])
            ckpt = Path(f"runs/synergen_vl_2b/{stage}/last.ckpt")
            out[stage] = {"losses": recorder.losses, "fit_wall_s": time.perf_counter() - t0,
                          "global_step": read_checkpoint_meta(ckpt)["global_step"], "sharded": ckpt.is_dir(),
                          "accumulate_grad_batches": trainer.accumulate_grad_batches, "precision": trainer.precision,
                          "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}
            del trainer, recorder
            gc.collect()  # the stage's model and optimizer gone before the next stage's peak is counted
            if cuda:
                torch.cuda.empty_cache()
        # which parts of the trunk each stage changed, from the checkpoints: stage 1 the vision FFN only, stage 2 the
        # attention too, SFT the text FFN too
        out["trained_parts"] = s2b.trained_parts(root, project)
        out["stages_train_as_the_paper"] = out["trained_parts"] == s2b.PROGRESSIVE_ALIGNMENT
        scene = s2b.understanding_image(root, root / "scene.jpg")
        for name, args in s2b.user_commands(scene, device).items():
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                out[f"{name}_exit"] = synergen(args)
        out["generated"] = sorted(p.name for p in Path("generated").glob("*.png"))
        out["answer"] = printed.getvalue().strip()[-200:]  # what `synergen answer` printed (an untrained model's)
    return out


# ------------------------------------------------------------------------------------------------ reduced 2b step
def section_reduced_2b(device: str, compile: bool) -> dict:
    from bench_mfu import PRESET_2B, QUICK, build_2b, gen_batch, system_flops
    from common import gemm_variant, interleaved
    from synergen_lightning.distributed import parallelize
    from synergen_lightning.plan import ModelSpec, StepShape, estimate

    ensure_process_group(device)
    cuda = device == "cuda"
    if cuda:
        c, images, prompt_len, layers = dict(PRESET_2B, num_layers=4), 8, 32, 4
    else:  # tiny widths of the same build
        c = dict(PRESET_2B, hidden_size=QUICK["hidden_size"], num_heads=QUICK["num_heads"],
                 num_kv_heads=QUICK["num_kv_heads"], intermediate_size=QUICK["intermediate_size"], vocab_size=92547,
                 codebook_size=512, grid=16, head_layers=1, num_layers=2)
        images, prompt_len, layers = 2, 8, 2
    dtype = "bfloat16" if cuda else None
    batch = gen_batch(c, images, prompt_len, device)

    def built(compiled: bool):
        """The model sharded with `parallelize` (compiled per block: FSDP2Strategy's `compile: true`), its optimizer
        and one training step."""
        torch.manual_seed(0)
        fresh_dynamo()
        model = build_2b(c, device).train()
        parallelize(model, None, param_dtype=dtype, reduce_dtype="float32", activation_checkpointing=True,
                    compile=compiled, check_states=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # compiles; AdamW's moments exist from here on, as in a run
        return model, step

    out = {}
    try:  # by default compiled on CUDA only (on the CPU compiling takes minutes)
        model, step = built(compile)
    except BudgetSpent:
        raise
    except Exception as exc:  # noqa: BLE001 -- a compile failure is recorded and the step measured uncompiled
        if not compile:
            raise
        out["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        compile = False
        model, step = built(compile)
    spec = ModelSpec(llm=dict(model.hparams.llm),
                     head={**model.head.model.config.__dict__, "num_layers": c["head_layers"]},
                     codebook_size=c["codebook_size"], image_size=c["grid"] * 8, downsample=8, fold=tuple(c["fold"]),
                     code_dim=c["hidden_size"], stage="full")
    spec.head = {k: spec.head[k]
                 for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    m, k, n = (8192 if cuda else 512), c["hidden_size"], c["intermediate_size"]
    gemm, gemm_flops = gemm_variant(m, k, n, torch.bfloat16 if cuda else torch.float32, device, inner=20 if cuda else 2)
    timed = interleaved({"train_step": step, "gemm_peak": gemm}, 5 if cuda else 2, 1, device=device)
    flops = system_flops(model, c, images, prompt_len)
    mfu = (flops / timed["train_step"]["median_s"]) / (gemm_flops / timed["gemm_peak"]["median_s"])
    shape = StepShape(gen_rows=images, und_rows=0, seq_len=batch["input_ids"].shape[1])
    plan = estimate(spec, shape, shard=1, param_dtype=dtype, compute="bf16" if cuda else "fp32",
                    activation_checkpointing=True)
    out |= {"compiled": compile, "llm_layers": layers, "head_layers": c["head_layers"],
            "hidden_size": c["hidden_size"], "images": images, "seq_len": shape.seq_len,
            "step_s": timed["train_step"]["median_s"], "flops_per_step": flops,
            "gemm_peak_tflops": gemm_flops / timed["gemm_peak"]["median_s"] / 1e12, "mfu": mfu,
            "plan_bytes": plan["total_bytes"], **(dynamo_counts() if compile else {})}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_memory_bytes=peak, plan_over_measured=plan["total_bytes"] / peak)
    else:
        out["peak_memory_bytes"] = None
    return out


# ------------------------------------------------------------------------------------------------ generation
# the parameters' dtype of the generation section on the CPU, on a GPU: `inference_dtype("auto", device)`
GENERATION_DTYPE = {False: torch.float32, True: torch.bfloat16}


def section_generation(device: str, out: dict | None = None) -> dict:
    import bench_folding as bf
    from synergen_lightning.checkpoint import cast_parameters
    from synergen_lightning.inference import generate_codes

    c = dict(bf.FULL) if device == "cuda" else dict(bf.QUICK)
    torch.manual_seed(0)
    fresh_dynamo()
    folded, unfolded = bf.build_folded(c).to(device).eval(), bf.build_unfolded(c).to(device).eval()
    dtype = GENERATION_DTYPE[device == "cuda"]
    for model in (folded, unfolded):  # as the inference commands load a model there (`--dtype auto`)
        cast_parameters(model, dtype)
    p = bf.prompt(c, torch.Generator().manual_seed(0))
    out = {} if out is None else out  # filled as it goes: a section stopped at the budget keeps what it measured
    out["config"] = {k: c[k] for k in ("hidden_size", "num_layers", "head_layers", "codebook_size", "grid")}
    out["dtype"] = str(dtype).removeprefix("torch.")
    seed = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731  (every variant draws the same codes)
    # compiled decoding (head patch and LLM step as graphs) too; on the CPU for one folded image at these tiny sizes
    # (the same code as for 16 and for the unfolded model's step, its graphs built in seconds), so the GPU run meets
    # only CUDA's problems
    with torch.no_grad():
        for n in (1, 16):
            row, eager_codes = out.setdefault(f"images_{n}", {}), {}
            for compile in (False, True) if device == "cuda" or n == 1 else (False,):
                tag = "_compiled" if compile else ""
                for name, fn in (("folded", lambda n=n, k=compile: generate_codes(folded, [p] * n, None, cfg_scale=None,
                                                                                 generator=seed(), compile=k)),
                                 ("unfolded", lambda n=n, k=compile: bf.unfolded_generate(
                                     unfolded, p, c["grid"] ** 2, seed(), rows=n, compile=k))):
                    if compile and name == "unfolded" and device != "cuda":
                        continue
                    try:
                        first = fn() if n == 1 or compile else None  # warm-up (graphs built) once
                        _sync(device)
                        t0 = time.perf_counter()
                        codes = fn()
                        _sync(device)
                    except Exception as exc:  # noqa: BLE001 -- a compile failure is recorded, eager figures kept
                        if not compile or isinstance(exc, BudgetSpent):
                            raise
                        row[f"{name}_compiled_error"] = f"{type(exc).__name__}: {exc}"[:300]
                        break
                    row[f"{name}{tag}_s"] = time.perf_counter() - t0
                    row[f"{name}_codes"] = int(codes.numel())
                    if compile:  # where compiled and eager codes part (None: never); the fused kernels round
                        # differently, so a long unfolded image may flip one draw and differ from there on
                        diff = (codes != eager_codes[name]).flatten(1).any(0).nonzero()
                        row[f"{name}_compiled_first_differing_code"] = int(diff[0]) if len(diff) else None
                    else:
                        eager_codes[name] = codes
                    del first
                if f"unfolded{tag}_s" in row and f"folded{tag}_s" in row:
                    row[f"speedup{tag}"] = row[f"unfolded{tag}_s"] / row[f"folded{tag}_s"]
                    row[f"folded{tag}_images_per_s"] = n / row[f"folded{tag}_s"]
    out["compiled_decoding"] = dynamo_counts()
    return out


# ------------------------------------------------------------------------------------------------ DCP round trip
def section_dcp(device: str, work: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    from memory_check import TINY, spec_of
    from synergen_lightning.distributed import load_sharded_into, load_sharded_state_dict, parallelize
    from synergen_lightning.plan import build_model, scaled_spec

    ensure_process_group(device)
    spec = spec_of(TINY) if device == "cuda" else scaled_spec(spec_of(TINY), 8)
    torch.manual_seed(0)
    a = build_model(spec, device)
    parallelize(a, None, check_states=False)
    path = work / "dcp_roundtrip"
    t0 = time.perf_counter()
    dcp.save({"state_dict": a.state_dict()}, checkpoint_id=str(path))
    save_s = time.perf_counter() - t0
    torch.manual_seed(1)
    b = build_model(spec, device)
    parallelize(b, None, check_states=False)
    t0 = time.perf_counter()
    load_sharded_into(b, path)
    load_s = time.perf_counter() - t0
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    sa, sb = a.state_dict(), b.state_dict()
    into = max(float((full(sa[k]) - full(sb[k])).abs().max()) for k in sa if sa[k].is_floating_point())
    plain = load_sharded_state_dict(path)
    offline = max(float((full(sa[k]).cpu() - plain[k]).abs().max()) for k in sa if sa[k].is_floating_point())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"tensors": len(sa), "bytes_on_disk": size, "save_s": save_s, "load_s": load_s,
            "max_abs_diff_sharded_load": into, "max_abs_diff_offline_load": offline,
            "identical": into == 0.0 and offline == 0.0}


# ------------------------------------------------------------------------------------------------ FlashAttention
FLASH_NOT_MEASURED = "not measured (no CUDA device: the CPU has no FlashAttention kernel)"


def right_padded_batch(c: dict, prompt_lens: list[int], device: str) -> dict:
    """Generation rows (`bench_mfu.gen_batch`) with prompts of different lengths, right-padded to the longest and
    carrying their attention mask, as `data.batch.collate` gives them."""
    from bench_mfu import gen_batch
    from synergen_lightning.data.batch import add_indices

    rows = [gen_batch(c, 1, n, device) for n in prompt_lens]
    t = max(r["input_ids"].shape[1] for r in rows)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

    batch = {"input_ids": torch.cat([pad(r["input_ids"], 0) for r in rows]),
             "image_mask": torch.cat([pad(r["image_mask"], False) for r in rows]),
             "labels": torch.cat([pad(r["labels"], -100) for r in rows]),
             "attention_mask": torch.cat([pad(torch.ones_like(r["image_mask"]), False) for r in rows]),
             "image_codes": torch.cat([r["image_codes"] for r in rows]),
             "image_loss_mask": torch.cat([r["image_loss_mask"] for r in rows])}
    batch["position_ids"] = torch.arange(t, device=device).expand(len(rows), t).clone()
    return add_indices(batch)


@contextlib.contextmanager
def recorded_sdpa(calls: list):
    """Record how every `F.scaled_dot_product_attention` call is made (dtype, mask, causal, GQA)."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append({"dtype": str(q.dtype).removeprefix("torch."), "mask": attn_mask is not None,
                      "is_causal": bool(is_causal), "gqa": bool(kw.get("enable_gqa")), "q_heads": q.shape[1],
                      "kv_heads": k.shape[1]})
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = recording
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def flash_forward(model, batch: dict, device: str, flash_only: bool) -> dict:
    """One training forward and backward; with `flash_only`, SDPA may use FlashAttention and nothing else."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls: list = []
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            kernel = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash_only else contextlib.nullcontext()
            with kernel, recorded_sdpa(calls), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(batch)["loss"]
                loss.backward()
            _sync(device)
            out["accepted"] = True
        except RuntimeError as exc:
            out.update(accepted=False, error=str(exc).splitlines()[0][:300])
    model.zero_grad(set_to_none=True)
    reasons = sorted({str(w.message).splitlines()[0][:200] for w in caught if "attention" in str(w.message).lower()})
    out.update(sdpa_calls=len(calls), calls_with_mask=sum(c["mask"] for c in calls),
               causal_calls=sum(c["is_causal"] for c in calls), gqa_calls=sum(c["gqa"] for c in calls),
               dtypes=sorted({c["dtype"] for c in calls}), reasons=reasons[:6])
    return out


def section_flash_attention(device: str) -> dict:
    from bench_mfu import PRESET_2B, QUICK, build_2b
    from synergen_lightning.distributed import parallelize

    cuda = device == "cuda"
    if cuda:  # the 2b widths (16 heads over 8 KV heads), 2 LLM layers and 1 head layer, 32x32 codes per image
        c, prompt_lens = dict(PRESET_2B, num_layers=2, head_layers=1, grid=32), [40, 7, 23, 12]
    else:
        c = dict(PRESET_2B, hidden_size=QUICK["hidden_size"], num_heads=4, num_kv_heads=2,
                 intermediate_size=QUICK["intermediate_size"], vocab_size=92547, codebook_size=512, grid=16,
                 head_layers=1, num_layers=2)
        prompt_lens = [12, 3, 7]
    batch = right_padded_batch(c, prompt_lens, device)
    out = {"heads": f"{c['num_heads']} query / {c['num_kv_heads']} KV", "rows": len(prompt_lens),
           "row_tokens": batch["row_tokens"], "padded_to": int(batch["input_ids"].shape[1])}
    torch.manual_seed(0)
    model = build_2b(c, device).train()
    if not cuda:
        out["flash_accepted"] = FLASH_NOT_MEASURED
        out["cpu_forward"] = flash_forward(model, batch, device, flash_only=False)
        return out
    out["autocast_fp32_params"] = flash_forward(model, batch, device, flash_only=True)
    ensure_process_group(device)
    parallelize(model, None, param_dtype="bfloat16", reduce_dtype="float32", activation_checkpointing=True,
                check_states=False)
    out["fsdp_bf16_params"] = flash_forward(model, batch, device, flash_only=True)
    out["flash_accepted"] = out["fsdp_bf16_params"]["accepted"] and out["autocast_fp32_params"]["accepted"]
    return out


# ------------------------------------------------------------------------------------------------ run
# cheap sections and the targets' figures (MFU, memory against the plan) first: a run stopped early keeps them; the 2b
# recipes' chain before generation (whether the recipes launch on the device outweighs decoding's figures)
SECTIONS = ("reduced_2b_step", "dcp_roundtrip", "flash_attention", "tiny_stage1", "recipes_2b", "generation")


class BudgetSpent(Exception):
    """Raised in the section still running when `--budget-s` is spent."""


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise `BudgetSpent` in the main thread once `seconds` have passed (None: never)."""
    if seconds is None:
        yield
        return

    def stop(signum, frame):
        raise BudgetSpent("stopped when the budget was spent (--budget-s); the figures above were measured")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(device: str, out: Path, only: list[str] | None = None, compile: bool | None = None,
        budget_s: float | None = None) -> dict:
    """Run the sections in order, writing `out` after each one (a run killed from outside keeps what it measured);
    once `budget_s` seconds are spent, the section running stops with what it had measured and those not yet begun
    are recorded as skipped. `compile` (default: on CUDA only) compiles the tiny stage 1 and the reduced 2b step per
    block."""
    import lightning

    from common import machine_info

    compile = device == "cuda" if compile is None else compile
    result = {"device": device, "machine": machine_info(device), "gpu_measured": device == "cuda",
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                           "lightning": lightning.__version__}}
    if device != "cuda":
        result["note"] = NOT_MEASURED
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=1, default=str))

    save()  # the machine and versions, before any section
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        # each takes the dict it fills as it goes (sections built in one piece return theirs)
        funcs = {"tiny_stage1": lambda part: section_tiny_stage1(device, work / "world", compile, part),
                 "reduced_2b_step": lambda part: section_reduced_2b(device, compile),
                 "generation": lambda part: section_generation(device, part),
                 "dcp_roundtrip": lambda part: section_dcp(device, work),
                 "recipes_2b": lambda part: section_recipes_2b(device, work, part),
                 "flash_attention": lambda part: section_flash_attention(device)}
        for name in SECTIONS:
            if only and name not in only:
                continue
            left = None if budget_s is None else budget_s - (time.perf_counter() - start)
            if left is not None and left <= 0:
                result[name] = {"skipped": f"the budget of {budget_s:.0f} s was spent before it began (--budget-s)"}
            else:
                t0, part = time.perf_counter(), {}
                try:
                    with deadline(left):
                        result[name] = funcs[name](part)
                except (Exception, SystemExit) as exc:  # noqa: BLE001 -- recorded (a CLI's exit too); the rest run
                    result[name] = {**part, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc().splitlines()[-8:]}
                result[name]["section_s"] = time.perf_counter() - t0
                gc.collect()  # the section's models (Lightning and FSDP2 hold reference cycles) before the next
                if device == "cuda":
                    torch.cuda.empty_cache()
            save()
    return result


def _f(v, fmt="{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def _tiny_rows(s: dict) -> list:
    e, c = s.get("eager", {}), s.get("compiled", {})
    losses = e.get("losses") or [None]
    return [("tiny stage 1, eager", f"{e.get('steps')} steps",
             f"median step {_f(e.get('median_step_s'))} s, loss {_f(losses[0])} -> {_f(losses[-1])}"),
            ("tiny stage 1, compiled", "skipped", c["skipped"][:90]) if "skipped" in c else
            ("tiny stage 1, compiled", f"{c.get('steps')} steps", f"median step {_f(c.get('median_step_s'))} s, "
             f"losses match {s.get('losses_match')} (max rel diff {_f(s.get('max_rel_loss_diff'))}), {_graphs(c)}")]


def _graphs(r: dict) -> str:
    return f"{r.get('graphs')} graphs, {r.get('graph_breaks')} graph breaks" if "graphs" in r else "eager"


def _gib(v):
    return v and v / 2**30


def _reduced_2b_rows(r: dict) -> list:
    return [("reduced 2b step (AC)", f"{r.get('llm_layers')} layers",
             f"step {_f(r.get('step_s'))} s, MFU {_f(r.get('mfu'), '{:.1%}')}, peak "
             f"{_f(_gib(r.get('peak_memory_bytes')))} GiB vs plan {_f(_gib(r.get('plan_bytes')))} GiB, {_graphs(r)}")]


def _recipes_2b_rows(r: dict) -> list:
    rows = []
    for stage in ("stage1", "stage2", "sft"):
        st = r.get(stage, {})
        losses = st.get("losses") or [None]
        rows.append((f"2b recipe {stage} (stand-ins)", f"{st.get('global_step')} steps",
                     f"loss {_f(losses[0])} -> {_f(losses[-1])}, accumulate {st.get('accumulate_grad_batches')}, "
                     f"{st.get('precision')}, peak {_f(_gib(st.get('peak_memory_bytes')))} GiB, "
                     f"{r.get('image_size')}-px views, {r.get('image_tokenizer')} tokenizer"))
    changed = "; ".join(f"{stage}: {', '.join(p for p, c in parts.items() if c) or 'none'}"
                        for stage, parts in (r.get("trained_parts") or {}).items())
    rows.append(("2b recipes: what each stage trained", "",
                 f"as the paper's stages: {r.get('stages_train_as_the_paper')} ({changed})"))
    rows.append(("2b recipes: export, generate, answer", "", f"exit {r.get('export_exit')}, {r.get('generate_exit')}, "
                 f"{r.get('answer_exit')}; {len(r.get('generated', []))} images, answer {r.get('answer', '')[:40]!r}"))
    return rows


def _generation_rows(g: dict) -> list:
    rows = []
    for n in (1, 16):
        row = g.get(f"images_{n}", {})
        compiled = (f"; compiled {_f(row.get('folded_compiled_s'))} s vs {_f(row.get('unfolded_compiled_s'))} s "
                    f"({_f(row.get('speedup_compiled'))}x), codes part at "
                    f"{row.get('folded_compiled_first_differing_code')}/"
                    f"{row.get('unfolded_compiled_first_differing_code')}"
                    if "folded_compiled_s" in row else "")
        rows.append((f"generation, {n} image(s)", "", f"folded {_f(row.get('folded_s'))} s vs unfolded "
                     f"{_f(row.get('unfolded_s'))} s ({_f(row.get('speedup'))}x)" + compiled))
    d = g.get("compiled_decoding")
    if d:
        rows.append(("compiled decoding", "", f"{_graphs(d)}, {d.get('cudagraph_skips')} CUDA graphs declined"))
    return rows


def _dcp_rows(d: dict) -> list:
    return [("DCP save/load", f"{d.get('tensors')} tensors", f"identical {d.get('identical')}, "
             f"{_f(d.get('bytes_on_disk'))} B, save {_f(d.get('save_s'))} s, load {_f(d.get('load_s'))} s")]


def _flash_rows(fa: dict) -> list:
    detail = ""
    for name in ("fsdp_bf16_params", "autocast_fp32_params", "cpu_forward"):
        if name in fa:
            r = fa[name]
            detail += (f"{name}: {'accepted' if r.get('accepted') else 'refused: ' + r.get('error', '')[:60]} "
                       f"({r.get('sdpa_calls')} calls, {r.get('calls_with_mask')} with mask, "
                       f"{r.get('gqa_calls')} GQA); ")
    accepted = fa.get("flash_accepted")
    status = "not measured" if isinstance(accepted, str) else "accepted" if accepted else "refused"
    return [("FlashAttention, padded", status, detail.rstrip("; "))]


SUMMARY_ROWS = {"reduced_2b_step": ("reduced 2b step", _reduced_2b_rows), "dcp_roundtrip": ("DCP save/load", _dcp_rows),
                "flash_attention": ("FlashAttention", _flash_rows), "tiny_stage1": ("tiny stage 1", _tiny_rows),
                "recipes_2b": ("2b recipes (stand-ins)", _recipes_2b_rows),
                "generation": ("generation", _generation_rows)}


def summary(result: dict) -> str:
    """A few lines per section run: its figures, or its error, or why it was skipped."""
    rows = []
    for name in SECTIONS:
        if name not in result:
            continue
        label, section_rows = SUMMARY_ROWS[name]
        s = result[name]
        if "error" in s:
            rows.append((label, "error", s["error"][:90]))
        elif "skipped" in s:
            rows.append((label, "skipped", s["skipped"][:90]))
        else:
            rows += section_rows(s)
    width = max((len(a) for a, _, _ in rows), default=0)
    v = result.get("versions", {})
    on = f"{result['device']}" + "".join(f", {k} {v[k]}" for k in ("torch", "cuda", "lightning") if v.get(k))
    lines = [f"gpu-check on {on}" + (f" -- {result['note']}" if result.get("note") else "")]
    lines += [f"  {a:<{width}}  {b:<14}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else the CPU smoke run at tiny sizes")
    p.add_argument("--only", default=None, help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--out", default="runs/gpu_check/results.json", help="the JSON, rewritten after every section")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile per block in tiny_stage1 and reduced_2b_step (auto: on CUDA only; on the CPU "
                        "it takes minutes); generation compiles its decoding in every mode")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="after this many seconds the section running stops, keeping what it measured, and the rest "
                        "are recorded as skipped (for a fixed GPU slot: leave a minute for start-up and the summary); "
                        "0: no limit")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "use --device auto")
    if a.budget_s < 0:
        raise SystemExit(f"--budget-s {a.budget_s}: must be >= 0 (0: no limit)")
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    if only and set(only) - set(SECTIONS):
        raise SystemExit(f"--only {a.only!r}: unknown section(s) {sorted(set(only) - set(SECTIONS))}; "
                         f"use {','.join(SECTIONS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    compile = None if a.compile == "auto" else a.compile == "on"
    result = run(device, Path(a.out), only, compile=compile, budget_s=a.budget_s or None)
    print(summary(result))
    print(f"wrote {a.out}")
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
