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

Pure inference: the functions take the model (a `SynerGenVL`) as an argument and import no Lightning, checkpoint, eval
or CLI code; `synergen generate` / `synergen answer` are in inference_cli.py.
"""

from __future__ import annotations

import os
import shutil

import torch
from PIL import Image
from torch import Tensor

from synergen_lightning.data.sequences import generation_prompt_ids
from synergen_lightning.data.views import dynamic_tiles, to_uint8_tensor
from synergen_lightning.models.chunked_ce import CHUNK_LOGITS
from synergen_lightning.models.decoding import STOP_CHECK_EVERY, left_pad, left_pad_positions, sample_logits
from synergen_lightning.models.folding import unfold_codes


def _check_compiler(device: torch.device) -> None:
    """`torch.compile` builds C++ kernels on the CPU: say so before its build fails deep inside."""
    if device.type == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, ("g++", "c++", "clang++")))):
        raise RuntimeError("compiled decoding on the CPU needs a C++ compiler (torch.compile builds C++ kernels) and none "
                           "was found (g++, c++, clang++ or $CXX): install one, or decode without --compile / compile=True")


def _check_context(model, prompt_len: int, extra: int, what: str) -> None:
    limit = model.context_limit
    if prompt_len + extra > limit:
        raise ValueError(f"{what}: prompt of {prompt_len} tokens + {extra} to generate = {prompt_len + extra} exceeds the "
                         f"context of {limit} tokens; shorten the prompt (or raise model.max_context if RoPE allows)")


@torch.no_grad()
def generate_codes(model, prompt_ids: list[list[int]], uncond_ids: list[int] | None = None, cfg_scale: float | None = 7.5,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, use_cache: bool = True, compile: bool = False) -> Tensor:
    """Prompt ids (each ending with `<boi>`) -> code grids Long[R, h, w].

    With `cfg_scale` (and `uncond_ids`), the unconditional prompt runs beside every row in the same
    batch. `use_cache=False` recomputes the whole sequence at every patch (the test reference).
    `compile`: the head's patch and the LLM's decode step run as `torch.compile`d graphs (built on the first
    call, seconds to a minute, then reused; on the CPU it needs a C++ compiler): the per-step work of small
    ops, which bounds one-image decoding, goes (RESULTS.md, decoding against its FLOP bound).
    """
    device = model.device
    if compile:
        _check_compiler(device)
    use_cfg = cfg_scale is not None and uncond_ids is not None
    rows = list(prompt_ids) + ([list(uncond_ids)] * len(prompt_ids) if use_cfg else [])
    P, R = model.tokens_per_view, len(prompt_ids)
    _check_context(model, max(map(len, rows)), P + 1, "generate")
    pad_id = int(model.hparams.special_token_ids.get("pad", 0))
    eoi_id = int(model.hparams.special_token_ids["eoi"])
    ids, mask = left_pad(rows, pad_id, device=device)
    pos = left_pad_positions(mask)
    llm, head, folder = model.llm.model, model.head.model, model.folder
    n = ids.shape[0]
    true_col = torch.ones(n, 1, dtype=torch.bool, device=device)
    cache = llm.new_kv_cache(capacity=ids.shape[1] + P + 1) if use_cache else None  # static: written in place
    embeds = model.embed_text(ids)
    hidden = llm(embeds, image_mask=torch.zeros_like(mask), position_ids=pos, attention_mask=mask, kv_cache=cache)
    # in the strides of every later step's h (a [1, D] slice keeps the row stride T*D, which `contiguous` leaves):
    # the compiled head (dynamic=False) is specialised on them and would build its graph twice
    h = hidden[:, -1].clone(memory_format=torch.contiguous_format)
    next_pos = pos[:, -1:] + 1
    seq, seq_img, seq_mask, seq_pos = embeds, torch.zeros_like(mask), mask, pos  # the uncached reference's inputs
    patches = []
    for i in range(P):
        codes = head.generate(h, cfg_scale=cfg_scale if use_cfg else None, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=generator, use_cache=use_cache, compile=compile)  # [R, m*n]
        patches.append(codes)
        fed = folder.fold_patch(torch.cat([codes, codes]) if use_cfg else codes, i)[:, None].to(embeds.dtype)
        if cache is not None:
            h = llm.decode_step(fed, cache, image=True, position_ids=next_pos, compile=compile)  # a real token: no mask
        else:
            seq, seq_img = torch.cat([seq, fed], 1), torch.cat([seq_img, true_col], 1)
            seq_mask, seq_pos = torch.cat([seq_mask, true_col], 1), torch.cat([seq_pos, next_pos], 1)
            h = llm(seq, image_mask=seq_img, position_ids=seq_pos, attention_mask=seq_mask)[:, -1]
        next_pos = next_pos + 1
    if cache is not None:  # close the image: the model is fed <eoi> after the last patch
        llm(model.embed_text(torch.full((n, 1), eoi_id, device=device)), image_mask=~true_col, position_ids=next_pos,
            kv_cache=cache)
    return unfold_codes(torch.stack(patches, dim=1)[:R], model.grid, model.fold_size)


def generation_arg_errors(num: int = 1, batch_size: int = 1, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None, cfg: float = 1.0) -> list[tuple[str, object, str]]:
    """(argument, value, what it must be) for each value no draw can use: a negative temperature or top_p > 1 would
    otherwise act as greedy or as no truncation without a word, and a negative CFG scale steers away from the
    prompt."""
    rules = [("num", num, num >= 1, ">= 1"), ("batch_size", batch_size, batch_size >= 1, ">= 1"),
             ("cfg", cfg, cfg >= 0, ">= 0 (1: off)"),
             ("temperature", temperature, temperature >= 0, ">= 0 (0: greedy)"),
             ("top_k", top_k, top_k is None or top_k >= 1, ">= 1 (or unset: off)"),
             ("top_p", top_p, top_p is None or 0 < top_p <= 1, "in (0, 1] (or unset: off)")]
    return [(name, value, f"must be {rule}") for name, value, ok, rule in rules if not ok]


@torch.no_grad()
def generated_batches(model, prompts: list[str] | str, num: int = 1, cfg_scale: float | None = 7.5,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      seed: int | None = None, batch_size: int = 16, output: str = "pil", use_cache: bool = True,
                      compile: bool = False):
    """`generate_images`, yielded a batch of `batch_size` rows at a time in the same order and with the same draws:
    each batch is decoded to pixels as soon as its codes are drawn, so memory holds one batch of images (Emu3's
    decoder holds 10 GiB of activations per 512-px image: RESULTS.md), and a caller can write and count them as they
    come."""
    errors = generation_arg_errors(num, batch_size, temperature, top_k, top_p, 1.0 if cfg_scale is None else cfg_scale)
    if errors:
        raise ValueError("; ".join(f"{name}={value} {rule}" for name, value, rule in errors))
    if output not in ("pil", "tensor", "codes"):
        raise ValueError(f"output={output!r}: use 'pil', 'tensor' or 'codes'")
    if isinstance(prompts, str):
        prompts = [prompts]
    model.eval()
    tok = model.text_tokenizer
    rows = [generation_prompt_ids(tok, p) for p in prompts for _ in range(num)]
    uncond = generation_prompt_ids(tok, None) if cfg_scale not in (None, 1.0) else None
    generator = torch.Generator(device=model.device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    for i in range(0, len(rows), batch_size):
        codes = generate_codes(model, rows[i:i + batch_size], uncond, cfg_scale, temperature, top_k, top_p, generator,
                               use_cache, compile)
        if output == "codes":
            yield codes
            continue
        images = model.image_tokenizer.decode(codes.to(model.device)).clamp(0, 1).float().cpu()
        if output == "tensor":
            yield images
            continue
        arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        yield [Image.fromarray(a) for a in arr]


def generate_images(model, prompts: list[str] | str, num: int = 1, cfg_scale: float | None = 7.5, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None, batch_size: int = 16,
                    output: str = "pil", use_cache: bool = True, compile: bool = False):
    """Prompts -> `num` images each (prompt-major order): PIL images (`output="pil"`), float [N,3,H,W]
    in [0,1] (`"tensor"`) or code grids (`"codes"`). `cfg_scale=None` or 1 disables guidance; a `None`
    prompt draws from the unconditional (`<UNCOND>`) prompt, the CFG dropout rows of training. `compile`: as
    `generate_codes` (the same codes, faster once the graphs are built). Rows are drawn and decoded `batch_size` at
    a time (`generated_batches`)."""
    batches = list(generated_batches(model, prompts, num, cfg_scale, temperature, top_k, top_p, seed, batch_size,
                                     output, use_cache, compile))
    return [image for batch in batches for image in batch] if output == "pil" else torch.cat(batches)


def understanding_prompt_ids(tok, n_views: int, tokens_per_view: int, question: str, question_first: bool = False
                             ) -> tuple[list[int], list[bool]]:
    """`<s><|im_start|>user\\n<boi>[IMG]<eoi>...\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`, as training builds it
    (`question_first`: `user\\n{question}\\n<boi>[IMG]<eoi>...<|im_end|>`)."""
    ids = [tok.bos_id, tok.im_start_id] + tok.encode("user\n" + (question + "\n" if question_first else ""))
    img = [False] * len(ids)
    for _ in range(n_views):
        ids += [tok.boi_id] + [tok.pad_id] * tokens_per_view + [tok.eoi_id]
        img += [False] + [True] * tokens_per_view + [False]
    tail = ([] if question_first else tok.encode("\n" + question)) + [tok.im_end_id] + tok.encode("\n") \
        + [tok.im_start_id] + tok.encode("assistant\n")
    return ids + tail, img + [False] * len(tail)


def understanding_rows(model, images_per_row: list, questions: list[str], max_tiles: int = 1, thumbnail: bool = False,
                       codes: Tensor | None = None) -> tuple[list[tuple[list[int], list[bool]]], Tensor]:
    """The chat prompts of `questions` (ids, image flags) and the codes of their views, in slot order.

    `images_per_row[i]`: one PIL image, a list of them (their views follow each other) or None / [] (a text-only
    turn, `tok.chat_prompt_ids`). `codes` Long[B, h, w]: pre-encoded views, one per row."""
    tok = model.text_tokenizer
    size = model.grid[0] * model.hparams.downsample
    built, all_codes = [], []
    for i, q in enumerate(questions):
        if codes is not None:
            row_codes = codes[i:i + 1].to(model.device)
        else:
            imgs = images_per_row[i]
            imgs = [] if imgs is None else [imgs] if isinstance(imgs, Image.Image) else list(imgs)
            views = [v for im in imgs for v in dynamic_tiles(im, size, max_tiles=max_tiles, thumbnail=thumbnail)]
            row_codes = model.encode_images(to_uint8_tensor(views)) if views else \
                torch.zeros(0, *model.grid, dtype=torch.long, device=model.device)
        if row_codes.shape[0]:
            built.append(understanding_prompt_ids(tok, row_codes.shape[0], model.tokens_per_view, q,
                                                  question_first=model.question_first))
        else:
            ids = tok.chat_prompt_ids(q)
            built.append((ids, [False] * len(ids)))
        all_codes.append(row_codes)
    return built, torch.cat(all_codes)


def _batch_inputs(model, rows: list[tuple[list[int], list[bool]]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left-padded (ids, attention mask, positions, image mask) of (ids, image flags) rows."""
    ids, mask = left_pad([r[0] for r in rows], model.text_tokenizer.pad_id, device=model.device)
    image_mask, _ = left_pad([r[1] for r in rows], False, dtype=torch.bool, device=model.device)
    return ids, mask, left_pad_positions(mask), image_mask


