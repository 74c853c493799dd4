"""`synergen plan`'s estimate against the measured peak memory of the same training step on the CPU.

Measurement: each configuration runs in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536`, so every tensor above
64 KiB is its own mmap, returned to the OS when freed: the resident set then follows the live tensor bytes (glibc's
default adapts the threshold and keeps freed blocks in its heap, which hides or shifts peaks). The process records
its resident memory before the model is built, runs one warm-up step (AdamW's moments come to exist), resets the
kernel's high-water mark (`/proc/self/clear_refs`) and runs a second step; measured peak = the bytes of every
tensor alive before that step (parameters, AdamW's moments: counted, as `torch.cuda.max_memory_allocated` counts
tensors only) + the resident high-water mark of the step above the resident memory before it (measured). The CPU's
one-off memory (the code of the kernels run, oneDNN's JIT-compiled kernels per shape) stays outside both. A step is `SynerGenVL.forward_losses` + backward + AdamW, with
activation checkpointing per block as `distributed.parallelize` applies it; "bf16" shards the model with
`distributed.parallelize` (FSDP2, world size 1, gloo, bf16 params, fp32 reduce) under bf16 autocast, as the 2b
recipes run.

A second, independent count, at world sizes the CPU cannot launch (`--world N`, `--shard-size S` for HSDP): one
process stands for one rank of N, with torch's fake process group (every collective returns at once; the all-gathered
units and reduce-scatter buffers are still allocated, at their real sizes) and the model sharded by
`distributed.parallelize` over that mesh; torch's `FSDPMemTracker` counts the live tensor bytes through the second
step, as `torch.cuda.max_memory_allocated` does. At world size 1 the two counts agree within a few percent
(`tests/test_plan.py`).

    .venv/bin/python bench/memory_check.py --num-layers 4 --seq-len 1024 --out runs/bench/memory_check.json
    .venv/bin/python bench/memory_check.py --preset 2b --num-layers 2 --gen-rows 1 --und-rows 1 --seq-len 1024 --compute bf16
    .venv/bin/python bench/memory_check.py --world 64 --shard-size 8 --compute bf16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synergen_lightning.plan import (  # noqa: E402
    ModelSpec,
    StepShape,
    build_model,
    estimate,
    fsdp_shard,
    probe_activations,
    probe_batch,
    scaled_spec,
)

# InternLM2-1.8B widths with the 2b recipe's head, fold and Emu3 codebook (recipes/synergen_vl_2b/stage1.yaml)
PRESET_2B = dict(llm=dict(vocab_size=92547, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8,
                          intermediate_size=8192, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768),
                 head=dict(num_layers=4, hidden_size=2048, num_heads=16, num_kv_heads=8, intermediate_size=8192),
                 codebook_size=32768, image_size=512, downsample=8, fold=(2, 8), code_dim=2048, stage="stage1")
TINY = dict(llm=dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=352,
                     max_position_embeddings=8192),
            head=dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=352),
            codebook_size=1024, image_size=256, downsample=8, fold=(2, 8), code_dim=128, stage="stage1")


def spec_of(d: dict) -> ModelSpec:
    return ModelSpec(**{**d, "fold": tuple(d["fold"])})


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive (parameters, AdamW's moments, the batch; a DTensor's local shard), each
    storage once: what the CUDA allocator would count, without the CPU's one-off kernel code and caches."""
    import gc

    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                t = getattr(obj, "_local_tensor", obj)
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return sum(seen.values())


