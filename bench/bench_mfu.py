"""Model FLOPs utilisation of a training step, against the host's measured matmul peak, side by side.

CPU (default): the MMoE trunk (`MMoETransformer`, LM loss) at a mid-size configuration (width 512,
8 layers, 1,024 tokens), fp32, `--threads` torch threads. In one interleaved loop the suite times
the training step (fwd+bwd) and an fp32 GEMM of the model's largest matmul shape ([tokens, width] x
[width, ffn]) at the same thread count: MFU = model FLOPs per second / GEMM FLOPs per second.

Model FLOPs are counted analytically (6 x active matmul weights x tokens + causal attention, see
`common.train_flops`) and cross-checked with `torch.utils.flop_counter.FlopCounterMode` (which
counts no FLOPs for the CPU flash-attention kernel: compare it with `analytic_matmuls_only`).

GPU (`--device cuda`): the reduced-depth 2B configuration (`--preset 2b`: InternLM2-1.8B widths,
`--num-layers` deep, head 4 layers) as a `SynerGenVL` generation step, bf16 params via FSDP2
(`distributed.parallelize`, world size 1) and `torch.compile` per block; peak = a bf16 GEMM of the
model's FFN shape, measured in the same run. Without CUDA it builds the model on the meta device,
counts its FLOPs, and reports "not measured".

    .venv/bin/python bench/bench_mfu.py --out runs/bench/mfu.json
    .venv/bin/python bench/bench_mfu.py --device cuda --preset 2b --num-layers 4 --out bench/results_gpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    TooLarge,
    check_fits,
    counted_flops,
    gemm_variant,
    interleaved,
    load_average,
    machine_info,
    set_threads,
    train_flops,
    write_json,
)
from synergen_lightning.llm import lm_loss  # noqa: E402
from synergen_lightning.models.config import LLMConfig  # noqa: E402
from synergen_lightning.models.mmoe import MMoETransformer  # noqa: E402

TARGET_CPU, TARGET_GPU = 0.40, 0.45
MID = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1376, vocab_size=4096,
           batch_size=1, seq_len=1024, image_fraction=0.0)
QUICK = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=344, vocab_size=512,
             batch_size=1, seq_len=128, image_fraction=0.0)
# InternLM2-1.8B widths (recipes/synergen_vl_2b), depth reduced to fit one GPU's benchmark
PRESET_2B = dict(hidden_size=2048, num_heads=16, num_kv_heads=8, intermediate_size=8192, vocab_size=92547,
                 rope_theta=1_000_000.0, codebook_size=32768, head_layers=4, grid=64, fold=(2, 8))


def cpu_mfu(c: dict, threads: int, repeats: int, warmup: int) -> dict:
    cfg = LLMConfig(**{k: c[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                         "intermediate_size")})
    b, t = c["batch_size"], c["seq_len"]
    params = sum([4 * cfg.hidden_size ** 2, 6 * cfg.hidden_size * cfg.intermediate_size]) * cfg.num_layers
    check_fits(4.0 * (3 * params + b * t * cfg.num_layers * (20 * cfg.hidden_size + 6 * cfg.intermediate_size)
                      + 3 * b * t * cfg.vocab_size), f"MFU step width {cfg.hidden_size} x {cfg.num_layers} layers, {b * t} tokens")
    torch.manual_seed(0)
    model = MMoETransformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    mask = None
    if c["image_fraction"]:
        mask = torch.zeros(b, t, dtype=torch.bool)
        mask[:, t // 4: t // 4 + int(t * c["image_fraction"])] = True

    def step():
        lm_loss(model.logits(model(model.embed(ids), image_mask=mask)), ids).backward()
        model.zero_grad(set_to_none=True)

    gemm, gemm_flops = gemm_variant(b * t, cfg.hidden_size, cfg.intermediate_size)
    timed = interleaved({"train_step": step, "gemm_peak": gemm}, repeats, warmup)
    analytic = train_flops(cfg, b, t)
    counted = counted_flops(step)
    model_flops_s = analytic / timed["train_step"]["median_s"]
    peak_flops_s = gemm_flops / timed["gemm_peak"]["median_s"]
    mfu = model_flops_s / peak_flops_s
    return {"config": c, "timed": timed, "flops": {"analytic_causal": analytic,
                                                    "analytic_noncausal": train_flops(cfg, b, t, causal=False),
                                                    "analytic_matmuls_only": train_flops(cfg, b, t, attention=False),
                                                    "flop_counter": counted},
            "model_gflops_per_s": model_flops_s / 1e9, "peak_gflops_per_s": peak_flops_s / 1e9,
            "peak_gemm": [b * t, cfg.hidden_size, cfg.intermediate_size], "mfu": mfu,
            "mfu_of_min": (analytic / timed["train_step"]["min_s"]) / (gemm_flops / timed["gemm_peak"]["min_s"]),
            "target": TARGET_CPU, "met": mfu >= TARGET_CPU}


def gpu_config(num_layers: int) -> dict:
    return dict(PRESET_2B, num_layers=num_layers)


def build_2b(c: dict, device: str):
    from synergen_lightning.system import SynerGenVL

    llm = {k: c[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                             "rope_theta")}
    llm["max_position_embeddings"] = 32768
    special = {"bos": 1, "eos": 2, "pad": 0, "boi": 92544, "eoi": 92545, "uncond": 92546, "im_start": 92543, "im_end": 92542}
    with torch.device(device):
        return SynerGenVL(llm=llm, special_token_ids=special, codebook_size=c["codebook_size"], image_size=c["grid"] * 8,
                          downsample=8, fold=c["fold"], code_dim=c["hidden_size"], head={"num_layers": c["head_layers"]},
                          stage="full")


def gen_batch(c: dict, images: int, prompt_len: int, device: str) -> dict:
    p = (c["grid"] // c["fold"][0]) * (c["grid"] // c["fold"][1])
    t = prompt_len + 2 + p + 1
    ids = torch.randint(3, 90000, (images, t), device=device)
    ids[:, prompt_len + 1] = 92544
    ids[:, -1] = 92545
    image_mask = torch.zeros(images, t, dtype=torch.bool, device=device)
    image_mask[:, prompt_len + 2: prompt_len + 2 + p] = True
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 92545
    codes = torch.randint(0, c["codebook_size"], (images, c["grid"], c["grid"]), device=device)
    return {"input_ids": ids, "image_mask": image_mask, "labels": labels, "image_codes": codes,
            "image_loss_mask": torch.ones(images, dtype=torch.bool, device=device)}


def system_flops(model, c: dict, images: int, prompt_len: int) -> float:
    """6 N T + attention for the LLM (prompt + folded tokens) plus the head (16-code sequences), folder MLP included."""
    from synergen_lightning.models.mmoe import LLMConfig as Cfg

    p = model.tokens_per_view
    t = prompt_len + 2 + p + 1
    llm = train_flops(model.llm.model.config, images, t, logits_rows=images)
    head_cfg = model.head.model.config
    head = train_flops(Cfg(**{**vars(head_cfg), "head_dim": head_cfg.head_dim}), images * p, model.head.model.seq_len)
    folder = 6 * sum(m.weight.numel() for m in model.folder.mlp if isinstance(m, torch.nn.Linear)) * images * p
    return llm + head + folder


def gpu_mfu(c: dict, images: int, prompt_len: int, repeats: int, warmup: int, compile: bool) -> dict:
    if not torch.cuda.is_available():
        model = build_2b(c, "meta")  # the command builds; nothing is timed without a GPU
        n = sum(p.numel() for p in model.parameters())
        return {"skipped": "no CUDA device on this machine: GPU MFU not measured (the model was built on the meta device)",
                "config": c, "parameters": n, "flops_per_step": system_flops(model, c, images, prompt_len)}
    import torch.distributed as dist

    from synergen_lightning.distributed import parallelize

    if not dist.is_initialized():  # one rank: an in-process store, no TCP port
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    model = build_2b(c, "cuda").train()
    parallelize(model, None, param_dtype="bfloat16", reduce_dtype="float32", activation_checkpointing=False,
                compile=compile)
    batch = gen_batch(c, images, prompt_len, "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # foreach: works on FSDP2 DTensor params

    def step():
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gemm, gemm_flops = gemm_variant(8192, c["hidden_size"], c["intermediate_size"], torch.bfloat16, "cuda", inner=20)
    timed = interleaved({"train_step": step, "gemm_peak": gemm}, repeats, warmup, device="cuda")
    flops = system_flops(model, c, images, prompt_len)
    mfu = (flops / timed["train_step"]["median_s"]) / (gemm_flops / timed["gemm_peak"]["median_s"])
    return {"config": c, "images": images, "timed": timed, "flops_per_step": flops, "mfu": mfu,
            "mfu_vs_989_tflops": flops / timed["train_step"]["median_s"] / 989e12, "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "target": TARGET_GPU, "met": mfu >= TARGET_GPU, "compile": compile}


def run(quick: bool = False, threads: int = 1, repeats: int | None = None, warmup: int = 1, device: str = "cpu",
        config: dict | None = None, num_layers: int = 4, images: int = 8, compile: bool = True) -> dict:
    set_threads(threads)
    result = {"machine": machine_info(device, threads), "load_average_before": load_average()}
    try:
        if device == "cpu":
            result["cpu"] = cpu_mfu(dict(QUICK if quick else MID, **(config or {})), threads, repeats or (2 if quick else 3), warmup)
        else:
            result["gpu"] = gpu_mfu(gpu_config(num_layers), images, 32, repeats or 10, warmup or 3, compile)
    except TooLarge as exc:
        print(f"[skipped] {exc}", flush=True)
        result["cpu" if device == "cpu" else "gpu"] = {"skipped": str(exc)}
    result["load_average_after"] = load_average()
    return result


def main(argv: list[str] | None = None) -> dict:
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both the model step and the GEMM peak")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default=None, help="CPU: JSON overriding sizes, e.g. '{\"seq_len\": 2048}'")
    p.add_argument("--preset", default="2b", choices=["2b"], help="GPU configuration (InternLM2-1.8B widths)")
    p.add_argument("--num-layers", type=int, default=4, help="GPU: LLM depth of the reduced 2B configuration")
    p.add_argument("--images", type=int, default=8, help="GPU: generation samples per step")
    p.add_argument("--no-compile", action="store_true", help="GPU: skip torch.compile")
    p.add_argument("--out", default="runs/bench/mfu.json")
    a = p.parse_args(argv)
    result = run(a.quick, a.threads, a.repeats, a.warmup, a.device, json.loads(a.config) if a.config else None,
                 a.num_layers, a.images, not a.no_compile)
    for key in ("cpu", "gpu"):
        r = result.get(key)
        if r and "mfu" in r:
            print(f"{key} MFU {r['mfu']:.1%} (target {r['target']:.0%}): model {r.get('model_gflops_per_s', 0):.1f} GFLOP/s "
                  f"vs GEMM peak {r.get('peak_gflops_per_s', 0):.1f} GFLOP/s")
        elif r:
            print(f"{key}: {r.get('skipped')}")
    print(f"wrote {write_json(a.out, result)}")
    return result


if __name__ == "__main__":
    main()
