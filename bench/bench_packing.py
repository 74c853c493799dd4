"""Packed rows vs one sample per row: the tiny SFT recipe's training step, side by side.

Builds the SFT recipe's DataModule and model (`recipes/tiny/sft.yaml`, the data and base LLM of a `make demo`),
draws the same batches unpacked and packed (`pack_rows`), at the recipe's understanding rows and at `--und-rows`
more, and times one optimizer step (forward, backward, AdamW) of each batch, interleaved (bench/common.py). Reports
per variant: rows x padded length, real tokens, the padded share, step time, samples/s and real tokens/s; and the
packed speed-up beside its bound, the ratio of padded token slots (what packing removes).

    .venv/bin/python bench/bench_packing.py --demo . --out bench/results_packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.throughput import batch_flops  # noqa: E402
from common import interleaved, machine_info, ratio, set_threads  # noqa: E402
from datamodules.mixed import MixedDataModule  # noqa: E402
from synergen_lightning.plan import load_recipe  # noqa: E402
from synergen_lightning.system import SynerGenVL  # noqa: E402


def build(und_rows: int, pack: bool, recipe: dict) -> tuple[SynerGenVL, MixedDataModule]:
    data = dict(recipe["data"]["init_args"])
    data["batch_size"] = dict(data["batch_size"], understanding=und_rows)
    data.update(pack_rows=pack, num_workers=0, val_sources=None)
    model_args = dict(recipe["model"]["init_args"], init_from=None, init_from_base_llm=True)  # weights do not change the time
    model = SynerGenVL.from_paths(**model_args)
    data.update(image_size=model.hparams.image_size, tokens_per_view=model.tokens_per_view)
    dm = MixedDataModule(**data)
    dm.setup("fit")
    return model, dm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=Path("."), help="a folder where make demo ran (data/tiny, runs/tiny)")
    p.add_argument("--recipe", type=Path, default=Path("recipes/tiny/sft.yaml"))
    p.add_argument("--und-rows", type=int, nargs="+", default=[48, 144], help="understanding samples per step")
    p.add_argument("--batches", type=int, default=4, help="distinct batches per variant (cycled)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    set_threads(a.threads)
    out_path = a.out.resolve() if a.out else None
    os.chdir(a.demo)
    os.environ.setdefault("SYNERGEN_TINY_SHARDS", "data/tiny/codes")
    recipe = load_recipe([str(a.recipe if a.recipe.is_absolute() else Path(__file__).resolve().parents[1] / a.recipe)])
    variants, shapes = {}, {}
    for und in a.und_rows:
        for pack in (False, True):
            name = f"und{und}_{'packed' if pack else 'rows'}"
            torch.manual_seed(0)
            model, dm = build(und, pack, recipe)
            model.setup("fit")
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
            loader = iter(dm.train_dataloader())
            batches = [dm.on_before_batch_transfer(next(loader), 0) for _ in range(a.batches)]
            tokens = [sum(b["row_tokens"]) for b in batches]
            slots = [b["input_ids"].numel() for b in batches]
            shapes[name] = {"rows_x_len": [list(b["input_ids"].shape) for b in batches],
                            "samples": len(batches[0]["task"]), "real_tokens": sum(tokens) / len(tokens),
                            "token_slots": sum(slots) / len(slots), "padded_share": 1 - sum(tokens) / sum(slots),
                            "flops": sum(batch_flops(model, b) for b in batches) / len(batches)}
            state = {"i": 0}

            def step(model=model, opt=opt, batches=batches, state=state):
                b = batches[state["i"] % len(batches)]
                state["i"] += 1
                opt.zero_grad(set_to_none=True)
                model(b)["loss"].backward()
                opt.step()

            variants[name] = step
    timed = interleaved(variants, repeats=a.repeats, warmup=1)
    out = {"machine": machine_info(threads=a.threads), "variants": {}, "speedup": {}}
    for name, t in timed.items():
        s = shapes[name]
        out["variants"][name] = {**s, **t, "samples_per_s": s["samples"] / t["median_s"],
                                 "real_tokens_per_s": s["real_tokens"] / t["median_s"],
                                 "gflop_per_s": s["flops"] / t["median_s"] / 1e9}
    for und in a.und_rows:
        rows, packed = f"und{und}_rows", f"und{und}_packed"
        out["speedup"][f"und{und}"] = {**ratio(timed, rows, packed),
                                       "bound_token_slots": shapes[rows]["token_slots"] / shapes[packed]["token_slots"]}
    print(f"{'variant':<18}{'rows x len':>14}{'samples':>9}{'padded':>8}{'step s':>9}{'samples/s':>11}{'tokens/s':>10}")
    for name, v in out["variants"].items():
        shape = "x".join(map(str, v["rows_x_len"][0]))
        print(f"{name:<18}{shape:>14}{v['samples']:>9}{v['padded_share']:>8.2f}{v['median_s']:>9.3f}"
              f"{v['samples_per_s']:>11.1f}{v['real_tokens_per_s']:>10.0f}")
    for k, v in out["speedup"].items():
        print(f"{k}: packed is {v['median']:.2f}x faster per step (bound from token slots {v['bound_token_slots']:.2f}x)")
    if out_path:
        out_path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