def mem_tracker_peak(call, model) -> int:
    """torch's `MemTracker`'s peak of the tensors one call of `model` creates (activations, temporaries, outputs; not
    its weights), on any device (meta included). The tracker hooks every parameter's gradient, so frozen
    parameters require one for the call (which runs under `no_grad`) and are frozen again after it."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    tracker.track_external(model)
    try:
        with torch.no_grad(), tracker:
            call()
    finally:
        for p in frozen:
            p.requires_grad_(False)
    peak = tracker.get_tracker_snapshot("peak")
    weights = (_MemRefType.PARAM, _MemRefType.BUFFER, "Total")
    return sum(v for device in peak.values() for k, v in device.items() if k not in weights)


def _training_step(spec: ModelSpec, batch: dict, checkpointing: bool, compute: str, mesh=None):
    """The model, one training step and its optimizer; sharded with FSDP2 under bf16 or over `mesh` (fp32 params
    unless bf16)."""
    from synergen_lightning.distributed import _checkpoint_block, decoder_blocks, parallelize

    torch.manual_seed(0)
    model = build_model(spec, "cpu").train()
    if compute == "bf16" or mesh is not None:
        parallelize(model, mesh, param_dtype="bfloat16" if compute == "bf16" else None, reduce_dtype="float32",
                    activation_checkpointing=checkpointing, check_states=False)
    elif checkpointing:
        for block in decoder_blocks(model):
            _checkpoint_block(block)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, opt


def probe(spec: ModelSpec, shape: StepShape, checkpointing: bool, compute: str) -> dict:
    """(child process) the measured peak of the second training step, bytes above the memory before the model."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if compute == "bf16":
        import torch.distributed as dist

        # one rank: an in-process store, no TCP port another process could take first
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    # the same step at a tiny width first: the code it runs is paged in (file-backed pages count in the resident
    # set) and one-off buffers exist before the baseline
    small = scaled_spec(spec, 2)
    warm = StepShape(gen_rows=1, und_rows=1, seq_len=small.tokens_per_view + 8)
    model, step, _ = _training_step(small, probe_batch(small, warm), checkpointing, compute)
    step(), step()
    del model, step
    batch = probe_batch(spec, shape)
    base = _rss("VmRSS")
    model, step, _ = _training_step(spec, batch, checkpointing, compute)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    state = live_tensor_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS")
    t0 = time.perf_counter()
    step()
    step_peak = _rss("VmHWM") - before
    return {"measured_peak_bytes": state + step_peak, "state_tensor_bytes": state, "step_peak_bytes": step_peak,
            "rss_above_baseline_before_step": before - base, "step_s": time.perf_counter() - t0, "first_step_s": first}


def probe_tracked(spec: ModelSpec, shape: StepShape, checkpointing: bool, compute: str, world: int,
                  shard_size: int | None) -> dict:
    """(child process) the peak tensor bytes of one rank of `world` in the second step, counted by FSDPMemTracker."""
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from synergen_lightning.distributed import hsdp_mesh

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = hsdp_mesh("cpu", world, shard_size) or init_device_mesh("cpu", (world,))
    batch = probe_batch(spec, shape)
    model, step, opt = _training_step(spec, batch, checkpointing, compute, mesh)
    tracker = FSDPMemTracker(model, opt)
    tracker.track_inputs(tuple(v for v in batch.values() if isinstance(v, torch.Tensor)))
    t0 = time.perf_counter()
    with tracker:
        step()  # AdamW's moments come to exist
        tracker.reset_mod_stats()
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {"measured_peak_bytes": peak["Total"], "step_s": (time.perf_counter() - t0) / 2,
            "by_kind": {getattr(k, "value", str(k)): v for k, v in peak.items() if k != "Total"}}


