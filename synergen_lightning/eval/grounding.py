"""Does the model use its inputs? Teacher-forced losses with the true input vs a swapped one.

    caption_gain(model, items)    image loss (nats per code) of val images after their true caption, after the
                                  `<UNCOND>` prompt and after a wrong caption (another item's)
    image_gain(model, qa_items)   answer loss (nats per answer token) of val Q/A with the true image vs another
                                  item's image
    grounding_suite(model, ...)   both, from val shard samples (`load_grounding_samples`)

A gain is `loss(swapped input) - loss(true input)`: ~0 means the model ignores that input (its outputs come
from the prior: the caption-free image distribution, the question-only answer distribution); clearly > 0 means
it reads the input. Every sequence is built by the training `SequenceBuilder` (data/sequences.py) and collated by
`data.batch.collate`, and every loss is `SynerGenVL.forward_losses` (the training loss), so the measured format
cannot drift from what the model was trained on. Losses are token-weighted means over all items (each batch's
mean times its count of supervised codes / tokens).

Items are chosen deterministically: the wrong caption of item i is the caption of the next item (i+1, i+2, ...
cyclically) whose caption differs; the wrong image of Q/A item i is the image of the next item whose code grid
differs. Val samples: one Q/A pair per sample (pair i mod the sample's pair count), so the Q/A items see as many
images as the caption items.
"""

from __future__ import annotations

import io
import logging
import time
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from synergen_lightning.data.batch import collate
from synergen_lightning.data.sequences import CODES_EXT, IGNORE, IMAGE_EXTS, SequenceBuilder
from synergen_lightning.data.sources import SkipCounter, SkipSample, finite_samples, load_json
from synergen_lightning.eval.fid import EvalInputError
from synergen_lightning.eval.suites import eval_mode, shard_urls

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- helpers
def _text_tokenizer(model):
    try:
        return model.text_tokenizer
    except (ValueError, OSError) as exc:  # no tokenizer in the checkpoint, or its directory is gone
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvalInputError(f"grounding: the model has no usable text tokenizer ({msg}); pass --text-tokenizer DIR "
                             "(e.g. runs/tiny/text_tokenizer)") from None


def _builder(model, tok, cfg_dropout: float = 0.0, use_codes: bool = True) -> SequenceBuilder:
    """The training sequence builder at the model's view size (cfg_dropout 1.0: always the `<UNCOND>` prompt)."""
    return SequenceBuilder(tok, model.tokens_per_view, image_size=model.grid[0] * int(model.hparams.downsample),
                           max_seq_len=model.context_limit, cfg_dropout=cfg_dropout, use_codes=use_codes,
                           question_first=model.question_first)


def _npy_bytes(codes: Tensor) -> bytes:
    """A code grid as the `KEY.codes.npy` bytes of a pretokenized shard (int32 [n_views, h, w])."""
    arr = codes.detach().cpu().numpy().astype(np.int32)
    buf = io.BytesIO()
    np.save(buf, arr[None] if arr.ndim == 2 else arr)
    return buf.getvalue()


def _check_grid(model, codes: Tensor, what: str) -> Tensor:
    if not isinstance(codes, Tensor):
        codes = torch.as_tensor(np.asarray(codes))
    if codes.ndim not in (2, 3) or tuple(codes.shape[-2:]) != tuple(model.grid):
        raise EvalInputError(f"{what}: code grid {list(codes.shape)} does not match the model's grid {list(model.grid)}; "
                             f"pretokenize the shards at image size {model.grid[0] * int(model.hparams.downsample)} "
                             "or pass images")
    return codes.long()


def _rotation(n: int, differs, what: str) -> list[int]:
    """For each i, the first j = i+1, i+2, ... (cyclic) with differs(i, j)."""
    out = []
    for i in range(n):
        j = next(((i + k) % n for k in range(1, n) if differs(i, (i + k) % n)), None)
        if j is None:
            raise EvalInputError(f"{what}: item {i} has no partner that differs from it among {n} items; "
                                 "pass items with at least two different inputs")
        out.append(j)
    return out


def _weighted_loss(model, samples: list, batch_size: int, loss_key: str, count_key: str) -> tuple[float, int]:
    """(sum of loss x count, count) over batches of built samples, through `forward_losses`."""
    total, count = 0.0, 0
    pad = _text_tokenizer(model).pad_id
    for k in range(0, len(samples), batch_size):
        batch = collate(samples[k:k + batch_size], pad)
        batch = {key: v.to(model.device) if isinstance(v, Tensor) else v for key, v in batch.items()}
        out = model.forward_losses(batch)
        n = int(out[count_key])
        total += float(out[loss_key]) * n
        count += n
    return total, count


