"""Decode path before/after, in ONE process, interleaved call by call (1 thread): a git revision vs the working tree.

The revision's `synergen_lightning` is exported (`git archive`) into a temp dir, renamed `synergen_base` (its
imports rewritten) and loaded beside the working tree's package; both models get the same weights, and their
greedy CFG codes are asserted identical before timing. Measured, CPU time per unit (median over rounds, the
order of before/after alternating per round): the head's KV-cached decode (1 row; CFG 2 rows) per code, the
LLM's decode step (CFG rows, left-padded prompts), and `generate_codes` of one image with and without CFG.

`--vs-unfolded` times whole images instead, folded (`generate_codes`) and unfolded (`bench_folding.unfolded_generate`
of an `MMoETransformer` of the same LLM), before and after, at each of `--batches` (images per batch): each
revision's folded vs unfolded speed-up and its fraction of the FLOP bound (`bench_folding.analytic_flops`), wall and
CPU time, from the same rounds; the sampled codes (temperature 1, one seed) of before and after are asserted equal
where both revisions sample alike (greedy codes are compared first either way). `--compile` adds a third side, the
working tree with `generate_codes(compile=True)` and the unfolded LLM's compiled decode step (graphs built before
timing); where its codes first part from the eager working tree's is recorded (the fused kernels round differently,
and one flipped draw changes the rest of the image; tests/test_generation_decode.py checks the compiled path).

    .venv/bin/python bench/ab_decode.py --rev REV --grid 32 --rounds 5 --out runs/bench/ab_decode.json
    .venv/bin/python bench/ab_decode.py --rev REV --grid 64 --vs-unfolded --batches 1,16 --rounds 3 --compile
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def pure(component):
    """The pure module of a system component (`model.llm` / `model.head`); the module itself where the revision's
    system holds it directly."""
    return getattr(component, "model", component)


def export_revision(rev: str, dest: Path) -> None:
    """`git archive REV synergen_lightning` -> dest/synergen_base, every import renamed."""
    try:
        blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "synergen_lightning"], check=True,
                              capture_output=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--rev {rev!r}: git archive failed ({exc.stderr.decode().strip()}); pass a commit of this repo") from None
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "synergen_lightning").rename(dest / "synergen_base")
    for f in (dest / "synergen_base").rglob("*.py"):
        f.write_text(f.read_text().replace("synergen_lightning", "synergen_base"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the 'before' commit (e.g. the parent of the decode changes)")
    p.add_argument("--grid", type=int, default=32, help="code grid of the generated image (bench widths otherwise)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one untimed first)")
    p.add_argument("--vs-unfolded", action="store_true", help="whole images, folded vs unfolded, before and after")
    p.add_argument("--batches", default="1", help="--vs-unfolded: images per batch, comma-separated (e.g. 1,16)")
    p.add_argument("--compile", action="store_true", help="--vs-unfolded: also time the working tree compiled")
    p.add_argument("--out", default="runs/bench/ab_decode.json")
    a = p.parse_args(argv)
    if a.grid % 8 or a.grid <= 0:
        p.error(f"--grid {a.grid}: must be a positive multiple of 8 (2x8 folding)")
    tmp = tempfile.TemporaryDirectory()
    export_revision(a.rev, Path(tmp.name))
    sys.path.insert(0, tmp.name)

    import torch

    torch.set_num_threads(1)
    try:  # the revision's decode path: inference.py, else generation.py where that revision keeps it
        from synergen_base.inference import generate_codes as gen_old
    except ModuleNotFoundError:
        from synergen_base.generation import generate_codes as gen_old
    from synergen_base.system import SynerGenVL as OldVL

    import bench_folding as bf
    from synergen_lightning.inference import generate_codes as gen_new
    from synergen_lightning.models.decoding import left_pad, left_pad_positions
    from synergen_lightning.state_keys import flat_key

    c = dict(bf.FULL, grid=a.grid)
    torch.manual_seed(0)
    new = bf.build_folded(c).eval()
    old = OldVL(llm=vars(bf.llm_config(c)), special_token_ids=bf.SPECIAL, codebook_size=c["codebook_size"],
                image_size=a.grid * 8, downsample=8, fold=tuple(c["fold"]), code_dim=c["hidden_size"],
                head=bf.head_config(c), stage="full").eval()
    theirs = set(old.state_dict())  # a revision whose system holds the pure modules directly: the flat key layout
    old.load_state_dict({k if k in theirs else flat_key(k): v for k, v in new.state_dict().items()})
    d, g = c["hidden_size"], torch.Generator().manual_seed(0)
    prompt, uncond = bf.prompt(c, g), [bf.SPECIAL["bos"], bf.SPECIAL["uncond"], bf.SPECIAL["boi"]]
    h1, h2 = torch.randn(1, d), torch.randn(2, d)
    gen = {id(new): gen_new, id(old): gen_old}
    with torch.no_grad():
        same = torch.equal(gen_new(new, [prompt], uncond, 7.5, temperature=0.0), gen_old(old, [prompt], uncond, 7.5, temperature=0.0))
    if not same:
        raise SystemExit("before and after differ on greedy CFG generation: fix that before timing")
    if a.vs_unfolded:
        return vs_unfolded(a, c, prompt, {"before": (old, gen_old), "after": (new, gen_new)})

    def llm_steps(model, steps=32):
        ids, mask = left_pad([prompt, uncond], bf.SPECIAL["pad"])
        pos = left_pad_positions(mask)
        trunk = pure(model.llm)
        cache = trunk.new_kv_cache()
        trunk(model.embed_text(ids), image_mask=torch.zeros_like(mask), position_ids=pos, attention_mask=mask,
              kv_cache=cache)
        x, col, nxt = torch.randn(2, 1, d), torch.ones(2, 1, dtype=torch.bool), pos[:, -1:] + 1
        kw = {} if model is new else {"attention_mask": col}  # as each revision's generate_codes calls it
        for _ in range(steps):
            trunk(x, image_mask=col, position_ids=nxt, kv_cache=cache, **kw)
            nxt = nxt + 1

    L = new.head.model.seq_len
    tasks = {
        "head_ms_per_code": (lambda m: [pure(m.head).generate(h1, generator=g) for _ in range(8)], 1e3 / (8 * L)),
        "head_cfg_ms_per_code": (lambda m: [pure(m.head).generate(h2, cfg_scale=7.5, generator=g) for _ in range(8)],
                                 1e3 / (8 * L)),
        "llm_cfg_ms_per_step": (llm_steps, 1e3 / 32),
        "generate_image_s": (lambda m: gen[id(m)](m, [prompt], None, None, generator=g), 1.0),
        "generate_image_cfg_s": (lambda m: gen[id(m)](m, [prompt], uncond, 7.5, generator=g), 1.0),
    }
    times = {k: {"before": [], "after": []} for k in tasks}
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    with torch.no_grad():
        for r in range(a.rounds + 1):
            for k, (fn, scale) in tasks.items():
                for side, m in (("before", old), ("after", new)) if r % 2 else (("after", new), ("before", old)):
                    t0 = time.process_time()
                    fn(m)
                    if r:
                        times[k][side].append((time.process_time() - t0) * scale)
    out = {"rev": a.rev, "grid": a.grid, "rounds": a.rounds, "threads": 1, "load_before": load_before,
           "load_after": Path("/proc/loadavg").read_text().split()[:3] if load_before else None, "cpu_time": {}}
    for k, v in times.items():
        b, f = statistics.median(v["before"]), statistics.median(v["after"])
        out["cpu_time"][k] = {"before": b, "after": f, "speedup": b / f, "speedup_of_min": min(v["before"]) / min(v["after"])}
        print(f"{k:22s} before {b:8.4f}  after {f:8.4f}  speed-up {b / f:5.2f}x (of min {min(v['before']) / min(v['after']):5.2f}x)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return out


def vs_unfolded(a, c: dict, prompt: list[int], folded: dict) -> dict:
    """Whole images per batch size: folded and unfolded, before and after, one call each per round (the order of
    before/after alternating per round); round 0's codes of before and after must be equal."""
    import torch
    from synergen_base.models import decoding as old_decoding
    from synergen_base.models import mmoe as old_mmoe

    import bench_folding as bf
    from common import load_average, stats
    from synergen_lightning.models.decoding import sample_logits

    torch.manual_seed(0)
    new_llm = bf.build_unfolded(c).eval()
    old_llm = old_mmoe.MMoETransformer(old_mmoe.LLMConfig(**vars(new_llm.config))).eval()
    old_llm.load_state_dict(new_llm.state_dict())
    unfolded = {"before": (old_llm, old_decoding.sample_logits), "after": (new_llm, sample_logits)}
    hw, batches = c["grid"] ** 2, [int(b) for b in a.batches.split(",")]

    sides = ("before", "after") + (("compiled",) if a.compile else ())
    folded = {**folded, "compiled": folded["after"]}
    unfolded["compiled"] = unfolded["after"]
    probe, g0, g1 = torch.randn(64, 300), torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    same_sampler = torch.equal(old_decoding.sample_logits(probe, 1.0, generator=g0), sample_logits(probe, 1.0, generator=g1))

    def call(kind, side, n):
        seed, opt = torch.Generator().manual_seed(1), {"compile": True} if side == "compiled" else {}
        if kind == "folded":
            model, gen = folded[side]
            return gen(model, [prompt] * n, None, None, generator=seed, **opt)
        llm, sample = unfolded[side]
        return bf.unfolded_generate(llm, prompt, hw, seed, rows=n, sample=sample, **opt)

    wall = {(k, s, n): [] for k in ("folded", "unfolded") for s in sides for n in batches}
    cpu = {key: [] for key in wall}
    out = {"rev": a.rev, "grid": c["grid"], "rounds": a.rounds, "threads": 1, "same_sampler": same_sampler}
    with torch.no_grad():
        if a.compile:  # graphs built (and their build time recorded) before any timed call
            t0 = time.perf_counter()
            for n in batches:
                call("folded", "compiled", n)
                bf.unfolded_generate(unfolded["compiled"][0], prompt, 64, torch.Generator().manual_seed(1), rows=n,
                                     compile=True)
            out["compile_s"] = time.perf_counter() - t0
        out["load_average_before"] = load_average()
        for r in range(a.rounds):
            for n in batches:
                for kind in ("folded", "unfolded"):
                    codes = {}
                    for side in sides if r % 2 == 0 else sides[::-1]:
                        t0, c0 = time.perf_counter(), time.process_time()
                        codes[side] = call(kind, side, n)
                        wall[kind, side, n].append(time.perf_counter() - t0)
                        cpu[kind, side, n].append(time.process_time() - c0)
                    if r == 0 and same_sampler and not torch.equal(codes["before"], codes["after"]):
                        raise SystemExit(f"{kind} codes at batch {n} differ between before and after")
                    if r == 0 and a.compile:  # rounding differs in the fused kernels: one flipped draw and the
                        # rest of the image differs (the work per code does not); where they part is recorded
                        diff = (codes["compiled"] != codes["after"]).flatten(1).any(0).nonzero()
                        out.setdefault("compiled_first_differing_code", {})[f"{kind}_{n}"] = (
                            int(diff[0]) if len(diff) else None)
                    print(f"round {r} batch {n} {kind}: " + ", ".join(
                        f"{s} {wall[kind, s, n][-1]:.1f} s" for s in sides), flush=True)
    bound = bf.analytic_flops(c)["generate"]["ratio"]
    out["flops_ratio"], out["load_average_after"], out["batches"] = bound, load_average(), {}
    for n in batches:
        row = {}
        for side in sides:
            f, u = stats(wall["folded", side, n], cpu["folded", side, n]), stats(wall["unfolded", side, n], cpu["unfolded", side, n])
            sp, sp_cpu = u["median_s"] / f["median_s"], u["cpu_median_s"] / f["cpu_median_s"]
            row[side] = {"folded": f, "unfolded": u, "speedup": sp, "speedup_cpu_time": sp_cpu,
                         "fraction_of_bound": sp / bound, "fraction_of_bound_cpu_time": sp_cpu / bound}
            print(f"batch {n:2d} {side:8s}: folded {f['median_s']:7.2f} s, unfolded {u['median_s']:7.2f} s -> {sp:.2f}x "
                  f"= {sp / bound:.2f} of the FLOP bound {bound:.2f}x (CPU time {sp_cpu:.2f}x = {sp_cpu / bound:.2f})")
        out["batches"][str(n)] = row
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
