"""Image generation and answering with a trained SynerGenVL: KV caches in both the LLM and the head.

Generation (per prompt, `num` samples):

    prefill  LLM on `<s>...Generate an image of: {caption}...<boi>`   (+ the `<UNCOND>` prompt for CFG)
    for each of the P folded patches (fixed by the resolution):
        h      = LLM hidden state at the last position
        codes  = UnfoldingHead.generate(h) -- m*n codes, KV-cached, CFG on its logits
        feed   = TokenFolder.fold_patch(codes) -> LLM (one vision token, KV-cached)
    feed <eoi>; codes -> grid -> image tokenizer decode -> PNG

Classifier-free guidance runs the conditional and unconditional streams as one batch (rows
[cond..., uncond...]); both streams receive the same sampled codes. Answering: the image views
(InternVL-1.5 tiles) are encoded, folded into the prompt, and the answer is decoded greedily
(KV-cached) until `<|im_end|>` or `</s>`.

CLI: `synergen generate --ckpt CKPT --prompt TEXT --out DIR`, `synergen answer --ckpt CKPT --image FILE --question TEXT`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from synergen_lightning.models.folding import unfold_codes
from synergen_lightning.models.unfolding_head import sample_logits


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _check_context(model, prompt_len: int, extra: int, what: str) -> None:
    limit = model.hparams.get("max_context") or model.llm.config.max_position_embeddings
    if prompt_len + extra > limit:
        raise ValueError(f"{what}: prompt of {prompt_len} tokens + {extra} to generate = {prompt_len + extra} exceeds the "
                         f"context of {limit} tokens; shorten the prompt (or raise model.max_context if RoPE allows)")


@torch.no_grad()
def generate_codes(model, prompt_ids: list[list[int]], uncond_ids: list[int] | None = None, cfg_scale: float | None = 7.5,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
    """Prompt ids (each ending with `<boi>`) -> code grids Long[R, h, w].

    With `cfg_scale` (and `uncond_ids`), the unconditional prompt runs beside every row in the same
    batch. `use_cache=False` recomputes the whole sequence at every patch (the test reference).
    """
    device = model.device
    use_cfg = cfg_scale is not None and uncond_ids is not None
    rows = list(prompt_ids) + ([list(uncond_ids)] * len(prompt_ids) if use_cfg else [])
    P, R = model.tokens_per_view, len(prompt_ids)
    _check_context(model, max(map(len, rows)), P + 1, "generate")
    pad_id = int(model.hparams.special_token_ids.get("pad", 0))
    eoi_id = int(model.hparams.special_token_ids["eoi"])
    ids, mask, pos = _left_pad(rows, pad_id, device)
    llm, head, folder = model.llm, model.head, model.folder
    n = ids.shape[0]
    true_col = torch.ones(n, 1, dtype=torch.bool, device=device)
    cache = llm.new_kv_cache(capacity=ids.shape[1] + P + 1) if use_cache else None  # static: written in place
    embeds = model.embed_text(ids)
    hidden = llm(embeds, image_mask=torch.zeros_like(mask), position_ids=pos, attention_mask=mask, kv_cache=cache)
    h = hidden[:, -1]
    next_pos = pos[:, -1:] + 1
    seq, seq_img, seq_mask, seq_pos = embeds, torch.zeros_like(mask), mask, pos  # the uncached reference's inputs
    patches = []
    for i in range(P):
        codes = head.generate(h, cfg_scale=cfg_scale if use_cfg else None, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=generator, use_cache=use_cache)  # [R, m*n]
        patches.append(codes)
        fed = folder.fold_patch(torch.cat([codes, codes]) if use_cfg else codes, i)[:, None].to(embeds.dtype)
        if cache is not None:
            h = llm(fed, image_mask=true_col, position_ids=next_pos, kv_cache=cache)[:, -1]  # no mask: real token
        else:
            seq, seq_img = torch.cat([seq, fed], 1), torch.cat([seq_img, true_col], 1)
            seq_mask, seq_pos = torch.cat([seq_mask, true_col], 1), torch.cat([seq_pos, next_pos], 1)
            h = llm(seq, image_mask=seq_img, position_ids=seq_pos, attention_mask=seq_mask)[:, -1]
        next_pos = next_pos + 1
    if cache is not None:  # close the image: the model is fed <eoi> after the last patch
        llm(model.embed_text(torch.full((n, 1), eoi_id, device=device)), image_mask=~true_col, position_ids=next_pos,
            kv_cache=cache)
    return unfold_codes(torch.stack(patches, dim=1)[:R], model.grid, model.fold_size)


@torch.no_grad()
def generate_images(model, prompts: list[str] | str, num: int = 1, cfg_scale: float | None = 7.5, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None, batch_size: int = 16,
                    output: str = "pil", use_cache: bool = True):
    """Prompts -> `num` images each (prompt-major order): PIL images (`output="pil"`), float [N,3,H,W]
    in [0,1] (`"tensor"`) or code grids (`"codes"`). `cfg_scale=None` or 1 disables guidance; a `None`
    prompt draws from the unconditional (`<UNCOND>`) prompt, the CFG dropout rows of training."""
    from synergen_lightning.data.sequences import generation_prompt_ids

    if isinstance(prompts, str):
        prompts = [prompts]
    model.eval()
    tok = model.text_tokenizer
    rows = [generation_prompt_ids(tok, p) for p in prompts for _ in range(num)]
    uncond = generation_prompt_ids(tok, None) if cfg_scale not in (None, 1.0) else None
    generator = torch.Generator(device=model.device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    grids = [generate_codes(model, rows[i:i + batch_size], uncond, cfg_scale, temperature, top_k, top_p, generator,
                            use_cache) for i in range(0, len(rows), batch_size)]
    codes = torch.cat(grids)
    if output == "codes":
        return codes
    images = model.image_tokenizer.decode(codes.to(model.device)).clamp(0, 1).float().cpu()
    if output == "tensor":
        return images
    from PIL import Image

    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def objects_per_image(images) -> float:
    """Mean number of shapes the shape-world scorer accepts per image (each colour blob counts once; blobs rejected
    as no shape are not counted: `score_images` reports those as `rejected_per_image`)."""
    from synergen_lightning.world.scorer import detect_objects

    return sum(len(detect_objects(im)) for im in images) / max(len(images), 1)


@torch.no_grad()
def caption_floor(model, prompts: list[dict], seed: int = 0, temperature: float = 1.0, batch_size: int = 16) -> dict:
    """GenEval of images drawn from the unconditional prompt, scored against `prompts` (same seeds and chunks as
    `geneval_suite`): what the model scores while ignoring every caption. The scorer passes an item when the asked
    shapes are among the detected ones, so clutter alone scores here; a conditional score near this floor means
    the captions do not reach the image."""
    from synergen_lightning.world.scorer import score_images

    images = []
    for k in range(0, len(prompts), batch_size):
        n = len(prompts[k:k + batch_size])
        images += generate_images(model, [None] * n, cfg_scale=None, temperature=temperature, seed=seed + k // batch_size,
                                  batch_size=batch_size)
    report = score_images(images, prompts)
    report["objects_per_image"] = objects_per_image(images)
    return report


def understanding_prompt_ids(tok, n_views: int, tokens_per_view: int, question: str) -> tuple[list[int], list[bool]]:
    """`<s><|im_start|>user\\n<boi>[IMG]<eoi>...\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`, as training builds it."""
    ids = [tok.bos_id, tok.im_start_id] + tok.encode("user\n")
    img = [False] * len(ids)
    for _ in range(n_views):
        ids += [tok.boi_id] + [tok.pad_id] * tokens_per_view + [tok.eoi_id]
        img += [False] + [True] * tokens_per_view + [False]
    tail = tok.encode("\n" + question) + [tok.im_end_id] + tok.encode("\n") + [tok.im_start_id] + tok.encode("assistant\n")
    return ids + tail, img + [False] * len(tail)


@torch.no_grad()
def answer(model, images, questions: list[str] | str, max_new_tokens: int = 32, max_tiles: int = 1,
           thumbnail: bool = False, codes: Tensor | None = None) -> list[str]:
    """Answer each question about its image (PIL images, or pre-encoded `codes` Long[B, h, w], one view each)."""
    from PIL import Image

    from synergen_lightning.data.views import dynamic_tiles, to_uint8_tensor

    if isinstance(questions, str):
        questions = [questions]
    if isinstance(images, Image.Image):
        images = [images]
    model.eval()
    tok, device = model.text_tokenizer, model.device
    size = model.grid[0] * model.hparams.downsample
    views_per_row, all_codes = [], []
    for i in range(len(questions)):
        if codes is not None:
            all_codes.append(codes[i:i + 1].to(device))
        else:
            views = dynamic_tiles(images[i], size, max_tiles=max_tiles, thumbnail=thumbnail)
            all_codes.append(model.encode_images(to_uint8_tensor(views)))
        views_per_row.append(all_codes[-1].shape[0])
    built = [understanding_prompt_ids(tok, v, model.tokens_per_view, q) for v, q in zip(views_per_row, questions)]
    _check_context(model, max(len(ids) for ids, _ in built), max_new_tokens, "answer")
    ids, mask, pos = _left_pad([b[0] for b in built], tok.pad_id, device)
    width = ids.shape[1]
    image_mask = torch.zeros_like(mask)
    for r, (_, img) in enumerate(built):
        image_mask[r, width - len(img):] = torch.tensor(img, dtype=torch.bool)
    llm = model.llm
    cache = llm.new_kv_cache()
    embeds = model.embed_inputs(ids, image_mask, torch.cat(all_codes))
    hidden = llm(embeds, image_mask=image_mask, position_ids=pos, attention_mask=mask, kv_cache=cache)
    logits = llm.logits(hidden[:, -1])
    next_pos = pos[:, -1:] + 1
    stop = torch.tensor([tok.im_end_id, tok.eos_id], device=device)
    b = ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        nxt = sample_logits(logits, temperature=0.0)
        nxt = torch.where(done, torch.full_like(nxt, tok.eos_id), nxt)
        out.append(nxt)
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        hidden = llm(model.embed_text(nxt[:, None]), image_mask=torch.zeros(b, 1, dtype=torch.bool, device=device),
                     position_ids=next_pos, kv_cache=cache)
        logits = llm.logits(hidden[:, -1])
        next_pos = next_pos + 1
    answers = []
    for row in torch.stack(out, 1).tolist():
        cut = next((k for k, t in enumerate(row) if t in (tok.im_end_id, tok.eos_id)), len(row))
        answers.append(tok.decode(row[:cut]).strip())
    return answers


# ---------------------------------------------------------------------------------------- CLI
def _load(ckpt: str, device: str, text_tokenizer: str | None, image_tokenizer: str | None):
    # a .ckpt file (one process, DDP), a sharded FSDP2 directory or an export directory: the one loader reads all
    from synergen_lightning.checkpoint import load_synergen

    if not Path(ckpt).exists():
        raise SystemExit(f"--ckpt {ckpt!r} does not exist: train one with `make sft` (or pass runs/.../last.ckpt)")
    overrides = {k: v for k, v in (("text_tokenizer", text_tokenizer), ("image_tokenizer", image_tokenizer)) if v}
    try:
        return load_synergen(ckpt, map_location=device, **overrides)
    except FileNotFoundError as e:
        raise SystemExit(f"--ckpt: {e}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="SynerGenVL checkpoint (e.g. runs/tiny/sft/last.ckpt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-tokenizer", help="override the text tokenizer directory stored in the checkpoint")
    p.add_argument("--image-tokenizer", help="override the image tokenizer path stored in the checkpoint")


def generate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen generate", description="Generate images from text prompts with a "
                                "SynerGenVL checkpoint (KV-cached LLM + unfolding head, classifier-free guidance).")
    _common(p)
    p.add_argument("--prompt", action="append", required=True, help="caption to draw; repeat for several prompts")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale s in l_u + s (l_c - l_u) (paper: 7.5; 1 = off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy; tiny default: "
                   "below 1 the background codes win every patch and the canvas comes out empty)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest codes (off: truncation drops objects "
                   "on the tiny default, as temperatures below 1 do)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (x2 with CFG)")
    p.add_argument("--out", required=True, help="output directory for PNGs")
    a = p.parse_args(argv)
    if a.num < 1:
        p.error(f"--num {a.num} must be >= 1")
    model = _load(a.ckpt, a.device, a.text_tokenizer, a.image_tokenizer)
    images = generate_images(model, a.prompt, num=a.num, cfg_scale=a.cfg, temperature=a.temperature, top_k=a.top_k,
                             top_p=a.top_p, seed=a.seed, batch_size=a.batch_size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        path = out / f"{k // a.num:03d}_{k % a.num:02d}.png"
        img.save(path)
        print(path)
    return 0


def answer_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen answer", description="Answer a question about an image with a "
                                "SynerGenVL checkpoint (greedy, KV-cached).")
    _common(p)
    p.add_argument("--image", required=True, help="image file (any PIL-readable format)")
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-tiles", type=int, default=1, help="InternVL-1.5 dynamic tiles (paper: 1/6/12 per stage)")
    p.add_argument("--thumbnail", action="store_true", help="append a thumbnail view (stage 2 and SFT)")
    a = p.parse_args(argv)
    from PIL import Image

    try:
        img = Image.open(a.image)
        img.load()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--image {a.image!r} cannot be read ({exc}); pass a PNG/JPEG file")
    model = _load(a.ckpt, a.device, a.text_tokenizer, a.image_tokenizer)
    print(answer(model, [img], [a.question], max_new_tokens=a.max_new_tokens, max_tiles=a.max_tiles,
                 thumbnail=a.thumbnail)[0])
    return 0