@torch.no_grad()
def decode_rows(model, rows: list[tuple[list[int], list[bool]]], codes: Tensor, max_new_tokens: int = 32,
                temperature: float = 0.0, generator: torch.Generator | None = None,
                stop_ids: tuple[int, ...] | None = None) -> list[list[int]]:
    """KV-cached decoding after each prompt row (ids, image flags; `codes`: its views in slot order), greedy at
    temperature 0; each row's new ids, cut before its first stop id (default `<|im_end|>`, `</s>`)."""
    tok, device = model.text_tokenizer, model.device
    _check_context(model, max(len(r[0]) for r in rows), max_new_tokens, "answer")
    ids, mask, pos, image_mask = _batch_inputs(model, rows)
    llm = model.llm.model
    cache = llm.new_kv_cache(capacity=ids.shape[1] + max_new_tokens)  # static: no regrowth copy while decoding
    embeds = model.embed_inputs(ids, image_mask, codes)
    hidden = llm(embeds, image_mask=image_mask, position_ids=pos, attention_mask=mask, kv_cache=cache)
    logits = llm.logits(hidden[:, -1])
    next_pos = pos[:, -1:] + 1
    stops = tuple(stop_ids) if stop_ids is not None else (tok.im_end_id, tok.eos_id)
    stop = torch.tensor(stops, device=device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        nxt = sample_logits(logits, temperature=temperature, generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, stops[0]), nxt)
        out.append(nxt)
        done = done | torch.isin(nxt, stop)
        # the one read-back: whether every row has stopped, every STOP_CHECK_EVERY tokens (a GPU runs ahead meanwhile)
        if step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool(done.all()):
            break
        # sampled ids lie in the vocabulary: no range check (a read-back) per token
        x = model.embed_text(nxt[:, None], check=False)
        logits = llm.logits(llm.decode_step(x, cache, image=False, position_ids=next_pos))
        next_pos = next_pos + 1
    rows_out = []
    for row in torch.stack(out, 1).tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        rows_out.append(row[:cut])
    return rows_out


