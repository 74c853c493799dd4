"""Tiny SynerGenVL models and hand-made batches that follow the batch contract of docs/architecture.md."""

from __future__ import annotations

import torch

from synergen_lightning.system import SynerGenVL

VOCAB = 64
SPECIAL = {"bos": 1, "eos": 2, "pad": 0, "boi": 3, "eoi": 4, "uncond": 5, "im_start": 6, "im_end": 7}
LLM = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
           max_position_embeddings=128)
HEAD = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)


def tiny_model(**kw) -> SynerGenVL:
    args = dict(llm=LLM, special_token_ids=SPECIAL, codebook_size=16, image_size=16, downsample=4, fold=(2, 2),
                code_dim=8, head=HEAD, lr=3e-3, warmup_steps=0)
    args.update(kw)
    return SynerGenVL.from_paths(**args)  # reads only the parts a test leaves to its files


def make_batch(tasks: list[str], P: int = 4, grid=(4, 4), K: int = 16, seed: int = 0) -> dict:
    """Right-padded rows; one view per generation / understanding row."""
    g = torch.Generator().manual_seed(seed)
    rows, views, loss_views = [], [], []
    for task in tasks:
        words = torch.randint(10, VOCAB, (5,), generator=g).tolist()
        if task == "generation":
            toks = [1, 6] + words + [7, 6, 3] + [None] * P + [4, 2]
            sup = [False] * len(toks)
            views.append(torch.randint(0, K, grid, generator=g))
            loss_views.append(True)
        elif task == "understanding":
            ans = torch.randint(10, VOCAB, (3,), generator=g).tolist()
            toks = [1, 6, 3] + [None] * P + [4] + words + [7, 6] + ans + [7, 2]
            sup = [False] * (len(toks) - 5) + [True] * 5
            views.append(torch.randint(0, K, grid, generator=g))
            loss_views.append(False)
        else:
            toks = [1] + words + torch.randint(10, VOCAB, (4,), generator=g).tolist() + [2]
            sup = [False] + [True] * (len(toks) - 1)
        rows.append((toks, sup))
    T = max(len(t) for t, _ in rows)
    B = len(rows)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (toks, sup) in enumerate(rows):
        for t, (tok, s) in enumerate(zip(toks, sup)):
            attention_mask[b, t] = True
            if tok is None:
                image_mask[b, t] = True
            else:
                input_ids[b, t] = tok
                if s:
                    labels[b, t] = tok
    batch = {
        "input_ids": input_ids, "image_mask": image_mask, "attention_mask": attention_mask,
        "position_ids": torch.arange(T).expand(B, T).clone(), "labels": labels, "task": list(tasks),
        "image_codes": torch.stack(views) if views else torch.zeros(0, *grid, dtype=torch.long),
        "image_loss_mask": torch.tensor(loss_views, dtype=torch.bool),
    }
    return batch


class ListLoader(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def loader(batches):
    return torch.utils.data.DataLoader(ListLoader(batches), batch_size=None, collate_fn=lambda b: b)