# ---------------------------------------------------------------------------------------- caption gain
def caption_gain(model, items: list[tuple[Tensor, str]], batch_size: int = 32) -> dict:
    """Teacher-forced image loss (nats per code) after the true caption, `<UNCOND>`, and a wrong caption.

    items: [(codes Long[h, w], caption)], one generation view each. Returns {true, uncond, wrong, gain_vs_uncond,
    gain_vs_wrong, items}; gains = loss(other prompt) - loss(true caption)."""
    if not items:
        raise EvalInputError("caption_gain: no items; pass val samples with a code grid (or image) and a caption")
    if batch_size < 1:
        raise EvalInputError(f"caption_gain: batch_size {batch_size} must be >= 1")
    tok = _text_tokenizer(model)
    codes = [_check_grid(model, c, "caption_gain") for c, _ in items]
    if any(c.ndim == 3 and c.shape[0] != 1 for c in codes):
        raise EvalInputError("caption_gain: generation items need one view per image, got a multi-view code grid; "
                             "pretokenize with --task generation")
    captions = [str(c).strip() for _, c in items]
    if any(not c for c in captions):
        raise EvalInputError(f"caption_gain: item {captions.index('')} has an empty caption; drop it or give a caption")
    wrong_of = _rotation(len(items), lambda i, j: captions[i] != captions[j], "caption_gain (wrong caption)")
    npy = [_npy_bytes(c) for c in codes]
    cond, uncond = _builder(model, tok, 0.0), _builder(model, tok, 1.0)

    def built(builder, caption_of):
        try:
            return [builder.build({"__key__": f"item{i}", CODES_EXT: npy[i], "txt": caption_of(i).encode()}, "generation")
                    for i in range(len(items))]
        except SkipSample as exc:  # e.g. a caption longer than the model's context
            raise EvalInputError(f"caption_gain: {exc}") from None

    losses = {}
    with eval_mode(model):
        for name, builder, caption_of in (("true", cond, lambda i: captions[i]), ("uncond", uncond, lambda i: captions[i]),
                                          ("wrong", cond, lambda i: captions[wrong_of[i]])):
            total, n = _weighted_loss(model, built(builder, caption_of), batch_size, "loss_image", "image_codes")
            losses[name] = total / max(n, 1)
    return {**losses, "gain_vs_uncond": losses["uncond"] - losses["true"], "gain_vs_wrong": losses["wrong"] - losses["true"],
            "items": len(items)}


# ---------------------------------------------------------------------------------------- image gain
def _qa_fields(item, i: int) -> tuple[str, str, str]:
    if not isinstance(item, dict) or not isinstance(item.get("question"), str) or item.get("answer") is None:
        raise EvalInputError(f"image_gain: item {i} needs a dict with 'question', 'answer' and 'codes' or 'image' "
                             f"(what load_qa_items returns), got {type(item).__name__}")
    answer = str(item["answer"]).strip()
    if not answer:
        raise EvalInputError(f"image_gain: item {i} ({item['question']!r}) has an empty answer; drop it")
    return item["question"], answer, str(item.get("kind", "qa"))


def _item_codes(model, item: dict, max_tiles: int, thumbnail: bool) -> Tensor:
    """The understanding views of an item: its `codes`, or its PIL `image` through the training tile policy."""
    if item.get("codes") is not None:
        c = _check_grid(model, item["codes"], "image_gain")
        return c[None] if c.ndim == 2 else c
    if item.get("image") is None:
        raise EvalInputError("image_gain: an item has neither 'codes' nor 'image'")
    from synergen_lightning.data.views import dynamic_tiles, to_uint8_tensor

    size = model.grid[0] * int(model.hparams.downsample)
    return model.encode_images(to_uint8_tensor(dynamic_tiles(item["image"], size, max_tiles, thumbnail))).cpu()