@torch.no_grad()
def score_continuations(model, rows: list[tuple[list[int], list[bool]]], continuations: list[list[int]],
                        codes: Tensor | None = None) -> list[tuple[float, bool]]:
    """Teacher-forced (sum of log-probabilities, every token greedy) of each continuation after its prompt row
    (ids, image flags; `codes`: the views in slot order, None for text only). One forward pass for the batch."""
    if any(not c for c in continuations):
        raise ValueError("score_continuations: an empty continuation has no log-likelihood; pass at least one token")
    # the last token is only a target: the inputs are the prompt and the continuation without its last token
    full = [(r[0] + list(c[:-1]), r[1] + [False] * (len(c) - 1)) for r, c in zip(rows, continuations)]
    _check_context(model, max(len(f[0]) for f in full), 0, "loglikelihood")
    ids, mask, pos, image_mask = _batch_inputs(model, full)
    if codes is None:
        codes = torch.zeros(0, *model.grid, dtype=torch.long, device=model.device)
    embeds = model.embed_inputs(ids, image_mask, codes)
    llm = model.llm.model
    hidden = llm(embeds, image_mask=image_mask, position_ids=pos, attention_mask=mask)
    # left padding: every row ends at the last column, so a continuation's tokens are predicted by its last columns.
    # The [tokens, vocabulary] logits never exist at once (for a long rolling window they outgrow the model itself):
    # the log-likelihood through the chunked cross-entropy, the greedy check chunk by chunk
    rows_per_chunk = max(1, CHUNK_LOGITS // llm.config.vocab_size)
    out = []
    for r, cont in enumerate(continuations):
        h = hidden[r, ids.shape[1] - len(cont):]
        target = torch.tensor(cont, device=h.device)
        logprob = -llm.token_losses(h, target).sum()
        greedy = torch.stack([(llm.logits(h[s:s + rows_per_chunk]).argmax(-1) == target[s:s + rows_per_chunk]).all()
                              for s in range(0, len(cont), rows_per_chunk)]).all()
        out.append((float(logprob), bool(greedy)))
    return out


@torch.no_grad()
def answer(model, images, questions: list[str] | str, max_new_tokens: int = 32, max_tiles: int = 1,
           thumbnail: bool = False, codes: Tensor | None = None) -> list[str]:
    """Answer each question about its image (PIL images, or pre-encoded `codes` Long[B, h, w], one view each)."""
    if isinstance(questions, str):
        questions = [questions]
    if isinstance(images, Image.Image):
        images = [images]
    model.eval()
    rows, all_codes = understanding_rows(model, images if codes is None else [None] * len(questions), questions,
                                         max_tiles=max_tiles, thumbnail=thumbnail, codes=codes)
    tok = model.text_tokenizer
    return [tok.decode(r).strip() for r in decode_rows(model, rows, all_codes, max_new_tokens=max_new_tokens)]
