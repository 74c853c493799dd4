"""Independent reference for text-to-image on the shape world (RESULTS.md): a plain causal transformer that shares
no model code with SynerGenVL, trained from scratch on the same generation batches (our MixedDataModule).

Sequence: the generation prompt (ids exactly as training builds them, left-padded to 64), then the view's code grid in
raster order, UNFOLDED; a codebook classifier predicts every code. Width / depth default to the tiny base LLM's.
Reports the val caption gain (loss after a wrong caption or `<UNCOND>` minus the loss after the true caption, nats per
code) every 250 steps, and GenEval of the 600 eval prompts (KV-cached sampling, CFG) at the end.

    python bench/reference/gen_reference.py --demo . --steps 1500          # after `make demo` in this checkout
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from datamodules.mixed import MixedDataModule
from synergen_lightning.data.sequences import generation_prompt_ids
from synergen_lightning.image_tokenizer.loading import load_image_tokenizer
from synergen_lightning.text_tokenizer import load_or_train
from synergen_lightning.world import scorer

PROMPT_LEN = 64  # every prompt left-padded to this many ids, so code k always sits at position PROMPT_LEN + k


class Block(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.n1, self.qkv, self.o = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cache: dict | None = None):
        q, k, v = rearrange(self.qkv(self.n1(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # causal for a whole sequence; one decoded token sees the whole cache
        a = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1 and q.shape[2] == k.shape[2])
        x = x + self.o(rearrange(a, "b h t d -> b t (h d)"))
        return x + self.mlp(self.n2(x))


class ReferenceT2I(nn.Module):
    def __init__(self, text_vocab: int, codebook: int, d: int, layers: int, max_len: int = 512):
        super().__init__()
        self.txt, self.img, self.pos = nn.Embedding(text_vocab, d), nn.Embedding(codebook, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, codebook)

    def forward(self, prompt, codes):
        """prompt Long[B, PROMPT_LEN], codes Long[B, N] -> logits [B, N, codebook] (teacher forced)."""
        x = torch.cat([self.txt(prompt), self.img(codes[:, :-1])], 1)
        x = x + self.pos(torch.arange(x.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x))[:, prompt.shape[1] - 1:]

    @torch.no_grad()
    def sample(self, prompt, uncond, n_codes: int, cfg: float, generator, temperature: float = 1.0):
        """CFG sampling with a KV cache: conditional and unconditional rows as one batch."""
        x = torch.cat([prompt, uncond])
        h = self.txt(x) + self.pos(torch.arange(x.shape[1]))
        caches, out = [{} for _ in self.blocks], []
        for t in range(n_codes):
            for blk, c in zip(self.blocks, caches):
                h = blk(h, c)
            cond, unc = self.out(self.norm(h[:, -1])).chunk(2)
            logits = unc + cfg * (cond - unc)
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            out.append(nxt)
            h = self.img(torch.cat([nxt, nxt]))[:, None] + self.pos(torch.tensor([x.shape[1] + t]))
        return torch.stack(out, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=".", help="a checkout after `make demo` (its data/tiny, runs/tiny tokenizers)")
    p.add_argument("--train", default=None, help="train shard glob of pretokenized views (default DEMO/data/tiny/codes/train)")
    p.add_argument("--image-size", type=int, default=64, help="px of the pretokenized views (8 px per code; the demo level's 64)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250, help="steps between val caption-gain reports")
    p.add_argument("--resume", default=None, help="state dict to start from")
    p.add_argument("--cfg", type=float, nargs="*", default=[7.5], help="GenEval CFG scales (none: skip GenEval)")
    p.add_argument("--num-prompts", type=int, default=600, help="eval prompts to score (the first N)")
    p.add_argument("--out", default="runs/reference_gen")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    demo, out = Path(a.demo), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = a.image_size // 8  # codes per side
    tok = load_or_train(demo / "runs/tiny/text_tokenizer")
    vq = load_image_tokenizer(demo / "runs/tiny/tokenizer/checkpoints/last.ckpt")

    def stream(urls, batch, cfg_dropout):
        src = {"name": "gen", "urls": urls, "task": "generation", "options": {"caption_ext": None, "caption_field": "captions"}}
        dm = MixedDataModule(sources=[src], tokenizer=str(demo / "runs/tiny/text_tokenizer"), tokens_per_view=grid * grid // 16,
                             image_size=a.image_size,
                             batch_size={"generation": batch}, max_seq_len=256, num_workers=1, steps_per_epoch=10**6,
                             cfg_dropout=cfg_dropout)
        dm.setup("fit")
        return iter(dm.train_dataloader())

    def left_pad(ids):
        return [tok.pad_id] * (PROMPT_LEN - len(ids)) + ids[-PROMPT_LEN:]

    def tensors(b):
        first = b["image_mask"].float().argmax(1)  # the first image slot follows <boi>
        prompt = torch.tensor([left_pad(b["input_ids"][i, :int(f)].tolist()) for i, f in enumerate(first)])
        return prompt, rearrange(b["image_codes"], "b h w -> b (h w)")

    m = ReferenceT2I(tok.vocab_size, vq.codebook_size, a.width, a.layers)
    if a.resume:
        m.load_state_dict(torch.load(a.resume))
    print(f"reference: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    train = stream(a.train or str(demo / "data/tiny/codes/train/shard-*.tar"), 16, 0.1)
    val_stream = stream(str(demo / "data/tiny/codes/val/shard-*.tar"), 32, 0.0)
    val = [tensors(next(val_stream)) for _ in range(3)]
    uncond = left_pad(generation_prompt_ids(tok, None))

    @torch.no_grad()
    def losses():
        """val image loss after the true caption, <UNCOND>, and a wrong caption (the next row's)."""
        m.eval()
        tot = [0.0, 0.0, 0.0]
        for prompt, codes in val:
            for j, pr in enumerate([prompt, torch.tensor([uncond] * len(codes)), prompt.roll(1, 0)]):
                tot[j] += F.cross_entropy(rearrange(m(pr, codes), "b t v -> (b t) v"), codes.reshape(-1)).item() / len(val)
        m.train()
        return tot

    t0 = time.time()
    for step in range(a.steps):
        prompt, codes = tensors(next(train))
        loss = F.cross_entropy(rearrange(m(prompt, codes), "b t v -> (b t) v"), codes.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % a.eval_every == 0:
            t, u, w = losses()
            print(f"step {step + 1} val loss {t:.4f}  caption gain vs wrong {w - t:.4f} vs <UNCOND> {u - t:.4f} nats/code "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % 1000 == 0:
            torch.save(m.state_dict(), out / f"step{step + 1}.pt")
    torch.save(m.state_dict(), out / "last.pt")

    prompts = [json.loads(line) for line in open(demo / "data/tiny/eval_prompts.jsonl")][:a.num_prompts]
    for cfg in a.cfg:
        t1, images = time.time(), []
        for i in range(0, len(prompts), 50):
            chunk = prompts[i:i + 50]
            cond = torch.tensor([left_pad(generation_prompt_ids(tok, q["prompt"])) for q in chunk])
            codes = m.sample(cond, torch.tensor([uncond] * len(chunk)), grid * grid, cfg, torch.Generator().manual_seed(i))
            images += vq.decode(rearrange(codes, "b (h w) -> b h w", h=grid)).mul(255).round().to(torch.uint8).unbind(0)
        from PIL import Image
        pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        r = scorer.score_images(pil, prompts)
        print(f"cfg {cfg}: GenEval {r['overall']:.3f} " + " ".join(f"{k} {r[k]:.2f}" for k in scorer.CATEGORIES)
              + f"  shapes/img {r['objects_per_image']:.2f} rejected/img {r['rejected_per_image']:.2f} ({time.time() - t1:.0f}s)",
              flush=True)


if __name__ == "__main__":
    main()
