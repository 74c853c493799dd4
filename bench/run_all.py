"""`make bench`: every benchmark in one run -> bench/results.json and a markdown table (bench/results.md).

Benchmarks (each a side-by-side comparison timed in interleaved repeats, medians + spread):
  folding   bench_folding.py  training throughput and generation speed, folded (2x8 + head) vs unfolded,
                              CFG cost, peak step memory with/without activation checkpointing and folding
  mfu       bench_mfu.py      CPU MFU of a mid-size training step vs a measured fp32 GEMM peak
  gpu_mfu   bench_mfu.py      reduced-depth 2B MFU in bf16 + FSDP2 + compile (skipped, with a message, without CUDA)
  mmoe      bench_mmoe.py     MMoE routing overhead and ours vs transformers' Qwen2
  data      bench_data.py     pretokenized vs JPEG loading (its own JSON, summarised here)
  dataparallel bench_data_parallel.py  the tiny stage 1 in 1 process vs 2 (DDP, FSDP2), same global batch
                              (needs the tiny artefacts: skipped without them, and with --quick)

A configuration too large for the host is skipped with a one-line message (recorded under
"skipped"), never crashed. Every ratio is formed inside one benchmark run on one machine; the
results carry the machine fingerprint and the load average before/after (shared machines are noisy).

    .venv/bin/python bench/run_all.py                # full sizes (tens of minutes)
    .venv/bin/python bench/run_all.py --quick        # tiny sizes, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_folding  # noqa: E402
import bench_mfu  # noqa: E402
from common import load_average, machine_info, write_json  # noqa: E402

SCHEMA_VERSION = 1
BENCHMARKS = ("folding", "mfu", "gpu_mfu", "mmoe", "data", "dataparallel")


def _mmoe(quick: bool, threads: int, out_dir: Path) -> dict:
    import bench_mmoe

    args = ["--threads", str(threads), "--device", "cpu", "--out", str(out_dir / "results_mmoe.json")]
    args += ["--quick", "--repeats", "2", "--warmup", "1"] if quick else ["--repeats", "7", "--warmup", "2",
                                                                          "--batch-size", "4", "--seq-len", "128"]
    return bench_mmoe.main(args)


def _data(quick: bool, threads: int, out_dir: Path) -> dict:
    import bench_data

    out = out_dir / "results_data.json"
    args = ["--threads", str(threads), "--out", str(out)]
    if quick:
        args += ["--samples", "64", "--batches", "4", "--jpeg-batches", "1", "--rounds", "2", "--batch-size", "4",
                 "--demo-steps", "0", "--replay-samples", "200"]
    bench_data.main(args)
    return json.loads(out.read_text())


def run_benchmark(name: str, quick: bool, threads: int, out_dir: Path) -> dict:
    if name == "folding":
        return bench_folding.run(quick=quick, threads=threads)
    if name == "mfu":
        return bench_mfu.run(quick=quick, threads=threads)
    if name == "gpu_mfu":
        return bench_mfu.run(quick=quick, threads=threads, device="cuda")
    if name == "mmoe":
        return _mmoe(quick, threads, out_dir)
    if name == "data":
        return _data(quick, threads, out_dir)
    if name == "dataparallel":
        if quick:  # real fits of the tiny recipe: minutes, not seconds
            return {"skipped": "dataparallel: runs the tiny recipe for minutes; not in --quick"}
        import bench_data_parallel

        try:
            return bench_data_parallel.run(out=out_dir / "dataparallel")
        except bench_data_parallel.TooLarge as e:
            return {"skipped": f"dataparallel: {e}"}
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")


def _skips(obj, path="") -> list[str]:
    """Every `skipped` message in a result tree, with where it sits."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "skipped" and isinstance(v, str):
                out.append(f"{path}: {v}")
            else:
                out += _skips(v, f"{path}.{k}" if path else k)
    return out


