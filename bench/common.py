"""Shared helpers of the benchmark suite: interleaved timing, machine facts, memory probes, FLOP counts.

Every comparison in `bench/` is timed side by side: each repeat runs every variant once, in turn, so
load from other processes hits all variants alike; medians are the headline, min/max/IQR the spread.
A ratio is only ever formed between variants timed in the same call on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def in_project(path: Path, env: dict[str, str] | None = None):
    """The block runs in `path` (recipes read and write relative to the project) with `env` set; both restored."""
    env = env or {}
    saved, here = {k: os.environ.get(k) for k in env}, os.getcwd()
    try:
        os.environ.update(env)
        os.chdir(path)
        yield
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TooLarge(Exception):
    """A configuration that cannot run on the host; the suite records the message and skips it."""


def machine_info(device: str = "cpu", threads: int | None = None) -> dict:
    """The facts that make two timings comparable: a ratio never mixes two different fingerprints."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device,
            "torch_threads": threads if threads is not None else torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["fingerprint"] = f"{info['processor']}|{info['cpu_count']}cpu|{info.get('gpu', device)}|torch {info['torch']}"
    return info


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where unknown: no check then)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(estimate_bytes: float, what: str, fraction: float = 0.7) -> None:
    """Raise TooLarge (one line: the need, what is free, the fix) when `what` would not fit in memory."""
    free = available_memory_bytes()
    if free is not None and estimate_bytes > fraction * free:
        raise TooLarge(f"{what}: needs about {estimate_bytes / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is available "
                       f"(limit {fraction:.0%}); skipped -- lower the sizes (or use --quick)")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stats(times: list[float], cpu_times: list[float] | None = None) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    out = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iqr_s": q[2] - q[0],
           "repeats": len(times), "times_s": times}
    if cpu_times:
        # CPU seconds of this process: at one thread, the work done, barely inflated by other processes' load
        out["cpu_median_s"] = statistics.median(cpu_times)
        out["cpu_times_s"] = cpu_times
    return out


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: str = "cpu") -> dict[str, dict]:
    """Time every variant `repeats` times, round-robin (one call of each per round); `warmup` untimed rounds first."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: stats(v, cpu[k]) for k, v in times.items()}


def ratio(timed: dict[str, dict], slow: str, fast: str) -> dict:
    """slow/fast time ratio (a speed-up when > 1): of wall-time medians (the headline), of the least-disturbed
    (min) repeats, and of process CPU-time medians (the least load-sensitive at one thread)."""
    out = {"median": timed[slow]["median_s"] / timed[fast]["median_s"],
           "of_min": timed[slow]["min_s"] / timed[fast]["min_s"]}
    if timed[slow].get("cpu_median_s") and timed[fast].get("cpu_median_s"):
        out["of_cpu_time"] = timed[slow]["cpu_median_s"] / timed[fast]["cpu_median_s"]
    return out


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for child processes (memory probes)


# ------------------------------------------------------------------------------------------ memory
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_during(fn: Callable[[], object]) -> dict:
    """Peak resident memory while `fn` runs, above the resident memory just before it (bytes).

    CPU tensors have no allocator statistics, so this is the OS's view: run each probe in a fresh process
    (`probe_in_subprocess`) so memory freed by an earlier step and kept by malloc cannot hide a peak."""
    if not reset_peak_rss():
        raise TooLarge("peak memory: /proc/self/clear_refs is not writable here; skipped (Linux only)")
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return {"rss_before_bytes": before * 1024, "peak_rss_bytes": peak * 1024, "step_peak_bytes": (peak - before) * 1024}


def probe_in_subprocess(script: str, args: list[str], timeout: float = 900) -> dict:
    """Run `python bench/<script> --probe ...` in a fresh process; it prints one JSON line last."""
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"{' '.join(cmd[1:])} failed: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ FLOPs
def decoder_params(cfg) -> int:
    """Weights one token multiplies through in one decoder block (attention + ONE FFN expert), norms excluded."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2
    return attn + 3 * d * cfg.intermediate_size


def train_flops(cfg, batch: int, seq: int, vocab_out: int | None = None, causal: bool = True,
                logits_rows: int | None = None, attention: bool = True) -> float:
    """Model FLOPs of one forward+backward: 6 * (active matmul weights) * tokens + attention.

    Attention: QK^T and AV are 4*T*T*hd*H FLOPs per layer forward; a causal model needs half of it;
    backward is twice the forward. `logits_rows`: rows that go through the output layer (default all)."""
    tokens = batch * seq
    vocab_out = cfg.vocab_size if vocab_out is None else vocab_out
    rows = tokens if logits_rows is None else logits_rows
    linear = 6 * decoder_params(cfg) * cfg.num_layers * tokens + 6 * cfg.hidden_size * vocab_out * rows
    attn = 3 * 4 * batch * seq * seq * cfg.head_dim * cfg.num_heads * cfg.num_layers
    if not attention:
        return linear
    return linear + (attn / 2 if causal else attn)


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch's FlopCounterMode sees while `fn` runs: matmuls; SDPA only where a formula is registered
    for the kernel used (on CPU the flash kernel has none: compare with `train_flops(..., attention=False)`)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def gemm_variant(m: int, k: int, n: int, dtype=torch.float32, device: str = "cpu", inner: int = 5):
    """A timed variant doing `inner` [m,k]@[k,n] GEMMs, and its FLOPs: the machine's matmul peak at a model's size."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)

    def run():
        for _ in range(inner):
            torch.mm(a, b, out=out)

    return run, 2.0 * m * k * n * inner


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path
