"""Independent reference for image understanding on the shape world (RESULTS.md): a plain
`nn.TransformerEncoder` (causal, trained from scratch, no code shared with SynerGenVL) on the same Q/A batches as our
`MixedDataModule` builds them, with the same 4x4 fold of the pretokenized codes (concatenation + MLP).

Reports the exact match of the answer (every supervised token of the row right under teacher forcing, which is what
greedy decoding returns) on the training batches every 100 steps and on 500 val Q/A every `--val-every` steps: the val
figure shows when the model memorises the train scenes instead of generalising.

    python bench/reference/und_reference.py --demo . --steps 3000                 # after `make demo`
    python bench/reference/und_reference.py --demo . --kinds color --steps 600    # one question kind
    python bench/reference/und_reference.py --demo . --width 256 --schedule cosine --steps 6000   # larger, decaying lr
    python bench/reference/und_reference.py --demo . --image-size 64 --fold 2 --train 'CODES64/train/shard-*.tar' \
        --val 'CODES64/val/shard-*.tar'      # half the resolution at the same 16 tokens (pretokenize --image-size 64)

At the end it prints the val accuracy per question kind (100 val Q/A each) beside each kind's prior (the share of its most
common val answer), so a plateau can be traced to the kinds that stay at their prior.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from datamodules.mixed import MixedDataModule
from synergen_lightning.eval.suites import load_qa_items
from synergen_lightning.text_tokenizer import load_or_train
from synergen_lightning.world.language import QA_KINDS


class ReferenceVQA(nn.Module):
    def __init__(self, text_vocab: int, codebook: int, d: int = 128, layers: int = 4, grid: int = 16, fold: int = 4,
                 code_dim: int = 64, max_len: int = 256):
        super().__init__()
        self.fold = fold
        self.tok, self.code = nn.Embedding(text_vocab, d), nn.Embedding(codebook, code_dim)
        self.code_pos = nn.Parameter(torch.randn(grid, grid, code_dim) * 0.02)
        in_dim = fold * fold * code_dim
        self.fold_mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, d), nn.GELU(), nn.Linear(d, d))
        self.pos = nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, 4, 3 * d, 0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)  # norm_first has no nested path
        self.out = nn.Linear(d, text_vocab)

    def forward(self, b: dict):
        x = self.tok(b["input_ids"])
        c = rearrange(self.code(b["image_codes"]) + self.code_pos, "b (h m) (w n) d -> b (h w) (m n d)", m=self.fold, n=self.fold)
        x = x.masked_scatter(b["image_mask"][..., None], self.fold_mlp(c).reshape(-1, x.shape[-1]))
        t = x.shape[1]
        x = x + self.pos(torch.arange(t))
        return self.out(self.enc(x, mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True))


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Per row: (exact match, the answer's ids). A row matches when the teacher-forced argmax is right at every
    supervised position (the answer and its end-of-turn tokens), which is exactly when greedy decoding returns the
    answer. The first answer token alone is not a measure: a digit answer starts with the shared word-start id, so
    counts would score 1.0 without looking at the image."""
    tgt = labels[:, 1:]
    sup = tgt != -100
    right = ((logits[:, :-1].argmax(-1) == tgt) | ~sup).all(1)
    return right, [tuple(t[m].tolist()) for t, m in zip(tgt, sup)]


def init_code_embedding_from_pixels(m: ReferenceVQA, tokenizer_ckpt: Path) -> None:
    """What each code looks like, as its embedding: the decoded pixels of every code (centre of a uniform 3x3 grid),
    projected on their top principal components, each component scaled to unit variance."""
    from synergen_lightning.image_tokenizer.loading import load_image_tokenizer
    from synergen_lightning.models.folding import codebook_patches

    tok = load_image_tokenizer(tokenizer_ckpt)
    patches = codebook_patches(tok, tok.codebook_size, tok.downsample)  # [codebook, 3 * 8 * 8]
    centred = patches - patches.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    comps = centred @ v[: m.code.embedding_dim].T
    with torch.no_grad():
        m.code.weight.copy_(comps / comps.std(0))