def measure(spec: dict, shape: dict, checkpointing: bool, compute: str = "fp32", timeout: float = 900,
            world: int | None = None, shard_size: int | None = None) -> dict:
    """Run `probe` in a fresh process (the allocator setting must be in place before Python starts), or with a
    `world` size `probe_tracked` (a process group is per process)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps({"spec": spec, "shape": shape,
                                                                                   "checkpointing": checkpointing,
                                                                                   "compute": compute, "world": world,
                                                                                   "shard_size": shard_size})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(spec: dict, shape: dict, checkpointing: bool, compute: str = "fp32", world: int | None = None,
            shard_size: int | None = None, probe: dict | None = None) -> dict:
    """The plan's estimate and the measured peak of one configuration: world size 1 in the resident set, or one rank
    of `world` (FSDP2 over every rank, or HSDP groups of `shard_size`) counted by FSDPMemTracker."""
    measured = measure(spec, shape, checkpointing, compute, world=world, shard_size=shard_size)
    shard = fsdp_shard(world, shard_size) if world else 1
    est = estimate(spec_of(spec), StepShape(**shape), shard=shard,
                   param_dtype="bfloat16" if compute == "bf16" else None,
                   compute=compute, activation_checkpointing=checkpointing, fsdp=compute == "bf16" or world is not None,
                   probe=probe)
    planned = est["total_bytes"]
    return {"spec": spec, "shape": shape, "checkpointing": checkpointing, "compute": compute, "world": world,
            "shard_size": shard_size, "method": "fsdp_mem_tracker" if world else "resident_set",
            "planned_bytes": planned, "measured_bytes": measured["measured_peak_bytes"],
            "ratio": planned / measured["measured_peak_bytes"], "measured": measured,
            "plan": {k: est[k] for k in ("state_bytes", "activation_bytes", "transient_bytes", "parameters", "trainable")}}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--preset", choices=["tiny", "2b"], default="tiny")
    p.add_argument("--num-layers", type=int, default=None, help="LLM depth instead of the preset's")
    p.add_argument("--head-layers", type=int, default=None, help="head depth instead of the preset's")
    p.add_argument("--stage", choices=["stage1", "stage2", "sft"], nargs="+", default=None,
                   help="what trains (synergen_lightning/stages.py) instead of the preset's stage1; several: each")
    p.add_argument("--gen-rows", type=int, default=1)
    p.add_argument("--und-rows", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--compute", choices=["fp32", "bf16"], nargs="+", default=["fp32"], help="several: each")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--world", type=int, nargs="+", default=None,
                   help="one rank of this many under FSDP2, counted by FSDPMemTracker over a fake process group "
                        "(default: world size 1, measured in the resident set); several: each")
    p.add_argument("--shard-size", type=int, default=None, help="with --world: HSDP groups of this many ranks")
    p.add_argument("--out", default="runs/bench/memory_check.json")
    a = p.parse_args(argv)
    if a.shard_size and not a.world:
        p.error("--shard-size needs --world (the world size the HSDP groups divide)")
    if a.world is not None and min(a.world) < 1:
        p.error(f"--world {min(a.world)}: give a positive world size")
    if a.probe:
        args = json.loads(a.probe)
        common = (spec_of(args["spec"]), StepShape(**args["shape"]), args["checkpointing"], args["compute"])
        got = probe_tracked(*common, args["world"], args["shard_size"]) if args.get("world") else probe(*common)
        print(json.dumps(got))
        return None
    spec = json.loads(json.dumps(PRESET_2B if a.preset == "2b" else TINY))
    if a.num_layers:
        spec["llm"]["num_layers"] = a.num_layers
    if a.head_layers:
        spec["head"]["num_layers"] = a.head_layers
    shape = {"gen_rows": a.gen_rows, "und_rows": a.und_rows, "seq_len": a.seq_len}
    rows, probes = [], {}
    for stage, compute, world, ac in itertools.product(a.stage or [spec["stage"]], a.compute, a.world or [None],
                                                       (True, False) if a.checkpointing == "both"
                                                       else (a.checkpointing == "on",)):
        spec["stage"] = stage
        if (stage, compute) not in probes:  # the activations' probe depends on what trains and the dtype only
            probes[stage, compute] = probe_activations(spec_of(spec), compute)
        r = compare(spec, shape, ac, compute, world, a.shard_size, probe=probes[stage, compute])
        rows.append(r)
        where = f"one rank of {world} ({r['method']}), " if world else ""
        print(f"{stage} {compute}, {where}activation checkpointing {'on ' if ac else 'off'}: planned "
              f"{r['planned_bytes'] / 2**30:.3f} GiB, measured {r['measured_bytes'] / 2**30:.3f} GiB "
              f"(plan / measured {r['ratio']:.3f}; step {r['measured']['step_s']:.1f} s)", flush=True)
    if len(rows) > 1:
        ratios = [r["ratio"] for r in rows]
        print(f"{len(rows)} configurations: plan / measured from {min(ratios):.3f} to {max(ratios):.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {a.out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
