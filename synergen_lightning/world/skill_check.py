"""Learnability check for the held-out text skill: a tiny char-level transformer, trained on
`skill_train` for a wall-clock budget, answers `skill_val` (pairs it never saw) by greedy decoding.

This is an independent yardstick (plain PyTorch, not the toolkit's LLM), to show the skill is
learnable by a ~2M-parameter model in minutes on CPU yet needs a rule, not recall:

    python -m synergen_lightning.world.skill_check --seconds 180 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text_corpus import make_skill, score_text_skill, skill_text

VOCAB = sorted(set("\n0123456789 ?,:abcdefghijklmnopqrstuvwxyzQA"))


class TinyCharLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 192, layers: int = 4, heads: int = 6, ctx: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def run(seconds: float = 180.0, seed: int = 0, threads: int = 2, batch: int = 64, max_steps: int | None = None,
        dim: int = 128, layers: int = 4, heads: int = 4, log_every: int = 0) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    stoi = {c: i for i, c in enumerate(VOCAB)}
    nl = stoi["\n"]
    train, val = make_skill(seed)
    enc = lambda s: [stoi[c] for c in s]  # noqa: E731
    rows = [enc(skill_text(it) + "\n") for it in train]
    ctx = max(map(len, rows)) + 1
    data = torch.full((len(rows), ctx), nl, dtype=torch.long)
    for i, r in enumerate(rows):
        data[i, : len(r)] = torch.tensor(r)
    model = TinyCharLM(len(VOCAB), dim=dim, layers=layers, heads=heads, ctx=ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds and (max_steps is None or step < max_steps):
        idx = torch.randint(len(rows), (batch,))
        x = data[idx]
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if log_every and step % log_every == 0:
            print(f"step {step} loss {loss.item():.3f} held-out EM {_evaluate(model, val[:100], enc):.2f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    acc = _evaluate(model, val, enc)
    return {"exact_match": acc, "steps": step, "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()), "final_loss": loss.item()}


def _evaluate(model, val, enc, max_new: int = 4) -> float:
    """Greedy decoding, batched over prompts of equal length (absolute positions need no padding)."""
    nl = VOCAB.index("\n")
    model.eval()
    preds = [""] * len(val)
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(val):
        groups.setdefault(len(it["prompt"]) + 1, []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            ids = torch.tensor([enc(val[i]["prompt"] + " ") for i in idx])
            for _ in range(max_new):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
            for row, i in zip(ids[:, -max_new:].tolist(), idx):
                chars = []
                for t in row:
                    if t == nl:
                        break
                    chars.append(VOCAB[t])
                preds[i] = "".join(chars)
    model.train()
    return score_text_skill(preds, [it["answer"] for it in val])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180.0, help="training wall-clock budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (hardware-independent)")
    p.add_argument("--log-every", type=int, default=0, help="print loss and held-out exact match every N steps")
    a = p.parse_args(argv)
    r = run(a.seconds, a.seed, a.threads, max_steps=a.max_steps, log_every=a.log_every)
    print(f"skill_check: exact match {r['exact_match']:.3f} on held-out pairs after {r['steps']} steps "
          f"({r['seconds']:.0f}s, {r['params'] / 1e6:.2f}M params, final loss {r['final_loss']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