def image_gain(model, qa_items: list[dict], batch_size: int = 32, max_tiles: int = 1, thumbnail: bool = False) -> dict:
    """Teacher-forced answer loss (nats per answer token) with the true image vs another item's image.

    qa_items: dicts {question, answer, codes Long[(n,) h, w] or image PIL, kind?} (`load_qa_items` gives the PIL
    form; images are tiled as training tiles them: `max_tiles`, `thumbnail`). The answer's closing `<|im_end|></s>`
    (supervised in training) are left out: they do not depend on the image and would dilute the 1-3 answer tokens.
    Returns {true, wrong_image, gain, items, answer_tokens, per_kind: {kind: gain}}."""
    if not qa_items:
        raise EvalInputError("image_gain: no Q/A items; pass val samples whose KEY.json has a 'qa' list")
    if batch_size < 1:
        raise EvalInputError(f"image_gain: batch_size {batch_size} must be >= 1")
    tok = _text_tokenizer(model)
    fields = [_qa_fields(it, i) for i, it in enumerate(qa_items)]
    with eval_mode(model):
        views = [_item_codes(model, it, max_tiles, thumbnail) for it in qa_items]
    wrong_of = _rotation(len(views), lambda i, j: views[i].shape != views[j].shape or not torch.equal(views[i], views[j]),
                         "image_gain (wrong image)")
    npy = [_npy_bytes(v) for v in views]
    builder = _builder(model, tok, 0.0)
    closing = torch.tensor([tok.im_end_id, tok.eos_id])

    def built(i: int, image_of: int):
        raw = {"__key__": f"item{i}", CODES_EXT: npy[image_of],
               "json": {"qa": [{"question": fields[i][0], "answer": fields[i][1]}]}}
        s = builder.build(raw, "understanding", "qa")
        lab = torch.tensor(s.labels)
        s.labels = torch.where(torch.isin(lab, closing), IGNORE, lab).tolist()  # answer tokens only
        return s

    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(fields):
        by_kind[f[2]].append(i)
    sums: dict[str, dict[str, float]] = {name: {} for name in ("true", "wrong_image")}
    counts: dict[str, int] = {}
    with eval_mode(model):
        for kind, idx in sorted(by_kind.items()):  # batches within one kind: per-kind gains at no extra forward
            for name, image_of in (("true", lambda i: i), ("wrong_image", lambda i: wrong_of[i])):
                try:
                    samples = [built(i, image_of(i)) for i in idx]
                except SkipSample as exc:
                    raise EvalInputError(f"image_gain: {exc}") from None
                total, n = _weighted_loss(model, samples, batch_size, "loss_text", "text_tokens")
                sums[name][kind], counts[kind] = total, n
    n_all = sum(counts.values())
    if n_all == 0:
        raise EvalInputError("image_gain: no answer token to score (every answer tokenized to nothing)")
    true = sum(sums["true"].values()) / n_all
    wrong = sum(sums["wrong_image"].values()) / n_all
    per_kind = {k: (sums["wrong_image"][k] - sums["true"][k]) / counts[k] for k in sorted(counts) if counts[k]}
    return {"true": true, "wrong_image": wrong, "gain": wrong - true, "items": len(qa_items), "answer_tokens": n_all,
            "per_kind": per_kind}


# ---------------------------------------------------------------------------------------- val shards
def load_grounding_samples(shards: str | list[str], max_items: int = 64) -> list[dict]:
    """The first `max_items` val shard samples with a caption, a `KEY.json` Q/A list and a code grid
    (`KEY.codes.npy`) or an image, as raw shard dicts (read by the data room's `finite_samples`)."""
    if max_items < 1:
        raise EvalInputError(f"grounding: max_items {max_items} must be >= 1")
    urls = shard_urls(shards, "grounding")
    counter = SkipCounter()
    out = []
    for raw in finite_samples(urls, counter):
        key = raw["__key__"]
        if CODES_EXT not in raw and not any(e in raw for e in IMAGE_EXTS):
            counter.add("missing_image", key)
            continue
        try:
            meta = load_json(raw["json"], key) if "json" in raw else {}
        except SkipSample as exc:
            counter.add(exc.reason, str(exc))
            continue
        # the caption a generation source reads by default (KEY.txt), else the json's `caption`
        caption = (raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else str(meta.get("caption") or "")).strip()
        if not caption:
            counter.add("missing_caption", key)
            continue
        out.append({**raw, "_caption": caption, "_qa": [q for q in meta.get("qa") or []
                                                          if isinstance(q, dict) and isinstance(q.get("question"), str)
                                                          and q.get("answer") is not None]})
        if len(out) >= max_items:
            break
    if not out:
        raise EvalInputError(f"grounding: no sample with a caption and an image (or codes) in {len(urls)} shard(s) "
                             f"{shards!r} (skipped: {dict(counter.counts)})")
    return out