def table_rows(results: dict) -> list[dict]:
    """The headline figures: one row per measured quantity (value, target, met, spread/notes)."""
    rows = []

    def add(bench, what, value, unit, target=None, met=None, note=""):
        rows.append({"benchmark": bench, "measure": what, "value": value, "unit": unit, "target": target, "met": met,
                     "note": note})

    f = results.get("folding", {})
    if "speedup" in f.get("train", {}):
        t = f["train"]
        add("folding", "train image codes/s, folded vs unfolded", t["speedup"]["median"], "x", f">= {t['target']}",
            t["met"], f"{t['timed']['folded']['image_codes_per_s']:.0f} vs {t['timed']['unfolded']['image_codes_per_s']:.0f} "
                      f"codes/s; of min {t['speedup']['of_min']:.2f}x, CPU time {t['speedup'].get('of_cpu_time', float('nan')):.2f}x; "
                      f"FLOP ratio {t['flops_per_image']['ratio']:.2f}x (paper 2B: {t['flops_ratio_paper_2b']:.2f}x)")
        for key, n in (t.get("narrow_head") or {}).items():
            hc = n["head"]
            add("folding", f"train image codes/s, folded vs unfolded, head width {hc['hidden_size']} ({key})",
                n["speedup"]["median"], "x", f">= {t['target']}", n["speedup"]["median"] >= t["target"],
                f"{t['timed']['folded_head_' + key]['image_codes_per_s']:.0f} codes/s; CPU time "
                f"{n['speedup'].get('of_cpu_time', float('nan')):.2f}x; FLOP ratio {n['flops_ratio']:.2f}x "
                f"(paper 2B: {n['flops_ratio_paper_2b']:.2f}x); quality not measured")
    if "speedup" in f.get("generate", {}):
        g = f["generate"]
        add("folding", "generate one image, unfolded / folded time", g["speedup"]["median"], "x",
            f">= {g['targets']['speedup']}", g["met"]["speedup"],
            f"{g['timed']['folded']['median_s']:.2f} s vs {g['timed']['unfolded']['median_s']:.2f} s; CPU time "
            f"{g['speedup'].get('of_cpu_time', float('nan')):.2f}x; FLOP ratio {g['flops_per_image']['ratio']:.2f}x "
            f"(paper 2B: {g['flops_ratio_paper_2b']:.2f}x)")
        for key, n in (g.get("narrow_head") or {}).items():
            hc = n["head"]
            add("folding", f"generate one image, unfolded / folded, head width {hc['hidden_size']} ({key})",
                n["speedup"]["median"], "x", f">= {g['targets']['speedup']}", n["speedup"]["median"] >= g["targets"]["speedup"],
                f"{g['timed']['folded_head_' + key]['median_s']:.2f} s; CPU time {n['speedup'].get('of_cpu_time', float('nan')):.2f}x; "
                f"FLOP ratio {n['flops_ratio']:.2f}x (paper 2B: {n['flops_ratio_paper_2b']:.2f}x); quality not measured")
        if g.get("batched"):
            bt = g["batched"]
            add("folding", f"generate {bt['images']} images in one batch: images/s (separate row, not the 1-image target)",
                bt["images_per_s"], "images/s", note=f"{bt['gain']:.2f}x the one-at-a-time rate "
                f"({bt['images_per_s_one_at_a_time']:.3f} images/s)")
        for n, b in (g.get("bound") or {}).items():
            rate = b["gflops_per_s"]
            add("folding", f"generate {n} image{'s' if n != '1' else ''} in one batch, folded vs unfolded: fraction of the "
                f"FLOP bound", b["fraction"], "fraction", f">= {g['targets']['bound_fraction']}",
                b["fraction"] >= g["targets"]["bound_fraction"],
                f"{b['speedup']['median']:.2f}x vs FLOP ratio {b['flops_ratio']:.2f}x; CPU time "
                f"{b.get('fraction_of_cpu_time', float('nan')):.2f}; {rate['folded']:.2f} vs {rate['unfolded']:.2f} GFLOP/s")
        add("folding", f"CFG cost (scale {g['cfg_scale']}), with / without", g["cfg_cost"]["median"], "x",
            f"<= {g['targets']['cfg_cost_max']}", g["met"]["cfg_cost"],
            f"one batched pass (cond + uncond rows); CPU time {g['cfg_cost'].get('of_cpu_time', float('nan')):.2f}x")
    mem = f.get("memory", {})
    for k, v in (mem.get("step_peak_mib") or {}).items():
        add("folding", f"peak step memory: {k.replace('_', ' ')}", v, "MiB", note="RSS above the pre-step level")
    m = results.get("mfu", {}).get("cpu", {})
    if "mfu" in m:
        add("mfu", f"CPU MFU, width {m['config']['hidden_size']} x {m['config']['num_layers']} layers, "
                   f"{m['config']['batch_size'] * m['config']['seq_len']} tokens", m["mfu"], "fraction",
            f">= {m['target']}", m["met"], f"{m['model_gflops_per_s']:.1f} vs GEMM peak {m['peak_gflops_per_s']:.1f} GFLOP/s "
            f"(GEMM {'x'.join(map(str, m['peak_gemm']))}); of min {m['mfu_of_min']:.1%}")
    gm = results.get("gpu_mfu", {}).get("gpu", {})
    if "mfu" in gm:
        add("gpu_mfu", "GPU MFU, reduced-depth 2B, bf16 FSDP2 + compile", gm["mfu"], "fraction", f">= {gm['target']}", gm["met"])
    elif gm:
        add("gpu_mfu", "GPU MFU, reduced-depth 2B", None, "", ">= 0.45", None, gm.get("skipped", ""))
    mm = results.get("mmoe", {})
    for k, v in (mm.get("ratios") or {}).items():
        tgt = mm["targets"].get(k)
        add("mmoe", k.replace("_", " "), v, "x", f"<= {tgt}", v <= tgt if tgt else None,
            f"of min {mm['ratios_of_min'][k]:.3f}x, CPU time {(mm.get('ratios_of_cpu_time') or {}).get(k) or float('nan'):.3f}x")
    d = results.get("data", {}).get("throughput", {})
    if "pretokenized_64x64" in d:
        r = d["pretokenized_64x64"]
        add("data", "pretokenized 64x64 samples/s per worker (the data loader's target)", r["samples_per_s_per_worker"], "samples/s", ">= 10000",
            r["meets_target_wall"], f"x{r['ratio_vs_jpeg_512']:.1f} vs JPEG 512")
    for name, r in (results.get("dataparallel", {}).get("speedup") or {}).items():
        add("dataparallel", f"tiny stage-1 steps/s, 2 processes ({name.split('_')[0].upper()}) vs 1, same global batch",
            r["step_rate_vs_one_process"], "x", note=f"repeats {', '.join(f'{x:.2f}' for x in r['all'])}; whole "
            f"command {r['wall_vs_one_process']:.2f}x (start-up and end-of-stage evaluation included)")
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Benchmark results ({'quick' if results['quick'] else 'full'} sizes)", "",
             f"Machine: `{m['fingerprint']}`, {results['threads']} torch thread(s); load average before "
             f"{results['load_average']['before']}, after {results['load_average']['after']}. "
             f"Command: `{results['command']}`.", "",
             "| benchmark | measure | value | target | met | note |", "|---|---|---|---|---|---|"]
    for r in results["table"]:
        v = r["value"]
        val = "not measured" if v is None else (f"{v:.1%}" if r["unit"] == "fraction" else f"{v:,.3g} {r['unit']}")
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['benchmark']} | {r['measure']} | {val} | {r['target'] or ''} | {met} | {r['note']} |")
    if results["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s}" for s in results["skipped"]]
    if results["errors"]:
        lines += ["", "Errors:"] + [f"- {k}: {v}" for k, v in results["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole suite in well under a minute")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every benchmark (both sides of each ratio)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--out", default="bench/results.json", help="JSON results (the markdown table goes next to it, .md)")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        p.error(f"--only {','.join(bad)}: unknown benchmark; choose from {','.join(BENCHMARKS)}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"schema_version": SCHEMA_VERSION, "quick": a.quick, "threads": a.threads,
               "command": " ".join(["python bench/run_all.py"] + (argv if argv is not None else sys.argv[1:])),
               "machine": machine_info("cpu", a.threads), "load_average": {"before": load_average()},
               "seconds": {}, "errors": {}}
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = run_benchmark(name, a.quick, a.threads, out.parent)
        except Exception as exc:  # noqa: BLE001 -- one failing benchmark must not lose the others' figures
            traceback.print_exc()
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
        results["seconds"][name] = time.perf_counter() - t0
    results["load_average"]["after"] = load_average()
    results["skipped"] = _skips({n: results[n] for n in names if n in results})
    results["table"] = table_rows(results)
    write_json(out, results)
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