def lr_factor(step: int, steps: int, schedule: str, warmup: int = 50) -> float:
    """Linear warm-up, then constant or a cosine decay to zero at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def accuracy(m: nn.Module, batches: list[dict]) -> tuple[int, int, Counter]:
    """(exact matches, rows, counts of each answer) over `batches`."""
    m.eval()
    with torch.no_grad():
        hits = [answer_hits(m(vb), vb["labels"]) for vb in batches]
    m.train()
    answers = Counter(a for _, ans in hits for a in ans)
    return sum(int(right.sum()) for right, _ in hits), sum(len(right) for right, _ in hits), answers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=".", help="a checkout after `make demo` (its data/tiny/codes, runs/tiny/text_tokenizer)")
    p.add_argument("--train", default=None, help="train shard glob (default DEMO/data/tiny/codes/train/shard-*.tar)")
    p.add_argument("--val", default=None, help="val shard glob (default DEMO/data/tiny/codes/val/shard-*.tar)")
    p.add_argument("--image-size", type=int, default=64, help="px of the pretokenized views (8 px per code; the demo level's 64)")
    p.add_argument("--fold", type=int, default=4, help="fold f: f x f neighbouring codes make one LLM token")
    p.add_argument("--code-init", choices=["random", "codebook"], default="random",
                   help="code embedding: random, or the top principal components of each code's decoded 8x8 pixels")
    p.add_argument("--kinds", default=None, help="comma-separated question kinds (default: all)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32, help="Q/A rows per step (the tiny SFT recipe: 48)")
    p.add_argument("--val-every", type=int, default=500, help="steps between val accuracies (a multiple of 100)")
    p.add_argument("--width", type=int, default=128, help="model width (the tiny LLM's: 128)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (the tiny LLM's: 4)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="lr after a 50-step warm-up: constant, or cosine decay to 0 at --steps")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    demo = Path(a.demo)
    tok_dir = demo / "runs/tiny/text_tokenizer"
    kinds = a.kinds.split(",") if a.kinds else None

    grid = a.image_size // 8
    if grid % a.fold:
        p.error(f"--fold {a.fold} does not divide the {grid}x{grid} code grid of --image-size {a.image_size}")
    val_urls = a.val or str(demo / "data/tiny/codes/val/shard-*.tar")

    def stream(urls, batch, workers, qa_kinds=kinds):
        dm = MixedDataModule(sources=[{"name": "qa", "urls": urls, "task": "understanding", "format": "qa",
                                       "options": {"qa_kinds": qa_kinds}}],
                             tokenizer=str(tok_dir), tokens_per_view=(grid // a.fold) ** 2, image_size=a.image_size,
                             batch_size={"understanding": batch},
                             max_seq_len=256, num_workers=workers, steps_per_epoch=10**6)
        dm.setup("fit")
        return iter(dm.train_dataloader())

    train = stream(a.train or str(demo / "data/tiny/codes/train/shard-*.tar"), a.batch, 1)
    val_stream = stream(val_urls, 50, 0)
    val = [next(val_stream) for _ in range(10)]
    m = ReferenceVQA(load_or_train(tok_dir).vocab_size, 2048, d=a.width, layers=a.layers, grid=grid, fold=a.fold)
    print(f"{a.image_size}-px views, {grid}x{grid} codes folded {a.fold}x{a.fold} = {(grid // a.fold) ** 2} tokens; "
          f"width {a.width}, {a.layers} layers, {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters, "
          f"lr {a.lr} {a.schedule}, {a.batch} Q/A per step, code embedding {a.code_init}", flush=True)
    if a.code_init == "codebook":
        init_code_embedding_from_pixels(m, demo / "runs/tiny/tokenizer/checkpoints/last.ckpt")
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, a.steps, a.schedule))
    t0, hist = time.time(), []
    for step in range(a.steps):
        b = next(train)
        logits = m(b)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist.append(answer_hits(logits.detach(), b["labels"])[0].float().mean().item())
        if (step + 1) % 100 == 0:
            line = f"step {step + 1} train exact match {sum(hist[-100:]) / 100:.3f}"
            if (step + 1) % a.val_every == 0:
                ok, n, _ = accuracy(m, val)
                line += f"  VAL {ok / n:.3f} (n={n})"
            print(f"{line} ({time.time() - t0:.0f}s)", flush=True)
    present = {item["kind"] for item in load_qa_items(val_urls, 2000)}  # a level asks only some kinds (no text: demo)
    for kind in [k for k in (kinds or QA_KINDS) if k in present]:  # where the plateau is: each kind against its prior
        kind_val = stream(val_urls, 50, 0, [kind])
        batches = [next(kind_val) for _ in range(2)]
        ok, n, answers = accuracy(m, batches)
        print(f"val {kind:9s} {ok / n:.2f}  prior {answers.most_common(1)[0][1] / n:.2f} (n={n})", flush=True)


if __name__ == "__main__":
    main()
