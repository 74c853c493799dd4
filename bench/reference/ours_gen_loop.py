"""Our SynerGenVL in the reference's training loop (RESULTS.md): the tiny recipe's model (4x4 fold, 2-layer head,
fold output RMS 0.1) on generation batches only, EVERY parameter trainable at one learning rate (AdamW 1e-3, the
reference's optimizer), so that step for step it compares with `gen_reference.py` without the stage schedule.

Reports the product's own grounding measure (`synergen_lightning.eval.grounding.caption_gain`: image loss after the
true caption, a wrong caption and `<UNCOND>`) every `--eval-every` steps, checkpoints every 1,000 steps, and GenEval of
the eval prompts through `SynerGenVL.generate_images` at the end.

    python bench/reference/ours_gen_loop.py --demo . --steps 3000          # after `make demo`
    python bench/reference/ours_gen_loop.py --demo . --resume runs/reference_ours_gen/last.pt --schedule cosine --steps 2000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from datamodules.mixed import MixedDataModule
from synergen_lightning.eval.grounding import caption_gain, grounding_items, load_grounding_samples
from synergen_lightning.system import SynerGenVL
from synergen_lightning.world import scorer

sys.path.insert(0, str(Path(__file__).parent))
from und_reference import lr_factor  # noqa: E402  (the same warm-up + schedule as the understanding reference)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=".", help="a checkout after `make demo` (data/tiny, runs/tiny)")
    p.add_argument("--train", default=None, help="train shard glob (default DEMO/data/tiny/codes/train/shard-*.tar)")
    p.add_argument("--image-size", type=int, default=64, help="px of the pretokenized views (the demo level's 64)")
    p.add_argument("--fold", type=int, default=4, help="fold f: f x f codes per LLM token (the tiny recipes' 4)")
    p.add_argument("--head-layers", type=int, default=2, help="unfolding-head depth (the tiny recipes' 2)")
    p.add_argument("--head-condition", choices=["first", "every"], default="first", help="how h_i enters the head")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="with --init random: a trunk of the base LLM's shape but this many KV heads (4 = plain MHA)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init", choices=["base", "random"], default="base", help="trunk from the tiny base LLM or random")
    p.add_argument("--resume", default=None, help="a state dict this script saved (weights only; the optimizer starts fresh)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="lr after a 50-step warm-up: constant, or cosine decay to 0 at --steps")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--cfg", type=float, nargs="*", default=[7.5], help="GenEval CFG scales (none: skip GenEval)")
    p.add_argument("--num-prompts", type=int, default=600)
    p.add_argument("--out", default="runs/reference_ours_gen")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    demo, out = Path(a.demo), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = str(demo / "runs/tiny/text_tokenizer")
    if a.kv_heads and a.init != "random":
        p.error("--kv-heads changes the trunk's shape: use it with --init random")
    shape = {}
    if a.kv_heads:
        from synergen_lightning.checkpoint import read_checkpoint_meta

        base = read_checkpoint_meta(demo / "runs/tiny/base_llm/last.ckpt")["hyper_parameters"]["config"]
        shape = {"base_llm": None, "llm": {**base, "num_kv_heads": a.kv_heads}}
    m = SynerGenVL.from_paths(**{"base_llm": str(demo / "runs/tiny/base_llm/last.ckpt"), **shape}, text_tokenizer=tok,
                              image_tokenizer=str(demo / "runs/tiny/tokenizer/checkpoints/last.ckpt"), codebook_size=2048,
                              image_size=a.image_size, downsample=8, fold=(a.fold, a.fold), code_dim=64, fold_output_rms=0.1,
                              fold_output_rms_learnable=False, head={"num_layers": a.head_layers, "condition": a.head_condition})
    if not a.kv_heads:
        m._init_weights_for_fit("stage1")  # what `fit` does first: trunk from the base LLM, vision FFNs as its copies
    if a.init == "random":
        for mod in m.llm.model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.reset_parameters()
    if a.resume:
        m.load_state_dict(torch.load(a.resume, map_location="cpu"))
    for prm in m.parameters():
        prm.requires_grad_(True)
    src = {"name": "gen", "urls": a.train or str(demo / "data/tiny/codes/train/shard-*.tar"), "task": "generation",
           "options": {"caption_ext": None, "caption_field": "captions"}}
    dm = MixedDataModule(sources=[src], tokenizer=tok, tokens_per_view=(a.image_size // (8 * a.fold)) ** 2, image_size=a.image_size, batch_size={"generation": 16},
                         max_seq_len=256, num_workers=1, steps_per_epoch=10**6, cfg_dropout=0.1)
    dm.setup("fit")
    train = iter(dm.train_dataloader())
    samples = load_grounding_samples(str(demo / "data/tiny/codes/val/shard-*.tar"), max_items=96)
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, a.steps, a.schedule))
    m.train()
    t0 = time.time()
    for step in range(a.steps):
        loss = m.forward_losses(next(train))["loss_image"]
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % a.eval_every == 0:
            with torch.no_grad():
                captions, _ = grounding_items(m, samples)
                g = caption_gain(m, captions)
            m.train()
            print(f"step {step + 1} val loss {g['true']:.4f}  caption gain vs wrong {g['gain_vs_wrong']:.4f} "
                  f"vs <UNCOND> {g['gain_vs_uncond']:.4f} nats/code ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % 1000 == 0:
            torch.save(m.state_dict(), out / f"step{step + 1}.pt")
    torch.save(m.state_dict(), out / "last.pt")
    prompts = [json.loads(line) for line in open(demo / "data/tiny/eval_prompts.jsonl")][:a.num_prompts]
    for cfg in a.cfg:
        t1 = time.time()
        images = m.generate_images([q["prompt"] for q in prompts], cfg_scale=cfg, seed=0, batch_size=50)
        r = scorer.score_images(images, prompts)
        print(f"cfg {cfg}: GenEval {r['overall']:.3f} " + " ".join(f"{k} {r[k]:.2f}" for k in scorer.CATEGORIES)
              + f"  shapes/img {r['objects_per_image']:.2f} rejected/img {r['rejected_per_image']:.2f} ({time.time() - t1:.0f}s)",
              flush=True)


if __name__ == "__main__":
    main()