def grounding_items(model, samples: list[dict], max_tiles: int = 1, thumbnail: bool = False
                    ) -> tuple[list[tuple[Tensor, str]], list[dict]]:
    """Raw samples -> (caption items [(codes[h, w], caption)], Q/A items [{question, answer, kind, codes, key}]).

    Views come from the training builder: pretokenized codes when every sample has them (one view serves both
    tasks, as in training), else the images through the generation view / understanding tiles and the model's
    image tokenizer."""
    use_codes = all(CODES_EXT in s for s in samples)
    tok = _text_tokenizer(model)
    hp = model.hparams
    builder = SequenceBuilder(tok, model.tokens_per_view, image_size=model.grid[0] * int(hp.downsample),
                              max_tiles=max_tiles, thumbnail=thumbnail, use_codes=use_codes,
                              question_first=model.question_first)

    def codes_of(raw, task):
        pixels, codes = builder.views(raw, raw["__key__"], task)  # SkipSample: an undecodable image or bad codes
        if codes is None:
            try:
                with torch.no_grad():
                    codes = model.encode_images(pixels).cpu()
            except ValueError as exc:  # no image tokenizer in the checkpoint
                raise EvalInputError(f"grounding: the val shards hold images, not codes, and the model cannot encode "
                                     f"them ({str(exc).splitlines()[0]}); pass --image-tokenizer or pretokenized "
                                     "shards (synergen data pretokenize)") from None
        return codes

    captions, qa, skipped = [], [], SkipCounter()
    for i, raw in enumerate(samples):
        try:
            gen = codes_of(raw, "generation")
            und = gen if use_codes or not raw["_qa"] else codes_of(raw, "understanding")
        except SkipSample as exc:  # skipped and counted, as training skips it
            skipped.add(exc.reason, str(exc))
            continue
        captions.append((gen[0], raw["_caption"]))
        if raw["_qa"]:
            pick = raw["_qa"][i % len(raw["_qa"])]
            qa.append({"question": pick["question"], "answer": str(pick["answer"]), "kind": pick.get("kind", "qa"),
                       "codes": und, "key": raw["__key__"]})
    if skipped.counts:
        log.warning("grounding: skipped %d of %d val samples %s, e.g. %s", sum(skipped.counts.values()), len(samples),
                    dict(skipped.counts), next(iter(skipped.examples.values())))
    if not captions:
        raise EvalInputError(f"grounding: every val sample was skipped ({dict(skipped.counts)}, e.g. "
                             f"{next(iter(skipped.examples.values()))}); fix the val shards")
    return captions, qa


def grounding_suite(model, samples: list[dict] | None = None, shards: str | list[str] | None = None,
                    max_items: int = 64, batch_size: int = 32, max_tiles: int = 1, thumbnail: bool = False,
                    items: tuple[list, list] | None = None) -> dict:
    """caption_gain + image_gain on val shard samples (or prebuilt `items` = (caption items, Q/A items)).

    Returns {caption_gain (vs a wrong caption), caption_gain_vs_uncond, image_gain, caption: {...}, image: {...},
    seconds}."""
    t0 = time.time()
    if items is None:
        if samples is None:
            if shards is None:
                raise EvalInputError("grounding: pass val shards (--val-shards) or samples")
            samples = load_grounding_samples(shards, max_items)
        with eval_mode(model):
            items = grounding_items(model, samples, max_tiles=max_tiles, thumbnail=thumbnail)
    cap_items, qa_items = items
    cap = caption_gain(model, cap_items, batch_size=batch_size)
    img = image_gain(model, qa_items, batch_size=batch_size) if qa_items else None
    return {"caption_gain": cap["gain_vs_wrong"], "caption_gain_vs_uncond": cap["gain_vs_uncond"],
            "image_gain": None if img is None else img["gain"], "caption": cap, "image": img,
            "seconds": time.time() - t0}


def report_block(result: dict) -> dict:
    """The `grounding` block of `synergen eval report` / `synergen demo report` JSON."""
    cap, img = result["caption"], result["image"]
    return {"caption_gain_nats": result["caption_gain"], "caption_gain_vs_uncond_nats": result["caption_gain_vs_uncond"],
            "image_gain_nats": result["image_gain"],
            "caption_loss": {k: cap[k] for k in ("true", "uncond", "wrong")}, "caption_items": cap["items"],
            "answer_loss": None if img is None else {k: img[k] for k in ("true", "wrong_image")},
            "image_gain_per_kind": None if img is None else img["per_kind"],
            "qa_items": 0 if img is None else img["items"], "seconds": result["seconds"]}


def markdown_line(block: dict) -> str:
    img = block["image_gain_nats"]
    return (f"caption gain {block['caption_gain_nats']:+.4f} nats/code vs a wrong caption "
            f"({block['caption_gain_vs_uncond_nats']:+.4f} vs <UNCOND>), image gain "
            + ("n/a" if img is None else f"{img:+.4f} nats/answer token vs a wrong image")
            + f" ({block['caption_items']} images, {block['qa_items']} Q/A); ~0 = the input is ignored")
